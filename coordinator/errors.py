"""Errors of the coordinator core.

    CoordinatorError
    ├── InvalidArgument      bad input; the message names the field and the limit
    ├── NotFound             an id that the state does not hold
    ├── FailedPrecondition   the state forbids it now (e.g. cancelling a completed task)
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


class Compacted(CoordinatorError):
    code = "OUT_OF_RANGE"


class UnknownCommand(CoordinatorError):
    code = "INTERNAL"


ERRORS_BY_CODE: dict[str, type[CoordinatorError]] = {
    cls.code: cls for cls in (InvalidArgument, NotFound, FailedPrecondition, Compacted)
}


class InvariantViolation(AssertionError):
    """Internal consistency is broken: a bug, not bad input."""


def invariant(condition: object, message: str) -> None:
    """Like assert, but stays on under `python -O` (TigerStyle)."""
    if not condition:
        raise InvariantViolation(message)
