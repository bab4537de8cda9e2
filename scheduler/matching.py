"""How well an executor fits a task, and which tasks no executor can ever run.

    match_score(task, executor, load, weights) -> float      higher is better
    unschedulable_reason(task, view) -> str | None

The score combines, for an executor that supports the task's type:
    + success      * success_rate                 historical reliability, 0..1
    - load         * load / capacity              spread work; a busy executor is slower to start
    - cost         * cost / (1 + cost)            cost per task, squashed into 0..1
    - latency      * latency_p50_s / (1 + ...)    historical latency, squashed into 0..1
Squashing keeps every term in 0..1 whatever the unit scale, so the weights are comparable and a
single outlier cannot dominate. Capability fit is a hard filter, not a term: an executor that does
not support the type is never a candidate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scheduler.errors import InvalidPolicyConfig
from scheduler.view import ExecutorView, SchedulerView, TaskView

# How many registered task types an "unschedulable" reason lists before eliding the rest.
REASON_TYPES_LISTED_MAX = 8


@dataclass(frozen=True)
class MatchWeights:
    success: float = 2.0
    load: float = 1.0
    cost: float = 1.0
    latency: float = 1.0

    def __post_init__(self) -> None:
        for name in ("success", "load", "cost", "latency"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise InvalidPolicyConfig(f"match weight {name} must be a finite number >= 0, got {value!r}")


DEFAULT_WEIGHTS = MatchWeights()


def capable(task: TaskView, executor: ExecutorView) -> bool:
    return task.type in executor.task_types


def match_score(task: TaskView, executor: ExecutorView, load: int, weights: MatchWeights = DEFAULT_WEIGHTS) -> float:
    """Score of running `task` on `executor` when it already carries `load` tasks."""
    cost = max(0.0, executor.cost_per_task)
    latency_s = max(0.0, executor.latency_s_p50)
    return (
        weights.success * executor.success_rate
        - weights.load * (load / executor.capacity if executor.capacity > 0 else 1.0)
        - weights.cost * (cost / (1.0 + cost))
        - weights.latency * (latency_s / (1.0 + latency_s))
    )


def unschedulable_reason(task: TaskView, view: SchedulerView) -> str | None:
    """Why no registered executor can ever run `task`, or None if one can (even if it is busy).

    With no executors registered at all nothing is reported: executors connect after a leader
    starts, and failing every task in that window would be wrong.
    """
    if not view.executors or task.type in view.executors_by_type:
        return None
    types = sorted(view.executors_by_type)
    listed = ", ".join(types[:REASON_TYPES_LISTED_MAX]) + (", ..." if len(types) > REASON_TYPES_LISTED_MAX else "")
    return f"no executor supports task type {task.type!r} (supported: {listed or 'none'})"
