"""A deterministic discrete-event simulation of the scheduler running a DAG on executors.

    result = simulate(tasks, executors, policy, rng=random.Random(seed), failure_rate=0.1)
    result = simulate_workload(load_workload(path), executors_count=8, policy=get_policy("fifo"))

A fake clock in integer milliseconds jumps from event to event; nothing sleeps. After every
event the policy is asked for a plan over the current view, and the plan is applied through
`SchedulerState.apply_assignment`, the same re-validating path the leader's `apply` will take.
All randomness (failure injection) comes from the `random.Random` passed in, so a seed
reproduces a run exactly.

Quality metrics for `simulate_workload`:
    lower_bound_s = max(critical path, total work / K)     no schedule on K executors beats it
    deadlines: the DAG must finish by D = lower_bound * (1 + slack); each task's deadline is its
    latest finish, D - (upward_rank - runtime), i.e. the last moment it can end and still leave
    time for its longest chain of successors.
"""

from __future__ import annotations

import bisect
import heapq
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.errors import invariant
from scheduler.graph import TaskState, topological_order, upward_ranks
from scheduler.policies import SchedulingPolicy
from scheduler.state import SchedulerState
from scheduler.view import NO_DEADLINE_MS, ExecutorView, TaskView

WORKLOAD_TASK_TYPE = "wf"
# Attempts a task gets under failure injection before its failure becomes permanent.
SIM_ATTEMPTS_MAX = 3
# Bound on simulated events, so a scheduler bug that never finishes fails loudly instead.
SIM_EVENTS_MAX = 10_000_000


@dataclass(frozen=True, slots=True)
class SimTask:
    id: str
    runtime_ms: int
    deps: tuple[str, ...] = ()
    type: str = WORKLOAD_TASK_TYPE
    priority: int = 50
    deadline_ms: int = NO_DEADLINE_MS


@dataclass(frozen=True, slots=True)
class TraceEvent:
    time_ms: int
    kind: str  # start | complete | retry | fail | upstream_failed | unschedulable
    task_id: str
    detail: str = ""  # executor id for start/complete/retry; cause for failures


@dataclass(frozen=True)
class SimResult:
    makespan_ms: int
    finish_ms: Mapping[str, int]  # completed tasks only
    final_state: Mapping[str, TaskState]
    trace: tuple[TraceEvent, ...]
    decisions: int  # select() calls
    deadline_hits: int
    deadlines_total: int

    @property
    def deadline_hit_rate(self) -> float:
        return self.deadline_hits / self.deadlines_total if self.deadlines_total else 1.0


@dataclass(frozen=True)
class WorkloadResult:
    sim: SimResult
    executors_count: int
    lower_bound_ms: int
    critical_path_ms: int
    total_work_ms: int
    deadline_slack: float

    @property
    def makespan_over_lower_bound(self) -> float:
        return self.sim.makespan_ms / self.lower_bound_ms if self.lower_bound_ms else 1.0


@dataclass(frozen=True)
class Workload:
    name: str
    tasks: tuple[SimTask, ...] = field(repr=False)


def load_workload(path: str | Path) -> Workload:
    """Read the shared `{"tasks":[{"id","runtime_s","deps","cores"}]}` format. Runtimes become
    integer milliseconds (the clock's unit); `cores` is ignored: every task takes one slot (all
    shared workloads have cores = 1)."""
    path = Path(path)
    data = json.loads(path.read_text())
    return workload_from_dict(path.name.removesuffix(".dag.json"), data)


def workload_from_dict(name: str, data: Mapping[str, Any]) -> Workload:
    tasks = tuple(
        SimTask(str(t["id"]), max(0, round(float(t["runtime_s"]) * 1000)), tuple(str(d) for d in t.get("deps", ())))
        for t in data["tasks"]
    )
    return Workload(name, tasks)


