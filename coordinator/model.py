"""The domain model as users see it (pydantic). The replicated state machine keeps compact
records (`coordinator.records`) and converts to these at the edges."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class TaskStatus(str, Enum):
    PENDING = "pending"
    ASSIGNED = "assigned"
    EXECUTING = "executing"
    AWAITING_APPROVAL = "awaiting_approval"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    REQUIRES_CONTINUATION = "requires_continuation"
    CANCELLED = "cancelled"
    DEAD_LETTER = "dead_letter"  # retries exhausted; an operator may re-queue it

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.DEAD_LETTER})


class ExecutorType(str, Enum):
    CLAUDE_OPUS = "claude_opus"
    CLAUDE_SONNET = "claude_sonnet"
    LOCAL_LLM = "local_llm"
    SPECIALIZED_ML = "specialized_ml"
    ALGORITHMIC = "algorithmic"
    CLOUDRU = "cloudru"


class ExecutorStatus(str, Enum):
    ONLINE = "online"
    OFFLINE = "offline"


class ExecutorCapabilities(BaseModel):
    model_config = ConfigDict(frozen=True)

    supported_task_types: list[str] = Field(default_factory=list)
    input_schema: dict[str, Any] = Field(default_factory=dict)
    output_schema: dict[str, Any] = Field(default_factory=dict)
    performance_profile: dict[str, Any] = Field(default_factory=dict)
    context_window_size: int = 0
    # Resumes from checkpoints (ctx.restore / ctx.executed). A task with checkpoints assigned to
    # an executor that is not resumable restarts from scratch, recorded as such.
    resumable: bool = False


class Checkpoint(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    task_id: str
    sequence_number: int = Field(ge=0)
    timestamp: datetime
    state_snapshot: dict[str, Any] = Field(default_factory=dict)
    executed_actions: list[dict[str, Any]] = Field(default_factory=list)
    remaining_plan: list[dict[str, Any]] = Field(default_factory=list)
    kind: str = "full"
    base_sequence: int | None = None


class Task(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    type: str
    name: str = ""
    description: str = ""
    input_data: Any = None
    priority: int = Field(default=50, ge=0, le=100)
    deadline: datetime | None = None
    dependencies: list[str] = Field(default_factory=list)
    assigned_executor: str | None = None
    status: TaskStatus = TaskStatus.PENDING
    created_at: datetime
    updated_at: datetime
    checkpoints: list[Checkpoint] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)
    max_attempts: int = 3
    created_index: int = 0
    cancel_reason: str = ""


class Executor(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    type: ExecutorType
    capabilities: ExecutorCapabilities = Field(default_factory=ExecutorCapabilities)
    capacity: int = Field(default=1, ge=1)
    status: ExecutorStatus = ExecutorStatus.ONLINE
    registered_at: datetime
    metadata: dict[str, str] = Field(default_factory=dict)


class KnowledgeEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    content: str
    source_task_id: str | None = None
    tags: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime


class DomainEvent(BaseModel):
    model_config = ConfigDict(frozen=True)

    index: int
    seq: int
    kind: str
    task_id: str = ""
    executor_id: str = ""
    time_ms: int = 0
    data: dict[str, Any] = Field(default_factory=dict)
