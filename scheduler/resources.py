"""Each executor's load against its capacity, and which task runs where.

The leader's mirror of replicated state (`SchedulerState`) updates it as assignments, completions
and executor losses are applied; `views()` gives the executors with their current load for a
`SchedulerView`. Every update is O(1) (O(tasks on it) to remove an executor).
"""

from __future__ import annotations

from dataclasses import replace

from scheduler.errors import CapacityExceeded, DuplicateTask, UnknownExecutor, UnknownTask
from scheduler.view import ExecutorView


class ResourceAllocator:
    def __init__(self) -> None:
        self._executors: dict[str, ExecutorView] = {}
        self._running: dict[str, set[str]] = {}  # executor id -> task ids
        self._placement: dict[str, str] = {}  # task id -> executor id

    # ------------------------------------------------------------------ queries
    def __contains__(self, executor_id: object) -> bool:
        return executor_id in self._executors

    def get(self, executor_id: str) -> ExecutorView:
        return self._executor(executor_id)

    def views(self) -> tuple[ExecutorView, ...]:
        """Executors with their current load, in id order (deterministic)."""
        return tuple(self._executors[k] for k in sorted(self._executors))

    def load(self, executor_id: str) -> int:
        return self._executor(executor_id).load

    def free_slots(self, executor_id: str) -> int:
        return self._executor(executor_id).free_slots

    def total_free_slots(self) -> int:
        return sum(e.free_slots for e in self._executors.values())

    def executor_of(self, task_id: str) -> str | None:
        return self._placement.get(task_id)

    def tasks_on(self, executor_id: str) -> list[str]:
        self._executor(executor_id)
        return sorted(self._running[executor_id])

    # ------------------------------------------------------------------ updates
    def add_executor(self, executor: ExecutorView) -> None:
        """Register, or re-register with new capabilities/capacity; the load is kept (it is
        what this allocator counts, not what the caller says)."""
        running = self._running.setdefault(executor.id, set())
        self._executors[executor.id] = replace(executor, load=len(running))

    def update_stats(self, executor_id: str, *, cost_per_task: float | None = None,
                     latency_s_p50: float | None = None, success_rate: float | None = None) -> None:
        executor = self._executor(executor_id)
        changes = {k: v for k, v in (("cost_per_task", cost_per_task), ("latency_s_p50", latency_s_p50),
                                      ("success_rate", success_rate)) if v is not None}
        self._executors[executor_id] = replace(executor, **changes)

    def remove_executor(self, executor_id: str) -> list[str]:
        """Forget an executor; return the tasks that were running on it (to requeue), sorted."""
        self._executor(executor_id)
        del self._executors[executor_id]
        orphans = sorted(self._running.pop(executor_id))
        for task_id in orphans:
            del self._placement[task_id]
        return orphans

    def assign(self, task_id: str, executor_id: str) -> None:
        executor = self._executor(executor_id)
        if task_id in self._placement:
            raise DuplicateTask(f"task {task_id!r} already runs on {self._placement[task_id]!r}")
        if executor.free_slots <= 0:
            raise CapacityExceeded(f"executor {executor_id!r} is full ({executor.load}/{executor.capacity})")
        self._running[executor_id].add(task_id)
        self._placement[task_id] = executor_id
        self._executors[executor_id] = replace(executor, load=executor.load + 1)

    def release(self, task_id: str) -> str:
        executor_id = self._placement.pop(task_id, None)
        if executor_id is None:
            raise UnknownTask(f"task {task_id!r} is not running on any executor")
        self._running[executor_id].discard(task_id)
        executor = self._executors[executor_id]
        self._executors[executor_id] = replace(executor, load=executor.load - 1)
        return executor_id

    def _executor(self, executor_id: str) -> ExecutorView:
        executor = self._executors.get(executor_id)
        if executor is None:
            raise UnknownExecutor(f"no executor {executor_id!r}")
        return executor
