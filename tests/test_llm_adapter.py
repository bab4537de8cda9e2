"""CloudRuAdapter over the in-memory FakeChatAPI: fallback, pinned tiers, health, repair,
cache, accounting, cancellation and secret masking. Time is a FakeClock: no real backoff."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import traceback

import pytest

from coordinator.model import ExecutorType
from executors.base import ExecutorAdapter, ExecutorTask, InvalidTaskInput, LocalContext, TaskCancelled
from executors.cloudru import (
    CLOUDRU_API_KEY_ENV,
    CLOUDRU_BASE_URL_DEFAULT,
    CloudRuAdapter,
    CloudRuConfig,
    CloudRuModels,
    preset_tiers,
)
from executors.llm.adapter import LLMSettings
from executors.llm.cache import CacheLimits
from executors.llm.errors import (
    EndpointDown,
    MissingApiKey,
    OutputInvalid,
    RateLimited,
    RequestRejected,
    ServerError,
    TiersExhausted,
)
from executors.llm.fake import FakeChatAPI, Reply
from executors.llm.resilience import BreakerPolicy, FakeClock, RetryPolicy

BIG, MIDDLE, SMALL = "zai-org/GLM-4.7", "zai-org/GLM-4.7-FlashX", "zai-org/GLM-4.7-Flash"
KEY = "sk-cloudru-PLANTED-secret-4242"


def make(preset: str = "glm47", *, settings: LLMSettings | None = None, cache: CacheLimits | None = None,
         api: FakeChatAPI | None = None, clock: FakeClock | None = None) -> tuple[CloudRuAdapter, FakeChatAPI, FakeClock]:
    api = api or FakeChatAPI("https://fm.example/v1")
    clock = clock or FakeClock()
    config = CloudRuConfig(preset=preset, settings=settings or LLMSettings(), cache=cache)
    adapter = CloudRuAdapter(config, api=api, api_key=KEY, env={}, clock=clock, rng=random.Random(7))
    return adapter, api, clock


def task(type_: str = "chat", input_: object = None, *, tier: str | None = None, task_id: str = "t1") -> ExecutorTask:
    metadata = {"tier": tier} if tier else {}
    return ExecutorTask(task_id, 1, type_, input_ if input_ is not None else {"prompt": "hello"}, metadata)


# ------------------------------------------------------------------------------- configuration


def test_presets_map_tiers_to_models() -> None:
    assert preset_tiers("glm47") == {"big": BIG, "middle": MIDDLE, "small": SMALL}
    assert preset_tiers("flash") == {"big": SMALL, "middle": SMALL, "small": SMALL}
    assert preset_tiers("qwen")["big"] == "Qwen/Qwen3-Coder-480B-A35B-Instruct"
    assert preset_tiers("glm47", CloudRuModels(glm47="x/custom"), {"small": "y/other"}) == {
        "big": "x/custom", "middle": MIDDLE, "small": "y/other"}
    with pytest.raises(ValueError, match="preset"):
        preset_tiers("gpt")


def test_config_from_env() -> None:
    config = CloudRuConfig.from_env({"CLOUDRU_PRESET": "qwen", "CLOUDRU_MODEL_SMALL": "m/s",
                                     "CLOUDRU_BASE_URL": "http://127.0.0.1:9/v1"})
    assert config.preset == "qwen" and config.tiers["small"] == "m/s" and config.base_url == "http://127.0.0.1:9/v1"
    assert CloudRuConfig().base_url == CLOUDRU_BASE_URL_DEFAULT


def test_missing_key_names_the_variable() -> None:
    with pytest.raises(MissingApiKey, match=CLOUDRU_API_KEY_ENV):
        CloudRuAdapter(CloudRuConfig(), env={})
    adapter = CloudRuAdapter(CloudRuConfig(), env={CLOUDRU_API_KEY_ENV: KEY})
    assert KEY not in repr(adapter) and KEY not in repr(adapter.api) and KEY not in repr(vars(adapter))


def test_capabilities_and_protocol() -> None:
    adapter, _, _ = make()
    assert isinstance(adapter, ExecutorAdapter) and adapter.executor_type == ExecutorType.CLOUDRU
    caps = adapter.get_capabilities()
    assert caps.supported_task_types == ["chat", "structured"]
    assert set(caps.input_schema) == set(caps.output_schema) == {"chat", "structured"}
    profile = caps.performance_profile
    assert profile["cost_per_task"] > 0 and profile["cost_usd_per_1m_tokens"]["small"]["input_usd_per_1m_tokens"] == 0
    json.dumps(profile)


# ----------------------------------------------------------------------------------------- chat


async def test_chat_answers_with_template_usage_cost_and_model_versions() -> None:
    adapter, api, _ = make()
    api.script(BIG, Reply("hi there", prompt_tokens=1_000, completion_tokens=500, model="glm-4.7-2026-01"))
    result = await adapter.execute(task(input_={"prompt": "hello", "system": "short", "temperature": 0}),
                                   LocalContext())
    out = result.output
    assert out["text"] == "hi there" and out["tier"] == "big" and out["model_id"] == BIG
    assert out["template"] == {"id": "chat", "version": 1}
    assert out["model_versions"] == {BIG: "glm-4.7-2026-01"}
    expected_cost = (1_000 * 0.60 + 500 * 2.20) / 1e6
    assert out["cost_usd"] == pytest.approx(expected_cost)
    assert result.metrics["tokens_prompt_total"] == 1_000 and result.metrics["tokens_completion_total"] == 500
    assert result.metrics["cost_usd"] == pytest.approx(expected_cost)
    assert api.requests[0].messages[0] == {"role": "system", "content": "short"}
    assert api.requests[0].parameters == {"temperature": 0.0, "max_tokens": 2048}
    status = await adapter.get_status()
    assert status["usage"]["tasks_total"] == 1 and status["usage"]["cost_usd_total"] == pytest.approx(expected_cost)
    assert adapter.get_capabilities().performance_profile["cost_per_task_basis"] == "measured"


async def test_bad_input_and_metadata_name_the_field() -> None:
    adapter, _, _ = make()
    for input_, field in (({"prompt": "x", "colour": 1}, "input.colour"),
                          ({"prompt": "x", "max_tokens": 10**9}, "input.max_tokens"),
                          ({"prompt": "x", "temperature": 5}, "input.temperature"),
                          ({}, "input")):
        with pytest.raises(InvalidTaskInput) as info:
            await adapter.execute(task(input_=input_), LocalContext())
        assert info.value.field == field
    with pytest.raises(InvalidTaskInput) as info:
        await adapter.execute(task(tier="huge"), LocalContext())
    assert info.value.field == "metadata.tier"


# ------------------------------------------------------------------------------------- fallback


async def test_fallback_big_to_middle_to_small_is_recorded() -> None:
    adapter, api, clock = make(settings=LLMSettings(retry=RetryPolicy(retries_max=1)))
    api.script(BIG, ServerError("big 503", status=503), ServerError("big 503 again", status=503))
    api.script(MIDDLE, RateLimited("slow", status=429, retry_after_s=3), RateLimited("slow", status=429))
    api.script(SMALL, Reply("from small"))
    result = await adapter.execute(task(), LocalContext())
    out = result.output
    assert out["tier"] == "small" and out["text"] == "from small"
    tries = [(t["tier"], t["outcome"]) for t in out["tries"]]
    assert tries == [("big", "error"), ("big", "error"), ("big", "fallback"),
                     ("middle", "error"), ("middle", "error"), ("middle", "fallback"), ("small", "ok")]
    assert out["tries"][0]["status"] == 503 and out["tries"][3]["retry_in_s"] == 3
    assert result.metrics["fallbacks_total"] == 2 and result.metrics["retries_total"] == 2
    assert clock.sleeps[1] == 3                              # Retry-After of the 429
    assert [r.model for r in api.requests] == [BIG, BIG, MIDDLE, MIDDLE, SMALL]


async def test_open_circuit_falls_back_without_calling() -> None:
    adapter, api, _ = make(settings=LLMSettings(retry=RetryPolicy(retries_max=0),
                                                breaker=BreakerPolicy(failures_to_open=1, open_cooldown_s=60)))
    api.script(BIG, ServerError("down", status=500))
    assert (await adapter.execute(task(task_id="a"), LocalContext())).output["tier"] == "middle"
    result = await adapter.execute(task(task_id="b"), LocalContext())
    assert result.output["tier"] == "middle"
    assert result.output["tries"][0]["error"] == "LLM_CIRCUIT_OPEN"
    assert len(api.requests_for(BIG)) == 1                   # the second task never called big


async def test_pinned_tier_is_respected_with_no_fallback() -> None:
    adapter, api, _ = make(settings=LLMSettings(retry=RetryPolicy(retries_max=0)))
    api.script(MIDDLE, ServerError("middle down", status=502))
    with pytest.raises(ServerError, match="middle down"):
        await adapter.execute(task(tier="middle"), LocalContext())
    assert [r.model for r in api.requests] == [MIDDLE]
    api.script(MIDDLE, Reply("pinned"))
    out = (await adapter.execute(task(tier="middle"), LocalContext())).output
    assert out["tier"] == "middle" and [r.model for r in api.requests] == [MIDDLE, MIDDLE]


async def test_every_tier_failing_raises_tiers_exhausted_and_skips_same_model() -> None:
    adapter, api, _ = make("flash", settings=LLMSettings(retry=RetryPolicy(retries_max=0)))
    api.script(SMALL, ServerError("flash down", status=504))
    with pytest.raises(TiersExhausted) as info:
        await adapter.execute(task(), LocalContext())
    assert info.value.retryable and "flash down" in info.value.message
    assert [t["outcome"] for t in info.value.tries] == ["error", "failed", "skipped", "skipped"]
    assert len(api.requests) == 1


async def test_permanent_errors_do_not_fall_back() -> None:
    adapter, api, _ = make()
    api.script(BIG, RequestRejected("HTTP 400: bad", status=400))
    with pytest.raises(RequestRejected):
        await adapter.execute(task(), LocalContext())
    assert len(api.requests) == 1


async def test_endpoint_down_fails_fast_without_calls_or_fallback() -> None:
    adapter, api, clock = make()
    api.down = True
    for task_id in ("a", "b", "c"):
        with pytest.raises(EndpointDown, match="is down"):
            await adapter.execute(task(task_id=task_id), LocalContext())
    assert api.requests == [] and api.probes_total == 1 and clock.sleeps == []
    api.down = False
    clock.advance(adapter.settings.health_down_ttl_s)
    assert (await adapter.execute(task(task_id="d"), LocalContext())).output["tier"] == "big"


# ----------------------------------------------------------------------------------- structured


STRUCT = {"instruction": "count the words", "data": {"text": "a b c"},
          "schema": {"type": "object", "properties": {"words": {"type": "integer"}}, "required": ["words"]}}


async def test_structured_output_is_validated_and_repaired_on_the_same_tier() -> None:
    adapter, api, _ = make()
    api.script(BIG, Reply('{"words": "three"}', 100, 10), Reply('```json\n{"words": 3}\n```', 150, 10))
    result = await adapter.execute(task("structured", STRUCT), LocalContext())
    out = result.output
    assert out["value"] == {"words": 3} and out["repairs"] == 1 and out["tier"] == "big"
    assert out["template"] == {"id": "structured", "version": 1}
    assert out["repair_template"] == {"id": "repair", "version": 1}
    assert result.metrics["tokens_prompt_total"] == 250 and result.metrics["llm_calls_total"] == 2
    assert "$.words" in api.requests[1].messages[-1]["content"]


async def test_structured_fails_with_the_validation_error_after_bounded_repairs() -> None:
    adapter, api, _ = make(settings=LLMSettings(repair_attempts_max=2))
    api.default = Reply('{"words": []}')
    with pytest.raises(OutputInvalid) as info:
        await adapter.execute(task("structured", STRUCT), LocalContext())
    assert info.value.path == "$.words" and not info.value.retryable
    assert len(api.requests) == 3                            # the answer + 2 repair prompts
    assert (await adapter.get_status())["usage"]["tokens_prompt_total"] == 30   # failed tasks are accounted


async def test_structured_rejects_an_invalid_schema() -> None:
    adapter, api, _ = make()
    with pytest.raises(InvalidTaskInput) as info:
        await adapter.execute(task("structured", {**STRUCT, "schema": {"type": 12}}), LocalContext())
    assert info.value.field.startswith("input.schema") and api.requests == []


# ---------------------------------------------------------------------------------------- cache


async def test_cache_is_off_by_default_and_hits_when_on() -> None:
    adapter, api, _ = make()
    for task_id in ("a", "b"):
        await adapter.execute(task(task_id=task_id), LocalContext())
    assert len(api.requests) == 2 and adapter.cache is None

    adapter, api, clock = make(cache=CacheLimits(ttl_s=60))
    first = await adapter.execute(task(task_id="a", input_={"prompt": "p", "temperature": 0}), LocalContext())
    second = await adapter.execute(task(task_id="b", input_={"prompt": "p", "temperature": 0}), LocalContext())
    assert len(api.requests) == 1
    assert second.output["cached"] and not first.output["cached"] and second.output["text"] == first.output["text"]
    assert second.metrics["cost_usd"] == 0 and second.metrics["cache_hits_total"] == 1
    await adapter.execute(task(task_id="c", input_={"prompt": "other", "temperature": 0}), LocalContext())
    clock.advance(60)
    await adapter.execute(task(task_id="d", input_={"prompt": "p", "temperature": 0}), LocalContext())
    assert len(api.requests) == 3


# --------------------------------------------------------------------------------- cancellation


async def test_cancel_and_ctx_cancelled_stop_a_hanging_call() -> None:
    adapter, api, _ = make()
    started = asyncio.Event()

    async def hang(request):
        started.set()
        await asyncio.Event().wait()

    api.script(BIG, hang, hang)
    running = asyncio.ensure_future(adapter.execute(task(task_id="x"), LocalContext()))
    await asyncio.wait_for(started.wait(), 10)
    await adapter.cancel("x")
    with pytest.raises(TaskCancelled):
        await asyncio.wait_for(running, 10)

    started.clear()
    ctx = LocalContext()
    running = asyncio.ensure_future(adapter.execute(task(task_id="y"), ctx))
    await asyncio.wait_for(started.wait(), 10)
    ctx.cancel()
    with pytest.raises(TaskCancelled):
        await asyncio.wait_for(running, 10)
    status = await adapter.get_status()
    assert status["tasks_cancelled_total"] == 2 and status["running_total"] == 0


# -------------------------------------------------------------------------------------- secrets


async def test_key_never_appears_in_errors_results_status_or_logs(caplog) -> None:
    caplog.set_level(logging.DEBUG)
    adapter, api, _ = make(settings=LLMSettings(retry=RetryPolicy(retries_max=0)))
    api.script(BIG, Reply(f"echo {KEY}"))       # even a model that repeats the key does not leak it... in errors
    api.script(MIDDLE, RequestRejected(f"HTTP 401: invalid api key {KEY}", status=401))
    result = await adapter.execute(task(task_id="a"), LocalContext())
    with pytest.raises(RequestRejected) as info:
        await adapter.execute(task(task_id="b", tier="middle"), LocalContext())
    rendered = "".join(traceback.format_exception(info.value))
    assert KEY not in rendered and "***" in rendered
    assert KEY not in json.dumps(await adapter.get_status())
    assert KEY not in json.dumps(result.metrics)
    assert KEY not in json.dumps({k: v for k, v in result.output.items() if k != "text"})
    assert KEY not in caplog.text