def simulate(tasks: Sequence[SimTask], executors: Sequence[ExecutorView], policy: SchedulingPolicy, *,
             rng: random.Random | None = None, failure_rate: float = 0.0, start_ms: int = 0,
             record_trace: bool = True, estimates: bool = True) -> SimResult:
    """Run `tasks` to the end: every task completes, fails (injected, after SIM_ATTEMPTS_MAX
    attempts), fails upstream, or is reported unschedulable. With `estimates`, `est_runtime_s`
    and upward ranks are the true runtimes (an oracle; production estimates come from history
    per task type); without, the scheduler knows no runtimes (est None, rank 0)."""
    invariant(failure_rate == 0.0 or rng is not None, "failure injection needs an rng")
    deps = {t.id: t.deps for t in tasks}
    runtime_ms = {t.id: t.runtime_ms for t in tasks}
    ranks = upward_ranks(deps, {k: v / 1000.0 for k, v in runtime_ms.items()}) if estimates else dict.fromkeys(deps, 0.0)
    state = SchedulerState()
    for executor in executors:
        state.add_executor(executor)
    state.submit(
        TaskView(t.id, t.type, t.priority, t.deadline_ms, seq, t.deps, t.runtime_ms / 1000.0 if estimates else None, ranks[t.id])
        for seq, t in enumerate(tasks)
    )
    now_ms = start_ms
    trace: list[TraceEvent] = []
    record = trace.append if record_trace else (lambda event: None)
    finish_ms: dict[str, int] = {}
    attempts: dict[str, int] = {}
    # (time, sequence, task id, executor id, fails): the sequence makes equal times deterministic.
    events: list[tuple[int, int, str, str, bool]] = []
    event_seq = 0
    decisions = 0
    for _ in range(SIM_EVENTS_MAX):
        while len(state.queue) and state.allocator.total_free_slots() > 0:
            plan = policy.select(state.view(), now_ms, state.allocator.total_free_slots())
            decisions += 1
            for item in plan.unschedulable:
                record(TraceEvent(now_ms, "unschedulable", item.task_id, item.reason))
                for failed in state.mark_unschedulable(item.task_id, item.reason):
                    record(TraceEvent(now_ms, "upstream_failed", failed.task_id, failed.cause))
            for assignment in plan.assignments:
                state.apply_assignment(assignment)
                attempts[assignment.task_id] = attempts.get(assignment.task_id, 0) + 1
                fails = failure_rate > 0.0 and rng is not None and rng.random() < failure_rate
                record(TraceEvent(now_ms, "start", assignment.task_id, assignment.executor_id))
                heapq.heappush(events, (now_ms + runtime_ms[assignment.task_id], event_seq, assignment.task_id,
                                        assignment.executor_id, fails))
                event_seq += 1
            if not plan.assignments and not plan.unschedulable:
                break
        if not events:
            break
        now_ms, _, task_id, executor_id, fails = heapq.heappop(events)
        if not fails:
            state.complete(task_id)
            finish_ms[task_id] = now_ms
            record(TraceEvent(now_ms, "complete", task_id, executor_id))
        elif attempts[task_id] < SIM_ATTEMPTS_MAX:
            state.fail(task_id, permanent=False)
            record(TraceEvent(now_ms, "retry", task_id, executor_id))
        else:
            record(TraceEvent(now_ms, "fail", task_id, "failed"))
            for failed in state.fail(task_id, permanent=True, cause="failed"):
                record(TraceEvent(now_ms, "upstream_failed", failed.task_id, failed.cause))
    else:
        raise AssertionError(f"simulation exceeded SIM_EVENTS_MAX={SIM_EVENTS_MAX}")
    final_state = {t.id: state.state(t.id) for t in tasks}
    # With no executor registered, tasks wait (an executor may still connect); otherwise every
    # task must have ended one way or another.
    invariant(not executors or all(s.is_final for s in final_state.values()),
              f"simulation ended with unfinished tasks: {[k for k, s in final_state.items() if not s.is_final][:5]}")
    deadline_tasks = [t for t in tasks if t.deadline_ms != NO_DEADLINE_MS]
    hits = sum(1 for t in deadline_tasks if t.id in finish_ms and finish_ms[t.id] <= t.deadline_ms)
    return SimResult(
        makespan_ms=max(finish_ms.values(), default=start_ms) - start_ms,
        finish_ms=finish_ms,
        final_state=final_state,
        trace=tuple(trace),
        decisions=decisions,
        deadline_hits=hits,
        deadlines_total=len(deadline_tasks),
    )


