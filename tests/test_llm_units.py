"""Unit tests of executors/llm: templates, parsing with repair, resilience on a fake clock,
accounting, cache and secret masking. No network, no real sleeping."""

from __future__ import annotations

import asyncio
import random

import pytest

from executors.base import InvalidTaskInput
from executors.llm.accounting import FREE, ModelPrice, PriceTable, TaskAccount, Usage, UsageLedger
from executors.llm.cache import CacheLimits, ResponseCache, cache_key
from executors.llm.errors import (
    CircuitOpen,
    ConnectionFailed,
    EndpointDown,
    OutputInvalid,
    RateLimited,
    RequestRejected,
    RequestTimeout,
    ServerError,
)
from executors.llm.parsing import extract_json, parse_with_repair, validate
from executors.llm.resilience import (
    BreakerPolicy,
    CircuitBreaker,
    FakeClock,
    HealthCheck,
    Resilience,
    RetryPolicy,
    parse_retry_after,
)
from executors.llm.secrets import MASK, Secret, mask_secrets, scrub_error
from executors.llm.templates import (
    PromptTemplate,
    TemplateLimits,
    TemplateRegistry,
    default_registry,
    repair_messages,
)

# ------------------------------------------------------------------------------------ templates


def test_chat_template_renders_prompt_and_system_and_records_version() -> None:
    prompt = default_registry().render("chat", {"prompt": "hi", "system": "be brief"})
    assert prompt.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert prompt.template_ref == {"id": "chat", "version": 1}


def test_chat_template_passes_messages_and_rejects_bad_ones_naming_the_field() -> None:
    registry = default_registry()
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert registry.render("chat", {"messages": messages}).messages == messages
    with pytest.raises(InvalidTaskInput) as info:
        registry.render("chat", {"messages": [{"role": "robot", "content": "x"}]})
    assert info.value.field == "input.messages[0].role"
    with pytest.raises(InvalidTaskInput) as info:
        registry.render("chat", {"prompt": "a", "messages": messages})
    assert info.value.field == "input"


def test_template_bounds_are_named() -> None:
    registry = default_registry(TemplateLimits(message_chars_max=10, messages_max=2))
    with pytest.raises(InvalidTaskInput, match="message_chars_max"):
        registry.render("chat", {"prompt": "x" * 11})
    with pytest.raises(InvalidTaskInput, match="messages_max"):
        registry.render("chat", {"messages": [{"role": "user", "content": "a"}] * 3})


def test_structured_template_embeds_schema_and_data() -> None:
    prompt = default_registry().render("structured", {"instruction": "extract", "schema": {"type": "object"},
                                                      "data": {"a": 1}})
    assert prompt.template_ref == {"id": "structured", "version": 1}
    assert '"type": "object"' in prompt.messages[1]["content"] and '"a": 1' in prompt.messages[1]["content"]
    with pytest.raises(InvalidTaskInput, match="schema_bytes_max"):
        default_registry(TemplateLimits(schema_bytes_max=10)).render(
            "structured", {"instruction": "x", "schema": {"description": "long" * 10}})


def test_registry_versions_are_append_only_and_selectable() -> None:
    registry = TemplateRegistry()
    registry.register(PromptTemplate("t", 1, "chat", lambda i, limits: [{"role": "user", "content": "v1"}]))
    registry.register(PromptTemplate("t", 2, "chat", lambda i, limits: [{"role": "user", "content": "v2"}]))
    with pytest.raises(ValueError, match="new version"):
        registry.register(PromptTemplate("t", 2, "chat", lambda i, limits: []))
    assert registry.render("chat", {}).messages[0]["content"] == "v2"
    assert registry.render("chat", {}, version=1).template_version == 1
    with pytest.raises(InvalidTaskInput) as info:
        registry.render("chat", {}, version=7)
    assert info.value.field == "metadata.template_version"


def test_repair_messages_quote_the_bad_output_bounded() -> None:
    base = [{"role": "user", "content": "q"}]
    out = repair_messages(base, "x" * 50, "not JSON", TemplateLimits(repair_output_chars_max=10))
    assert out[0] == base[0] and out[1]["role"] == "assistant" and len(out[1]["content"]) == 11
    assert "not JSON" in out[2]["content"]


