"""`SchedulerState`: the leader's mirror of what the scheduler needs, fed by applied commands.

    submit(tasks)             TaskSubmitted   -> graph; tasks with no open dependency -> queue
    apply_assignment(a)       Assign          -> queue -> running on an executor (re-validated)
    complete(id)              TaskCompleted   -> releases the slot; dependents may become ready
    fail(id, permanent)       TaskFailed      -> retry (back to the queue) or fail dependents
    cancel(id)                TaskCancelled   -> dependents fail with upstream_failed:<id>
    mark_unschedulable(id)    (from a Plan)   -> fails it and its dependents
    add/remove_executor       ExecutorRegistered / ExecutorLost -> orphaned tasks requeued
    view()                    -> SchedulerView for a policy

It holds no clock and no randomness; the simulator and the scenario tests drive it exactly the
way the leader will (the leader from applied log entries, so every node could rebuild it).
"""

from __future__ import annotations

from collections.abc import Iterable

from scheduler.errors import CapacityExceeded, InvalidTransition, UnknownExecutor, UnknownTask
from scheduler.graph import DependencyGraph, GraphUpdate, TaskState, UpstreamFailed
from scheduler.limits import DEFAULT_LIMITS, SchedulerLimits
from scheduler.queue import ReadyQueue
from scheduler.resources import ResourceAllocator
from scheduler.view import Assignment, ExecutorView, SchedulerView, TaskView

UNSCHEDULABLE_PREFIX = "unschedulable:"


class SchedulerState:
    def __init__(self, limits: SchedulerLimits = DEFAULT_LIMITS) -> None:
        self.graph = DependencyGraph(limits)
        self.queue = ReadyQueue(limits)
        self.allocator = ResourceAllocator()
        self._tasks: dict[str, TaskView] = {}

    # ------------------------------------------------------------------ queries
    def view(self) -> SchedulerView:
        return SchedulerView(self.queue, self.allocator.views())

    def task(self, task_id: str) -> TaskView:
        task = self._tasks.get(task_id)
        if task is None:
            raise UnknownTask(f"no task {task_id!r}")
        return task

    def state(self, task_id: str) -> TaskState:
        return self.graph.state(task_id)

    # ------------------------------------------------------------------ executors
    def add_executor(self, executor: ExecutorView) -> None:
        self.allocator.add_executor(executor)

    def remove_executor(self, executor_id: str) -> list[str]:
        """The executor is gone; its running tasks go back to the queue (returned, sorted)."""
        orphans = self.allocator.remove_executor(executor_id)
        for task_id in orphans:
            self.graph.mark_requeued(task_id)
            self.queue.add(self._tasks[task_id])
        return orphans

    # ------------------------------------------------------------------ tasks
    def submit(self, tasks: Iterable[TaskView]) -> GraphUpdate:
        batch = list(tasks)
        update = self.graph.add_tasks((t.id, t.dependencies) for t in batch)
        for task in batch:
            self._tasks[task.id] = task
        for task_id in update.ready:
            self.queue.add(self._tasks[task_id])
        return update

    def apply_assignment(self, assignment: Assignment) -> None:
        """Re-validate and apply, as `apply` will: the task must still be queued and the
        executor must exist with a free slot. Nothing changes if a check fails."""
        task_id, executor_id = assignment.task_id, assignment.executor_id
        if task_id not in self.queue:
            raise InvalidTransition(f"task {task_id!r} is not waiting in the ready queue")
        if executor_id not in self.allocator:
            raise UnknownExecutor(f"no executor {executor_id!r}")
        executor = self.allocator.get(executor_id)
        if self._tasks[task_id].type not in executor.task_types:
            raise InvalidTransition(f"executor {executor_id!r} does not support task type {self._tasks[task_id].type!r}")
        if executor.free_slots <= 0:
            raise CapacityExceeded(f"executor {executor_id!r} is full ({executor.load}/{executor.capacity})")
        self.allocator.assign(task_id, executor_id)
        self.queue.remove(task_id)
        self.graph.mark_running(task_id)

    def complete(self, task_id: str) -> list[str]:
        if self.graph.state(task_id) is not TaskState.RUNNING:
            raise InvalidTransition(f"cannot complete task {task_id!r}: it is {self.graph.state(task_id).value}")
        self.allocator.release(task_id)
        released = self.graph.mark_completed(task_id)
        for dependent in released:
            self.queue.add(self._tasks[dependent])
        return released

    def fail(self, task_id: str, permanent: bool = True, cause: str = "failed") -> list[UpstreamFailed]:
        state = self.graph.state(task_id)
        if not permanent:
            if state is not TaskState.RUNNING:
                raise InvalidTransition(f"cannot retry task {task_id!r}: it is {state.value}")
            self.allocator.release(task_id)
            self.graph.mark_requeued(task_id)
            self.queue.add(self._tasks[task_id])
            return []
        self._leave(task_id, state)
        return self.graph.mark_failed(task_id, permanent=True, cause=cause)

    def cancel(self, task_id: str, reason: str = "cancelled") -> list[UpstreamFailed]:
        self._leave(task_id, self.graph.state(task_id))
        return self.graph.mark_cancelled(task_id, reason)

    def mark_unschedulable(self, task_id: str, reason: str) -> list[UpstreamFailed]:
        return self.fail(task_id, permanent=True, cause=UNSCHEDULABLE_PREFIX + reason)

    def _leave(self, task_id: str, state: TaskState) -> None:
        """Take a task out of the queue or off its executor before it becomes final."""
        if state is TaskState.RUNNING:
            self.allocator.release(task_id)
        elif state is TaskState.READY:
            self.queue.remove(task_id)
