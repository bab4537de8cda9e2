"""The scheduler's read-only input and its output, as frozen dataclasses.

The leader builds a `SchedulerView` from its mirror of replicated state (`SchedulerState`);
a policy reads it and returns a `Plan`. Nothing here holds a clock: `now_ms` is passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from coordinator.errors import invariant
from scheduler.limits import PRIORITY_MAX, PRIORITY_MIN

if TYPE_CHECKING:
    from scheduler.queue import ReadyQueue

NO_DEADLINE_MS = 0


@dataclass(frozen=True, slots=True)
class TaskView:
    id: str
    type: str
    priority: int = 50
    deadline_ms: int = NO_DEADLINE_MS  # absolute, stamped by the proposer; 0 = no deadline
    # Submission order; ties in every ordering break on it (then on id, which is unique).
    created_seq: int = 0
    dependencies: tuple[str, ...] = ()
    est_runtime_s: float | None = None
    # HEFT upward rank: est runtime of this task plus the longest est-runtime chain after it.
    # Computed by `graph.upward_ranks` when the DAG is submitted; used by `critical_path`.
    upward_rank_s: float = 0.0

    def __post_init__(self) -> None:
        invariant(PRIORITY_MIN <= self.priority <= PRIORITY_MAX, f"task {self.id!r}: priority {self.priority} out of range")
        invariant(self.deadline_ms >= 0, f"task {self.id!r}: negative deadline_ms")
        invariant(self.est_runtime_s is None or 0 <= self.est_runtime_s < float("inf"),
                  f"task {self.id!r}: est_runtime_s must be None or finite >= 0")
        # NaN would break every heap comparison.
        invariant(self.upward_rank_s == self.upward_rank_s, f"task {self.id!r}: upward_rank_s is NaN")


@dataclass(frozen=True, slots=True)
class ExecutorView:
    id: str
    type: str
    task_types: frozenset[str]
    capacity: int = 1
    load: int = 0  # tasks currently assigned to it
    cost_per_task: float = 0.0
    latency_s_p50: float = 0.0  # measured from completed tasks; 0 = unknown
    success_rate: float = 1.0  # measured from completed tasks; 1.0 until evidence says otherwise

    @property
    def free_slots(self) -> int:
        return max(0, self.capacity - self.load)


@dataclass(frozen=True, slots=True)
class Assignment:
    task_id: str
    executor_id: str
    score: float


@dataclass(frozen=True, slots=True)
class Unschedulable:
    """A task no registered executor can ever run (no executor supports its type)."""

    task_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Plan:
    """What one `select` call proposes. The leader turns `assignments` into `Assign` commands
    and `unschedulable` into permanent failures (or parks them until an executor appears);
    `apply` re-validates both against current state."""

    assignments: tuple[Assignment, ...] = ()
    unschedulable: tuple[Unschedulable, ...] = ()


EMPTY_PLAN = Plan()


@dataclass(frozen=True)
class SchedulerView:
    """Ready tasks (the queue, read through its non-mutating `iter_top`) and executors.

    `executors_by_type` is derived once per view so a policy finds the capable executors of a
    task in O(1) instead of scanning every executor for every candidate.
    """

    queue: ReadyQueue
    executors: tuple[ExecutorView, ...] = ()
    executors_by_type: Mapping[str, tuple[ExecutorView, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_type: dict[str, list[ExecutorView]] = {}
        for executor in sorted(self.executors, key=lambda e: e.id):
            for task_type in executor.task_types:
                by_type.setdefault(task_type, []).append(executor)
        object.__setattr__(self, "executors_by_type", {k: tuple(v) for k, v in by_type.items()})
