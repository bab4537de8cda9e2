"""The executor port: one Protocol that every executor adapter implements (STYLE §5).

The executor agent runtime (in `cluster/`) receives an assignment over gRPC, builds an
`ExecutorTask`, and awaits `adapter.execute(task, ctx)`. The adapter returns an
`ExecutorResult` or raises a `TaskError`; the runtime reports the outcome with the fencing
token `(task_id, attempt)`. While a task runs, the adapter may report progress through the
`ExecutionContext` and must stop soon after `ctx.cancelled` turns true or `cancel(task_id)`
is called.

Errors of an adapter (STYLE §6):

    TaskError                   retryable: bool, code: str; never raised bare
    ├── RetryableTaskError      retryable=True: a later attempt may succeed (backoff, then retry)
    │   └── ExecutorBusy        the adapter's own concurrency bound is reached
    ├── PermanentTaskError      retryable=False: retrying cannot help
    │   ├── InvalidTaskInput    the input fails validation; `.field` names it, the message the limit
    │   └── UnsupportedTaskType the adapter does not run this task type
    └── TaskCancelled           retryable=False: stopped because cancellation was asked

Any other exception escaping `execute` is a bug in the adapter; `task_error_from` maps it
(and asyncio's CancelledError, TimeoutError, OSError) into this tree in one place.

This module imports only the standard library and `coordinator`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from coordinator.errors import invariant
from coordinator.model import ExecutorCapabilities

# Bounds of LocalContext (STYLE §8).
PROGRESS_REPORTS_MAX_DEFAULT = 1_000
PROGRESS_MESSAGE_CHARS_MAX = 1_024


# --------------------------------------------------------------------------------- task and result


@dataclass(frozen=True)
class ExecutorTask:
    """One attempt of one task, as the runtime hands it to an adapter.

    `(task_id, attempt)` is the fencing token: every progress/complete/fail report carries it
    and the coordinator rejects a stale attempt. `deadline_ms` is the task's deadline as Unix
    time in milliseconds (0 = none); it is the scheduler's deadline, which an adapter may use
    to budget its work — leases are enforced by the runtime, not by the adapter.
    """

    task_id: str
    attempt: int
    type: str
    input: Any
    metadata: Mapping[str, str]
    deadline_ms: int = 0

    def __post_init__(self) -> None:
        invariant(isinstance(self.task_id, str) and self.task_id != "", "ExecutorTask.task_id: a non-empty str")
        invariant(isinstance(self.attempt, int) and self.attempt >= 1, f"ExecutorTask.attempt: >= 1, got {self.attempt!r}")
        invariant(isinstance(self.type, str) and self.type != "", "ExecutorTask.type: a non-empty str")
        invariant(isinstance(self.deadline_ms, int) and self.deadline_ms >= 0,
                  f"ExecutorTask.deadline_ms: >= 0 (0 = none), got {self.deadline_ms!r}")


@dataclass(frozen=True)
class ExecutorResult:
    """What a successful attempt produced. `output` is JSON-serializable; `metrics` are numbers
    with their unit last in the name, e.g. {"duration_s": 0.12, "tokens_total": 512}."""

    output: Any
    metrics: Mapping[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ errors


class TaskError(Exception):
    """Base of the adapter's errors. `retryable` tells the runtime whether another attempt may
    succeed; `code` is a stable name the runtime may record in the task's error history."""

    retryable: bool = False
    code: str = "TASK_ERROR"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RetryableTaskError(TaskError):
    retryable = True
    code = "RETRYABLE"


class ExecutorBusy(RetryableTaskError):
    code = "EXECUTOR_BUSY"


class PermanentTaskError(TaskError):
    retryable = False
    code = "PERMANENT"


class InvalidTaskInput(PermanentTaskError):
    """The task's input fails validation. `field` is a path such as "input.ms"; the message
    reads "<field>: <what is wrong, naming the limit>"."""

    code = "INVALID_INPUT"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class UnsupportedTaskType(PermanentTaskError):
    code = "UNSUPPORTED_TYPE"

    def __init__(self, task_type: str, supported: list[str]) -> None:
        super().__init__(f"type: {task_type!r} is not one of the supported task types {sorted(supported)}")
        self.task_type = task_type


