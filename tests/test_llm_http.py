"""CloudRuAdapter and OpenAIChatAPI through the real `openai` client against a tiny
OpenAI-compatible HTTP server on 127.0.0.1 (asyncio streams, a free port, started per test):
/v1/chat/completions (JSON and SSE) and /v1/models, scripted to answer 429 with Retry-After,
5xx, hang, cut a stream mid-way, or stream slowly until the client goes away."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest

from executors.base import ExecutorTask, LocalContext, TaskCancelled
from executors.cloudru import CloudRuAdapter, CloudRuConfig
from executors.llm.adapter import LLMSettings
from executors.llm.client import ChatRequest, OpenAIChatAPI
from executors.llm.errors import (
    ConnectionFailed,
    EndpointDown,
    RateLimited,
    RequestRejected,
    RequestTimeout,
    ServerError,
)
from executors.llm.resilience import FakeClock, RetryPolicy
from executors.llm.secrets import Secret

KEY = "sk-cloudru-PLANTED-http-7777"
BIG, MIDDLE, SMALL = "zai-org/GLM-4.7", "zai-org/GLM-4.7-FlashX", "zai-org/GLM-4.7-Flash"
WAIT_S = 10.0                # bound of every wait in these tests (never asserted as timing)


# --------------------------------------------------------------------------------- the server


@dataclass
class Ok:
    text: str = "hello from the server"
    prompt_tokens: int = 11
    completion_tokens: int = 4
    served_model: str | None = None


@dataclass
class Status:
    code: int
    message: str = "error"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Hang:
    pass


@dataclass
class CutStream:
    chunks: int = 2


@dataclass
class SlowStream:
    chunks: int = 1          # sent at once; then nothing until the client closes


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


class LLMServer:
    def __init__(self) -> None:
        self.script: dict[str, deque] = {}
        self.requests: list[Received] = []
        self.client_went_away = asyncio.Event()
        self.streams_sent_chunks = 0
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def on(self, model: str, *actions: Any) -> None:
        self.script.setdefault(model, deque()).extend(actions)

    def chat_requests(self) -> list[Received]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            close_clients = getattr(self._server, "close_clients", None)   # Python 3.13+
            if close_clients is not None:
                close_clients()
            await asyncio.wait_for(self._server.wait_closed(), WAIT_S)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(1_000):                        # requests per connection
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode().split(" ", 2)
                headers: dict[str, str] = {}
                for _ in range(100):
                    raw = await reader.readline()
                    if raw in (b"\r\n", b"\n", b""):
                        break
                    name, value = raw.decode().split(":", 1)
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                received = Received(method, path, headers, json.loads(body) if body else None)
                self.requests.append(received)
                if path.endswith("/models"):
                    await self._json(writer, 200, {"object": "list", "data": [{"id": BIG, "object": "model"}]})
                    continue
                model = received.body["model"]
                queue = self.script.get(model)
                action = queue.popleft() if queue else Ok()
                if not await self._serve(action, received, reader, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _json(self, writer, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        head = f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n"
        for name, value in (headers or {}).items():
            head += f"{name}: {value}\r\n"
        writer.write(head.encode() + b"\r\n" + data)
        await writer.drain()

    async def _serve(self, action: Any, req: Received, reader, writer) -> bool:
        """Answer one request; False closes the connection."""
        model = req.body["model"]
        if isinstance(action, Status):
            await self._json(writer, action.code, {"error": {"message": action.message, "type": "x"}}, action.headers)
            return True
        if isinstance(action, Hang):
            await self._until_client_goes_away(reader)
            return False
        if isinstance(action, Ok) and not req.body.get("stream"):
            await self._json(writer, 200, {
                "id": "c1", "object": "chat.completion", "created": 0, "model": action.served_model or model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": action.text},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": action.prompt_tokens, "completion_tokens": action.completion_tokens,
                          "total_tokens": action.prompt_tokens + action.completion_tokens}})
            return True
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
        text = action.text if isinstance(action, Ok) else "partial answer that never ends"
        pieces = [text[i:i + 5] for i in range(0, len(text), 5)]
        limit = len(pieces) if isinstance(action, Ok) else action.chunks
        for piece in pieces[:limit]:
            await self._event(writer, {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": model,
                                       "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
            self.streams_sent_chunks += 1
        if isinstance(action, Ok):
            await self._event(writer, {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": model,
                                       "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            await self._event(writer, {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": model,
                                       "choices": [], "usage": {"prompt_tokens": action.prompt_tokens,
                                                                "completion_tokens": action.completion_tokens,
                                                                "total_tokens": 0}})
            writer.write(b"data: [DONE]\n\n")
            await writer.drain()
        elif isinstance(action, SlowStream):
            await self._until_client_goes_away(reader)
        else:                                             # CutStream: drop the connection mid-way
            writer.transport.abort()
        return False

    async def _event(self, writer, payload: Any) -> None:
        writer.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        await writer.drain()

    async def _until_client_goes_away(self, reader) -> None:
        try:
            while await asyncio.wait_for(reader.read(1024), WAIT_S):
                pass
            self.client_went_away.set()
        except (TimeoutError, ConnectionError):
            pass


@pytest.fixture
async def server():
    srv = LLMServer()
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def adapter_for(base_url: str, *, settings: LLMSettings | None = None, clock: FakeClock | None = None,
                preset: str = "glm47") -> tuple[CloudRuAdapter, FakeClock]:
    clock = clock or FakeClock()
    config = CloudRuConfig(base_url=base_url, preset=preset, settings=settings or LLMSettings(request_timeout_s=5.0))
    return CloudRuAdapter(config, env={"CLOUDRU_API_KEY": KEY}, clock=clock, rng=random.Random(3)), clock


def task(task_id: str = "t1", input_: Any = None, **metadata: str) -> ExecutorTask:
    return ExecutorTask(task_id, 1, "chat", input_ if input_ is not None else {"prompt": "hi"}, metadata)


# ---------------------------------------------------------------------------------- the client


async def test_client_completes_and_sends_the_key_as_bearer(server: LLMServer) -> None:
    api = OpenAIChatAPI(server.base_url, api_key=Secret(KEY))
    try:
        response = await api.complete(ChatRequest(BIG, [{"role": "user", "content": "hi"}], {"max_tokens": 8}),
                                      timeout_s=5)
    finally:
        await api.aclose()
    assert response.text == "hello from the server" and response.usage.prompt_tokens == 11
    assert server.requests[0].headers["authorization"] == f"Bearer {KEY}"
    assert server.requests[0].body["max_tokens"] == 8


async def test_client_streams_text_and_usage(server: LLMServer) -> None:
    api = OpenAIChatAPI(server.base_url, api_key=Secret(KEY))
    seen: list[int] = []

    async def on_text(chars: int) -> None:
        seen.append(chars)

    try:
        response = await api.complete(ChatRequest(BIG, [{"role": "user", "content": "hi"}], stream=True),
                                      timeout_s=5, on_text=on_text)
    finally:
        await api.aclose()
    assert response.text == "hello from the server" and response.finish_reason == "stop"
    assert response.usage.completion_tokens == 4 and seen[-1] == len(response.text)
    assert server.requests[0].body["stream"] is True


@pytest.mark.parametrize("action, error, status", [
    (Status(429, "slow down", {"retry-after": "7"}), RateLimited, 429),
    (Status(503, "overloaded"), ServerError, 503),
    (Status(400, "bad request"), RequestRejected, 400),
])
async def test_client_maps_statuses(server: LLMServer, action: Status, error: type, status: int) -> None:
    server.on(BIG, action)
    api = OpenAIChatAPI(server.base_url, api_key=Secret(KEY))
    try:
        with pytest.raises(error) as info:
            await api.complete(ChatRequest(BIG, [{"role": "user", "content": "hi"}]), timeout_s=5)
    finally:
        await api.aclose()
    assert info.value.status == status and action.message in info.value.message
    if status == 429:
        assert info.value.retry_after_s == 7.0


async def test_client_timeout_and_cut_stream(server: LLMServer) -> None:
    server.on(BIG, Hang(), CutStream(chunks=2))
    api = OpenAIChatAPI(server.base_url, api_key=Secret(KEY))
    try:
        with pytest.raises(RequestTimeout):
            await api.complete(ChatRequest(BIG, [{"role": "user", "content": "hi"}]), timeout_s=0.3)
        with pytest.raises(ConnectionFailed):
            await api.complete(ChatRequest(BIG, [{"role": "user", "content": "hi"}], stream=True), timeout_s=5)
    finally:
        await api.aclose()
    assert server.streams_sent_chunks == 2


async def test_cancelling_a_stream_closes_the_connection(server: LLMServer) -> None:
    server.on(BIG, SlowStream(chunks=1))
    api = OpenAIChatAPI(server.base_url, api_key=Secret(KEY))
    first_chunk = asyncio.Event()

    async def on_text(chars: int) -> None:
        first_chunk.set()

    try:
        call = asyncio.ensure_future(api.complete(
            ChatRequest(BIG, [{"role": "user", "content": "hi"}], stream=True), timeout_s=WAIT_S, on_text=on_text))
        await asyncio.wait_for(first_chunk.wait(), WAIT_S)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.wait_for(server.client_went_away.wait(), WAIT_S)   # the HTTP response was closed
    finally:
        await api.aclose()


# --------------------------------------------------------------------------------- the adapter


async def test_adapter_retries_429_honouring_retry_after_then_answers(server: LLMServer) -> None:
    server.on(BIG, Status(429, "slow down", {"retry-after": "4"}), Status(503, "busy"), Ok("finally"))
    adapter, clock = adapter_for(server.base_url)
    try:
        result = await adapter.execute(task(), LocalContext())
    finally:
        await adapter.aclose()
    assert result.output["text"] == "finally" and result.output["tier"] == "big"
    assert clock.sleeps[0] == 4.0                         # Retry-After
    assert 2 * 0.7 <= clock.sleeps[1] <= 2 * 1.3          # second retry: 2 s ± 30 %
    assert [t.get("status") for t in result.output["tries"]] == [429, 503, None]
    assert result.metrics["retries_total"] == 2 and len(server.chat_requests()) == 3


async def test_adapter_falls_back_over_http_and_records_it(server: LLMServer) -> None:
    server.on(BIG, *[Status(500, "boom")] * 4)
    server.on(MIDDLE, Ok("middle answers", served_model="glm-4.7-flashx-v2"))
    adapter, clock = adapter_for(server.base_url)
    try:
        result = await adapter.execute(task(), LocalContext())
    finally:
        await adapter.aclose()
    out = result.output
    assert out["tier"] == "middle" and out["model_versions"] == {MIDDLE: "glm-4.7-flashx-v2"}
    assert [t["outcome"] for t in out["tries"]] == ["error"] * 4 + ["fallback", "ok"]
    assert len(clock.sleeps) == 3                          # retries_max=3 on big, then fall back
    assert [r.body["model"] for r in server.chat_requests()] == [BIG] * 4 + [MIDDLE]


async def test_adapter_streams_and_is_cancelled_mid_stream(server: LLMServer) -> None:
    server.on(BIG, SlowStream(chunks=1))
    adapter, _ = adapter_for(server.base_url, settings=LLMSettings(progress_interval_chars=1))
    ctx = LocalContext()
    try:
        running = asyncio.ensure_future(adapter.execute(task(input_={"prompt": "hi", "stream": True}), ctx))
        for _ in range(1_000):                             # bounded: until the first chunk is reported
            if any("streamed" in r.message for r in ctx.reports):
                break
            await asyncio.sleep(0.01)
        ctx.cancel()
        with pytest.raises(TaskCancelled):
            await asyncio.wait_for(running, WAIT_S)
        await asyncio.wait_for(server.client_went_away.wait(), WAIT_S)
    finally:
        await adapter.aclose()


async def test_adapter_cancel_by_task_id_stops_a_hanging_request(server: LLMServer) -> None:
    server.on(BIG, Hang())
    adapter, _ = adapter_for(server.base_url)
    try:
        running = asyncio.ensure_future(adapter.execute(task("hung"), LocalContext()))
        for _ in range(1_000):
            if server.chat_requests():
                break
            await asyncio.sleep(0.01)
        await adapter.cancel("hung")
        with pytest.raises(TaskCancelled):
            await asyncio.wait_for(running, WAIT_S)
        await asyncio.wait_for(server.client_went_away.wait(), WAIT_S)
    finally:
        await adapter.aclose()


async def test_adapter_times_out_a_hanging_request_and_falls_back(server: LLMServer) -> None:
    server.on(BIG, Hang())
    adapter, _ = adapter_for(server.base_url, settings=LLMSettings(request_timeout_s=0.3,
                                                                   retry=RetryPolicy(retries_max=0)))
    try:
        result = await adapter.execute(task(), LocalContext())
    finally:
        await adapter.aclose()
    assert result.output["tier"] == "middle" and result.output["tries"][0]["error"] == "LLM_TIMEOUT"


async def test_health_check_fails_fast_when_the_endpoint_is_down() -> None:
    adapter, clock = adapter_for(f"http://127.0.0.1:{closed_port()}/v1")
    try:
        for task_id in ("a", "b"):
            with pytest.raises(EndpointDown) as info:
                await adapter.execute(task(task_id), LocalContext())
            assert "is down" in info.value.message and info.value.retryable
        status = await adapter.get_status()
    finally:
        await adapter.aclose()
    assert clock.sleeps == [] and status["health"]["probes_total"] == 1
    assert status["resilience"]["breakers"] == {}          # no chat call was even tried


async def test_key_never_in_errors_results_status_or_logs(server: LLMServer, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    server.on(BIG, Status(401, f"invalid api key: Bearer {KEY}"))
    server.on(MIDDLE, Status(500, f"upstream rejected {KEY}"), Ok("fine"))
    adapter, _ = adapter_for(server.base_url, settings=LLMSettings(retry=RetryPolicy(retries_max=1)))
    try:
        with pytest.raises(RequestRejected) as info:
            await adapter.execute(task("a"), LocalContext())
        result = await adapter.execute(task("b", tier="middle"), LocalContext())
        status = await adapter.get_status()
    finally:
        await adapter.aclose()
    assert info.value.status == 401 and "check the API key" in info.value.message
    assert KEY not in "".join(traceback.format_exception(info.value))
    assert KEY not in json.dumps(result.output) and KEY not in json.dumps(result.metrics)
    assert "***" in result.output["tries"][0]["reason"]
    assert KEY not in json.dumps(status) and KEY not in caplog.text
