"""LocalLLMAdapter and BalancedChatAPI over in-memory FakeChatAPI replicas and a FakeClock:
least-outstanding balancing with round-robin ties, unhealthy replicas skipped, all down fails
fast, half-open recovery, Retry-After cool-down, model/LoRA resolution, LoRA loading once per
replica, accounting, structured repair, cancellation, configuration errors."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from coordinator.model import ExecutorType
from executors.base import ExecutorAdapter, ExecutorTask, InvalidTaskInput, LocalContext, TaskCancelled
from executors.llm.accounting import ModelPrice, PriceTable
from executors.llm.adapter import LLMSettings
from executors.llm.client import ChatRequest
from executors.llm.errors import (
    ConnectionFailed,
    EndpointDown,
    RateLimited,
    RequestRejected,
    ServerError,
)
from executors.llm.fake import FakeChatAPI, Reply
from executors.llm.resilience import BreakerPolicy, FakeClock
from executors.llm.secrets import Secret
from executors.local_llm import (
    LOCAL_LLM_ENDPOINTS_ENV,
    LOCAL_LLM_LOAD_LORA_ENV,
    LOCAL_LLM_MODEL_ENV,
    REPLICAS_MAX,
    BalancedChatAPI,
    LocalLLMAdapter,
    LocalLLMConfig,
    LoraModule,
    ReplicaPolicy,
    resolve_model,
)

MODEL = "tiny-gpt2"
WAIT_S = 10.0                 # bound of every wait (never asserted as timing)
POLICY = ReplicaPolicy(breaker=BreakerPolicy(failures_to_open=2, open_cooldown_s=10.0), health_down_ttl_s=5.0)


def replicas(n: int = 2) -> list[FakeChatAPI]:
    return [FakeChatAPI(f"http://replica-{chr(ord('a') + i)}/v1") for i in range(n)]


def request(model: str = MODEL) -> ChatRequest:
    return ChatRequest(model, [{"role": "user", "content": "hi"}], {"max_tokens": 4})


def served_by(fakes: list[FakeChatAPI]) -> list[int]:
    return [len(f.requests) for f in fakes]


class FakeLoader:
    def __init__(self, *outcomes: Exception | None) -> None:
        self.loads: list[tuple[str, str, str]] = []
        self.outcomes = list(outcomes)
        self.gate: asyncio.Event | None = None
        self.closed = False

    async def load(self, endpoint: str, name: str, path: str, *, timeout_s: float) -> None:
        self.loads.append((endpoint, name, path))
        if self.gate is not None:
            await self.gate.wait()
        if self.outcomes:
            outcome = self.outcomes.pop(0)
            if outcome is not None:
                raise outcome

    async def aclose(self) -> None:
        self.closed = True


def make(n: int = 2, *, config: LocalLLMConfig | None = None, loader: FakeLoader | None = None,
         settings: LLMSettings | None = None) -> tuple[LocalLLMAdapter, list[FakeChatAPI], FakeClock]:
    fakes = replicas(n)
    clock = FakeClock()
    config = config or LocalLLMConfig(model=MODEL, endpoints=tuple(f.endpoint for f in fakes), replica=POLICY,
                                      settings=settings or LLMSettings())
    adapter = LocalLLMAdapter(config, replicas=fakes, lora_loader=loader, clock=clock, rng=random.Random(3))
    return adapter, fakes, clock


def task(type_: str = "chat", input_: object = None, *, task_id: str = "t1", **metadata: str) -> ExecutorTask:
    return ExecutorTask(task_id, 1, type_, input_ if input_ is not None else {"prompt": "hello", "max_tokens": 4},
                        metadata)


# ------------------------------------------------------------------------------------- balancer


async def test_ties_go_round_robin() -> None:
    fakes = replicas(3)
    pool = BalancedChatAPI(fakes, policy=POLICY, clock=FakeClock())
    for _ in range(6):
        await pool.complete(request(), timeout_s=5)
    assert served_by(fakes) == [2, 2, 2]
    assert [pool.pick(set()).index for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    assert pool.pick({0, 1, 2}) is None


async def test_least_outstanding_requests_wins() -> None:
    fakes = replicas(2)
    pool = BalancedChatAPI(fakes, policy=POLICY, clock=FakeClock())
    release = asyncio.Event()
    started = asyncio.Event()

    async def slow(req):
        started.set()
        await release.wait()
        return Reply("slow")

    fakes[0].script(MODEL, slow)
    fakes[1].script(MODEL, slow)
    first = asyncio.ensure_future(pool.complete(request(), timeout_s=5))
    await asyncio.wait_for(started.wait(), WAIT_S)
    assert [r.outstanding for r in pool.replicas] == [1, 0]
    # Whatever the round-robin position, the idle replica gets the next requests until it is as busy.
    started.clear()
    second = asyncio.ensure_future(pool.complete(request(), timeout_s=5))
    await asyncio.wait_for(started.wait(), WAIT_S)
    assert [r.outstanding for r in pool.replicas] == [1, 1]
    # Replica a gets free; with b still busy, a takes the next two even though b would be next in turn.
    release.set()
    await asyncio.wait_for(asyncio.gather(first, second), WAIT_S)
    release.clear()
    started.clear()
    fakes[0].script(MODEL, slow)
    blocked = asyncio.ensure_future(pool.complete(request(), timeout_s=5))    # its turn by round robin: a
    await asyncio.wait_for(started.wait(), WAIT_S)
    assert [r.outstanding for r in pool.replicas] == [1, 0]
    await asyncio.wait_for(pool.complete(request(), timeout_s=5), WAIT_S)    # b's turn anyway
    await asyncio.wait_for(pool.complete(request(), timeout_s=5), WAIT_S)    # a's turn, but a is busy: b
    assert served_by(fakes) == [2, 3]
    release.set()
    await asyncio.wait_for(blocked, WAIT_S)
    assert [r.outstanding for r in pool.replicas] == [0, 0]


async def test_a_failing_replica_is_retried_on_another() -> None:
    fakes = replicas(2)
    pool = BalancedChatAPI(fakes, policy=POLICY, clock=FakeClock())
    fakes[0].script(MODEL, ServerError("boom", status=503))
    response = await pool.complete(request(), timeout_s=5)
    assert response.text == "ok" and served_by(fakes) == [1, 1]
    assert pool.replicas[0].breaker.failures_consecutive == 1
    assert pool.replicas[0].counts["failures"] == 1 and pool.replicas[1].counts["failures"] == 0


async def test_permanent_errors_are_not_failed_over() -> None:
    fakes = replicas(2)
    pool = BalancedChatAPI(fakes, policy=POLICY, clock=FakeClock())
    fakes[0].script(MODEL, RequestRejected("bad request", status=400))
    with pytest.raises(RequestRejected):
        await pool.complete(request(), timeout_s=5)
    assert served_by(fakes) == [1, 0]
    assert pool.replicas[0].breaker.state == "closed"      # it answered: alive


async def test_unhealthy_replica_is_skipped_without_calls() -> None:
    fakes = replicas(2)
    pool = BalancedChatAPI(fakes, policy=POLICY, clock=FakeClock())
    fakes[0].down = True
    for _ in range(4):
        await pool.complete(request(), timeout_s=5)
    assert served_by(fakes) == [0, 4]
    assert fakes[0].probes_total == 1                     # one probe per health_down_ttl_s, not per call


async def test_connection_failure_marks_the_replica_down() -> None:
    fakes = replicas(2)
    pool = BalancedChatAPI(fakes, policy=POLICY, clock=FakeClock())

    def refused(req):            # the server dies between its health check and this call
        fakes[0].down = True
        return ConnectionFailed("refused")

    fakes[0].script(MODEL, refused)
    for _ in range(3):
        await pool.complete(request(), timeout_s=5)
    assert served_by(fakes) == [1, 3]
    assert pool.replicas[0].health.snapshot()["down"] is True


async def test_all_down_fails_fast_without_hammering() -> None:
    fakes = replicas(2)
    clock = FakeClock()
    pool = BalancedChatAPI(fakes, policy=POLICY, clock=clock)
    for f in fakes:
        f.down = True
    for _ in range(5):
        with pytest.raises(EndpointDown, match="all 2 replicas are unavailable"):
            await pool.complete(request(), timeout_s=5)
    assert served_by(fakes) == [0, 0]
    assert [f.probes_total for f in fakes] == [1, 1]
    assert clock.sleeps == []
    with pytest.raises(ConnectionFailed, match="all 2 replicas are down"):
        await pool.probe(timeout_s=5)


async def test_breaker_opens_then_half_open_probe_recovers() -> None:
    fakes = replicas(2)
    clock = FakeClock()
    pool = BalancedChatAPI(fakes, policy=POLICY, clock=clock)
    a = pool.replicas[0]
    fakes[0].script(MODEL, ServerError("boom", status=500), ServerError("boom", status=500))
    for _ in range(4):
        await pool.complete(request(), timeout_s=5)
    assert a.breaker.state == "open" and served_by(fakes) == [2, 4]
    for _ in range(4):                                   # open: a is skipped, no call reaches it
        await pool.complete(request(), timeout_s=5)
    assert served_by(fakes) == [2, 8] and a.counts["skipped"] >= 2
    clock.advance(POLICY.breaker.open_cooldown_s)
    for _ in range(4):                                   # half-open probe succeeds → closed → shares again
        await pool.complete(request(), timeout_s=5)
    assert a.breaker.state == "closed"
    assert served_by(fakes)[0] == 4


async def test_half_open_probe_failure_reopens() -> None:
    fakes = replicas(2)
    clock = FakeClock()
    pool = BalancedChatAPI(fakes, policy=POLICY, clock=clock)
    fakes[0].script(MODEL, *[ServerError("boom", status=500)] * 3)
    for _ in range(4):
        await pool.complete(request(), timeout_s=5)
    clock.advance(POLICY.breaker.open_cooldown_s)
    for _ in range(2):
        await pool.complete(request(), timeout_s=5)
    assert pool.replicas[0].breaker.state == "open" and pool.replicas[0].breaker.opens_total == 2
    assert served_by(fakes)[0] == 3


async def test_all_breakers_open_fails_fast() -> None:
    fakes = replicas(2)
    pool = BalancedChatAPI(fakes, policy=POLICY, clock=FakeClock())
    for f in fakes:
        f.script(MODEL, *[ServerError("boom", status=500)] * 2)
    for _ in range(2):
        with pytest.raises(ServerError, match="2 of 2 replicas failed"):
            await pool.complete(request(), timeout_s=5)
    with pytest.raises(EndpointDown, match="circuit open"):
        await pool.complete(request(), timeout_s=5)
    assert served_by(fakes) == [2, 2]


async def test_retry_after_keeps_a_replica_out_until_it_passes() -> None:
    fakes = replicas(2)
    clock = FakeClock()
    pool = BalancedChatAPI(fakes, policy=POLICY, clock=clock)
    fakes[0].script(MODEL, RateLimited("slow down", status=429, retry_after_s=5.0))
    for _ in range(3):
        await pool.complete(request(), timeout_s=5)
    assert served_by(fakes) == [1, 3]
    assert pool.replicas[0].breaker.state == "closed"    # a 429 says nothing about health
    clock.advance(5.0)
    for _ in range(2):
        await pool.complete(request(), timeout_s=5)
    assert served_by(fakes)[0] == 2


async def test_every_replica_rate_limited_passes_retry_after_on() -> None:
    fakes = replicas(2)
    pool = BalancedChatAPI(fakes, policy=POLICY, clock=FakeClock())
    fakes[0].script(MODEL, RateLimited("a", status=429, retry_after_s=3.0))
    fakes[1].script(MODEL, RateLimited("b", status=429, retry_after_s=2.0))
    with pytest.raises(RateLimited) as info:
        await pool.complete(request(), timeout_s=5)
    assert info.value.retry_after_s == 2.0
    with pytest.raises(RateLimited, match="asked to wait") as info:
        await pool.complete(request(), timeout_s=5)
    assert 0 < info.value.retry_after_s <= 2.0


async def test_adapter_honours_retry_after_of_the_pool() -> None:
    adapter, fakes, clock = make()
    fakes[0].script(MODEL, RateLimited("a", status=429, retry_after_s=3.0))
    fakes[1].script(MODEL, RateLimited("b", status=429, retry_after_s=4.0))
    result = await adapter.execute(task(), LocalContext())
    assert result.output["text"] == "ok"
    assert clock.sleeps == [4.0]                         # the last replica's Retry-After
    outcomes = [(e["replica"], e["outcome"]) for e in result.output["replicas"]]
    assert outcomes[:2] == [(fakes[0].endpoint, "error"), (fakes[1].endpoint, "error")]
    assert outcomes[-1][1] == "ok"


def test_pool_bounds() -> None:
    with pytest.raises(ValueError, match="REPLICAS_MAX"):
        BalancedChatAPI(replicas(REPLICAS_MAX + 1))
    with pytest.raises(ValueError, match="each endpoint once"):
        BalancedChatAPI([FakeChatAPI("http://x/v1"), FakeChatAPI("http://x/v1")])


# ------------------------------------------------------------------------------------- adapter


async def test_chat_result_accounting_and_template() -> None:
    adapter, fakes, _ = make()
    assert isinstance(adapter, ExecutorAdapter)
    fakes[0].default = Reply("hello there", prompt_tokens=12, completion_tokens=3)
    fakes[1].default = Reply("hello there", prompt_tokens=12, completion_tokens=3)
    result = await adapter.execute(task(), LocalContext())
    out = result.output
    assert out["text"] == "hello there" and out["model_id"] == MODEL and out["base_model"] == MODEL
    assert out["lora"] is None and out["template"] == {"id": "chat", "version": 1}
    assert out["usage"]["prompt_tokens"] == 12 and out["usage"]["completion_tokens"] == 3
    assert out["cost_usd"] == 0 and result.metrics["cost_usd"] == 0
    assert result.metrics["tokens_total"] == 15
    assert [e["outcome"] for e in out["replicas"]] == ["ok"]
    status = await adapter.get_status()
    assert status["executor_type"] == "local_llm" and status["usage"]["unpriced_calls_total"] == 0
    assert len(status["balancer"]["replicas"]) == 2


async def test_cost_is_configurable() -> None:
    fakes = replicas(1)
    config = LocalLLMConfig(model=MODEL, endpoints=(fakes[0].endpoint,),
                            prices=PriceTable({MODEL: ModelPrice(1.0, 2.0)}))
    adapter = LocalLLMAdapter(config, replicas=fakes, clock=FakeClock())
    fakes[0].default = Reply("x", prompt_tokens=1_000, completion_tokens=500)
    result = await adapter.execute(task(), LocalContext())
    assert result.metrics["cost_usd"] == pytest.approx((1_000 * 1.0 + 500 * 2.0) / 1e6)
    assert adapter.performance_profile()["cost_per_task"] == pytest.approx(0.002)


def test_capabilities() -> None:
    adapter, _, _ = make()
    caps = adapter.get_capabilities()
    assert sorted(caps.supported_task_types) == ["chat", "structured"]
    assert caps.input_schema["chat"]["properties"]["max_tokens"]["maximum"] == LLMSettings().max_tokens_max
    assert "lora" in caps.output_schema["chat"]["required"]
    assert caps.performance_profile["cost_per_task"] == 0.0
    assert caps.performance_profile["replicas_total"] == 2
    assert adapter.executor_type is ExecutorType.LOCAL_LLM


async def test_structured_with_repair() -> None:
    adapter, fakes, _ = make(1)
    schema = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}
    fakes[0].script(MODEL, Reply("not json"), Reply('{"n": 3}'))
    result = await adapter.execute(task("structured", {"instruction": "count", "schema": schema}), LocalContext())
    assert result.output["value"] == {"n": 3} and result.output["repairs"] == 1
    assert [e["outcome"] for e in result.output["replicas"]] == ["ok", "ok"]


async def test_model_and_lora_from_metadata() -> None:
    fakes = replicas(1)
    config = LocalLLMConfig(model=MODEL, endpoints=(fakes[0].endpoint,), models=frozenset({"other"}),
                            loras={"sql": LoraModule(), "chem": LoraModule(base_model="other")})
    adapter = LocalLLMAdapter(config, replicas=fakes, clock=FakeClock())
    out = (await adapter.execute(task(model="other"), LocalContext())).output
    assert (out["model_id"], out["base_model"], out["lora"]) == ("other", "other", None)
    out = (await adapter.execute(task(lora="sql"), LocalContext())).output
    assert (out["model_id"], out["base_model"], out["lora"]) == ("sql", MODEL, "sql")
    assert [r.model for r in fakes[0].requests] == ["other", "sql"]
    assert resolve_model(task(lora="chem"), config) == ("other", "chem")
    with pytest.raises(InvalidTaskInput, match="metadata.model.*'gpt-5'"):
        await adapter.execute(task(model="gpt-5"), LocalContext())
    with pytest.raises(InvalidTaskInput, match="metadata.lora.*\\['chem', 'sql'\\]"):
        await adapter.execute(task(lora="nope"), LocalContext())
    with pytest.raises(InvalidTaskInput, match="adapter of 'other'"):
        resolve_model(task(model=MODEL, lora="chem"), config)
    assert len(fakes[0].requests) == 2


async def test_resolver_is_the_seam() -> None:
    fakes = replicas(1)
    config = LocalLLMConfig(model=MODEL, endpoints=(fakes[0].endpoint,))
    adapter = LocalLLMAdapter(config, replicas=fakes, clock=FakeClock(),
                              resolver=lambda t: ("registry-model", "registry-lora"))
    out = (await adapter.execute(task(), LocalContext())).output
    assert out["model_id"] == "registry-lora" and out["base_model"] == "registry-model"


# ------------------------------------------------------------------------------------------ LoRA


def lora_config(fakes: list[FakeChatAPI], **kw) -> LocalLLMConfig:
    return LocalLLMConfig(model=MODEL, endpoints=tuple(f.endpoint for f in fakes), replica=POLICY,
                          loras={"sql": LoraModule("/adapters/sql"), "pre": LoraModule()}, load_lora=True, **kw)


async def test_lora_loaded_once_per_replica() -> None:
    fakes = replicas(2)
    loader = FakeLoader()
    adapter = LocalLLMAdapter(lora_config(fakes), replicas=fakes, lora_loader=loader, clock=FakeClock())
    for i in range(6):
        await adapter.execute(task(lora="sql", task_id=f"t{i}"), LocalContext())
    assert sorted(loader.loads) == [(f.endpoint, "sql", "/adapters/sql") for f in fakes]
    await adapter.execute(task(lora="pre"), LocalContext())            # preloaded: never loaded by us
    await adapter.execute(task(), LocalContext())
    assert len(loader.loads) == 2
    status = await adapter.get_status()
    assert [r["loras_loaded"] for r in status["balancer"]["replicas"]] == [["sql"], ["sql"]]
    await adapter.aclose()
    assert loader.closed


async def test_concurrent_tasks_load_a_lora_once() -> None:
    fakes = replicas(1)
    loader = FakeLoader()
    loader.gate = asyncio.Event()
    adapter = LocalLLMAdapter(lora_config(fakes), replicas=fakes, lora_loader=loader, clock=FakeClock())
    runs = [asyncio.ensure_future(adapter.execute(task(lora="sql", task_id=f"t{i}"), LocalContext()))
            for i in range(3)]
    for _ in range(50):
        await asyncio.sleep(0)
    loader.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*runs), WAIT_S)
    assert len(loader.loads) == 1 and all(r.output["lora"] == "sql" for r in results)


async def test_lora_load_failure_fails_over_or_is_permanent() -> None:
    fakes = replicas(2)
    loader = FakeLoader(ServerError("load boom", status=503))
    adapter = LocalLLMAdapter(lora_config(fakes), replicas=fakes, lora_loader=loader, clock=FakeClock())
    out = (await adapter.execute(task(lora="sql"), LocalContext())).output
    assert [e["outcome"] for e in out["replicas"]] == ["error", "ok"]
    assert sum(len(f.requests) for f in fakes) == 1

    fakes = replicas(1)
    loader = FakeLoader(RequestRejected("HTTP 404: VLLM_ALLOW_RUNTIME_LORA_UPDATING", status=404))
    adapter = LocalLLMAdapter(lora_config(fakes), replicas=fakes, lora_loader=loader, clock=FakeClock())
    with pytest.raises(RequestRejected, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
        await adapter.execute(task(lora="sql"), LocalContext())
    assert fakes[0].requests == []


# --------------------------------------------------------------------------------- cancellation


async def test_cancel_stops_the_call_and_frees_the_replica() -> None:
    adapter, fakes, _ = make()
    started = asyncio.Event()

    async def hang(req):
        started.set()
        await asyncio.Event().wait()

    fakes[0].script(MODEL, hang)
    fakes[1].script(MODEL, hang)
    running = asyncio.ensure_future(adapter.execute(task(task_id="x"), LocalContext()))
    await asyncio.wait_for(started.wait(), WAIT_S)
    await adapter.cancel("x")
    with pytest.raises(TaskCancelled):
        await asyncio.wait_for(running, WAIT_S)
    pool = adapter.balanced
    assert [r.outstanding for r in pool.replicas] == [0, 0]
    assert all(r.breaker.state == "closed" for r in pool.replicas)


# -------------------------------------------------------------------------------- configuration


def test_config_from_env() -> None:
    config = LocalLLMConfig.from_env({
        LOCAL_LLM_ENDPOINTS_ENV: "http://127.0.0.1:8000/v1, http://127.0.0.1:8001/v1/",
        LOCAL_LLM_MODEL_ENV: "qwen", "LOCAL_LLM_API_KEY": "k-PLANTED-1234", "LOCAL_LLM_MODELS": "a,b",
        "LOCAL_LLM_LORAS": "sql=/adapters/sql,pre", LOCAL_LLM_LOAD_LORA_ENV: "true",
        "LOCAL_LLM_REQUEST_TIMEOUT_S": "7.5"})
    assert config.endpoints == ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8001/v1")
    assert config.model == "qwen" and config.models_allowed == {"qwen", "a", "b"}
    assert config.loras == {"sql": LoraModule("/adapters/sql"), "pre": LoraModule()}
    assert config.load_lora and config.settings.request_timeout_s == 7.5
    assert config.api_key == Secret("k-PLANTED-1234") and "PLANTED" not in repr(config)
    default = LocalLLMConfig.from_env({LOCAL_LLM_MODEL_ENV: "m"})
    assert default.endpoints == ("http://127.0.0.1:8000/v1",) and default.api_key is None


@pytest.mark.parametrize(("env", "match"), [
    ({}, "LOCAL_LLM_MODEL is not set"),
    ({LOCAL_LLM_MODEL_ENV: "has space"}, "LOCAL_LLM_MODEL: .*no spaces"),
    ({LOCAL_LLM_MODEL_ENV: "m", LOCAL_LLM_ENDPOINTS_ENV: ",".join(f"http://h{i}/v1" for i in range(17))},
     "LOCAL_LLM_ENDPOINTS: 1..16 endpoints \\(REPLICAS_MAX\\), got 17"),
    ({LOCAL_LLM_MODEL_ENV: "m", LOCAL_LLM_ENDPOINTS_ENV: "localhost:8000"}, "LOCAL_LLM_ENDPOINTS: .*http"),
    ({LOCAL_LLM_MODEL_ENV: "m", LOCAL_LLM_ENDPOINTS_ENV: "http://a/v1,http://a/v1"}, "LOCAL_LLM_ENDPOINTS: each"),
    ({LOCAL_LLM_MODEL_ENV: "m", LOCAL_LLM_ENDPOINTS_ENV: ","}, "LOCAL_LLM_ENDPOINTS"),
    ({LOCAL_LLM_MODEL_ENV: "m", LOCAL_LLM_LOAD_LORA_ENV: "maybe"}, "LOCAL_LLM_LOAD_LORA: one of"),
    ({LOCAL_LLM_MODEL_ENV: "m", LOCAL_LLM_LOAD_LORA_ENV: "1"}, "LOCAL_LLM_LOAD_LORA.*LOCAL_LLM_LORAS"),
    ({LOCAL_LLM_MODEL_ENV: "m", "LOCAL_LLM_LORAS": "a=x,a=y"}, "LOCAL_LLM_LORAS: 'a' named twice"),
    ({LOCAL_LLM_MODEL_ENV: "m", "LOCAL_LLM_REQUEST_TIMEOUT_S": "0"}, "LOCAL_LLM_REQUEST_TIMEOUT_S: seconds"),
])
def test_bad_env_names_the_variable(env, match) -> None:
    with pytest.raises(ValueError, match=match):
        LocalLLMConfig.from_env(env)


def test_key_never_shown() -> None:
    key = "sk-local-PLANTED-9999"
    adapter = LocalLLMAdapter(env={LOCAL_LLM_MODEL_ENV: "m", "LOCAL_LLM_API_KEY": key})
    assert key not in repr(adapter) and key not in repr(vars(adapter)) and key not in repr(adapter.balanced)
    assert key not in json.dumps(adapter.get_capabilities().model_dump())


async def test_key_masked_in_errors() -> None:
    key = "sk-local-PLANTED-9999"
    fakes = replicas(1)
    config = LocalLLMConfig(model=MODEL, endpoints=(fakes[0].endpoint,), api_key=Secret(key))
    adapter = LocalLLMAdapter(config, replicas=fakes, clock=FakeClock())
    fakes[0].script(MODEL, RequestRejected(f"HTTP 401: bad key {key}", status=401))
    with pytest.raises(RequestRejected) as info:
        await adapter.execute(task(), LocalContext())
    assert key not in str(info.value) and key not in info.value.message
    assert key not in json.dumps(await adapter.get_status(), default=str)
