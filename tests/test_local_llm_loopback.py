"""LocalLLMAdapter through the real openai/httpx clients against small vLLM-like servers of our
own on 127.0.0.1 (transformers serve has no LoRA API): POST /v1/load_lora_adapter with vLLM's
answers (200 "Success", 400 "has already been loaded", 404 when runtime updating is off or the
adapter is unknown), /v1/models, /v1/chat/completions (JSON and SSE, a LoRA served under its own
name, 404 for a model it does not serve), and a stream that stays open until the client goes away."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from executors.base import ExecutorTask, LocalContext, TaskCancelled
from executors.llm.adapter import LLMSettings
from executors.llm.errors import RequestRejected
from executors.llm.resilience import RetryPolicy
from executors.llm.secrets import Secret
from executors.local_llm import LocalLLMAdapter, LocalLLMConfig, LoraModule

BASE = "tiny-base"
KEY = "sk-local-PLANTED-loopback-5151"
SQL_PATH = "/adapters/sql-lora"
WAIT_S = 10.0                  # bound of every wait (never asserted as timing)
REQUESTS_PER_CONN_MAX = 1_000
HEADERS_MAX = 100


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


class VLLMLikeServer:
    """Serves BASE and the LoRA adapters loaded into it; `adapters` maps a path on 'disk' to
    an adapter that can be loaded from it."""

    def __init__(self, *, runtime_lora_updating: bool = True, preloaded: tuple[str, ...] = (),
                 slow_stream: bool = False) -> None:
        self.runtime_lora_updating = runtime_lora_updating
        self.adapters_on_disk = {SQL_PATH}
        self.loaded: set[str] = set(preloaded)
        self.slow_stream = slow_stream
        self.requests: list[Received] = []
        self.stream_started = asyncio.Event()
        self.client_went_away = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    async def start(self) -> VLLMLikeServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await asyncio.wait_for(self._server.wait_closed(), WAIT_S)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(REQUESTS_PER_CONN_MAX):
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode().split(" ", 2)
                headers: dict[str, str] = {}
                for _ in range(HEADERS_MAX):
                    h = await reader.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = h.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                raw = await reader.readexactly(int(headers.get("content-length", "0")))
                body = json.loads(raw) if raw else None
                self.requests.append(Received(method, path, headers, body))
                if not await self._answer(method, path, headers, body, reader, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def _answer(self, method, path, headers, body, reader, writer) -> bool:
        if headers.get("authorization") != f"Bearer {KEY}":
            return await self._json(writer, 401, {"error": {"message": "bad key", "type": "Unauthorized"}})
        if method == "GET" and path == "/v1/models":
            data = [{"id": BASE, "object": "model"}] + [
                {"id": name, "object": "model", "parent": BASE} for name in sorted(self.loaded)]
            return await self._json(writer, 200, {"object": "list", "data": data})
        if method == "POST" and path == "/v1/load_lora_adapter":
            if not self.runtime_lora_updating:          # the route is only mounted with the env flag
                return await self._json(writer, 404, {"detail": "Not Found"})
            name, lora_path = body.get("lora_name"), body.get("lora_path")
            if not name or not lora_path:
                return await self._error(writer, 400, "Both 'lora_name' and 'lora_path' must be provided.")
            if name in self.loaded:
                return await self._error(writer, 400, f"The lora adapter '{name}' has already been loaded.")
            if lora_path not in self.adapters_on_disk:
                return await self._error(writer, 404, f"No adapter found for {lora_path}")
            self.loaded.add(name)
            return await self._text(writer, 200, f"Success: LoRA adapter '{name}' added successfully.")
        if method == "POST" and path == "/v1/chat/completions":
            model = body["model"]
            if model != BASE and model not in self.loaded:
                return await self._error(writer, 404, f"The model `{model}` does not exist.")
            if body.get("stream"):
                return await self._stream(writer, reader, model)
            return await self._json(writer, 200, {
                "id": "c1", "object": "chat.completion", "created": 1, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": f"answer of {model}"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}})
        return await self._json(writer, 404, {"detail": "Not Found"})

    async def _stream(self, writer, reader, model) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")

        def event(delta: dict, finish: str | None = None, usage: dict | None = None) -> bytes:
            chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "usage": usage}
            return f"data: {json.dumps(chunk)}\n\n".encode()

        writer.write(event({"role": "assistant", "content": "partial "}))
        await writer.drain()
        self.stream_started.set()
        if self.slow_stream:                   # nothing more until the client goes away
            data = await reader.read(1)
            if not data:
                self.client_went_away.set()
            return False
        writer.write(event({"content": "end"}, "stop", {"prompt_tokens": 9, "completion_tokens": 2,
                                                         "total_tokens": 11}))
        writer.write(b"data: [DONE]\n\n")
        await writer.drain()
        return False

    async def _error(self, writer, status: int, message: str) -> bool:
        kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "Error")
        return await self._json(writer, status, {"error": {"message": message, "type": kind, "code": status}})

    async def _json(self, writer, status: int, body: Any) -> bool:
        return await self._send(writer, status, "application/json", json.dumps(body).encode())

    async def _text(self, writer, status: int, text: str) -> bool:
        return await self._send(writer, status, "text/plain", text.encode())

    async def _send(self, writer, status: int, content_type: str, payload: bytes) -> bool:
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        await writer.drain()
        return True


@pytest.fixture
async def servers(request) -> AsyncIterator[list[VLLMLikeServer]]:
    options = getattr(request, "param", {})
    started = [await VLLMLikeServer(**options).start() for _ in range(2)]
    try:
        yield started
    finally:
        for server in started:
            await server.stop()


def make(servers: list[VLLMLikeServer], **settings: Any) -> LocalLLMAdapter:
    config = LocalLLMConfig(model=BASE, endpoints=tuple(s.base_url for s in servers), api_key=Secret(KEY),
                            loras={"sql": LoraModule(SQL_PATH), "missing": LoraModule("/adapters/none")},
                            load_lora=True,
                            settings=LLMSettings(retry=RetryPolicy(retries_max=0), **settings))
    return LocalLLMAdapter(config, rng=random.Random(1))


def task(i: int, **metadata: str) -> ExecutorTask:
    return ExecutorTask(f"t{i}", 1, "chat", {"prompt": "hi", "max_tokens": 4}, metadata)


async def test_lora_is_loaded_once_per_replica(servers) -> None:
    adapter = make(servers)
    try:
        for i in range(4):
            result = await adapter.execute(task(i, lora="sql"), LocalContext())
            out = result.output
            assert (out["text"], out["model"], out["model_id"], out["lora"], out["base_model"]) == (
                "answer of sql", "sql", "sql", "sql", BASE)
            assert result.metrics["tokens_total"] == 12
        for server in servers:
            loads = [r for r in server.requests if r.path == "/v1/load_lora_adapter"]
            assert len(loads) == 1
            assert loads[0].body == {"lora_name": "sql", "lora_path": SQL_PATH}
            assert loads[0].headers["authorization"] == f"Bearer {KEY}"
            assert [r.body["model"] for r in server.requests if r.path == "/v1/chat/completions"] == ["sql", "sql"]
            assert server.loaded == {"sql"}
        await adapter.execute(task(9), LocalContext())               # the base model needs no load
        assert sum(s.paths().count("/v1/load_lora_adapter") for s in servers) == 2
    finally:
        await adapter.aclose()


@pytest.mark.parametrize("servers", [{"preloaded": ("sql",)}], indirect=True)
async def test_already_loaded_counts_as_loaded(servers) -> None:
    adapter = make(servers)
    try:
        for i in range(2):
            assert (await adapter.execute(task(i, lora="sql"), LocalContext())).output["text"] == "answer of sql"
        assert [s.paths().count("/v1/load_lora_adapter") for s in servers] == [1, 1]
    finally:
        await adapter.aclose()


async def test_a_restarted_server_gets_the_lora_again(servers) -> None:
    adapter = make(servers)
    try:
        for i in range(2):
            await adapter.execute(task(i, lora="sql"), LocalContext())
        for server in servers:
            server.loaded.clear()                                     # as after a restart
        for i in range(2):
            assert (await adapter.execute(task(10 + i, lora="sql"), LocalContext())).output["lora"] == "sql"
        assert [s.paths().count("/v1/load_lora_adapter") for s in servers] == [2, 2]
        replicas = (await adapter.get_status())["balancer"]["replicas"]
        assert [r["lora_reloads_total"] for r in replicas] == [1, 1]
    finally:
        await adapter.aclose()


@pytest.mark.parametrize("servers", [{"runtime_lora_updating": False}], indirect=True)
async def test_runtime_updating_off_is_a_clear_permanent_error(servers) -> None:
    adapter = make(servers)
    try:
        with pytest.raises(RequestRejected, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING") as info:
            await adapter.execute(task(1, lora="sql"), LocalContext())
        assert not info.value.retryable and KEY not in str(info.value)
        assert all("/v1/chat/completions" not in s.paths() for s in servers)
    finally:
        await adapter.aclose()


async def test_unknown_adapter_path_is_rejected(servers) -> None:
    adapter = make(servers)
    try:
        with pytest.raises(RequestRejected, match="No adapter found"):
            await adapter.execute(task(1, lora="missing"), LocalContext())
    finally:
        await adapter.aclose()


async def test_stream_through_the_pool(servers) -> None:
    adapter = make(servers)
    try:
        result = await adapter.execute(ExecutorTask("s", 1, "chat", {"prompt": "hi", "stream": True}, {}),
                                       LocalContext())
        assert result.output["text"] == "partial end" and result.metrics["tokens_total"] == 11
    finally:
        await adapter.aclose()


@pytest.mark.parametrize("servers", [{"slow_stream": True}], indirect=True)
async def test_cancelling_a_stream_closes_its_connection(servers) -> None:
    adapter = make(servers)
    try:
        running = asyncio.ensure_future(adapter.execute(
            ExecutorTask("s", 1, "chat", {"prompt": "hi", "stream": True}, {}), LocalContext()))
        started = asyncio.ensure_future(asyncio.wait([asyncio.ensure_future(s.stream_started.wait())
                                                      for s in servers], return_when=asyncio.FIRST_COMPLETED))
        await asyncio.wait_for(started, WAIT_S)
        await adapter.cancel("s")
        with pytest.raises(TaskCancelled):
            await asyncio.wait_for(running, WAIT_S)
        streaming = [s for s in servers if s.stream_started.is_set()]
        assert len(streaming) == 1
        await asyncio.wait_for(streaming[0].client_went_away.wait(), WAIT_S)
        replicas = (await adapter.get_status())["balancer"]["replicas"]
        assert [r["outstanding"] for r in replicas] == [0, 0]
        assert all(r["breaker"]["state"] == "closed" for r in replicas)
    finally:
        await adapter.aclose()
