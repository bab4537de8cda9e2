"""Scheduling policies: pure functions from a read-only view to a plan.

    policy = get_policy("deadline_aware", alpha=50, beta_per_s=1/60)
    plan = policy.select(view, now_ms, slots_max)     # Plan(assignments, unschedulable)

Every policy walks the ready queue best-first in its own ordering, lazily, and stops after
`candidates_window_max` tasks or when the free slots (capped by `slots_max`) are used up; it never
scans the whole queue, so a decision costs O(101 + window * (log n + capable executors)).
For each candidate it picks an executor among those that support the task type and still have
a free slot *in this plan* (the plan counts its own assignments; the view is never mutated).

    name                 task order                          executor choice
    deadline_aware *     effective priority (alpha, beta)    best match score
    fifo                 submission sequence                 best match score
    cost_optimized       effective priority                  cheapest, then best score
    resource_optimized   effective priority                  fullest that still fits (best fit:
                                                             packs work, leaves whole executors idle)
    critical_path        HEFT upward rank                    best match score
    (* default)

Ties between executors break on the lower executor id, so a plan is a pure function of its input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from scheduler.errors import InvalidPolicyConfig, UnknownPolicy
from scheduler.limits import DEFAULT_LIMITS
from scheduler.matching import DEFAULT_WEIGHTS, MatchWeights, match_score, unschedulable_reason
from scheduler.queue import EffectivePriority, Fifo, Ordering, UpwardRank
from scheduler.view import EMPTY_PLAN, Assignment, ExecutorView, Plan, SchedulerView, TaskView, Unschedulable

DEFAULT_POLICY = "deadline_aware"


@runtime_checkable
class SchedulingPolicy(Protocol):
    name: str
    ordering: Ordering

    def select(self, view: SchedulerView, now_ms: int, slots_max: int) -> Plan: ...


# Chooses among capable executors with a free slot: returns (executor, score) or None.
ExecutorChooser = Callable[[TaskView, list[ExecutorView], dict[str, int], MatchWeights], "tuple[ExecutorView, float] | None"]


def choose_best_score(task: TaskView, candidates: list[ExecutorView], load: dict[str, int],
                      weights: MatchWeights) -> tuple[ExecutorView, float] | None:
    best: tuple[ExecutorView, float] | None = None
    for executor in candidates:  # in id order, so '>' keeps the lowest id on a tie
        score = match_score(task, executor, load[executor.id], weights)
        if best is None or score > best[1]:
            best = (executor, score)
    return best


def choose_cheapest(task: TaskView, candidates: list[ExecutorView], load: dict[str, int],
                    weights: MatchWeights) -> tuple[ExecutorView, float] | None:
    best: tuple[float, float, ExecutorView] | None = None
    for executor in candidates:
        score = match_score(task, executor, load[executor.id], weights)
        if best is None or (executor.cost_per_task, -score) < (best[0], -best[1]):
            best = (executor.cost_per_task, score, executor)
    return None if best is None else (best[2], best[1])


def choose_best_fit(task: TaskView, candidates: list[ExecutorView], load: dict[str, int],
                    weights: MatchWeights) -> tuple[ExecutorView, float] | None:
    best: tuple[int, float, ExecutorView] | None = None
    for executor in candidates:
        free = executor.capacity - load[executor.id]
        score = match_score(task, executor, load[executor.id], weights)
        if best is None or (free, -score) < (best[0], -best[1]):
            best = (free, score, executor)
    return None if best is None else (best[2], best[1])


@dataclass(frozen=True)
class WindowPolicy:
    """The one selection loop every registered policy shares; they differ in ordering and
    executor choice only."""

    name: str
    ordering: Ordering
    chooser: ExecutorChooser = field(default=choose_best_score, repr=False)
    candidates_window_max: int = DEFAULT_LIMITS.candidates_window_max
    weights: MatchWeights = DEFAULT_WEIGHTS

    def __post_init__(self) -> None:
        if not (isinstance(self.candidates_window_max, int) and self.candidates_window_max >= 1):
            raise InvalidPolicyConfig(f"candidates_window_max must be an integer >= 1, got {self.candidates_window_max!r}")

    def select(self, view: SchedulerView, now_ms: int, slots_max: int) -> Plan:
        if slots_max <= 0 or len(view.queue) == 0:
            return EMPTY_PLAN
        load = {e.id: e.load for e in view.executors}
        budget = min(slots_max, sum(e.free_slots for e in view.executors))
        by_type = view.executors_by_type
        assignments: list[Assignment] = []
        unschedulable: list[Unschedulable] = []
        examined = 0
        for task in view.queue.iter_top(now_ms, self.ordering):
            examined += 1
            capable = by_type.get(task.type)
            if capable is None:
                reason = unschedulable_reason(task, view)
                if reason is not None:
                    unschedulable.append(Unschedulable(task.id, reason))
            elif budget > 0:
                candidates = [e for e in capable if load[e.id] < e.capacity]
                choice = self.chooser(task, candidates, load, self.weights) if candidates else None
                if choice is not None:
                    executor, score = choice
                    assignments.append(Assignment(task.id, executor.id, score))
                    load[executor.id] += 1
                    budget -= 1
            if examined >= self.candidates_window_max or budget == 0:
                break
        if not assignments and not unschedulable:
            return EMPTY_PLAN
        return Plan(tuple(assignments), tuple(unschedulable))


_COMMON_KEYS = ("candidates_window_max", "weights")
_EFFECTIVE_KEYS = ("alpha", "beta_per_s")


def _build(name: str, config: dict[str, Any], uses_effective: bool, make_ordering: Callable[..., Ordering],
           chooser: ExecutorChooser) -> WindowPolicy:
    valid = _COMMON_KEYS + (_EFFECTIVE_KEYS if uses_effective else ())
    unknown = sorted(set(config) - set(valid))
    if unknown:
        raise InvalidPolicyConfig(f"policy {name!r} has no setting {', '.join(unknown)}; valid settings: {', '.join(valid)}")
    ordering = make_ordering(**{k: config[k] for k in _EFFECTIVE_KEYS if k in config}) if uses_effective else make_ordering()
    weights = config.get("weights", DEFAULT_WEIGHTS)
    if isinstance(weights, dict):
        weights = MatchWeights(**weights)
    kwargs: dict[str, Any] = {"weights": weights}
    if "candidates_window_max" in config:
        kwargs["candidates_window_max"] = config["candidates_window_max"]
    return WindowPolicy(name, ordering, chooser, **kwargs)


POLICIES: dict[str, Callable[..., SchedulingPolicy]] = {
    "deadline_aware": lambda **c: _build("deadline_aware", c, True, EffectivePriority, choose_best_score),
    "fifo": lambda **c: _build("fifo", c, False, Fifo, choose_best_score),
    "cost_optimized": lambda **c: _build("cost_optimized", c, True, EffectivePriority, choose_cheapest),
    "resource_optimized": lambda **c: _build("resource_optimized", c, True, EffectivePriority, choose_best_fit),
    "critical_path": lambda **c: _build("critical_path", c, False, UpwardRank, choose_best_score),
}


def get_policy(name: str = DEFAULT_POLICY, **config: Any) -> SchedulingPolicy:
    """The policy registered as `name`, configured by `config` (e.g. alpha, beta_per_s,
    candidates_window_max, weights). Raises UnknownPolicy naming the valid policies."""
    factory = POLICIES.get(name)
    if factory is None:
        raise UnknownPolicy(f"unknown scheduling policy {name!r}; valid policies: {', '.join(sorted(POLICIES))}")
    return factory(**config)