def identical_executors(count: int, task_type: str = WORKLOAD_TASK_TYPE, capacity: int = 1) -> list[ExecutorView]:
    width = len(str(max(0, count - 1)))
    return [ExecutorView(f"e{i:0{width}d}", "algorithmic", frozenset({task_type}), capacity) for i in range(count)]


def lower_bound_ms(tasks: Sequence[SimTask], executors_count: int) -> tuple[int, int, int]:
    """(lower bound, critical path, total work) in ms for `executors_count` unit executors."""
    ranks = upward_ranks({t.id: t.deps for t in tasks}, {t.id: float(t.runtime_ms) for t in tasks})
    critical_path = round(max(ranks.values(), default=0.0))
    total_work = sum(t.runtime_ms for t in tasks)
    return max(critical_path, math.ceil(total_work / executors_count)), critical_path, total_work


def energetic_lower_bound_ms(tasks: Sequence[SimTask], executors_count: int) -> int:
    """A tighter valid bound than max(critical path, work / K), to tell a loose bound from a poor
    schedule. For any time theta, each task's part that cannot run before theta (given its
    earliest start, the longest chain of predecessors) must fit on K executors after theta:
        M >= theta + sum(max(0, min(w, es + w - theta))) / K
    and symmetrically for the part that must run before M - theta (using the upward rank). The
    right side is piecewise linear in theta, so checking its breakpoints suffices. O(n^2)."""
    deps = {t.id: t.deps for t in tasks}
    runtime = {t.id: t.runtime_ms for t in tasks}
    ranks = upward_ranks(deps, {k: float(v) for k, v in runtime.items()})
    reversed_deps: dict[str, list[str]] = {t.id: [] for t in tasks}
    for t in tasks:
        for dep in t.deps:
            reversed_deps[dep].append(t.id)
    # Earliest start = upward rank in the reversed DAG minus the task's own runtime.
    reverse_ranks = upward_ranks(reversed_deps, {k: float(v) for k, v in runtime.items()})
    best = 0.0
    for starts in ([reverse_ranks[t.id] - t.runtime_ms for t in tasks], [ranks[t.id] - t.runtime_ms for t in tasks]):
        windows = [(s, s + t.runtime_ms) for s, t in zip(starts, tasks, strict=True)]
        for theta in sorted({s for s, _ in windows} | {e for _, e in windows}):
            after = sum(e - max(s, theta) for s, e in windows if e > theta)
            best = max(best, theta + after / executors_count)
    return math.ceil(best)


# How many rounds of the pigeonhole argument `cut_lower_bound_ms` tries (j = 1..this): enough to
# see a third or fourth wave of long tasks on K executors; each round costs O(K) per threshold.
PIGEONHOLE_ROUNDS_MAX = 4


def _set_bound(items: list[tuple[int, int]], executors_count: int) -> int:
    """A lower bound on when K unit executors can finish every task of `items` = [(earliest
    start, runtime)]: for each threshold t, the tasks that cannot start before t need
        t + work / K                                    (energy), and
        t + the j+1 shortest of their jK+1 longest     (pigeonhole: some executor runs j+1 of them).
    O(len(items) * K * PIGEONHOLE_ROUNDS_MAX)."""
    k = executors_count
    keep = PIGEONHOLE_ROUNDS_MAX * k + 1
    items = sorted(items, reverse=True)
    top: list[int] = []  # ascending: the `keep` longest runtimes among tasks with start >= t
    work = 0
    best = 0.0
    i = 0
    while i < len(items):
        t = items[i][0]
        while i < len(items) and items[i][0] == t:
            runtime = items[i][1]
            work += runtime
            bisect.insort(top, runtime)
            if len(top) > keep:
                del top[0]
            i += 1
        longest = top[::-1]
        ph = 0
        for j in range(1, PIGEONHOLE_ROUNDS_MAX + 1):
            if j * k + 1 > len(longest):
                break
            ph = max(ph, sum(longest[j * k - j: j * k + 1]))
        best = max(best, t + max(work / k, ph))
    return math.ceil(best)


