"""Proposer-side validation: turns client input into command payloads or a clear error.

Pure: the caller passes the clock reading (`now_ms`), an id generator and a lookup of existing
task ids. Every error names the field and the limit. `apply` re-checks what depends on state
(dependencies exist, no cycle), because the state may change between this check and commit.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from coordinator import commands as cmd
from coordinator.checkpoints import CheckpointLimits, CheckpointRecord, canonical_bytes, check_record
from coordinator.dag import find_cycle
from coordinator.errors import InvalidArgument, invariant
from coordinator.limits import Limits
from coordinator.model import ExecutorType

_TYPE_RE = re.compile(r"^[A-Za-z0-9_.:\-]+$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:\-/]+$")


@dataclass
class TaskInput:
    """One task as a client describes it (from gRPC, the CLI or a DAG file)."""

    type: str
    name: str = ""
    description: str = ""
    input_json: str = ""
    priority: int | None = None
    deadline_unix_ms: int = 0
    deadline_in_ms: int = 0
    depends_on: Sequence[str] = ()
    max_attempts: int = 0
    metadata: Mapping[str, str] = field(default_factory=dict)


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")


def _finite_float(token: str) -> float:
    value = float(token)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{token} is out of range for a number")
    return value


_strict_json = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def _check_json(text: str, where: str, bytes_max: int) -> str:
    if not text:
        return "null"
    size = len(text.encode())
    if size > bytes_max:
        raise InvalidArgument(f"{where}: at most {bytes_max} bytes, got {size}")
    try:
        _strict_json.decode(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"{where}: not valid JSON ({exc})") from None
    return text


def _check_metadata(metadata: Mapping[str, str], where: str, limits: Limits) -> dict[str, str] | None:
    if not metadata:
        return None
    if len(metadata) > limits.metadata_entries_max:
        raise InvalidArgument(f"{where}: at most {limits.metadata_entries_max} entries, got {len(metadata)}")
    out = {}
    for key in sorted(metadata):
        value = metadata[key]
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidArgument(f"{where}: keys and values must be strings")
        if not key or len(key) > limits.metadata_key_chars_max:
            raise InvalidArgument(f"{where}: key {key[:80]!r} must be 1..{limits.metadata_key_chars_max} chars")
        if len(value.encode()) > limits.metadata_value_bytes_max:
            raise InvalidArgument(f"{where}[{key!r}]: at most {limits.metadata_value_bytes_max} bytes")
        out[key] = value
    return out


def build_task_specs(
    tasks: Sequence[TaskInput],
    *,
    now_ms: int,
    new_id: Callable[[], str],
    task_exists: Callable[[str], bool],
    limits: Limits,
    field_prefix: str = "tasks",
    single: bool = False,
) -> tuple[list[list[Any]], list[str]]:
    """Validate a submission and return (SUBMIT_TASKS task rows, ids in request order)."""
    if not tasks:
        raise InvalidArgument(f"{field_prefix}: at least one task is required")
    if len(tasks) > limits.dag_tasks_max:
        raise InvalidArgument(f"{field_prefix}: at most {limits.dag_tasks_max} tasks per submission, got {len(tasks)}")

    def where(position: int) -> str:
        return field_prefix if single else f"{field_prefix}[{position}]"

    ids_by_name: dict[str, str] = {}
    ids: list[str] = []
    for position, task in enumerate(tasks):
        task_id = new_id()
        ids.append(task_id)
        name = task.name
        if name:
            if len(name) > limits.task_name_chars_max or not _NAME_RE.match(name):
                raise InvalidArgument(
                    f"{where(position)}.name: 1..{limits.task_name_chars_max} chars of [A-Za-z0-9_.:-/], got {name[:80]!r}"
                )
            if name in ids_by_name:
                raise InvalidArgument(f"{where(position)}.name: {name!r} is used twice in this submission")
            ids_by_name[name] = task_id

    rows: list[list[Any]] = []
    edges: dict[str, list[str]] = {}
    for position, task in enumerate(tasks):
        at = where(position)
        if not isinstance(task.type, str) or not task.type:
            raise InvalidArgument(f"{at}.type: required")
        if len(task.type) > limits.task_type_chars_max or not _TYPE_RE.match(task.type):
            raise InvalidArgument(
                f"{at}.type: 1..{limits.task_type_chars_max} chars of [A-Za-z0-9_.:-], got {task.type[:80]!r}"
            )
        description_bytes = len(task.description.encode())
        if description_bytes > limits.task_description_bytes_max:
            raise InvalidArgument(
                f"{at}.description: at most {limits.task_description_bytes_max} bytes, got {description_bytes}"
            )
        input_json = _check_json(task.input_json, f"{at}.input", limits.task_input_bytes_max)
        priority = limits.priority_default if task.priority is None else task.priority
        if not isinstance(priority, int) or not limits.priority_min <= priority <= limits.priority_max:
            raise InvalidArgument(
                f"{at}.priority: must be between {limits.priority_min} and {limits.priority_max}, got {priority}"
            )
        deadline_ms = _resolve_deadline(task, at, now_ms, limits)
        max_attempts = task.max_attempts or limits.max_attempts_default
        if not 1 <= max_attempts <= limits.max_attempts_max:
            raise InvalidArgument(f"{at}.max_attempts: must be between 1 and {limits.max_attempts_max}, got {max_attempts}")
        if len(task.depends_on) > limits.dependencies_per_task_max:
            raise InvalidArgument(
                f"{at}.depends_on: at most {limits.dependencies_per_task_max} dependencies, got {len(task.depends_on)}"
            )
        deps: list[str] = []
        for dep_position, ref in enumerate(task.depends_on):
            dep_id = ids_by_name.get(ref)
            if dep_id is None:
                if not task_exists(ref):
                    raise InvalidArgument(
                        f"{at}.depends_on[{dep_position}]: unknown task {ref[:80]!r} (not a name in this submission "
                        "nor an existing task id)"
                    )
                dep_id = ref
            if dep_id not in deps:
                deps.append(dep_id)
        metadata = _check_metadata(task.metadata, f"{at}.metadata", limits)
        task_id = ids[position]
        edges[task_id] = deps
        rows.append([task_id, task.name, task.type, task.description, input_json, priority, deadline_ms, deps,
                     max_attempts, metadata])

    cycle = find_cycle(edges)
    if cycle is not None:
        names = {task_id: (tasks[i].name or task_id) for i, task_id in enumerate(ids)}
        raise InvalidArgument(f"{field_prefix}.depends_on: dependency cycle {' -> '.join(names[c] for c in cycle)}")
    return rows, ids


def _resolve_deadline(task: TaskInput, at: str, now_ms: int, limits: Limits) -> int:
    if task.deadline_unix_ms and task.deadline_in_ms:
        raise InvalidArgument(f"{at}.deadline: give an absolute or a relative deadline, not both")
    if task.deadline_in_ms:
        if task.deadline_in_ms < 0:
            raise InvalidArgument(f"{at}.deadline: must be in the future, got {task.deadline_in_ms} ms from now")
        deadline_ms = now_ms + task.deadline_in_ms
    elif task.deadline_unix_ms:
        deadline_ms = task.deadline_unix_ms
        if deadline_ms <= now_ms:
            raise InvalidArgument(f"{at}.deadline: must be in the future, got {deadline_ms} ms (now {now_ms} ms)")
    else:
        return 0
    horizon_ms = limits.deadline_horizon_s_max * 1000
    if deadline_ms - now_ms > horizon_ms:
        raise InvalidArgument(f"{at}.deadline: at most {limits.deadline_horizon_s_max} s ahead")
    return deadline_ms


def check_idempotency_key(key: str, limits: Limits) -> str | None:
    if not key:
        return None
    if len(key) > limits.idempotency_key_chars_max or not key.isprintable():
        raise InvalidArgument(f"idempotency_key: 1..{limits.idempotency_key_chars_max} printable chars")
    return key


@dataclass
class ExecutorInput:
    name: str
    type: str
    id: str = ""
    supported_task_types: Sequence[str] = ()
    input_schema_json: str = ""
    output_schema_json: str = ""
    performance_profile_json: str = ""
    context_window_size: int = 0
    capacity: int = 1
    metadata: Mapping[str, str] = field(default_factory=dict)
    resumable: bool = False  # resumes tasks from their checkpoints


def build_executor_spec(executor: ExecutorInput, *, new_id: Callable[[], str], limits: Limits) -> dict[str, Any]:
    if not executor.name or len(executor.name) > limits.task_name_chars_max or not _NAME_RE.match(executor.name):
        raise InvalidArgument(f"executor.name: 1..{limits.task_name_chars_max} chars of [A-Za-z0-9_.:-/]")
    valid_types = [t.value for t in ExecutorType]
    if executor.type not in valid_types:
        raise InvalidArgument(f"executor.type: one of {', '.join(valid_types)}, got {executor.type[:40]!r}")
    if executor.id and (len(executor.id) > limits.task_name_chars_max or not _NAME_RE.match(executor.id)):
        raise InvalidArgument(f"executor.id: 1..{limits.task_name_chars_max} chars of [A-Za-z0-9_.:-/]")
    if not 1 <= executor.capacity <= limits.executor_capacity_max:
        raise InvalidArgument(f"executor.capacity: must be between 1 and {limits.executor_capacity_max}, got {executor.capacity}")
    if len(executor.supported_task_types) > limits.executor_task_types_max:
        raise InvalidArgument(f"executor.supported_task_types: at most {limits.executor_task_types_max} entries")
    for i, task_type in enumerate(executor.supported_task_types):
        if not task_type or len(task_type) > limits.task_type_chars_max or not _TYPE_RE.match(task_type):
            raise InvalidArgument(f"executor.supported_task_types[{i}]: 1..{limits.task_type_chars_max} chars of [A-Za-z0-9_.:-]")
    if executor.context_window_size < 0:
        raise InvalidArgument("executor.context_window_size: must be >= 0")
    return {
        "id": executor.id or new_id(),
        "name": executor.name,
        "type": executor.type,
        "task_types": list(dict.fromkeys(executor.supported_task_types)),
        "capacity": executor.capacity,
        "input_schema_json": _check_json(executor.input_schema_json, "executor.input_schema", limits.executor_schema_bytes_max),
        "output_schema_json": _check_json(executor.output_schema_json, "executor.output_schema", limits.executor_schema_bytes_max),
        "performance_profile_json": _check_json(
            executor.performance_profile_json, "executor.performance_profile", limits.executor_schema_bytes_max
        ),
        "context_window_size": executor.context_window_size,
        "metadata": _check_metadata(executor.metadata, "executor.metadata", limits),
        **({"resumable": True} if executor.resumable else {}),  # absent = False: older entries read alike
    }


# --- checkpoints ------------------------------------------------------------------------------
CHECKPOINT_INPUT_REQUIRED = ("task_id", "attempt", "executor_id", "sequence_number", "kind", "checksum")
CHECKPOINT_INPUT_OPTIONAL = ("base_sequence", "payload", "payload_json", "payload_bytes", "model_versions", "timestamp_ms")
CHECKPOINT_ID_CHARS_MAX = 256  # task and executor ids in a checkpoint request
# Raw payload_json may carry whitespace the canonical encoding drops; refuse to even decode
# text longer than this many times checkpoint_bytes_max.
CHECKPOINT_RAW_JSON_FACTOR_MAX = 2


def build_checkpoint_command(data: Mapping[str, Any], *, now_ms: int, limits: CheckpointLimits) -> dict[str, Any]:
    """A SAVE_CHECKPOINT command from an untrusted request (a dict from gRPC or an agent).

    Keys: task_id, attempt, executor_id (the fencing triple), sequence_number, kind, checksum,
    and base_sequence (deltas), payload (decoded JSON) or payload_json (its text), optional
    payload_bytes (computed when absent; must agree when given), model_versions. timestamp_ms
    is the coordinator's: `now_ms` replaces whatever the client sent. The state-free checks
    (`check_record`) run here; `apply` repeats them and adds those that need the chain."""
    if not isinstance(data, Mapping):
        raise InvalidArgument("checkpoint: an object is required")
    unknown = sorted(set(data) - set(CHECKPOINT_INPUT_REQUIRED) - set(CHECKPOINT_INPUT_OPTIONAL))
    if unknown:
        raise InvalidArgument(f"checkpoint: unknown fields {', '.join(map(str, unknown[:8]))}")
    missing = [key for key in CHECKPOINT_INPUT_REQUIRED if key not in data]
    if missing:
        raise InvalidArgument(f"checkpoint.{missing[0]}: required")
    for key in ("task_id", "executor_id"):
        value = data[key]
        if type(value) is not str or not 1 <= len(value) <= CHECKPOINT_ID_CHARS_MAX:
            raise InvalidArgument(f"checkpoint.{key}: a string of 1..{CHECKPOINT_ID_CHARS_MAX} chars")
    attempt = data["attempt"]
    if type(attempt) is not int or attempt < 1:
        raise InvalidArgument(f"checkpoint.attempt: an integer >= 1 (the attempt holding the lease), got {attempt!r}")
    payload = _checkpoint_payload(data, limits)
    payload_bytes = data.get("payload_bytes")
    if payload_bytes is None:
        payload_bytes = len(canonical_bytes(payload))
    versions = data.get("model_versions") or {}
    if not isinstance(versions, Mapping):
        raise InvalidArgument("checkpoint.model_versions: an object of model names to versions")
    record = CheckpointRecord(
        task_id=data["task_id"], sequence_number=data["sequence_number"], kind=data["kind"],
        base_sequence=data.get("base_sequence"), payload=payload, checksum=data["checksum"], timestamp_ms=now_ms,
        payload_bytes=payload_bytes, model_versions=dict(versions),
    )
    check_record(record, limits)
    fields = {key: value for key, value in record.as_dict().items() if key != "task_id"}
    invariant(tuple(fields) == cmd.CHECKPOINT_FIELDS, f"CheckpointRecord fields {tuple(fields)} differ from CHECKPOINT_FIELDS")
    return cmd.save_checkpoint(now_ms, record.task_id, attempt, data["executor_id"], fields)


def _checkpoint_payload(data: Mapping[str, Any], limits: CheckpointLimits) -> Any:
    has_text, has_value = "payload_json" in data, "payload" in data
    if has_text == has_value:
        raise InvalidArgument("checkpoint.payload: give payload or payload_json, exactly one")
    if has_value:
        return data["payload"]
    text = data["payload_json"]
    if type(text) is not str:
        raise InvalidArgument("checkpoint.payload_json: a string of JSON")
    raw_max = CHECKPOINT_RAW_JSON_FACTOR_MAX * limits.checkpoint_bytes_max
    if len(text) > raw_max:
        raise InvalidArgument(f"checkpoint.payload_json: at most {CHECKPOINT_RAW_JSON_FACTOR_MAX} * "
                              f"checkpoint_bytes_max={raw_max} chars before canonical encoding, got {len(text)}")
    try:
        return _strict_json.decode(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"checkpoint.payload_json: not valid JSON ({exc})") from None
