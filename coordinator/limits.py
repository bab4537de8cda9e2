"""Named bounds of the core. Every queue, payload and batch has one; units go last."""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.audit import AuditLimits
from coordinator.checkpoints import CheckpointLimits


@dataclass(frozen=True)
class Limits:
    priority_min: int = 0
    priority_max: int = 100
    priority_default: int = 50
    dag_tasks_max: int = 10_000
    task_input_bytes_max: int = 64 * 1024
    task_description_bytes_max: int = 4 * 1024
    task_type_chars_max: int = 64
    task_name_chars_max: int = 128
    dependencies_per_task_max: int = 10_000  # real workflows fan in: Montage has a 662-way join
    metadata_entries_max: int = 32
    metadata_key_chars_max: int = 64
    metadata_value_bytes_max: int = 1024
    max_attempts_default: int = 3
    max_attempts_max: int = 100
    deadline_horizon_s_max: int = 366 * 24 * 3600
    idempotency_key_chars_max: int = 128
    id_chars_max: int = 128  # any id a request names (task, DAG, executor, secret): checked before use
    cancel_reason_bytes_max: int = 1024
    executor_capacity_max: int = 10_000
    executor_task_types_max: int = 256
    executor_schema_bytes_max: int = 64 * 1024
    executors_max: int = 10_000


@dataclass(frozen=True)
class StateLimits:
    """Bounds on replicated state. They shape `apply`, so every node must use the same values:
    they are fixed here rather than configurable per node."""

    events_retained_max: int = 100_000
    idempotency_keys_max: int = 100_000
    checkpoints: CheckpointLimits = CheckpointLimits()  # per record, per chain, the whole store, retention
    audit: AuditLimits = AuditLimits()  # records retained, signed heads retained, field length
    secrets_max: int = 1024  # envelope-encrypted secrets held
    secret_envelope_chars_max: int = 96 * 1024  # one envelope's fields together (a 64 KiB secret, base64)