# -------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text", ['{"a": 1}', '```json\n{"a": 1}\n```', 'Sure! Here it is: {"a": 1} Done.'])
def test_extract_json_accepts_bare_fenced_and_embedded(text: str) -> None:
    assert extract_json(text) == {"a": 1}


def test_extract_json_rejects_prose() -> None:
    with pytest.raises(OutputInvalid) as info:
        extract_json("no json here")
    assert info.value.path == "$"


def test_validate_names_the_path() -> None:
    schema = {"type": "object", "properties": {"items": {"type": "array", "items": {
        "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}}}
    with pytest.raises(OutputInvalid) as info:
        validate({"items": [{"n": 1}, {"n": "two"}]}, schema)
    assert info.value.path == "$.items[1].n" and "integer" in info.value.message


def test_invalid_schema_is_invalid_input() -> None:
    with pytest.raises(InvalidTaskInput) as info:
        validate({}, {"type": "nonsense"})
    assert info.value.field.startswith("input.schema")


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}


async def test_repair_prompt_fixes_the_output() -> None:
    asked: list[list[dict]] = []

    async def ask(messages):
        asked.append(messages)
        return '{"n": 3}'

    outcome = await parse_with_repair('{"n": "three"}', SCHEMA, messages=[{"role": "user", "content": "q"}],
                                      ask=ask, repair_attempts_max=2)
    assert outcome.value == {"n": 3} and outcome.repairs == 1
    assert asked[0][-2] == {"role": "assistant", "content": '{"n": "three"}'}
    assert "$.n" in asked[0][-1]["content"]


async def test_repair_is_bounded_then_fails_with_the_validation_error() -> None:
    calls = 0

    async def ask(messages):
        nonlocal calls
        calls += 1
        return '{"n": "still not"}'

    with pytest.raises(OutputInvalid) as info:
        await parse_with_repair("nope", SCHEMA, messages=[{"role": "user", "content": "q"}], ask=ask,
                                repair_attempts_max=2)
    assert calls == 2
    assert info.value.path == "$.n" and "repair_attempts_max=2" in info.value.message
    assert not info.value.retryable


# ----------------------------------------------------------------------------------- resilience


def test_backoff_is_exponential_capped_with_bounded_jitter() -> None:
    policy = RetryPolicy()
    no_jitter = RetryPolicy(jitter_fraction=0.0)
    rng = random.Random(1)
    assert [no_jitter.backoff_s(n, rng) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    for n in range(1, 8):
        base = min(30.0, 2.0 ** (n - 1))
        for _ in range(50):
            delay = policy.backoff_s(n, rng)
            assert base * 0.7 - 1e-9 <= delay <= min(30.0, base * 1.3) + 1e-9


def test_retry_after_seconds_and_http_date() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:40 GMT", now) == pytest.approx(20.0)
    assert parse_retry_after("Tue, 14 Nov 2023 22:00:00 GMT", now) == 0.0     # in the past
    assert parse_retry_after("soon", now) is None and parse_retry_after(None, now) is None
    assert RetryPolicy().delay_s(1, random.Random(0), retry_after_s=500) == 60.0   # capped


def _flaky(errors: list[Exception], result: str = "ok"):
    calls = []

    async def op():
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return result
    return op, calls


async def test_retries_sleep_the_backoff_on_the_fake_clock() -> None:
    clock = FakeClock()
    res = Resilience(retry=RetryPolicy(jitter_fraction=0.0), clock=clock, rng=random.Random(0))
    op, calls = _flaky([ServerError("a", status=503), RequestTimeout("b"), ServerError("c", status=502)])
    seen = []
    assert await res.call("e", op, on_failure=lambda a, e, d: seen.append((a, e.code, d))) == "ok"
    assert len(calls) == 4 and clock.sleeps == [1.0, 2.0, 4.0]
    assert [d for _, _, d in seen] == [1.0, 2.0, 4.0]


async def test_retries_give_up_after_retries_max_with_the_last_error() -> None:
    clock = FakeClock()
    res = Resilience(retry=RetryPolicy(retries_max=3), clock=clock, rng=random.Random(0))
    op, calls = _flaky([ServerError(f"e{i}", status=500) for i in range(10)])
    with pytest.raises(ServerError, match="e3"):
        await res.call("e", op)
    assert len(calls) == 4 and len(clock.sleeps) == 3
    for n, slept in enumerate(clock.sleeps, 1):
        assert 0.7 * 2 ** (n - 1) <= slept <= 1.3 * 2 ** (n - 1)


async def test_retry_after_replaces_the_backoff() -> None:
    clock = FakeClock()
    res = Resilience(clock=clock, rng=random.Random(0))
    op, _ = _flaky([RateLimited("slow down", status=429, retry_after_s=12.0)])
    assert await res.call("e", op) == "ok"
    assert clock.sleeps == [12.0]


async def test_permanent_errors_are_not_retried() -> None:
    clock = FakeClock()
    res = Resilience(clock=clock)
    op, calls = _flaky([RequestRejected("bad", status=400)])
    with pytest.raises(RequestRejected):
        await res.call("e", op)
    assert len(calls) == 1 and clock.sleeps == []


async def test_breaker_opens_half_opens_and_closes() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("e", BreakerPolicy(failures_to_open=3, open_cooldown_s=30), clock)
    for _ in range(3):
        breaker.before_call()
        breaker.record_failure(ServerError("x", status=500))
    assert breaker.state == "open"
    with pytest.raises(CircuitOpen, match="open_cooldown_s"):
        breaker.before_call()
    clock.advance(30)
    breaker.before_call()                                    # the half-open probe
    assert breaker.state == "half_open"
    with pytest.raises(CircuitOpen, match="probe"):
        breaker.before_call()                                # only one probe at a time
    breaker.record_failure(ConnectionFailed("x"))            # probe failed: open again
    assert breaker.state == "open"
    with pytest.raises(CircuitOpen):
        breaker.before_call()
    clock.advance(30)
    breaker.before_call()
    breaker.record_success()
    assert breaker.state == "closed" and breaker.failures_consecutive == 0
    breaker.before_call()


async def test_breaker_ignores_answers_that_are_refusals() -> None:
    breaker = CircuitBreaker("e", BreakerPolicy(failures_to_open=2), FakeClock())
    for error in (ServerError("x", status=500), RateLimited("y", status=429), ServerError("z", status=500)):
        breaker.before_call()
        breaker.record_failure(error)
    assert breaker.state == "closed"                         # 429 said the endpoint is alive


async def test_open_breaker_stops_the_retry_loop() -> None:
    clock = FakeClock()
    res = Resilience(retry=RetryPolicy(retries_max=5), breaker=BreakerPolicy(failures_to_open=2), clock=clock)
    op, calls = _flaky([ServerError(f"e{i}", status=503) for i in range(10)])
    with pytest.raises(CircuitOpen):
        await res.call("e", op)
    assert len(calls) == 2
    with pytest.raises(CircuitOpen):                         # fails fast without calling
        await res.call("e", op)
    assert len(calls) == 2


async def test_health_check_fails_fast_and_caches_the_answer() -> None:
    clock = FakeClock()
    probes = []

    async def probe():
        probes.append(1)
        raise ConnectionFailed("http://x: connection refused")

    health = HealthCheck("http://x", probe, clock, down_ttl_s=5)
    with pytest.raises(EndpointDown, match="is down: .*connection refused"):
        await health.ensure_up()
    with pytest.raises(EndpointDown):
        await health.ensure_up()
    assert len(probes) == 1                                  # cached for down_ttl_s
    clock.advance(5)
    with pytest.raises(EndpointDown):
        await health.ensure_up()
    assert len(probes) == 2


async def test_health_check_treats_any_http_answer_as_up_and_a_hang_as_down() -> None:
    async def not_found():
        raise RequestRejected("404", status=404)

    await HealthCheck("e", not_found, FakeClock()).ensure_up()

    async def hang():
        await asyncio.Event().wait()

    with pytest.raises(EndpointDown, match="no answer"):
        await HealthCheck("e", hang, FakeClock(), timeout_s=0.05).ensure_up()


async def test_connection_failure_consults_health_and_stops_when_down() -> None:
    clock = FakeClock()

    async def probe():
        raise ConnectionFailed("refused")

    health = HealthCheck("e", probe, clock)
    res = Resilience(clock=clock)
    op, calls = _flaky([ConnectionFailed("refused")] * 5)
    with pytest.raises(EndpointDown):
        await res.call("e", op, health=health)
    assert len(calls) == 1 and clock.sleeps == []            # no retry loop against a dead endpoint


# ----------------------------------------------------------------------------------- accounting


def test_cost_from_the_price_table_per_call_and_task() -> None:
    prices = PriceTable({"big": ModelPrice(1.0, 4.0), "free": FREE})
    account = TaskAccount(prices)
    account.add("big", Usage(1_000_000, 500_000))
    account.add("free", Usage(10, 10))
    account.add("big", Usage(0, 0), cached=True)
    account.add("unknown", Usage(1, 1))
    metrics = account.metrics()
    assert metrics["cost_usd"] == pytest.approx(3.0)
    assert metrics["tokens_prompt_total"] == 1_000_011 and metrics["tokens_completion_total"] == 500_011
    assert metrics["llm_calls_total"] == 3 and metrics["cache_hits_total"] == 1
    assert account.unpriced_calls_total == 1
    ledger = UsageLedger()
    ledger.add_task(account)
    ledger.add_task(TaskAccount(prices))
    snap = ledger.snapshot()
    assert snap["cost_per_task_usd"] == pytest.approx(1.5)
    assert snap["by_model"]["big"]["calls_total"] == 1 and snap["by_model"]["big"]["cache_hits_total"] == 1


def test_usage_from_api_objects_and_missing_usage() -> None:
    class U:
        prompt_tokens = 3
        completion_tokens = 4
    assert Usage.from_api(U()) == Usage(3, 4)
    assert Usage.from_api({"prompt_tokens": 1, "completion_tokens": 2}) == Usage(1, 2)
    assert Usage.from_api(None).reported is False
    assert PriceTable.from_mapping({"m": {"input": 1, "output": 2}}).price_of("m") == ModelPrice(1, 2)


# ---------------------------------------------------------------------------------------- cache


def test_cache_key_is_canonical() -> None:
    m = [{"role": "user", "content": "hi"}]
    assert cache_key("a", m, {"x": 1, "y": 2}) == cache_key("a", m, {"y": 2, "x": 1})
    assert cache_key("a", m, {"x": 1}) != cache_key("b", m, {"x": 1})
    assert len(cache_key("a", m, {})) == 64


def test_cache_ttl_lru_and_bounds() -> None:
    clock = FakeClock()
    cache = ResponseCache(CacheLimits(ttl_s=10, entries_max=2, bytes_max=1000, entry_bytes_max=100), clock=clock)
    cache.put("a", "A")
    cache.put("b", "B")
    assert cache.get("a") == "A"            # a is now the most recently used
    cache.put("c", "C")                     # evicts b
    assert cache.get("b") is None and cache.get("a") == "A" and cache.get("c") == "C"
    assert not cache.put("big", "x" * 200) and cache.too_large_total == 1
    clock.advance(10)
    assert cache.get("a") is None and len(cache) == 1
    assert cache.snapshot()["evictions_total"] == 1


def test_cache_bytes_bound() -> None:
    cache = ResponseCache(CacheLimits(entries_max=100, bytes_max=30, entry_bytes_max=30), clock=FakeClock())
    for i in range(5):
        cache.put(str(i), "x" * 8)          # 10 bytes as JSON
    assert len(cache) == 3 and cache.bytes_total == 30


# -------------------------------------------------------------------------------------- secrets


def test_masking_secrets_and_bearer_tokens() -> None:
    key = "sk-planted-0123456789"
    assert key not in mask_secrets(f"bad key {key} given", [key])
    assert mask_secrets("Authorization: Bearer abc.def", []) == f"Authorization: Bearer {MASK}"
    secret = Secret(key)
    assert key not in repr(secret) and key not in f"{secret}" and secret.reveal() == key
    exc = scrub_error(RequestRejected(f"HTTP 401: invalid {key}", status=401), [secret])
    assert key not in str(exc) and key not in exc.message