def cut_lower_bound_ms(tasks: Sequence[SimTask], executors_count: int) -> int:
    """A tighter valid bound for the benchmark's "tight LB" column (never a target): the
    energetic bound, strengthened by cuts through the DAG. A task cannot start before all its
    ancestors are done, and `_set_bound(ancestors)` (energy + pigeonhole over their earliest
    starts) bounds when that is; symmetrically its descendants need `_set_bound` of them (over
    their tails) after it ends. So, in topological order,
        head(x) = max(max over deps d of head(d) + runtime(d), _set_bound(ancestors of x))
        tail(x) = max(max over dependents s of tail(s) + runtime(s), _set_bound(descendants of x))
    (the set bound only at joins / forks: elsewhere the chain term dominates or it is skipped,
    which only loosens the bound), and makespan >= head(x) + runtime(x) + tail(x) for every x,
    and >= _set_bound(all tasks) by heads and by tails. Each step holds in every schedule, so
    the result never exceeds an achievable makespan (checked against simulated and exhaustive
    schedules in tests/test_scheduler_properties.py)."""
    k = executors_count
    runtime = {t.id: t.runtime_ms for t in tasks}
    deps = {t.id: tuple(dict.fromkeys(d for d in t.deps if d in runtime)) for t in tasks}
    dependents: dict[str, list[str]] = {t.id: [] for t in tasks}
    for task_id, task_deps in deps.items():
        for dep in task_deps:
            dependents[dep].append(task_id)
    order = topological_order(deps)

    def sweep(ids: list[str], before: Mapping[str, Sequence[str]]) -> dict[str, int]:
        bound: dict[str, int] = {}
        closure: dict[str, frozenset[str]] = {}
        for x in ids:
            preds = before[x]
            closure[x] = frozenset(preds).union(*(closure[p] for p in preds))
            chain = max((bound[p] + runtime[p] for p in preds), default=0)
            if len(preds) >= 2:
                chain = max(chain, _set_bound([(bound[a], runtime[a]) for a in closure[x]], k))
            bound[x] = chain
        return bound

    head = sweep(order, deps)
    tail = sweep(order[::-1], dependents)
    best = max((head[x] + runtime[x] + tail[x] for x in runtime), default=0)
    best = max(best, _set_bound([(head[x], runtime[x]) for x in runtime], k),
               _set_bound([(tail[x], runtime[x]) for x in runtime], k))
    return max(best, energetic_lower_bound_ms(tasks, executors_count), lower_bound_ms(tasks, executors_count)[0])


def with_latest_finish_deadlines(tasks: Sequence[SimTask], dag_deadline_ms: int, start_ms: int = 0) -> list[SimTask]:
    """Each task's deadline = its latest finish for the DAG to end by `dag_deadline_ms`."""
    ranks = upward_ranks({t.id: t.deps for t in tasks}, {t.id: float(t.runtime_ms) for t in tasks})
    out = []
    for t in tasks:
        latest_finish_ms = start_ms + dag_deadline_ms - round(ranks[t.id]) + t.runtime_ms
        out.append(SimTask(t.id, t.runtime_ms, t.deps, t.type, t.priority, max(1, latest_finish_ms)))
    return out


def simulate_workload(workload: Workload, executors_count: int, policy: SchedulingPolicy, *,
                      deadline_slack: float = 0.1, record_trace: bool = False, estimates: bool = True) -> WorkloadResult:
    """Run a shared workload on `executors_count` identical one-slot executors, with per-task
    latest-finish deadlines for a DAG deadline of lower_bound * (1 + deadline_slack)."""
    bound, critical_path, total_work = lower_bound_ms(workload.tasks, executors_count)
    # Deadlines are absolute and 0 means "none", so the simulated clock starts at 1 s.
    start_ms = 1000
    tasks = with_latest_finish_deadlines(workload.tasks, round(bound * (1 + deadline_slack)), start_ms)
    sim = simulate(tasks, identical_executors(executors_count), policy, start_ms=start_ms, record_trace=record_trace,
                   estimates=estimates)
    return WorkloadResult(sim, executors_count, bound, critical_path, total_work, deadline_slack)
