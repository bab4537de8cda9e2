"""The dependency graph of tasks: who waits for whom, and what a completion or failure releases.

    add_tasks([(id, deps)])  -> GraphUpdate(ready, failed)   all or nothing; cycle check on add
    mark_running(id)                                          READY -> RUNNING
    mark_requeued(id)                                         RUNNING -> READY (retry, lost lease)
    mark_completed(id)       -> [newly ready ids]             O(out-degree)
    mark_failed(id)          -> [UpstreamFailed]              permanent: dependents fail too
    mark_cancelled(id)       -> [UpstreamFailed]

Every update costs O(degree): each task keeps a count of dependencies not yet completed, and
each completion decrements the counts of its dependents. Failure propagation walks the
dependents transitively, but each task fails at most once, so the total stays O(V + E).
Dependents of a failed or cancelled task fail with cause `upstream_failed:<root id>`, naming the
task whose failure started the cascade, so none is left pending forever.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from coordinator.dag import find_cycle
from coordinator.errors import invariant
from scheduler.errors import (
    BoundExceeded,
    DependencyCycle,
    DuplicateTask,
    InvalidTransition,
    UnknownDependency,
    UnknownTask,
)
from scheduler.limits import DEFAULT_LIMITS, SchedulerLimits

UPSTREAM_FAILED_PREFIX = "upstream_failed:"


class TaskState(str, Enum):
    PENDING = "pending"  # waiting for dependencies
    READY = "ready"  # dependencies completed; waiting for an executor
    RUNNING = "running"  # assigned
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in _FINAL


_FINAL = frozenset({TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED})


@dataclass(frozen=True, slots=True)
class UpstreamFailed:
    task_id: str
    cause: str  # "upstream_failed:<id of the task whose failure started the cascade>"


@dataclass(frozen=True, slots=True)
class GraphUpdate:
    ready: tuple[str, ...] = ()  # added tasks whose dependencies are all completed already
    failed: tuple[UpstreamFailed, ...] = ()  # added tasks depending on an already failed task


class _Node:
    __slots__ = ("deps", "dependents", "waiting", "state", "cause")

    def __init__(self, deps: tuple[str, ...]) -> None:
        self.deps = deps
        self.dependents: list[str] = []
        self.waiting = 0  # dependencies not yet completed
        self.state = TaskState.PENDING
        self.cause = ""


class DependencyGraph:
    def __init__(self, limits: SchedulerLimits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._nodes: dict[str, _Node] = {}
        self._ready: dict[str, None] = {}  # an insertion-ordered set

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._nodes

    def state(self, task_id: str) -> TaskState:
        return self._node(task_id).state

    def cause(self, task_id: str) -> str:
        """Why a failed or cancelled task ended ('' otherwise)."""
        return self._node(task_id).cause

    def dependencies(self, task_id: str) -> tuple[str, ...]:
        return self._node(task_id).deps

    def dependents(self, task_id: str) -> tuple[str, ...]:
        return tuple(self._node(task_id).dependents)

    def ready(self) -> list[str]:
        """Tasks whose dependencies all completed and that are not running or final, in the
        order they became ready."""
        return list(self._ready)

    def task_ids(self) -> list[str]:
        return list(self._nodes)

    # ------------------------------------------------------------------ updates
    def add_task(self, task_id: str, dependencies: Sequence[str] = ()) -> GraphUpdate:
        return self.add_tasks([(task_id, dependencies)])

    def add_tasks(self, specs: Iterable[tuple[str, Sequence[str]]]) -> GraphUpdate:
        """Add a batch of tasks (a DAG submission). Dependencies may name tasks of the same batch
        or tasks already in the graph. Validated completely before anything changes."""
        nodes = self._nodes
        batch: dict[str, tuple[str, ...]] = {}
        for task_id, deps in specs:
            if task_id in nodes or task_id in batch:
                raise DuplicateTask(f"task {task_id!r} already exists")
            batch[task_id] = tuple(dict.fromkeys(deps))  # a repeated dependency counts once
        if len(nodes) + len(batch) > self._limits.graph_tasks_max:
            raise BoundExceeded(f"graph would hold {len(nodes) + len(batch)} tasks > graph_tasks_max {self._limits.graph_tasks_max}")
        for task_id, deps in batch.items():
            for dep in deps:
                if dep not in nodes and dep not in batch:
                    raise UnknownDependency(f"task {task_id!r} depends on unknown task {dep!r}")
        # Tasks already in the graph cannot depend on new ones, so only the batch can hold a cycle.
        cycle = find_cycle(batch)
        if cycle is not None:
            raise DependencyCycle(f"dependency cycle {' -> '.join(cycle)}")

        for task_id, deps in batch.items():
            nodes[task_id] = _Node(deps)
        ready: list[str] = []
        failed: list[UpstreamFailed] = []
        # Wire edges; a dependency that already failed fails the new task at once. Batch order
        # need not be topological, so failures are collected first and propagated after wiring.
        doomed: list[tuple[str, str]] = []
        for task_id, deps in batch.items():
            node = nodes[task_id]
            for dep in deps:
                dep_node = nodes[dep]
                dep_node.dependents.append(task_id)
                if dep_node.state is TaskState.COMPLETED:
                    continue
                node.waiting += 1
                if dep_node.state in (TaskState.FAILED, TaskState.CANCELLED):
                    root = dep_node.cause[len(UPSTREAM_FAILED_PREFIX):] if dep_node.cause.startswith(UPSTREAM_FAILED_PREFIX) else dep
                    doomed.append((task_id, root))
        for task_id, root in doomed:
            node = nodes[task_id]
            if node.state.is_final:
                continue
            self._finish(task_id, node, TaskState.FAILED, UPSTREAM_FAILED_PREFIX + root)
            failed.append(UpstreamFailed(task_id, node.cause))
            failed.extend(self._propagate(task_id, root))
        for task_id in batch:
            node = nodes[task_id]
            if node.state is TaskState.PENDING and node.waiting == 0:
                node.state = TaskState.READY
                self._ready[task_id] = None
                ready.append(task_id)
        return GraphUpdate(tuple(ready), tuple(failed))

    def mark_running(self, task_id: str) -> None:
        node = self._node(task_id)
        self._expect(task_id, node, (TaskState.READY,), "start")
        node.state = TaskState.RUNNING
        del self._ready[task_id]

    def mark_requeued(self, task_id: str) -> None:
        """A running task goes back to ready: a retryable failure or a lost executor."""
        node = self._node(task_id)
        self._expect(task_id, node, (TaskState.RUNNING,), "requeue")
        node.state = TaskState.READY
        self._ready[task_id] = None

    def mark_completed(self, task_id: str) -> list[str]:
        """Record a completion; return the dependents that became ready, in edge order."""
        node = self._node(task_id)
        self._expect(task_id, node, (TaskState.READY, TaskState.RUNNING), "complete")
        self._finish(task_id, node, TaskState.COMPLETED, "")
        released: list[str] = []
        nodes = self._nodes
        for dependent in node.dependents:
            dep_node = nodes[dependent]
            if dep_node.state.is_final:
                continue
            invariant(dep_node.state is TaskState.PENDING and dep_node.waiting > 0,
                      f"dependent {dependent!r} of {task_id!r} is {dep_node.state.value} with {dep_node.waiting} waiting")
            dep_node.waiting -= 1
            if dep_node.waiting == 0:
                dep_node.state = TaskState.READY
                self._ready[dependent] = None
                released.append(dependent)
        return released

    def mark_failed(self, task_id: str, permanent: bool = True, cause: str = "failed") -> list[UpstreamFailed]:
        """A permanent failure fails every transitive dependent; a retryable one (permanent=False)
        puts a running task back to ready and affects nobody else."""
        node = self._node(task_id)
        if not permanent:
            self.mark_requeued(task_id)
            return []
        self._expect(task_id, node, (TaskState.PENDING, TaskState.READY, TaskState.RUNNING), "fail")
        self._finish(task_id, node, TaskState.FAILED, cause)
        return self._propagate(task_id, task_id)

    def mark_cancelled(self, task_id: str, reason: str = "cancelled") -> list[UpstreamFailed]:
        node = self._node(task_id)
        self._expect(task_id, node, (TaskState.PENDING, TaskState.READY, TaskState.RUNNING), "cancel")
        self._finish(task_id, node, TaskState.CANCELLED, reason)
        return self._propagate(task_id, task_id)

    def forget(self, task_id: str) -> None:
        """Drop a final task whose dependents are all final, to keep memory bounded. A task
        submitted later may not depend on it (the caller checks replicated state instead)."""
        node = self._node(task_id)
        if not node.state.is_final or any(not self._nodes[d].state.is_final for d in node.dependents if d in self._nodes):
            raise InvalidTransition(f"task {task_id!r} is {node.state.value} or has unfinished dependents; cannot forget it")
        del self._nodes[task_id]

    # ------------------------------------------------------------------ helpers
    def _node(self, task_id: str) -> _Node:
        node = self._nodes.get(task_id)
        if node is None:
            raise UnknownTask(f"no task {task_id!r} in the dependency graph")
        return node

    @staticmethod
    def _expect(task_id: str, node: _Node, allowed: tuple[TaskState, ...], verb: str) -> None:
        if node.state not in allowed:
            raise InvalidTransition(f"cannot {verb} task {task_id!r}: it is {node.state.value}")

    def _finish(self, task_id: str, node: _Node, state: TaskState, cause: str) -> None:
        self._ready.pop(task_id, None)
        node.state = state
        node.cause = cause

    def _propagate(self, start: str, root: str) -> list[UpstreamFailed]:
        """Fail every not-yet-final transitive dependent of `start`, breadth first."""
        cause = UPSTREAM_FAILED_PREFIX + root
        nodes = self._nodes
        out: list[UpstreamFailed] = []
        frontier = deque(nodes[start].dependents)
        while frontier:
            task_id = frontier.popleft()
            node = nodes[task_id]
            if node.state.is_final:
                continue
            invariant(node.state is TaskState.PENDING, f"dependent {task_id!r} of a failed task is {node.state.value}")
            self._finish(task_id, node, TaskState.FAILED, cause)
            out.append(UpstreamFailed(task_id, cause))
            frontier.extend(node.dependents)
        return out


def topological_order(deps: Mapping[str, Sequence[str]]) -> list[str]:
    """Kahn's algorithm over the keys of `deps` (dependencies outside the mapping are ignored);
    ties keep mapping order, so the result is deterministic. Raises DependencyCycle."""
    waiting = {task_id: 0 for task_id in deps}
    dependents: dict[str, list[str]] = {task_id: [] for task_id in deps}
    for task_id, task_deps in deps.items():
        for dep in dict.fromkeys(task_deps):
            if dep in dependents:
                dependents[dep].append(task_id)
                waiting[task_id] += 1
    frontier = deque(t for t, n in waiting.items() if n == 0)
    order: list[str] = []
    while frontier:
        task_id = frontier.popleft()
        order.append(task_id)
        for dependent in dependents[task_id]:
            waiting[dependent] -= 1
            if waiting[dependent] == 0:
                frontier.append(dependent)
    if len(order) != len(deps):
        cycle = find_cycle(deps) or []
        raise DependencyCycle(f"dependency cycle {' -> '.join(cycle)}")
    return order


def upward_ranks(deps: Mapping[str, Sequence[str]], runtime_s: Mapping[str, float]) -> dict[str, float]:
    """HEFT upward rank: rank(t) = runtime(t) + max(rank(s) for s in successors(t)), computed in
    reverse topological order in O(V + E). The largest rank is the critical path length."""
    order = topological_order(deps)
    successors: dict[str, list[str]] = {task_id: [] for task_id in deps}
    for task_id, task_deps in deps.items():
        for dep in dict.fromkeys(task_deps):
            if dep in successors:
                successors[dep].append(task_id)
    rank: dict[str, float] = {}
    for task_id in reversed(order):
        after = max((rank[s] for s in successors[task_id]), default=0.0)
        rank[task_id] = runtime_s.get(task_id, 0.0) + after
    return {task_id: rank[task_id] for task_id in deps}
