"""An in-memory ChatAPI for unit tests (STYLE §5: the fake beside the real adapter).

    api = FakeChatAPI()
    api.script("model-a", ServerError("boom", status=503), Reply("hello", prompt_tokens=5))
    api.script("model-b", Reply('{"x": 1}'))
    api.down = True            # probe() raises ConnectionFailed: the health check says down

Each `complete` pops the next outcome scripted for the request's model (a TaskError is
raised, a Reply answered), else answers `default` (Reply("ok") unless set). Every request is
recorded in `requests`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

from executors.base import TaskError
from executors.llm.accounting import Usage
from executors.llm.client import ChatRequest, ChatResponse, OnText
from executors.llm.errors import ConnectionFailed

SCRIPT_OUTCOMES_MAX = 10_000
REQUESTS_RECORDED_MAX = 100_000


@dataclass(frozen=True)
class Reply:
    text: str = "ok"
    prompt_tokens: int = 10
    completion_tokens: int = 5
    model: str | None = None            # the version the API reports; default: the requested id
    finish_reason: str = "stop"
    usage_reported: bool = True


Outcome = Union[Reply, TaskError, Callable[[ChatRequest], Any]]


class FakeChatAPI:
    def __init__(self, endpoint: str = "fake://llm", *, default: Outcome | None = None) -> None:
        self.endpoint = endpoint
        self.default: Outcome = default if default is not None else Reply()
        self._scripts: dict[str, deque[Outcome]] = {}
        self.requests: list[ChatRequest] = []
        self.down = False
        self.probes_total = 0
        self.closed = False

    def script(self, model: str, *outcomes: Outcome) -> None:
        queue = self._scripts.setdefault(model, deque())
        if len(queue) + len(outcomes) > SCRIPT_OUTCOMES_MAX:
            raise ValueError(f"script: at most {SCRIPT_OUTCOMES_MAX} outcomes per model (SCRIPT_OUTCOMES_MAX)")
        queue.extend(outcomes)

    def requests_for(self, model: str) -> list[ChatRequest]:
        return [r for r in self.requests if r.model == model]

    async def complete(self, request: ChatRequest, *, timeout_s: float, on_text: OnText | None = None) -> ChatResponse:
        if len(self.requests) < REQUESTS_RECORDED_MAX:
            self.requests.append(request)
        queue = self._scripts.get(request.model)
        outcome = queue.popleft() if queue else self.default
        if callable(outcome) and not isinstance(outcome, (Reply, TaskError)):
            outcome = outcome(request)
            if hasattr(outcome, "__await__"):
                outcome = await outcome
        if isinstance(outcome, TaskError):
            raise outcome
        if on_text is not None and outcome.text:
            await on_text(len(outcome.text))
        usage = Usage(outcome.prompt_tokens, outcome.completion_tokens, outcome.usage_reported)
        if not outcome.usage_reported:
            usage = Usage(0, 0, reported=False)
        return ChatResponse(outcome.text, outcome.model or request.model, usage, outcome.finish_reason)

    async def probe(self, *, timeout_s: float) -> None:
        self.probes_total += 1
        if self.down:
            raise ConnectionFailed(f"{self.endpoint}: connection refused")

    async def aclose(self) -> None:
        self.closed = True
