"""Named bounds of the scheduler; units go last (STYLE §8)."""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.limits import Limits

PRIORITY_MIN = Limits.priority_min
PRIORITY_MAX = Limits.priority_max
# One heap per priority value: the deadline-aware pick compares at most this many heads.
PRIORITY_BUCKETS = PRIORITY_MAX - PRIORITY_MIN + 1


@dataclass(frozen=True)
class SchedulerLimits:
    # How many queue heads a policy examines per decision round. It bounds decision cost
    # (never a scan of the whole queue) at the price of head-of-line blocking when the top
    # candidates all need executors that are full (see README "Limits").
    candidates_window_max: int = 64
    # Ready tasks held at once; beyond this `ReadyQueue.add` raises BoundExceeded.
    queue_depth_max: int = 1_000_000
    # Tasks (any status) the dependency graph holds before `forget` must be called.
    graph_tasks_max: int = 2_000_000
    # Lazily deleted heap entries tolerated before the queue rebuilds its heaps: the rebuild is
    # O(n) but happens after at least this many removals plus one per live entry, so it
    # amortizes to O(1) per removal while keeping dead entries below live + this slack.
    queue_dead_entries_slack: int = 1024


DEFAULT_LIMITS = SchedulerLimits()
