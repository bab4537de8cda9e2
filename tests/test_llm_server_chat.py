"""The LLM test server works: the real `openai` AsyncOpenAI client against `transformers serve`
running the tiny GPT-2 built on the spot (directly, and through the fault proxy in pass-through)."""

from __future__ import annotations

import time

import openai
import pytest

from tests.support.tiny_model import build_tiny_model, cache_key

pytest_plugins = ["tests.support.llm_fixtures"]

MESSAGES = [{"role": "user", "content": "Hello! How are you?"}]
MAX_TOKENS = 8


def make_client(base_url: str, **kw) -> openai.AsyncOpenAI:
    kw.setdefault("max_retries", 0)
    kw.setdefault("timeout", 30.0)
    return openai.AsyncOpenAI(base_url=base_url, api_key="test-key", **kw)


def test_tiny_model_is_cached_by_content_hash(tiny_model_dir, tmp_path):
    assert tiny_model_dir.name == f"tiny-gpt2-{cache_key()}"
    assert (tiny_model_dir / "BUILD_OK").is_file()
    t0 = time.monotonic()
    assert build_tiny_model(tiny_model_dir.parent) == tiny_model_dir  # a hit: nothing rebuilt
    assert time.monotonic() - t0 < 1.0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (tiny_model_dir / name).is_file(), name


async def test_chat_completion(llm_server, llm_timings):
    async with make_client(llm_server.base_url) as client:
        t0 = time.monotonic()
        resp = await client.chat.completions.create(
            model=llm_server.model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0
        )
        latency_s = time.monotonic() - t0
    assert resp.object == "chat.completion"
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content  # the trained tiny model writes words, not only special tokens
    assert choice.finish_reason in ("length", "stop")
    assert resp.usage.prompt_tokens > 0
    assert 0 < resp.usage.completion_tokens <= MAX_TOKENS
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    print(f"timings: {llm_timings} chat latency {latency_s * 1000:.0f} ms")


async def test_chat_completion_is_deterministic(llm_server):
    async with make_client(llm_server.base_url) as client:
        a, b = [
            await client.chat.completions.create(
                model=llm_server.model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0
            )
            for _ in range(2)
        ]
    assert a.choices[0].message.content == b.choices[0].message.content


async def test_chat_completion_streaming_with_usage(llm_server):
    async with make_client(llm_server.base_url) as client:
        stream = await client.chat.completions.create(
            model=llm_server.model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish and finish[-1] in ("length", "stop")
    usage = chunks[-1].usage  # `transformers serve` puts usage on the last chunk, always
    assert usage is not None
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= MAX_TOKENS
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_stream_text_matches_non_streamed_text(llm_server):
    async with make_client(llm_server.base_url) as client:
        whole = await client.chat.completions.create(
            model=llm_server.model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0
        )
        stream = await client.chat.completions.create(
            model=llm_server.model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == whole.choices[0].message.content


async def test_wrong_model_name_is_a_client_error(llm_server):
    async with make_client(llm_server.base_url) as client:
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(
                model="some/other-model", messages=MESSAGES, max_tokens=MAX_TOKENS
            )


async def test_pass_through_proxy(fault_proxy, llm_server):
    async with make_client(fault_proxy.base_url) as client:
        resp = await client.chat.completions.create(
            model=llm_server.model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0
        )
        stream = await client.chat.completions.create(
            model=llm_server.model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        chunks = [c async for c in stream]
    assert resp.usage.completion_tokens > 0
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert fault_proxy.requests_seen == 2
    assert [r.outcome for r in fault_proxy.log] == ["status 200", "status 200"]
    assert fault_proxy.log[0].json()["max_tokens"] == MAX_TOKENS
