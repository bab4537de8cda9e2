"""The ready queue: tasks whose dependencies completed, ordered for the policy to pick from.

One structure serves every ordering a policy may ask for, read through the non-mutating
`iter_top(now_ms, ordering)`:

    EffectivePriority(alpha, beta_per_s)   effective = priority + alpha * exp(-beta * max(0, ttd_s)),
                                           ttd_s = seconds until the task's start-by point
                                           (deadline - START_BY_RUNTIME_FRACTION * estimated
                                           runtime; the deadline if unknown)
    StaticPriority()                       priority only (EffectivePriority with alpha = 0)
    Fifo()                                 submission sequence
    UpwardRank()                           HEFT upward rank, longest remaining chain first

Ties, in every ordering, break on earlier start-by point (no deadline sorts last), then longer upward
rank (the longer remaining chain starts first, as in HEFT; 0 when no estimate is known), then
submission sequence (FIFO), then task id. `Ordering.sort_key(task, now_ms)` states each order as a plain
sort key: it is the naive reference the fast path is tested against, and the fast path yields
exactly `sorted(tasks, key=sort_key)`.

Why the effective order is exact and cheap: priorities are integers 0..100, so the queue keeps
one heap per priority value ordered by (start-by point, -upward rank, seq). Within one priority the
boost alpha*exp(-beta*ttd) never increases as the start-by point moves later (float `exp`, `*`, `+`
are monotone), so a bucket's heap order *is* its effective order at every `now_ms`; the best task
is the best of the <= 101 bucket heads, each scored at `now_ms`: O(101 + log n), independent of
how urgent anything became since it was queued. (Tasks past their deadline all get the full
boost alpha; among them the earlier start-by point wins the tie, which keeps bucket order exact.)
The next-best tasks come from a frontier over the buckets' heap arrays (a heap's children are
never better than their parent), so the top k cost O(101 + k log n) and nothing is mutated.

Removal and update are lazy: a task's heap entries carry a generation, and entries whose
generation is not the task's current one are dead. Dead entries at a heap's top are popped at
once; the rest are skipped when met and purged by a rebuild once they outnumber the live ones
plus `queue_dead_entries_slack` (amortized O(1) per removal).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from coordinator.errors import invariant
from scheduler.errors import BoundExceeded, DuplicateTask, InvalidPolicyConfig, UnknownTask
from scheduler.limits import DEFAULT_LIMITS, PRIORITY_BUCKETS, PRIORITY_MIN, SchedulerLimits
from scheduler.view import NO_DEADLINE_MS, TaskView

# Sorts after every real deadline (ms since the epoch fit far below it).
NO_DEADLINE_KEY = 1 << 62


# Urgency counts down to `deadline - START_BY_RUNTIME_FRACTION * estimated runtime`.
#   1.0 (the latest start): with deadlines derived from a DAG deadline the order is exactly the
#       HEFT upward rank, so long tasks whose latest start is a little earlier run ahead of short
#       tasks due just after it; with every executor busy on the long ones, the short ones all
#       miss (epigenomics on 4 executors: 46 % of deadlines met, FIFO 54 %).
#   0.0 (the deadline, EDD / Jackson's rule, optimal for maximum lateness on one executor): a
#       long task late in its chain starts too late and stretches the makespan (cycles on 4
#       executors: 1.42x the lower bound instead of 1.13x).
#   Every value from 0.25 to 0.9 keeps both on the shared workloads (benchmarks/RESULTS.md,
#   "# Scheduler"); 0.5 is the middle of that range. It must stay one constant for the whole
#   queue: the bucket heaps are keyed by it.
START_BY_RUNTIME_FRACTION = 0.5


def start_by_key(task: TaskView) -> int:
    """The moment (ms) urgency counts down to: the deadline moved earlier by half the estimated
    runtime (START_BY_RUNTIME_FRACTION; the deadline itself when no estimate is known), so a
    10-minute task due in 11 minutes (start-by in 6) is more urgent than a 1-second one due in 7.
    NO_DEADLINE_KEY if the task has no deadline."""
    if task.deadline_ms == NO_DEADLINE_MS:
        return NO_DEADLINE_KEY
    return task.deadline_ms - round((task.est_runtime_s or 0.0) * 1000 * START_BY_RUNTIME_FRACTION)


def effective_priority(priority: int, start_by_key: int, now_ms: int, alpha: float, beta_per_s: float) -> float:
    """priority + alpha * exp(-beta * max(0, time_to_deadline_s)), where time to deadline is
    counted to the start-by point (`start_by_key`, which accounts for half the estimated runtime).
    No deadline -> no boost; past the start-by point -> the full boost alpha.
    The one definition both the fast path and the naive reference use, so their floats are
    bit-identical."""
    if start_by_key == NO_DEADLINE_KEY:
        return float(priority)
    time_to_deadline_s = max(0, start_by_key - now_ms) / 1000.0
    return priority + alpha * math.exp(-beta_per_s * time_to_deadline_s)


def effective_priority_of(task: TaskView, now_ms: int, alpha: float, beta_per_s: float) -> float:
    return effective_priority(task.priority, start_by_key(task), now_ms, alpha, beta_per_s)


class Ordering(Protocol):
    def sort_key(self, task: TaskView, now_ms: int) -> tuple: ...


@dataclass(frozen=True)
class EffectivePriority:
    # alpha: how many priority points an imminent (or missed) deadline is worth.
    alpha: float = 50.0
    # beta: how fast the boost fades with time to deadline; 1/60 -> alpha/e at one minute out.
    beta_per_s: float = 1.0 / 60.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise InvalidPolicyConfig(f"alpha must be a finite number >= 0, got {self.alpha!r}")
        if not (math.isfinite(self.beta_per_s) and self.beta_per_s > 0):
            raise InvalidPolicyConfig(f"beta_per_s must be a finite number > 0, got {self.beta_per_s!r}")

    def sort_key(self, task: TaskView, now_ms: int) -> tuple:
        start_by = start_by_key(task)
        eff = effective_priority(task.priority, start_by, now_ms, self.alpha, self.beta_per_s)
        return (-eff, start_by, -task.upward_rank_s, task.created_seq, task.id)


@dataclass(frozen=True)
class StaticPriority:
    alpha = 0.0
    beta_per_s = 1.0

    def sort_key(self, task: TaskView, now_ms: int) -> tuple:
        start_by = start_by_key(task)
        eff = effective_priority(task.priority, start_by, now_ms, 0.0, 1.0)
        return (-eff, start_by, -task.upward_rank_s, task.created_seq, task.id)


@dataclass(frozen=True)
class Fifo:
    def sort_key(self, task: TaskView, now_ms: int) -> tuple:
        return (task.created_seq, task.id)


@dataclass(frozen=True)
class UpwardRank:
    def sort_key(self, task: TaskView, now_ms: int) -> tuple:
        return (-task.upward_rank_s, start_by_key(task), task.created_seq, task.id)


# Heap entries are tuples whose last two fields are (task id, generation); the id is unique, so
# the generation is never compared.
#   bucket heap (one per priority):  (start_by_key, -upward_rank_s, seq, id, gen)
#   fifo heap:                       (seq, id, gen)
#   rank heap:                       (-upward_rank_s, start_by_key, seq, id, gen)


class ReadyQueue:
    def __init__(self, limits: SchedulerLimits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._tasks: dict[str, TaskView] = {}
        self._gen: dict[str, int] = {}
        self._next_gen = 0
        self._buckets: list[list[tuple]] = [[] for _ in range(PRIORITY_BUCKETS)]
        self._fifo: list[tuple] = []
        self._rank: list[tuple] = []
        self._dead = 0  # dead entries across all heaps

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._tasks

    def get(self, task_id: str) -> TaskView | None:
        return self._tasks.get(task_id)

    def tasks(self) -> list[TaskView]:
        """Every queued task, unordered (for the naive reference and for debugging: O(n))."""
        return list(self._tasks.values())

    @property
    def dead_entries(self) -> int:
        return self._dead

    def iter_top(self, now_ms: int, ordering: Ordering) -> Iterator[TaskView]:
        """Queued tasks best first under `ordering` at `now_ms`, lazily; mutates nothing. The
        caller bounds how far it reads (a policy stops at `candidates_window_max`)."""
        if isinstance(ordering, (EffectivePriority, StaticPriority)):
            return self._iter_buckets(now_ms, ordering.alpha, ordering.beta_per_s)
        if isinstance(ordering, Fifo):
            return self._iter_heap(self._fifo)
        if isinstance(ordering, UpwardRank):
            return self._iter_heap(self._rank)
        raise InvalidPolicyConfig(f"unknown queue ordering {ordering!r}")

    def top(self, now_ms: int, ordering: Ordering, count: int) -> list[TaskView]:
        out: list[TaskView] = []
        if count <= 0:
            return out
        for task in self.iter_top(now_ms, ordering):
            out.append(task)
            if len(out) == count:
                break
        return out

    # ------------------------------------------------------------------ updates
    def add(self, task: TaskView) -> None:
        if task.id in self._tasks:
            raise DuplicateTask(f"task {task.id!r} is already queued")
        if len(self._tasks) >= self._limits.queue_depth_max:
            raise BoundExceeded(f"ready queue holds {len(self._tasks)} tasks = queue_depth_max")
        gen = self._next_gen
        self._next_gen += 1
        self._tasks[task.id] = task
        self._gen[task.id] = gen
        self._push(task, gen)

    def remove(self, task_id: str) -> TaskView:
        task = self._tasks.pop(task_id, None)
        if task is None:
            raise UnknownTask(f"task {task_id!r} is not queued")
        del self._gen[task_id]
        self._dead += 3
        self._drop_dead_head(self._buckets[task.priority - PRIORITY_MIN])
        self._drop_dead_head(self._fifo)
        self._drop_dead_head(self._rank)
        if self._dead > 3 * len(self._tasks) + self._limits.queue_dead_entries_slack:
            self._rebuild()
        return task

    def discard(self, task_id: str) -> TaskView | None:
        return self.remove(task_id) if task_id in self._tasks else None

    def update(self, task: TaskView) -> None:
        """Replace a queued task (new priority or deadline); it keeps no old position."""
        self.remove(task.id)
        self.add(task)

    def pop(self, now_ms: int, ordering: Ordering) -> TaskView | None:
        for task in self.iter_top(now_ms, ordering):
            return self.remove(task.id)
        return None

    # ------------------------------------------------------------------ internals
    def _push(self, task: TaskView, gen: int) -> None:
        dkey = start_by_key(task)
        heapq.heappush(self._buckets[task.priority - PRIORITY_MIN], (dkey, -task.upward_rank_s, task.created_seq, task.id, gen))
        heapq.heappush(self._fifo, (task.created_seq, task.id, gen))
        heapq.heappush(self._rank, (-task.upward_rank_s, dkey, task.created_seq, task.id, gen))

    def _live(self, entry: tuple) -> bool:
        return self._gen.get(entry[-2]) == entry[-1]

    def _drop_dead_head(self, heap: list[tuple]) -> None:
        gens = self._gen
        while heap and gens.get(heap[0][-2]) != heap[0][-1]:
            heapq.heappop(heap)
            self._dead -= 1

    def _rebuild(self) -> None:
        self._buckets = [[] for _ in range(PRIORITY_BUCKETS)]
        self._fifo = []
        self._rank = []
        for task in self._tasks.values():
            self._push(task, self._gen[task.id])
        self._dead = 0

    def _iter_heap(self, heap: list[tuple]) -> Iterator[TaskView]:
        """Entries of one heap in order without popping: a frontier of array positions whose
        parents were already yielded (a child is never better than its parent)."""
        if not heap:
            return
        tasks, gens = self._tasks, self._gen
        frontier = [(heap[0], 0)]
        size = len(heap)
        while frontier:
            entry, i = heapq.heappop(frontier)
            for child in (2 * i + 1, 2 * i + 2):
                if child < size:
                    heapq.heappush(frontier, (heap[child], child))
            if gens.get(entry[-2]) == entry[-1]:
                yield tasks[entry[-2]]

    def _iter_buckets(self, now_ms: int, alpha: float, beta_per_s: float) -> Iterator[TaskView]:
        """Merge the priority buckets by effective priority at `now_ms` (see module docstring)."""
        tasks, gens, buckets = self._tasks, self._gen, self._buckets
        frontier: list[tuple] = []
        for index, heap in enumerate(buckets):
            if heap:
                frontier.append((_bucket_key(index, heap[0], now_ms, alpha, beta_per_s), index, 0))
        heapq.heapify(frontier)
        while frontier:
            key, index, i = heapq.heappop(frontier)
            heap = buckets[index]
            size = len(heap)
            for child in (2 * i + 1, 2 * i + 2):
                if child < size:
                    heapq.heappush(frontier, (_bucket_key(index, heap[child], now_ms, alpha, beta_per_s), index, child))
            entry = heap[i]
            if gens.get(entry[-2]) == entry[-1]:
                task = tasks[entry[-2]]
                invariant(task.priority - PRIORITY_MIN == index, f"task {task.id!r} in the wrong bucket")
                yield task


def _bucket_key(index: int, entry: tuple, now_ms: int, alpha: float, beta_per_s: float) -> tuple:
    dkey = entry[0]
    eff = effective_priority(index + PRIORITY_MIN, dkey, now_ms, alpha, beta_per_s)
    # Must equal EffectivePriority.sort_key for the same task, field for field.
    return (-eff, dkey, entry[1], entry[2], entry[3])
