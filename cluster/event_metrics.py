"""Task metrics folded from the replicated state's events, off the Raft apply path.

    thread "metrics-events" (cluster/metrics.py), every POLL_INTERVAL_S:
        EventReader.read()   under fsm_lock: at most EVENTS_PER_READ_MAX events after the cursor,
                             and (type, created_at_ms) of the tasks they name
        EventFolder.fold()   no lock, no clock, no I/O: events + task info in → Observations out
        NodeMetrics.record   Observations → prometheus counters and histograms

What each event becomes (event tuples: index, seq, kind, task_id, executor_id, time_ms, data_json;
times are the proposer-stamped milliseconds, so every node computes the same numbers):

    TaskCompleted / TaskCancelled / TaskFailed with status failed or dead_letter
        → tasks_total{type, status} + 1; task_duration_seconds{type} ← time_ms − created_at_ms
    TaskFailed with status pending (a retry)   → task_retries_total{type} + 1; assignable at retry_at_ms
    TaskRequeued naming an executor            → task_retries_total{type} + 1 (an attempt taken back
                                                 from a lost or unregistered executor)
    TaskReady                                  → assignable since max(time_ms, retry_at_ms)
    TaskAssigned                               → dispatch_latency_seconds{type} ← time_ms − assignable
                                                 since (one per assignment; none if unseen, see below)
    ExecutorLost                               → lease_expirations_total + the tasks it took back: its
                                                 "requeued" list plus the TaskFailed dead_letter events
                                                 of the same index and executor (out of attempts)

Bounds: `type` keeps the first TASK_TYPE_LABELS_MAX distinct task types this process saw; later
ones are counted as "other" (a task type "other" shares that label). At most READY_TRACKED_MAX
tasks are remembered as waiting to be assigned (the oldest are forgotten: their assignment is not
observed). A reader that fell behind the FSM's event ring (events_retained_max) skips to the oldest
retained index and counts the log entries it skipped (the FSM does not count evicted events, so
this is entries, not events: any increase means the task counters under-count).

Counters start at the node's start: the reader begins after the last entry its journal held
(history the node had applied before is not counted again), and tasks that were already waiting to
be assigned are seeded with an estimate of when they became assignable (`ready_since_ms`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from coordinator.errors import Compacted

TASK_TYPE_LABELS_MAX = 64
OTHER_TYPE = "other"
READY_TRACKED_MAX = 100_000
EVENTS_PER_READ_MAX = 1_000   # per hold of the FSM lock: apply waits while it is held
FINAL_STATUSES = ("completed", "failed", "cancelled", "dead_letter")
EXECUTOR_LOST_PREFIX = "executor lost:"  # the reason fsm._apply_executor_lost gives what it takes back

Event = tuple[int, int, str, str, str, int, str]
TaskInfo = tuple[str, int]  # (type, created_at_ms)


class TypeLabels:
    """Bounded `type` label values: the first `distinct_max` types keep their name."""

    def __init__(self, distinct_max: int = TASK_TYPE_LABELS_MAX) -> None:
        self.distinct_max = distinct_max
        self._known: set[str] = set()

    def __call__(self, task_type: str) -> str:
        known = self._known
        if task_type in known:
            return task_type
        if len(known) < self.distinct_max:
            known.add(task_type)
            return task_type
        return OTHER_TYPE


@dataclass
class Observations:
    finished: Counter = field(default_factory=Counter)  # (type, status) -> tasks
    durations_s: list[tuple[str, float]] = field(default_factory=list)  # (type, creation → final)
    dispatch_s: list[tuple[str, float]] = field(default_factory=list)  # (type, assignable → assigned)
    retries: Counter = field(default_factory=Counter)  # type -> attempts put back for another
    lease_expirations: int = 0


def _data(data_json: str) -> dict[str, Any]:
    try:
        data = json.loads(data_json) if data_json else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


class EventFolder:
    """Turns events into observations. Deterministic: the same events and task info always give
    the same observations. Keeps only what spans events: when waiting tasks became assignable,
    the retry times announced before their TaskReady, and take-backs waiting for their ExecutorLost."""

    def __init__(self, types: TypeLabels | None = None, ready_tracked_max: int = READY_TRACKED_MAX) -> None:
        self.types = types or TypeLabels()
        self.ready_tracked_max = ready_tracked_max
        self.ready_forgotten = 0  # tasks dropped from the bounded waiting set (their dispatch not observed)
        self._ready_since: dict[str, int] = {}
        self._retry_at: dict[str, int] = {}
        self._taken_back: Counter = Counter()  # executor -> dead-lettered take-backs at _taken_back_index
        self._taken_back_index = -1

    @property
    def waiting(self) -> int:
        return len(self._ready_since)

    def seed_ready(self, items: Iterable[tuple[str, int]]) -> None:
        """Tasks already waiting to be assigned when observation starts: (task id, assignable since)."""
        for task_id, since_ms in items:
            self._remember(self._ready_since, task_id, since_ms)

    def _remember(self, table: dict[str, int], task_id: str, value: int) -> None:
        table.pop(task_id, None)  # re-inserted: the dict's order is the order of last change
        table[task_id] = value
        while len(table) > self.ready_tracked_max:
            del table[next(iter(table))]
            self.ready_forgotten += 1

    def fold(self, events: Iterable[Event], tasks: Mapping[str, TaskInfo]) -> Observations:
        out = Observations()
        for index, _seq, kind, task_id, executor_id, time_ms, data_json in events:
            if index != self._taken_back_index:
                self._taken_back.clear()
                self._taken_back_index = index
            info = tasks.get(task_id) if task_id else None
            if kind == "TaskReady":
                since = max(time_ms, self._retry_at.pop(task_id, 0))
                self._remember(self._ready_since, task_id, since)
            elif kind == "TaskAssigned":
                since = self._ready_since.pop(task_id, None)
                if since is not None:
                    out.dispatch_s.append((self._type(info), max(0, time_ms - since) / 1000.0))
            elif kind == "TaskCompleted":
                self._finish(out, task_id, info, "completed", time_ms)
            elif kind == "TaskCancelled":
                self._finish(out, task_id, info, "cancelled", time_ms)
            elif kind == "TaskFailed":
                data = _data(data_json)
                status = data.get("status")
                if status == "pending":
                    out.retries[self._type(info)] += 1
                    retry_at = data.get("retry_at_ms")
                    if isinstance(retry_at, int) and retry_at > 0:
                        self._remember(self._retry_at, task_id, retry_at)
                elif status in FINAL_STATUSES:
                    self._finish(out, task_id, info, status, time_ms)
                    error = data.get("error")
                    if (status == "dead_letter" and executor_id and isinstance(error, str)
                            and error.startswith(EXECUTOR_LOST_PREFIX)):
                        self._taken_back[executor_id] += 1
            elif kind == "TaskRequeued":
                self._ready_since.pop(task_id, None)
                if executor_id:  # taken back from its executor (lost or unregistered), not an operator's re-queue
                    out.retries[self._type(info)] += 1
            elif kind == "ExecutorLost":
                requeued = _data(data_json).get("requeued")
                out.lease_expirations += (len(requeued) if isinstance(requeued, list) else 0)
                out.lease_expirations += self._taken_back.pop(executor_id, 0)
        return out

    def _type(self, info: TaskInfo | None) -> str:
        return self.types(info[0]) if info is not None else OTHER_TYPE

    def _finish(self, out: Observations, task_id: str, info: TaskInfo | None, status: str, time_ms: int) -> None:
        self._ready_since.pop(task_id, None)
        self._retry_at.pop(task_id, None)
        task_type = self._type(info)
        out.finished[(task_type, status)] += 1
        if info is not None:
            out.durations_s.append((task_type, max(0, time_ms - info[1]) / 1000.0))


def ready_since_ms(record: Any, tasks: Mapping[str, Any]) -> int:
    """When a task that is waiting to be assigned became assignable, from its record alone (for
    tasks already waiting when observation starts): the latest of its creation, its retry time,
    its dependencies' completion (a final task's updated_at_ms is when it became final) and its
    last move back to pending (updated_at_ms, unless that was a mark as unschedulable)."""
    since = max(record.created_at_ms, record.not_before_ms)
    for dep in record.dependencies:
        dep_record = tasks.get(dep)
        if dep_record is not None:
            since = max(since, dep_record.updated_at_ms)
    if not record.error.startswith("unschedulable:"):
        since = max(since, record.updated_at_ms)
    return since


@dataclass
class Batch:
    events: list[Event]
    tasks: dict[str, TaskInfo]
    seeds: list[tuple[str, int]] = field(default_factory=list)
    missed_entries: int = 0


class EventReader:
    """A cursor over the FSM's event ring. Each read holds `fsm_lock` for one bounded slice.

    Nothing is read until the FSM has applied `start_after_index` (what the journal held at start
    is replayed first; it was counted before the restart). The first read after that also returns
    the tasks already waiting to be assigned, for EventFolder.seed_ready."""

    def __init__(self, fsm: Any, fsm_lock: Any, start_after_index: int = 0,
                 events_per_read_max: int = EVENTS_PER_READ_MAX) -> None:
        self._fsm = fsm
        self._lock = fsm_lock
        self._index = start_after_index + 1
        self._seq = -1
        self._started = False
        self.events_per_read_max = events_per_read_max

    @property
    def cursor(self) -> tuple[int, int]:
        return self._index, self._seq

    def read(self) -> Batch:
        fsm = self._fsm
        with self._lock:
            seeds: list[tuple[str, int]] = []
            if not self._started:
                if fsm.last_applied_index < self._index - 1:
                    return Batch([], {})
                self._started = True
                tasks = fsm.tasks
                seeds = [(task_id, ready_since_ms(tasks[task_id], tasks)) for task_id in fsm.ready if task_id in tasks]
            missed = 0
            try:
                events = fsm.events_from(self._index, self.events_per_read_max, self._seq)
            except Compacted:
                # Entries after the cursor up to `through` were evicted unread; the cursor's own
                # entry only if none of it was read (its unread tail, if any, is not counted).
                through = fsm.events_compacted_through
                missed = through - self._index + (1 if self._seq < 0 else 0)
                self._index, self._seq = through + 1, -1
                events = fsm.events_from(self._index, self.events_per_read_max, self._seq)
            tasks = fsm.tasks
            info: dict[str, TaskInfo] = {}
            for event in events:
                task_id = event[3]
                if task_id and task_id not in info:
                    record = tasks.get(task_id)
                    if record is not None:
                        info[task_id] = (record.type, record.created_at_ms)
        if events:
            self._index, self._seq = events[-1][0], events[-1][1]
        return Batch(events, info, seeds, missed)


class LeaderWatch:
    """Counts leader changes seen by polling: a leader different from the last one seen, or the
    same one in a new term. The first leader a node sees after starting counts as one. A change
    and back between two polls is not seen (the poll is cheap, not exhaustive)."""

    def __init__(self) -> None:
        self._last: tuple[str, int] | None = None

    def observe(self, leader: str, term: int) -> bool:
        if not leader:
            return False
        seen = (leader, term)
        if seen == self._last:
            return False
        self._last = seen
        return True
