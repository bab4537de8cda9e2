"""Errors of the scheduler.

    CoordinatorError (coordinator.errors)
    └── SchedulerError
        ├── InvalidArgument-coded
        │   ├── UnknownPolicy        a policy name not in the registry (names the valid ones)
        │   ├── InvalidPolicyConfig  an unknown or out-of-range policy setting
        │   ├── DuplicateTask        a task id the graph or queue already holds
        │   ├── UnknownDependency    a dependency on a task the graph does not hold
        │   └── DependencyCycle      the new tasks close a cycle (the message shows it)
        ├── NotFound-coded
        │   ├── UnknownTask          a task id the graph, queue or allocator does not hold
        │   └── UnknownExecutor      an executor id the allocator does not hold
        ├── FailedPrecondition-coded
        │   ├── InvalidTransition    e.g. completing a task twice, or one that is not ready
        │   └── CapacityExceeded     assigning to an executor with no free slot
        └── ResourceExhausted-coded
            └── BoundExceeded        a named bound (queue depth, graph size) would be exceeded
    InvariantViolation (coordinator.errors)  a bug; never caught

The scheduler's own logic never raises these on a valid view: they guard the mutable
structures (graph, queue, allocator) that the leader feeds from applied log entries.
"""

from __future__ import annotations

from coordinator.errors import CoordinatorError


class SchedulerError(CoordinatorError):
    code = "INTERNAL"


class UnknownPolicy(SchedulerError):
    code = "INVALID_ARGUMENT"


class InvalidPolicyConfig(SchedulerError):
    code = "INVALID_ARGUMENT"


class DuplicateTask(SchedulerError):
    code = "INVALID_ARGUMENT"


class UnknownDependency(SchedulerError):
    code = "INVALID_ARGUMENT"


class DependencyCycle(SchedulerError):
    code = "INVALID_ARGUMENT"


class UnknownTask(SchedulerError):
    code = "NOT_FOUND"


class UnknownExecutor(SchedulerError):
    code = "NOT_FOUND"


class InvalidTransition(SchedulerError):
    code = "FAILED_PRECONDITION"


class CapacityExceeded(SchedulerError):
    code = "FAILED_PRECONDITION"


class BoundExceeded(SchedulerError):
    code = "RESOURCE_EXHAUSTED"