class TaskCancelled(TaskError):
    retryable = False
    code = "CANCELLED"


def admit(task: ExecutorTask, supported: Mapping[str, Any] | Sequence[str], running: int, running_max: int,
          counts: Any) -> None:
    """The admission every adapter applies before running an attempt: a task type it runs, and
    one of its `running_max` slots free. A refusal counts in counts["rejected"]."""
    if task.type not in supported:
        counts["rejected"] += 1
        raise UnsupportedTaskType(task.type, list(supported))
    if running >= running_max:
        counts["rejected"] += 1
        raise ExecutorBusy(f"running tasks: at most {running_max} at once (running_tasks_max)")


def run_status(runs: Any, now_s: float, running_max: int, counts: Any, **extra_per_run: str) -> dict[str, Any]:
    """The part of `get_status()` every adapter reports: its running attempts (objects with
    task_id, attempt, type, started_s and a `cancel_requested` asyncio.Event; `extra_per_run`
    maps more output keys to attribute names) and its outcome counters."""
    running = sorted(runs, key=lambda r: (r.task_id, r.attempt))
    return {
        "running_task_ids": sorted({r.task_id for r in running}),
        "running": [{"task_id": r.task_id, "attempt": r.attempt, "type": r.type,
                     "running_s": round(now_s - r.started_s, 6),
                     **{key: getattr(r, name) for key, name in extra_per_run.items()},
                     "cancel_requested": r.cancel_requested.is_set()} for r in running],
        "running_total": len(running),
        "running_tasks_max": running_max,
        **{f"tasks_{outcome}_total": counts[outcome]
           for outcome in ("started", "succeeded", "failed", "cancelled", "rejected")},
    }


def task_error_from(exc: BaseException) -> TaskError:
    """Map any exception that escaped `execute` into the tree above (the one place that does).

    A TaskError is returned as is; asyncio.CancelledError becomes TaskCancelled; TimeoutError
    and OSError (network, files) are retryable; anything else is a bug in the adapter and is
    reported as permanent, naming the exception type, so it does not burn every attempt."""
    if isinstance(exc, TaskError):
        return exc
    if isinstance(exc, asyncio.CancelledError):
        return TaskCancelled("execution was cancelled")
    if isinstance(exc, TimeoutError):
        return RetryableTaskError(f"timed out: {exc}" if str(exc) else "timed out")
    if isinstance(exc, OSError):
        return RetryableTaskError(f"{type(exc).__name__}: {exc}")
    return PermanentTaskError(f"internal error in the adapter: {type(exc).__name__}: {exc}")


# ------------------------------------------------------------------------------------------- ports


@runtime_checkable
class ExecutionContext(Protocol):
    """What a running task sees of the runtime."""

    async def progress(self, fraction: float, message: str = "") -> None:
        """Report progress in 0.0..1.0 with an optional short message."""
        ...

    @property
    def cancelled(self) -> bool:
        """True once cancellation of this task was asked; the adapter should stop soon."""
        ...

    async def delegate(self, tasks: Sequence[Mapping[str, Any]], request_id: str) -> list[str]:
        """Create subtasks (each {"type", "input", "name"?, "depends_on"?, "priority"?}) in this
        task's DAG; returns their ids. The same request_id returns the same subtasks, so a resumed
        attempt does not create them twice."""
        ...

    async def wait_for(self, task_ids: Sequence[str], timeout_s: float) -> list[dict[str, Any]]:
        """Wait until the tasks are final or timeout_s passes: [{"id", "status", "output", "error"}]."""
        ...

    # Checkpoints (executors/checkpointing.py). An adapter that uses them declares
    # `resumable=True` in its capabilities; others restart from scratch after a failure.
    async def restore(self) -> Any:
        """The task's newest verified checkpoint as `Restored` (state, executed_actions,
        remaining_plan, model_versions, ...), or None on a fresh start."""
        ...

    def executed(self, action_id: str) -> bool:
        """True when an earlier attempt recorded this action as done (after `restore`)."""
        ...

    async def checkpoint(self, state: Mapping[str, Any], *, action: Any = None,
                         remaining_plan: list[Any] | None = None,
                         model_versions: Mapping[str, str] | None = None) -> int | None:
        """Record state and the action just done; saved per the runtime's triggers. Returns
        the saved sequence number, or None when it is not saved yet."""
        ...

    async def save_checkpoint(self) -> int:
        """Save what was recorded now; returns its sequence number once durable."""
        ...


