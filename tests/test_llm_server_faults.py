"""Each fault of the fault proxy, as the real `openai` AsyncOpenAI client sees it, in front of a
real `transformers serve` on the tiny model."""

from __future__ import annotations

import time

import openai
import pytest

from tests.support.fault_proxy import CutStream, Delay, Drop, Hang, PassThrough, Status

pytest_plugins = ["tests.support.llm_fixtures"]

MESSAGES = [{"role": "user", "content": "Hello! How are you?"}]
MAX_TOKENS = 8


def make_client(base_url: str, **kw) -> openai.AsyncOpenAI:
    kw.setdefault("max_retries", 0)
    kw.setdefault("timeout", 30.0)
    return openai.AsyncOpenAI(base_url=base_url, api_key="test-key", **kw)


async def chat(client, model, **kw):
    return await client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, **kw
    )


async def test_429_with_retry_after(fault_proxy, llm_server):
    fault_proxy.push(Status(429, retry_after_s=7))
    async with make_client(fault_proxy.base_url) as client:
        with pytest.raises(openai.RateLimitError) as info:
            await chat(client, llm_server.model)
        assert info.value.status_code == 429
        assert info.value.response.headers["retry-after"] == "7"
        assert "injected 429" in str(info.value)
        # The queue is consumed: the next request passes through.
        resp = await chat(client, llm_server.model)
    assert resp.usage.completion_tokens > 0
    assert fault_proxy.requests_seen == 2
    assert [r.outcome for r in fault_proxy.log] == ["status 429", "status 200"]


async def test_client_retry_honours_retry_after(fault_proxy, llm_server):
    fault_proxy.push(Status(429, retry_after_s=1))
    async with make_client(fault_proxy.base_url, max_retries=1) as client:
        t0 = time.monotonic()
        resp = await chat(client, llm_server.model)
        elapsed_s = time.monotonic() - t0
    assert resp.choices[0].message.content
    assert fault_proxy.requests_seen == 2
    gap_s = fault_proxy.log[1].t_s - fault_proxy.log[0].t_s
    assert gap_s >= 0.9, gap_s  # the client waited for Retry-After before retrying
    assert elapsed_s >= 0.9


@pytest.mark.parametrize(
    ("code", "exc"),
    [
        (500, openai.InternalServerError),
        (502, openai.InternalServerError),
        (503, openai.InternalServerError),
        (504, openai.InternalServerError),
    ],
)
async def test_5xx(fault_proxy, llm_server, code, exc):
    fault_proxy.push(Status(code))
    async with make_client(fault_proxy.base_url) as client:
        with pytest.raises(exc) as info:
            await chat(client, llm_server.model)
    assert info.value.status_code == code
    assert fault_proxy.log[0].outcome == f"status {code}"


async def test_5xx_streaming_request(fault_proxy, llm_server):
    fault_proxy.push(Status(503, retry_after_s=2))
    async with make_client(fault_proxy.base_url) as client:
        with pytest.raises(openai.InternalServerError) as info:
            await chat(client, llm_server.model, stream=True)
    assert info.value.status_code == 503
    assert info.value.response.headers["retry-after"] == "2"


async def test_faults_are_consumed_in_order_then_pass_through(fault_proxy, llm_server):
    # A short Retry-After (the client honours fractions) keeps the client's retries fast.
    fault_proxy.push(Status(503, retry_after_s=0.05), Status(429, retry_after_s=0.05), Status(500, retry_after_s=0.05))
    async with make_client(fault_proxy.base_url, max_retries=3) as client:
        resp = await chat(client, llm_server.model)
    assert resp.usage.total_tokens > 0
    assert [r.outcome for r in fault_proxy.log] == ["status 503", "status 429", "status 500", "status 200"]
    assert fault_proxy.pending_faults == 0


async def test_default_fault(fault_proxy, llm_server):
    fault_proxy.set_default(Status(503, retry_after_s=0.05))
    async with make_client(fault_proxy.base_url, max_retries=2) as client:
        with pytest.raises(openai.InternalServerError):
            await chat(client, llm_server.model)
    assert fault_proxy.requests_seen == 3  # one try and two retries, all answered 503
    fault_proxy.set_default(PassThrough())
    async with make_client(fault_proxy.base_url) as client:
        assert (await chat(client, llm_server.model)).choices


async def test_hang_times_out(fault_proxy, llm_server):
    fault_proxy.push(Hang())
    async with make_client(fault_proxy.base_url, timeout=1.0) as client:
        t0 = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            await chat(client, llm_server.model)
        elapsed_s = time.monotonic() - t0
        assert 0.9 <= elapsed_s < 10, elapsed_s
        resp = await chat(client, llm_server.model)  # the hang was for one request only
    assert resp.choices
    assert [r.outcome for r in fault_proxy.log] == ["hang", "status 200"]


async def test_hang_with_bound_closes_without_answer(fault_proxy, llm_server):
    fault_proxy.push(Hang(max_s=0.3))
    async with make_client(fault_proxy.base_url, timeout=10.0) as client:
        with pytest.raises(openai.APIConnectionError):
            await chat(client, llm_server.model)


async def test_drop_is_a_connection_error(fault_proxy, llm_server):
    fault_proxy.push(Drop())
    async with make_client(fault_proxy.base_url) as client:
        with pytest.raises(openai.APIConnectionError):
            await chat(client, llm_server.model)
    assert fault_proxy.log[0].outcome == "dropped"


async def test_delay_then_pass_through(fault_proxy, llm_server):
    fault_proxy.push(Delay(0.5))
    async with make_client(fault_proxy.base_url) as client:
        t0 = time.monotonic()
        resp = await chat(client, llm_server.model)
        assert time.monotonic() - t0 >= 0.5
    assert resp.usage.completion_tokens > 0


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "reset"])
async def test_stream_cut_midway_raises(fault_proxy, llm_server, reset):
    fault_proxy.push(CutStream(after_events=1, reset=reset))
    got = []
    async with make_client(fault_proxy.base_url) as client:
        stream = await chat(client, llm_server.model, stream=True)
        with pytest.raises(openai.APIConnectionError) as info:
            async for chunk in stream:
                got.append(chunk)
    # The client saw the first event (the assistant role), then the stream broke before the
    # final chunk, so it never got a finish_reason or usage.
    assert len(got) == 1 and got[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in got)
    assert fault_proxy.log[0].outcome == "cut after 1 events"
    cause = info.value.__cause__
    print(f"stream cut ({'reset' if reset else 'fin'}): {info.value!r} from {type(cause).__module__}.{cause!r}")


async def test_non_streamed_body_cut(fault_proxy, llm_server):
    fault_proxy.push(CutStream(after_bytes=20))
    async with make_client(fault_proxy.base_url) as client:
        with pytest.raises(openai.APIConnectionError):
            await chat(client, llm_server.model)
    assert fault_proxy.log[0].outcome == "cut after 20 bytes"


async def test_requests_are_counted_and_recorded(fault_proxy, llm_server):
    async with make_client(fault_proxy.base_url) as client:
        for _ in range(3):
            await chat(client, llm_server.model)
    assert fault_proxy.requests_seen == 3
    rec = fault_proxy.log[0]
    assert (rec.method, rec.path) == ("POST", "/v1/chat/completions")
    assert rec.json()["messages"] == MESSAGES
    assert rec.headers["authorization"] == "Bearer test-key"
    fault_proxy.clear()
    assert fault_proxy.requests_seen == 0
