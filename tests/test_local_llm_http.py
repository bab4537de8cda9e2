"""LocalLLMAdapter against a real `transformers serve` on the tiny model, as two replicas: the
one server behind two fault proxies, so one replica can be made to fail (5xx, hang, drop, a cut
stream) while tasks still complete on the other, with token counts from the server's `usage`."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from executors.base import ExecutorTask, LocalContext
from executors.llm.adapter import LLMSettings
from executors.llm.errors import EndpointDown
from executors.llm.resilience import BreakerPolicy, RetryPolicy
from executors.local_llm import LocalLLMAdapter, LocalLLMConfig, ReplicaPolicy
from tests.support.fault_proxy import CutStream, Drop, FaultProxy, Hang, Status

pytest_plugins = ["tests.support.llm_fixtures"]

MAX_TOKENS = 8
TTL_S = 600.0                # health answers outlive any test: no probe depends on how long a test takes


@pytest.fixture
def second_proxy(llm_server) -> Iterator[FaultProxy]:
    proxy = FaultProxy(llm_server.root_url).start()
    try:
        yield proxy
    finally:
        proxy.stop()


def make(llm_server, proxies: list[FaultProxy], *, request_timeout_s: float = 60.0) -> LocalLLMAdapter:
    settings = LLMSettings(request_timeout_s=request_timeout_s, health_up_ttl_s=TTL_S, health_down_ttl_s=TTL_S,
                           retry=RetryPolicy(retries_max=2, backoff_base_s=0.05, backoff_max_s=0.2))
    policy = ReplicaPolicy(breaker=BreakerPolicy(failures_to_open=2, open_cooldown_s=TTL_S),
                           health_up_ttl_s=TTL_S, health_down_ttl_s=TTL_S)
    config = LocalLLMConfig(model=llm_server.model, endpoints=tuple(p.base_url for p in proxies),
                            settings=settings, replica=policy)
    return LocalLLMAdapter(config, rng=random.Random(5))


def chat_task(i: int, *, stream: bool = False) -> ExecutorTask:
    return ExecutorTask(f"t{i}", 1, "chat", {"prompt": f"Hello number {i}", "max_tokens": MAX_TOKENS,
                                             "temperature": 0, "stream": stream}, {})


def chats(proxy: FaultProxy) -> list:
    return [r for r in proxy.log if r.path.endswith("/chat/completions")]


def assert_real_usage(result) -> None:
    usage = result.output["usage"]
    assert usage["prompt_tokens"] > 0 and 1 <= usage["completion_tokens"] <= MAX_TOKENS
    assert usage["usage_missing_calls"] == 0
    assert result.metrics["tokens_total"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert result.metrics["cost_usd"] == 0


async def warm_up(adapter: LocalLLMAdapter, proxies: list[FaultProxy]) -> None:
    """One task per replica, so both health checks are cached as up."""
    for i in range(len(proxies)):
        assert_real_usage(await adapter.execute(chat_task(100 + i), LocalContext()))
    assert all(len(chats(p)) == 1 for p in proxies)


async def test_two_replicas_share_the_tasks(llm_server, fault_proxy, second_proxy) -> None:
    proxies = [fault_proxy, second_proxy]
    adapter = make(llm_server, proxies)
    try:
        for i in range(4):
            result = await adapter.execute(chat_task(i), LocalContext())
            assert_real_usage(result)
            assert result.output["model"] and result.output["base_model"] == llm_server.model
            assert [e["outcome"] for e in result.output["replicas"]] == ["ok"]
        assert [len(chats(p)) for p in proxies] == [2, 2]
        for record in chats(fault_proxy) + chats(second_proxy):
            assert record.json()["model"] == llm_server.model and record.json()["max_tokens"] == MAX_TOKENS
        status = await adapter.get_status()
        assert status["usage"]["tasks_total"] == 4 and status["usage"]["tokens_completion_total"] > 0
    finally:
        await adapter.aclose()


async def test_a_replica_answering_5xx_is_failed_over_then_opened(llm_server, fault_proxy, second_proxy) -> None:
    proxies = [fault_proxy, second_proxy]
    adapter = make(llm_server, proxies)
    try:
        await warm_up(adapter, proxies)
        fault_proxy.set_default(Status(500))
        results = [await adapter.execute(chat_task(i), LocalContext()) for i in range(6)]
        for result in results:
            assert_real_usage(result)
            assert result.output["replicas"][-1] == {"replica": second_proxy.base_url, "outcome": "ok"}
        failed = [e for r in results for e in r.output["replicas"] if e["outcome"] == "error"]
        assert len(failed) == 2 and all(e["replica"] == fault_proxy.base_url and e["error"] == "LLM_SERVER_ERROR"
                                        for e in failed)
        assert [r.outcome for r in chats(fault_proxy)[1:]] == ["status 500", "status 500"]   # then it is open
        replicas = (await adapter.get_status())["balancer"]["replicas"]
        assert replicas[0]["breaker"]["state"] == "open" and replicas[1]["breaker"]["state"] == "closed"
    finally:
        await adapter.aclose()


async def test_a_hanging_replica_times_out_and_is_failed_over(llm_server, fault_proxy, second_proxy) -> None:
    proxies = [fault_proxy, second_proxy]
    adapter = make(llm_server, proxies, request_timeout_s=2.0)
    try:
        await warm_up(adapter, proxies)
        fault_proxy.set_default(Hang(max_s=30))
        results = [await adapter.execute(chat_task(i), LocalContext()) for i in range(2)]
        for result in results:
            assert_real_usage(result)
        errors = [e for r in results for e in r.output["replicas"] if e["outcome"] == "error"]
        assert errors and all(e["error"] == "LLM_TIMEOUT" and e["replica"] == fault_proxy.base_url for e in errors)
    finally:
        await adapter.aclose()


async def test_a_dropping_replica_is_marked_down(llm_server, fault_proxy, second_proxy) -> None:
    proxies = [fault_proxy, second_proxy]
    adapter = make(llm_server, proxies)
    try:
        await warm_up(adapter, proxies)
        fault_proxy.set_default(Drop())
        results = [await adapter.execute(chat_task(i), LocalContext()) for i in range(4)]
        for result in results:
            assert_real_usage(result)
        replicas = (await adapter.get_status())["balancer"]["replicas"]
        assert replicas[0]["health"]["down"] is True and replicas[1]["health"]["down"] is False
        # One dropped chat request, one forced health probe (dropped too); then a is skipped.
        assert [r.outcome for r in fault_proxy.log[-2:]] == ["dropped", "dropped"]
        assert len(chats(fault_proxy)) == 2 and len(chats(second_proxy)) == 1 + 4
    finally:
        await adapter.aclose()


async def test_a_cut_stream_is_failed_over(llm_server, fault_proxy, second_proxy) -> None:
    proxies = [fault_proxy, second_proxy]
    adapter = make(llm_server, proxies)
    try:
        await warm_up(adapter, proxies)
        fault_proxy.push(CutStream(after_events=1))
        results = [await adapter.execute(chat_task(i, stream=True), LocalContext()) for i in range(2)]
        for result in results:
            assert_real_usage(result)            # the usage of the streamed answer's last chunk
            assert result.output["finish_reason"]
        cut = [e for r in results for e in r.output["replicas"] if e["outcome"] == "error"]
        assert len(cut) == 1 and cut[0]["error"] == "LLM_CONNECTION_FAILED"
        assert "cut after 1 events" in [r.outcome for r in chats(fault_proxy)]
    finally:
        await adapter.aclose()


async def test_all_replicas_down_fails_fast(llm_server, fault_proxy, second_proxy) -> None:
    proxies = [fault_proxy, second_proxy]
    for proxy in proxies:
        proxy.set_default(Drop())
    adapter = make(llm_server, proxies)
    try:
        for i in range(3):
            with pytest.raises(EndpointDown, match="down"):
                await adapter.execute(chat_task(i), LocalContext())
        # One health probe per replica in all (cached for health_down_ttl_s), no chat request.
        assert [p.requests_seen for p in proxies] == [1, 1]
        assert all(r.path == "/v1/models" for p in proxies for r in p.log)
        status = await adapter.get_status()
        assert status["tasks_failed_total"] == 3 and status["balancer"]["calls_total"] == 0
    finally:
        await adapter.aclose()