@runtime_checkable
class ExecutorAdapter(Protocol):
    async def execute(self, task: ExecutorTask, ctx: ExecutionContext) -> ExecutorResult:
        """Run one attempt. Return the result or raise a TaskError."""
        ...

    def get_capabilities(self) -> ExecutorCapabilities:
        """The task types this adapter runs; `input_schema`/`output_schema` map each task type
        to a JSON Schema."""
        ...

    async def get_status(self) -> dict[str, Any]:
        """A JSON-serializable snapshot: running tasks and counters."""
        ...

    async def cancel(self, task_id: str) -> None:
        """Ask every running attempt of `task_id` to stop; a no-op when none is running."""
        ...


# ---------------------------------------------------------------------------------- local context


@dataclass(frozen=True)
class ProgressReport:
    fraction: float
    message: str


class LocalContext:
    """An in-process ExecutionContext: progress reports are kept in a bounded list (the oldest
    are dropped once `progress_reports_max` is reached; `progress_reports_total` counts them
    all), and cancellation is a flag that tests — or a runtime subclass — set."""

    def __init__(self, *, progress_reports_max: int = PROGRESS_REPORTS_MAX_DEFAULT, checkpointer: Any = None) -> None:
        if not isinstance(progress_reports_max, int) or progress_reports_max < 1:
            raise ValueError(f"progress_reports_max: >= 1, got {progress_reports_max!r}")
        if checkpointer is None:
            # Here, not at the top: executors.checkpointing imports this module's errors.
            from executors.checkpointing import Checkpointer, MemoryCheckpoints

            checkpointer = Checkpointer(MemoryCheckpoints("local"), task_id="local")
        self.checkpointer = checkpointer
        self.progress_reports_max = progress_reports_max
        self._reports: deque[ProgressReport] = deque(maxlen=progress_reports_max)
        self.progress_reports_total = 0
        self._cancelled = False

    async def progress(self, fraction: float, message: str = "") -> None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"progress.fraction: a number in 0.0..1.0, got {fraction!r}")
        if not isinstance(message, str) or len(message) > PROGRESS_MESSAGE_CHARS_MAX:
            raise ValueError(f"progress.message: a str of at most {PROGRESS_MESSAGE_CHARS_MAX} chars")
        self._reports.append(ProgressReport(float(fraction), message))
        self.progress_reports_total += 1

    @property
    def reports(self) -> list[ProgressReport]:
        return list(self._reports)

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @cancelled.setter
    def cancelled(self, value: bool) -> None:
        self._cancelled = bool(value)

    def cancel(self) -> None:
        self._cancelled = True

    async def delegate(self, tasks: Sequence[Mapping[str, Any]], request_id: str) -> list[str]:
        raise PermanentTaskError("delegate: this context runs tasks locally, with no coordinator to delegate to")

    async def wait_for(self, task_ids: Sequence[str], timeout_s: float) -> list[dict[str, Any]]:
        raise PermanentTaskError("wait_for: this context runs tasks locally, with no coordinator to ask")

    async def restore(self) -> Any:
        return await self.checkpointer.restore()

    def executed(self, action_id: str) -> bool:
        return self.checkpointer.executed(action_id)

    async def checkpoint(self, state: Mapping[str, Any], *, action: Any = None,
                         remaining_plan: list[Any] | None = None,
                         model_versions: Mapping[str, str] | None = None) -> int | None:
        return await self.checkpointer.checkpoint(state, action=action, remaining_plan=remaining_plan,
                                                  model_versions=model_versions)

    async def save_checkpoint(self) -> int:
        return await self.checkpointer.save()

    async def close(self) -> None:
        """Stop the checkpoint timer, if any (the runtime calls this when the attempt ends)."""
        await self.checkpointer.close()
