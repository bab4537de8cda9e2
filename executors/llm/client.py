"""The chat-completion port (`ChatAPI`) and its real adapter over the `openai` client; the one
place where openai/httpx exceptions become ours (`mapped_errors`, STYLE §6).

    api = OpenAIChatAPI(base_url, api_key=Secret(key))
    response = await api.complete(ChatRequest(model, messages, {"temperature": 0}), timeout_s=60)
    response = await api.complete(ChatRequest(..., stream=True), timeout_s=60, on_text=report)

Streaming: chunks are read as they come (`on_text(chars_so_far)` after each); when the task
running `complete` is cancelled — the adapter does that on ctx.cancelled or cancel(task_id) —
the stream is closed in `finally`, which closes the HTTP response (the server sees the
connection go away). The openai client's own retries are off (max_retries=0): resilience.py
decides about retries.

Mapping (messages pass through mask_secrets; the library exception is not chained because it
carries the request with its Authorization header and an unmasked response body):

    openai.APITimeoutError, httpx timeouts, our per-request timeout  → RequestTimeout
    openai.APIConnectionError, httpx transport errors (a cut stream) → ConnectionFailed
    HTTP 429 → RateLimited (Retry-After read)   408 → RequestTimeout   409 → Conflict
    HTTP 500/502/503/504 → ServerError (Retry-After read)   other 4xx/5xx → RequestRejected
    a response that does not parse → ServerError
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import openai

from executors.base import TaskError
from executors.llm.accounting import Usage
from executors.llm.errors import (
    Conflict,
    ConnectionFailed,
    RateLimited,
    RequestRejected,
    RequestTimeout,
    ServerError,
)
from executors.llm.resilience import parse_retry_after
from executors.llm.secrets import Secret, mask_secrets

RETRYABLE_SERVER_STATUSES = frozenset({500, 502, 503, 504})
DETAIL_CHARS_MAX = 300              # characters of a server's error message kept in ours
STREAM_CHUNKS_MAX = 1_000_000       # chunks read from one stream
RESPONSE_CHARS_MAX = 4_000_000      # characters of one response's text

try:  # openai >= 3 talks through httpx2; its transport errors can escape while a stream is read
    import httpx2 as _httpx2
except ImportError:  # pragma: no cover
    _httpx2 = None

_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (httpx.TransportError,) + (
    (_httpx2.TransportError,) if _httpx2 is not None else ())
_TIMEOUT_ERRORS: tuple[type[BaseException], ...] = (httpx.TimeoutException,) + (
    (_httpx2.TimeoutException,) if _httpx2 is not None else ())


# ------------------------------------------------------------------------------------ the port


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: Sequence[Mapping[str, str]]
    parameters: Mapping[str, Any] = field(default_factory=dict)   # temperature, max_tokens, ...
    stream: bool = False


@dataclass(frozen=True)
class ChatResponse:
    text: str
    model: str                          # the model the API says answered (its version)
    usage: Usage
    finish_reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "model": self.model, "finish_reason": self.finish_reason,
                "usage": {"prompt_tokens": self.usage.prompt_tokens,
                          "completion_tokens": self.usage.completion_tokens, "reported": self.usage.reported}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ChatResponse:
        u = data["usage"]
        return cls(data["text"], data["model"], Usage(u["prompt_tokens"], u["completion_tokens"], u["reported"]),
                   data.get("finish_reason"))


OnText = Callable[[int], Awaitable[None]]


class ChatAPI(Protocol):
    endpoint: str

    async def complete(self, request: ChatRequest, *, timeout_s: float, on_text: OnText | None = None) -> ChatResponse:
        """One chat completion (streamed when request.stream); raises TaskErrors of errors.py."""
        ...

    async def probe(self, *, timeout_s: float) -> None:
        """Return when the endpoint answers at all; raise a mapped TaskError otherwise."""
        ...

    async def aclose(self) -> None: ...


# ------------------------------------------------------------------------------------- mapping


def _detail(exc: BaseException, secrets: Sequence[str | Secret]) -> str:
    body = getattr(exc, "body", None)
    message = None
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, Mapping) else inner
    text = str(message) if message else str(exc)
    text = mask_secrets(text, secrets)
    return text if len(text) <= DETAIL_CHARS_MAX else text[:DETAIL_CHARS_MAX] + "…"


@contextlib.contextmanager
def mapped_errors(endpoint: str, secrets: Sequence[str | Secret] = (), *,
                  now_unix_s: Callable[[], float] = time.time) -> Iterator[None]:
    """Library errors → errors.py. TaskErrors and cancellation pass through unchanged."""
    try:
        yield
    except TaskError:
        raise
    except openai.APITimeoutError as exc:
        raise RequestTimeout(f"{endpoint}: request timed out: {_detail(exc, secrets)}") from None
    except openai.APIConnectionError as exc:
        raise ConnectionFailed(f"{endpoint}: connection failed: {_detail(exc, secrets)}") from None
    except openai.APIStatusError as exc:
        raise _status_error(endpoint, exc.status_code, exc.response.headers.get("retry-after"),
                            _detail(exc, secrets), now_unix_s()) from None
    except openai.APIResponseValidationError as exc:
        raise ServerError(f"{endpoint}: the response does not parse: {_detail(exc, secrets)}") from None
    except _TIMEOUT_ERRORS as exc:
        raise RequestTimeout(f"{endpoint}: timed out: {type(exc).__name__}") from None
    except _TRANSPORT_ERRORS as exc:
        raise ConnectionFailed(f"{endpoint}: connection failed: {type(exc).__name__}: "
                               f"{mask_secrets(str(exc), secrets)}") from None
    except TimeoutError:
        raise RequestTimeout(f"{endpoint}: no complete answer within the per-request timeout") from None
    except openai.OpenAIError as exc:
        raise RequestRejected(f"{endpoint}: {type(exc).__name__}: {_detail(exc, secrets)}") from None


def _status_error(endpoint: str, status: int, retry_after: str | None, detail: str, now_unix_s: float) -> TaskError:
    message = f"{endpoint}: HTTP {status}: {detail}"
    if status == 429:
        return RateLimited(message, status=status, retry_after_s=parse_retry_after(retry_after, now_unix_s))
    if status in RETRYABLE_SERVER_STATUSES:
        return ServerError(message, status=status, retry_after_s=parse_retry_after(retry_after, now_unix_s))
    if status == 408:
        return RequestTimeout(message, status=status)
    if status == 409:
        return Conflict(message, status=status)
    if status in (401, 403):
        message += " (check the API key)"
    return RequestRejected(message, status=status)


# ---------------------------------------------------------------------------------- real adapter


class OpenAIChatAPI:
    """ChatAPI over `openai.AsyncOpenAI` against any OpenAI-compatible endpoint."""

    def __init__(self, base_url: str, *, api_key: Secret, http_client: Any = None,
                 clock_unix_s: Callable[[], float] = time.time, extra_secrets: Sequence[str | Secret] = ()) -> None:
        self.endpoint = base_url.rstrip("/")
        self._secrets: list[str | Secret] = [api_key, *extra_secrets]
        self._now_unix_s = clock_unix_s
        kwargs: dict[str, Any] = {"base_url": self.endpoint, "api_key": api_key.reveal(), "max_retries": 0}
        if http_client is not None:
            kwargs["http_client"] = http_client
        self._client = openai.AsyncOpenAI(**kwargs)

    def __repr__(self) -> str:
        return f"OpenAIChatAPI({self.endpoint!r})"

    def _mapped(self) -> contextlib.AbstractContextManager[None]:
        return mapped_errors(self.endpoint, self._secrets, now_unix_s=self._now_unix_s)

    async def complete(self, request: ChatRequest, *, timeout_s: float, on_text: OnText | None = None) -> ChatResponse:
        with self._mapped():
            async with asyncio.timeout(timeout_s):
                if request.stream:
                    return await self._stream(request, timeout_s, on_text)
                response = await self._client.chat.completions.create(
                    model=request.model, messages=list(request.messages), timeout=timeout_s, **dict(request.parameters))
                if not response.choices:
                    raise ServerError(f"{self.endpoint}: the response has no choices")
                choice = response.choices[0]
                text = choice.message.content or ""
                if len(text) > RESPONSE_CHARS_MAX:
                    raise ServerError(f"{self.endpoint}: response longer than {RESPONSE_CHARS_MAX} chars "
                                      "(RESPONSE_CHARS_MAX)")
                return ChatResponse(text, response.model or request.model, Usage.from_api(response.usage),
                                    choice.finish_reason)

    async def _stream(self, request: ChatRequest, timeout_s: float, on_text: OnText | None) -> ChatResponse:
        stream = await self._client.chat.completions.create(
            model=request.model, messages=list(request.messages), timeout=timeout_s, stream=True,
            stream_options={"include_usage": True}, **dict(request.parameters))
        parts: list[str] = []
        chars = 0
        model, usage, finish_reason = request.model, None, None
        try:
            chunks = 0
            async for chunk in stream:
                chunks += 1
                if chunks > STREAM_CHUNKS_MAX:
                    raise ServerError(f"{self.endpoint}: more than {STREAM_CHUNKS_MAX} chunks (STREAM_CHUNKS_MAX)")
                model = chunk.model or model
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices or ():
                    if choice.finish_reason:
                        finish_reason = choice.finish_reason
                    piece = choice.delta.content if choice.delta else None
                    if piece:
                        parts.append(piece)
                        chars += len(piece)
                        if chars > RESPONSE_CHARS_MAX:
                            raise ServerError(f"{self.endpoint}: response longer than {RESPONSE_CHARS_MAX} chars "
                                              "(RESPONSE_CHARS_MAX)")
                        if on_text is not None:
                            await on_text(chars)
        finally:
            await stream.close()        # closes the HTTP response: also on cancellation and errors
        if finish_reason is None:
            raise ConnectionFailed(f"{self.endpoint}: the stream ended before the model finished "
                                   f"({chars} chars received)")
        return ChatResponse("".join(parts), model, Usage.from_api(usage), finish_reason)

    async def probe(self, *, timeout_s: float) -> None:
        with self._mapped():
            async with asyncio.timeout(timeout_s):
                await self._client.models.list(timeout=timeout_s)

    async def aclose(self) -> None:
        await self._client.close()
