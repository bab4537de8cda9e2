"""Errors of the coordinator core.

    CoordinatorError
    ├── InvalidArgument      bad input; the message names the field and the limit
    ├── NotFound             an id that the state does not hold
    ├── FailedPrecondition   the state forbids it now (e.g. cancelling a completed task)
    │   └── StaleFencingToken  an executor report for an attempt that no longer holds the lease
    ├── ResourceExhausted    a bound on replicated state is reached; the message names it
    ├── PermissionDenied     an ownership check in apply refused it (issue 6)
    ├── Compacted            an event cursor older than the retained ring
    └── UnknownCommand       a log entry this code cannot apply (fails loudly)
    InvariantViolation       a bug: internal consistency broken (never caught)

Each expected error carries a stable `code` that the gRPC layer maps to a status code.
"""

from __future__ import annotations


class CoordinatorError(Exception):
    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(CoordinatorError):
    code = "INVALID_ARGUMENT"


class NotFound(CoordinatorError):
    code = "NOT_FOUND"


class FailedPrecondition(CoordinatorError):
    code = "FAILED_PRECONDITION"


class StaleFencingToken(FailedPrecondition):
    """Carries the FAILED_PRECONDITION code; `apply` reports it as a result whose message starts
    with "StaleFencingToken:" (see `error_from_result`)."""


class ResourceExhausted(CoordinatorError):
    code = "RESOURCE_EXHAUSTED"


class PermissionDenied(CoordinatorError):
    """An ownership check in `apply` refused the command (issue 6)."""

    code = "PERMISSION_DENIED"


class Compacted(CoordinatorError):
    code = "OUT_OF_RANGE"


class UnknownCommand(CoordinatorError):
    code = "INTERNAL"


ERRORS_BY_CODE: dict[str, type[CoordinatorError]] = {
    cls.code: cls for cls in (InvalidArgument, NotFound, FailedPrecondition, ResourceExhausted, Compacted,
                              PermissionDenied)
}


def error_from_result(code: str, message: str) -> CoordinatorError:
    """The typed error for a failed ApplyResult: the one place result codes become exceptions."""
    if message.startswith("StaleFencingToken:"):
        return StaleFencingToken(message)
    return ERRORS_BY_CODE.get(code, CoordinatorError)(message)


class InvariantViolation(AssertionError):
    """Internal consistency is broken: a bug, not bad input."""


def invariant(condition: object, message: str) -> None:
    """Like assert, but stays on under `python -O` (TigerStyle)."""
    if not condition:
        raise InvariantViolation(message)
