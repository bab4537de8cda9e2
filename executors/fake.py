"""An in-memory, scripted ExecutorAdapter for unit tests of the executor runtime (STYLE §5: the
fake ships beside the real adapter).

Script outcomes per task id or per task type; each `execute` pops the next outcome of the task
id's queue, else of the task type's queue, else uses the default outcome (Echo unless set):

    fake = FakeExecutor(task_types=["echo", "work"])
    fake.script_type("work", Retryable("flaky"), Succeed({"ok": True}))
    fake.script_task("t-7", Hang())                  # runs until cancel(), ctx.cancelled or asyncio cancel
    result = await fake.execute(task, LocalContext())
    assert fake.calls[0].task_id == task.task_id and fake.calls[0].attempt == 1

Outcomes: Echo (output = input), Succeed(output, metrics), Retryable(message) → RetryableTaskError,
Permanent(message) → PermanentTaskError, Hang() → waits for cancellation, then TaskCancelled.
Every outcome takes `delay_ms` (a cancellable wait before it happens) and `progress` (fractions
reported first). Every call is recorded as a FakeCall; `wait_started` lets a test wait until a
given attempt is running.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from coordinator.model import ExecutorCapabilities, ExecutorType
from executors.base import (
    ExecutionContext,
    ExecutorBusy,
    ExecutorResult,
    ExecutorTask,
    PermanentTaskError,
    RetryableTaskError,
    TaskCancelled,
    UnsupportedTaskType,
)

CALLS_RECORDED_MAX_DEFAULT = 100_000
SCRIPT_OUTCOMES_MAX = 10_000          # outcomes queued per task id or task type
CANCEL_POLL_INTERVAL_MS = 5           # how often a waiting outcome looks at ctx.cancelled


# ----------------------------------------------------------------------------------------- outcomes


def _check_outcome(outcome: Any) -> None:
    name = type(outcome).__name__
    if isinstance(outcome.delay_ms, bool) or not isinstance(outcome.delay_ms, int) or outcome.delay_ms < 0:
        raise ValueError(f"{name}.delay_ms: an int >= 0, got {outcome.delay_ms!r}")
    for fraction in outcome.progress:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"{name}.progress: fractions in 0.0..1.0, got {fraction!r}")


@dataclass(frozen=True)
class Echo:
    delay_ms: int = 0
    progress: tuple[float, ...] = ()

    __post_init__ = _check_outcome


@dataclass(frozen=True)
class Succeed:
    output: Any = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    delay_ms: int = 0
    progress: tuple[float, ...] = ()

    __post_init__ = _check_outcome


@dataclass(frozen=True)
class Retryable:
    message: str = "scripted retryable failure"
    delay_ms: int = 0
    progress: tuple[float, ...] = ()

    __post_init__ = _check_outcome


@dataclass(frozen=True)
class Permanent:
    message: str = "scripted permanent failure"
    delay_ms: int = 0
    progress: tuple[float, ...] = ()

    __post_init__ = _check_outcome


@dataclass(frozen=True)
class Hang:
    """Wait until cancelled (cancel(task_id), ctx.cancelled or asyncio cancellation)."""

    delay_ms: int = 0
    progress: tuple[float, ...] = ()

    __post_init__ = _check_outcome


Outcome = Union[Echo, Succeed, Retryable, Permanent, Hang]
_OUTCOME_TYPES = (Echo, Succeed, Retryable, Permanent, Hang)


@dataclass(frozen=True)
class FakeCall:
    task_id: str
    attempt: int
    type: str
    input: Any
    outcome: Outcome


# -------------------------------------------------------------------------------------- the fake


class FakeExecutor:
    """Implements `executors.base.ExecutorAdapter`, in memory."""

    executor_type = ExecutorType.ALGORITHMIC

    def __init__(self, task_types: Iterable[str] = ("echo",), *, default: Outcome | None = Echo(),
                 running_tasks_max: int = 1_024, calls_recorded_max: int = CALLS_RECORDED_MAX_DEFAULT) -> None:
        """`default` is used when no scripted outcome is left; None makes such a call fail with
        PermanentTaskError("no scripted outcome")."""
        self.task_types = list(dict.fromkeys(task_types))
        if not self.task_types:
            raise ValueError("task_types: at least one task type")
        if default is not None and not isinstance(default, _OUTCOME_TYPES):
            raise TypeError(f"default: an outcome ({', '.join(t.__name__ for t in _OUTCOME_TYPES)}) or None")
        for name, value in (("running_tasks_max", running_tasks_max), ("calls_recorded_max", calls_recorded_max)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: an int >= 1, got {value!r}")
        self.default = default
        self.running_tasks_max = running_tasks_max
        self._by_task: dict[str, deque[Outcome]] = {}
        self._by_type: dict[str, deque[Outcome]] = {}
        self._calls: deque[FakeCall] = deque(maxlen=calls_recorded_max)
        self.calls_total = 0
        self.cancel_calls: list[str] = []
        self._running: dict[tuple[str, int], asyncio.Event] = {}
        self._started: dict[tuple[str, int], asyncio.Event] = {}
        self._counts: Counter[str] = Counter()

    # -------------------------------------------------------------------------------- scripting

    def script_task(self, task_id: str, *outcomes: Outcome) -> FakeExecutor:
        self._enqueue(self._by_task, task_id, outcomes, "script_task")
        return self

    def script_type(self, task_type: str, *outcomes: Outcome) -> FakeExecutor:
        if task_type not in self.task_types:
            raise ValueError(f"script_type: {task_type!r} is not one of task_types {self.task_types}")
        self._enqueue(self._by_type, task_type, outcomes, "script_type")
        return self

    def pending_outcomes(self, *, task_id: str | None = None, task_type: str | None = None) -> int:
        """How many scripted outcomes remain for that task id or type."""
        if (task_id is None) == (task_type is None):
            raise ValueError("pending_outcomes: give exactly one of task_id, task_type")
        queue = self._by_task.get(task_id) if task_id is not None else self._by_type.get(task_type)  # type: ignore[arg-type]
        return len(queue) if queue else 0

    @property
    def calls(self) -> list[FakeCall]:
        return list(self._calls)

    def attempts_of(self, task_id: str) -> list[int]:
        return [c.attempt for c in self._calls if c.task_id == task_id]

    async def wait_started(self, task_id: str, attempt: int = 1, *, timeout_s: float = 5.0) -> None:
        """Return once that attempt has started executing (raises TimeoutError after timeout_s)."""
        event = self._started.setdefault((task_id, attempt), asyncio.Event())
        await asyncio.wait_for(event.wait(), timeout_s)

    # ----------------------------------------------------------------------------- the protocol

    async def execute(self, task: ExecutorTask, ctx: ExecutionContext) -> ExecutorResult:
        if task.type not in self.task_types:
            raise UnsupportedTaskType(task.type, self.task_types)
        if len(self._running) >= self.running_tasks_max:
            raise ExecutorBusy(f"running tasks: at most {self.running_tasks_max} at once (running_tasks_max)")
        outcome = self._next_outcome(task)
        self._calls.append(FakeCall(task.task_id, task.attempt, task.type, task.input, outcome))
        self.calls_total += 1
        key = (task.task_id, task.attempt)
        cancel_requested = asyncio.Event()
        self._running[key] = cancel_requested
        self._started.setdefault(key, asyncio.Event()).set()
        while len(self._started) > self._calls.maxlen:          # bounded like the call record
            del self._started[next(iter(self._started))]
        self._counts["started"] += 1
        try:
            if outcome is None:
                raise PermanentTaskError(f"no scripted outcome for task {task.task_id!r} of type {task.type!r}")
            result = await self._play(outcome, task, ctx, cancel_requested)
        except (TaskCancelled, asyncio.CancelledError):
            self._counts["cancelled"] += 1
            raise
        except Exception:                   # TaskError, or a bug that task_error_from maps
            self._counts["failed"] += 1
            raise
        finally:
            self._running.pop(key, None)
        self._counts["succeeded"] += 1
        return result

    def get_capabilities(self) -> ExecutorCapabilities:
        return ExecutorCapabilities(supported_task_types=list(self.task_types),
                                    input_schema={t: {} for t in self.task_types},
                                    output_schema={t: {} for t in self.task_types},
                                    performance_profile={"cost_per_task": 0.0})

    async def get_status(self) -> dict[str, Any]:
        running = sorted(self._running)
        return {
            "executor_type": "fake",
            "running_task_ids": sorted({task_id for task_id, _ in running}),
            "running": [{"task_id": task_id, "attempt": attempt} for task_id, attempt in running],
            "running_total": len(running),
            "running_tasks_max": self.running_tasks_max,
            "tasks_started_total": self._counts["started"],
            "tasks_succeeded_total": self._counts["succeeded"],
            "tasks_failed_total": self._counts["failed"],
            "tasks_cancelled_total": self._counts["cancelled"],
        }

    async def cancel(self, task_id: str) -> None:
        self.cancel_calls.append(task_id)
        for (running_id, _), cancel_requested in self._running.items():
            if running_id == task_id:
                cancel_requested.set()

    # --------------------------------------------------------------------------------- internals

    def _enqueue(self, queues: dict[str, deque[Outcome]], key: str, outcomes: tuple[Outcome, ...], where: str) -> None:
        for outcome in outcomes:
            if not isinstance(outcome, _OUTCOME_TYPES):
                raise TypeError(f"{where}: {outcome!r} is not an outcome "
                                f"({', '.join(t.__name__ for t in _OUTCOME_TYPES)})")
        queue = queues.setdefault(key, deque())
        if len(queue) + len(outcomes) > SCRIPT_OUTCOMES_MAX:
            raise ValueError(f"{where}: at most {SCRIPT_OUTCOMES_MAX} outcomes queued for {key!r} (SCRIPT_OUTCOMES_MAX)")
        queue.extend(outcomes)

    def _next_outcome(self, task: ExecutorTask) -> Outcome | None:
        for queue in (self._by_task.get(task.task_id), self._by_type.get(task.type)):
            if queue:
                return queue.popleft()
        return self.default

    async def _play(self, outcome: Outcome, task: ExecutorTask, ctx: ExecutionContext,
                    cancel_requested: asyncio.Event) -> ExecutorResult:
        for fraction in outcome.progress:
            await ctx.progress(fraction, "scripted")
        if outcome.delay_ms > 0:
            await _wait_cancellable(cancel_requested, ctx, outcome.delay_ms / 1000)
        elif cancel_requested.is_set() or ctx.cancelled:
            raise TaskCancelled(f"task {task.task_id!r} attempt {task.attempt} cancelled")
        if isinstance(outcome, Hang):
            await _wait_cancellable(cancel_requested, ctx, None)   # returns only by raising TaskCancelled
        if isinstance(outcome, Echo):
            return ExecutorResult(output=task.input)
        if isinstance(outcome, Succeed):
            return ExecutorResult(output=outcome.output, metrics=dict(outcome.metrics))
        if isinstance(outcome, Retryable):
            raise RetryableTaskError(outcome.message)
        raise PermanentTaskError(outcome.message)


async def _wait_cancellable(cancel_requested: asyncio.Event, ctx: ExecutionContext, timeout_s: float | None) -> None:
    """Wait `timeout_s` (None = forever); raise TaskCancelled as soon as cancellation is asked."""
    loop = asyncio.get_running_loop()
    end_s = None if timeout_s is None else loop.time() + timeout_s
    waiter = asyncio.ensure_future(cancel_requested.wait())
    try:
        while True:
            if cancel_requested.is_set() or ctx.cancelled:
                raise TaskCancelled("cancelled while running")
            poll_s = CANCEL_POLL_INTERVAL_MS / 1000
            if end_s is not None:
                remaining_s = end_s - loop.time()
                if remaining_s <= 0:
                    return
                poll_s = min(poll_s, remaining_s)
            await asyncio.wait({waiter}, timeout=poll_s)
    finally:
        waiter.cancel()
