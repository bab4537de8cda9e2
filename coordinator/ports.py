"""The ports of the core: one Protocol each. Adapters live in the outer packages and ship an
in-memory fake beside the real implementation."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol

from coordinator.checkpoints import CheckpointRecord, Recovery
from coordinator.fsm import ApplyResult
from coordinator.model import DomainEvent, Executor, KnowledgeEntry, Task


class TaskScheduler(Protocol):
    def select(self, ready: Sequence[Task], executors: Sequence[Executor], now_ms: int) -> list[tuple[str, str]]:
        """Return (task_id, executor_id) assignments to propose; never mutates state."""
        ...


class ExecutorRegistry(Protocol):
    async def register(self, executor: Executor) -> str: ...

    async def unregister(self, executor_id: str) -> None: ...

    async def list(self) -> list[Executor]: ...


class CommandLog(Protocol):
    """The replicated log as the shells see it (cluster.proposer.Proposer is the real one)."""

    async def propose(self, command: dict[str, Any], timeout_s: float | None = None) -> ApplyResult:
        """Returns once the command is committed by a majority, durable and applied on this
        node; raises when the outcome is unknown (the caller retries)."""
        ...


class CheckpointState(Protocol):
    """Reads of the applied checkpoint state (CoordinatorFSM, or a view taking its lock)."""

    def checkpoints_of(self, task_id: str) -> list[CheckpointRecord]: ...

    def recover_task(self, task_id: str) -> Recovery: ...


class CheckpointStore(Protocol):
    async def create_checkpoint(self, request: Mapping[str, Any], *, timeout_s: float | None = None) -> Any:
        """Acknowledged only after the checkpoint is committed by a majority and applied."""
        ...

    async def restore_from_checkpoint(self, task_id: str, *, linearizable: bool = False) -> Recovery: ...


class KnowledgeBase(Protocol):
    async def add(self, entry: KnowledgeEntry) -> str: ...

    async def search(self, query: str, limit: int = 10) -> list[KnowledgeEntry]: ...


class SecurityManager(Protocol):
    def authenticate(self, metadata: dict[str, str]) -> str:
        """Return the principal, or raise."""
        ...

    def authorize(self, principal: str, action: str, resource: Any) -> bool: ...


class EventBus(Protocol):
    def watch(self, from_index: int) -> AsyncIterator[DomainEvent]: ...
