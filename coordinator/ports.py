"""The ports of the core: one Protocol each. Adapters live in the outer packages and ship an
in-memory fake beside the real implementation."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from coordinator.model import Checkpoint, DomainEvent, Executor, KnowledgeEntry, Task


class TaskScheduler(Protocol):
    def select(self, ready: Sequence[Task], executors: Sequence[Executor], now_ms: int) -> list[tuple[str, str]]:
        """Return (task_id, executor_id) assignments to propose; never mutates state."""
        ...


class ExecutorRegistry(Protocol):
    async def register(self, executor: Executor) -> str: ...

    async def unregister(self, executor_id: str) -> None: ...

    async def list(self) -> list[Executor]: ...


class CheckpointStore(Protocol):
    async def create_checkpoint(self, checkpoint: Checkpoint) -> Checkpoint: ...

    async def restore_from_checkpoint(self, task_id: str, sequence_number: int | None = None) -> Checkpoint: ...


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
