"""A fault-injecting HTTP/1.1 reverse proxy for LLM adapter tests.

It listens on a free 127.0.0.1 port and forwards to one upstream (e.g. a `TransformersServer`). It
runs its own asyncio loop on a background thread, so sync and async tests, whatever their event
loop, drive it the same way; every control method is thread-safe.

    proxy = FaultProxy("http://127.0.0.1:8000").start()
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="k", max_retries=0)
    proxy.push(Status(429, retry_after_s=2), Status(503))   # the next two requests fail...
    ...                                                     # ...then requests pass through
    proxy.requests_seen                                     # count; proxy.log: one record per request
    proxy.stop()

Faults (each consumed by one request, in order; an empty queue means pass-through):
- `PassThrough()`: forward; streamed (SSE) responses are relayed event by event as they arrive.
- `Status(code, retry_after_s=None, body=None)`: answer `code` at once with an OpenAI-style JSON
  error body (and `Retry-After` when given); upstream never sees the request.
- `Hang(max_s=None)`: read the request and never answer (until the client gives up, the proxy
  stops, or `max_s` passes, after which the connection is closed without a response).
- `Delay(seconds)`: wait, then pass through.
- `CutStream(after_events=1, after_bytes=None, reset=False)`: forward, relay the first
  `after_events` SSE events (or the first `after_bytes` body bytes, for any response), then close
  the connection with the chunked body unterminated (FIN, or a TCP reset with `reset=True`): the
  client has read a partial body and then fails.
- `Drop()`: close the connection as soon as the request is read, with no response.

`proxy.set_default(fault)` changes what an empty queue means (e.g. every request answers 503).
Only loopback traffic: the proxy binds 127.0.0.1 and its upstream is whatever URL the test gives it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import threading
import time
from urllib.parse import urlsplit

import httpx

REQUEST_HEAD_BYTES_MAX = 64 * 1024
REQUEST_BODY_BYTES_MAX = 16 * 1024 * 1024
START_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 5.0

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "host",
}

REASONS = {
    200: "OK",
    400: "Bad Request",
    408: "Request Timeout",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


# ---- faults -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PassThrough:
    pass


@dataclasses.dataclass(frozen=True)
class Status:
    code: int
    retry_after_s: float | None = None
    body: dict | str | None = None
    headers: tuple[tuple[str, str], ...] = ()

    def payload(self) -> bytes:
        if isinstance(self.body, str):
            return self.body.encode()
        body = self.body or {
            "error": {
                "message": f"fault proxy: injected {self.code}",
                "type": "rate_limit_error" if self.code == 429 else "server_error",
                "code": str(self.code),
            }
        }
        return json.dumps(body).encode()


@dataclasses.dataclass(frozen=True)
class Hang:
    max_s: float | None = None


@dataclasses.dataclass(frozen=True)
class Delay:
    seconds: float


@dataclasses.dataclass(frozen=True)
class CutStream:
    """Relay `after_events` SSE events (`data: ...` blocks), or `after_bytes` body bytes when set,
    then close the connection mid-body (FIN; a TCP reset when `reset`)."""

    after_events: int = 1
    after_bytes: int | None = None
    reset: bool = False


@dataclasses.dataclass(frozen=True)
class Drop:
    pass


Fault = PassThrough | Status | Hang | Delay | CutStream | Drop


@dataclasses.dataclass
class RequestRecord:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    fault: Fault
    t_s: float  # time.monotonic() when the request was fully read
    outcome: str = "pending"  # "status 200", "status 429", "hang", "cut after 1 events", "dropped", ...

    def json(self):
        return json.loads(self.body) if self.body else None


class _BadRequest(Exception):
    pass


# ---- the proxy ----------------------------------------------------------------------------------


class FaultProxy:
    def __init__(self, upstream: str, *, host: str = "127.0.0.1", port: int = 0,
                 model_aliases: dict[str, str] | None = None, fault_paths: tuple[str, ...] = ()) -> None:
        """model_aliases: request "model" names rewritten before forwarding, so several names
        (e.g. the big/middle/small tiers of a preset) reach the one model a test server serves;
        the log keeps the name the client sent. fault_paths: when given, faults apply only to
        requests whose path ends with one of them (e.g. "/chat/completions", so a client's health
        probe of /v1/models passes through); the others are passed through, not counted."""
        self.model_aliases = dict(model_aliases or {})
        self.fault_paths = tuple(fault_paths)
        parts = urlsplit(upstream)
        self.upstream = f"{parts.scheme}://{parts.netloc}"  # paths are relayed as the client sent them
        self.host = host
        self.port = port
        self._lock = threading.Lock()
        self._faults: collections.deque[Fault] = collections.deque()
        self._default: Fault = PassThrough()
        self._log: list[RequestRecord] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._stopping: asyncio.Event | None = None
        self._conns: set[asyncio.Task] = set()
        self._started = threading.Event()
        self._start_error: BaseException | None = None

    # -- control (any thread) --
    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def push(self, *faults: Fault) -> FaultProxy:
        """Queue faults for the next requests, in order."""
        with self._lock:
            self._faults.extend(faults)
        return self

    def set_default(self, fault: Fault) -> None:
        with self._lock:
            self._default = fault

    def clear(self) -> None:
        """Drop queued faults, restore pass-through, forget the request log."""
        with self._lock:
            self._faults.clear()
            self._default = PassThrough()
            self._log.clear()

    @property
    def pending_faults(self) -> int:
        with self._lock:
            return len(self._faults)

    @property
    def requests_seen(self) -> int:
        with self._lock:
            return len(self._log)

    @property
    def log(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._log)

    def _aliased(self, body: bytes) -> bytes:
        if not self.model_aliases or not body:
            return body
        try:
            document = json.loads(body)
        except ValueError:
            return body
        if isinstance(document, dict) and document.get("model") in self.model_aliases:
            document["model"] = self.model_aliases[document["model"]]
            return json.dumps(document).encode()
        return body

    def _next_fault(self) -> Fault:
        with self._lock:
            return self._faults.popleft() if self._faults else self._default

    # -- lifecycle --
    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._started.wait(START_TIMEOUT_S):
            raise RuntimeError("fault proxy did not start")
        if self._start_error is not None:
            raise RuntimeError("fault proxy did not start") from self._start_error
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._stopping.set)
        thread.join(STOP_TIMEOUT_S)
        self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        # No environment proxies: the upstream is on loopback.
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(None), trust_env=False)
        try:
            self._server = await asyncio.start_server(self._serve_conn, self.host, self.port)
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:
            self._start_error = exc
            self._started.set()
            await self._client.aclose()
            return
        self._started.set()
        try:
            await self._stopping.wait()
        finally:
            self._server.close()
            for task in list(self._conns):
                task.cancel()
            await asyncio.gather(*self._conns, return_exceptions=True)
            await self._server.wait_closed()
            await self._client.aclose()

    # -- one client connection: HTTP/1.1 with keep-alive --
    async def _serve_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._conns.add(task)
        try:
            while True:
                try:
                    req = await self._read_request(reader)
                except (_BadRequest, asyncio.IncompleteReadError, ConnectionError):
                    return
                if req is None:
                    return
                method, path, headers, body = req
                if self.fault_paths and not path.split("?")[0].endswith(self.fault_paths):
                    fault: Fault = PassThrough()
                else:
                    fault = self._next_fault()
                record = RequestRecord(method, path, headers, body, fault, time.monotonic())
                with self._lock:
                    self._log.append(record)
                keep_open = await self._answer(record, reader, writer)
                if not keep_open or headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._conns.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _read_request(self, reader: asyncio.StreamReader):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return None  # client closed an idle keep-alive connection
            raise
        except asyncio.LimitOverrunError as exc:
            raise _BadRequest("request head too large") from exc
        if len(head) > REQUEST_HEAD_BYTES_MAX:
            raise _BadRequest("request head too large")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _version = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._read_chunked(reader)
        else:
            length = int(headers.get("content-length", "0"))
            if length > REQUEST_BODY_BYTES_MAX:
                raise _BadRequest("request body too large")
            body = await reader.readexactly(length)
        return method, path, headers, body

    async def _read_chunked(self, reader: asyncio.StreamReader) -> bytes:
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return bytes(body)
            body += await reader.readexactly(size)
            await reader.readexactly(2)
            if len(body) > REQUEST_BODY_BYTES_MAX:
                raise _BadRequest("request body too large")

    async def _answer(self, rec: RequestRecord, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Apply `rec.fault`; True when the connection may serve another request."""
        fault = rec.fault
        if isinstance(fault, Status):
            headers = [("Content-Type", "application/json")]
            if fault.retry_after_s is not None:
                ra = fault.retry_after_s
                headers.append(("Retry-After", str(int(ra)) if float(ra).is_integer() else str(ra)))
            headers += list(fault.headers)
            payload = fault.payload()
            headers.append(("Content-Length", str(len(payload))))
            rec.outcome = f"status {fault.code}"  # before the client can see it: tests read it at once
            await self._write_head(writer, fault.code, headers)
            writer.write(payload)
            await writer.drain()
            return True
        if isinstance(fault, Hang):
            rec.outcome = "hang"
            await self._hang(reader, writer, fault.max_s)
            return False
        if isinstance(fault, Drop):
            rec.outcome = "dropped"
            writer.transport.abort()
            return False
        if isinstance(fault, Delay):
            await asyncio.sleep(fault.seconds)
        return await self._forward(rec, writer, fault if isinstance(fault, CutStream) else None)

    async def _hang(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_s: float | None) -> None:
        """Say nothing until the client closes, the proxy stops, or max_s passes."""
        try:
            # Returns at the client's FIN (b"") or with bytes it pipelined, which we ignore.
            await asyncio.wait_for(reader.read(1), timeout=max_s)
            while not reader.at_eof():
                await asyncio.wait_for(reader.read(65536), timeout=max_s)
        except (TimeoutError, ConnectionError):
            pass
        writer.transport.abort()

    async def _forward(self, rec: RequestRecord, writer: asyncio.StreamWriter, cut: CutStream | None) -> bool:
        headers = {k: v for k, v in rec.headers.items() if k not in HOP_BY_HOP}
        url = self.upstream + rec.path
        body = self._aliased(rec.body)
        if body is not rec.body:
            headers = {k: v for k, v in headers.items() if k.lower() != "content-length"}
        try:
            req = self._client.build_request(rec.method, url, headers=headers, content=body)
            resp = await self._client.send(req, stream=True)
        except httpx.HTTPError as exc:
            payload = json.dumps({"error": {"message": f"fault proxy: upstream: {exc!r}", "type": "server_error"}})
            rec.outcome = "upstream error: 502"
            await self._write_head(writer, 502, [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])
            writer.write(payload.encode())
            await writer.drain()
            return True
        try:
            out_headers = [(k, v) for k, v in resp.headers.multi_items() if k.lower() not in HOP_BY_HOP]
            out_headers.append(("Transfer-Encoding", "chunked"))
            await self._write_head(writer, resp.status_code, out_headers, reason=resp.reason_phrase)
            if cut is None:
                async for chunk in resp.aiter_raw():
                    await self._write_chunk(writer, chunk)
                rec.outcome = f"status {resp.status_code}"
                writer.write(b"0\r\n\r\n")
                await writer.drain()
                return True
            sent = 0
            events = 0
            buf = b""
            async for chunk in resp.aiter_raw():
                if cut.after_bytes is not None:
                    room = cut.after_bytes - sent
                    await self._write_chunk(writer, chunk[:room])
                    sent += min(room, len(chunk))
                    if sent >= cut.after_bytes:
                        break
                    continue
                buf += chunk
                while b"\n\n" in buf and events < cut.after_events:
                    event, buf = buf.split(b"\n\n", 1)
                    await self._write_chunk(writer, event + b"\n\n")
                    events += 1
                if events >= cut.after_events:
                    break
            rec.outcome = f"cut after {events} events" if cut.after_bytes is None else f"cut after {sent} bytes"
            # No terminating chunk: the client has a partial body, then the connection ends.
            if cut.reset:
                writer.transport.abort()
            else:
                writer.close()
            return False
        finally:
            await resp.aclose()

    @staticmethod
    async def _write_head(writer, code: int, headers, reason: str | None = None) -> None:
        lines = [f"HTTP/1.1 {code} {reason or REASONS.get(code, 'Status')}"]
        lines += [f"{k}: {v}" for k, v in headers]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()

    @staticmethod
    async def _write_chunk(writer, data: bytes) -> None:
        if data:
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            await writer.drain()
