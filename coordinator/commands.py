"""The replicated command set and its codec.

Commands are an append-only, versioned enum (Nomad's MessageType): never renumber or reuse a
type; add a new one instead of changing an old one's meaning. A log entry carries a batch of
commands (group commit) encoded as

    b"\\x01" + JSON array of command objects

Each command object has "t" (its CommandType). A type this code does not know fails loudly,
unless the command carries "ign": true. JSON keeps the codec in the standard library, readable
in a hex dump, and never executes code on decode (unlike pickle).

Task specs inside SUBMIT_TASKS are positional arrays (see TASK_FIELDS) because DAG submissions
carry thousands of them and positional arrays halve the bytes and the decode time.
"""

from __future__ import annotations

import json
from enum import IntEnum
from typing import Any

from coordinator.errors import UnknownCommand

ENTRY_FORMAT_V1 = 1


class CommandType(IntEnum):
    NOOP = 1  # a barrier for linearizable reads; changes nothing
    SUBMIT_TASKS = 2  # one task or a whole DAG, all or nothing
    CANCEL_TASK = 3
    REGISTER_EXECUTOR = 4
    UNREGISTER_EXECUTOR = 5
    ASSIGN_TASKS = 6  # the leader's scheduler: leases tasks to executors (re-validated in apply)
    START_TASK = 7  # an executor began an attempt
    COMPLETE_TASK = 8  # an attempt succeeded (fenced by task id + attempt + executor)
    FAIL_TASK = 9  # an attempt failed: retry after a stamped backoff, or dead-letter / fail
    EXECUTOR_LOST = 10  # the leader saw no heartbeat for a lease TTL: its tasks go back
    REQUEUE_TASK = 11  # an operator re-queues a dead-lettered or failed task
    MARK_UNSCHEDULABLE = 12  # the scheduler found no executor that can ever run these tasks
    CANCEL_DAG = 13  # cancel every task of one DAG submission that has not finished
    SAVE_CHECKPOINT = 14  # the lease holder of a task saves a full or delta checkpoint (fenced)
    REPORT_PROGRESS = 15  # the lease holder reports progress (fenced; agents send at most ~1/s per attempt)
    AUDIT_DECISIONS = 16  # access decisions (allowed / denied) a node made, each signed by it
    AUDIT_HEAD = 17  # the leader's signed checkpoint of the audit chain's head (seq, hash)
    PUT_SECRET = 18  # an envelope-encrypted secret (sealed by the proposer; never plaintext in the log)
    DELETE_SECRET = 19
    REWRAP_SECRETS = 20  # KEK rotation: every secret's data key wrapped by the new KEK, all or nothing


# Keys any command may carry (issue 6), stamped by the proposer:
#   "p": the principal's subject, "r": its roles (list), "own": the subject when the caller's
#   permission covers only its own resources (apply checks ownership), "a": the audit stamp
#   {"n": proposing node, "d": sha256 of the command without "a", "s": that node's Ed25519
#   signature of the record body}.


# Keys of the "cp" object of SAVE_CHECKPOINT: CheckpointRecord's fields but task_id (the
# command's "id"). Named, not positional: one checkpoint per command, and its payload dominates.
CHECKPOINT_FIELDS = (
    "sequence_number",
    "kind",  # "full" | "delta"
    "base_sequence",  # null for a full
    "payload",  # full: the document; delta: a list of ops
    "checksum",  # sha256 of the canonical resulting document
    "timestamp_ms",
    "payload_bytes",
    "model_versions",
)

# Field order of one task spec in SUBMIT_TASKS. Append only.
TASK_FIELDS = (
    "id",
    "name",
    "type",
    "description",
    "input_json",
    "priority",
    "deadline_ms",  # 0 = none
    "dependencies",
    "max_attempts",
    "metadata",  # dict or null
)

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_decode = json.JSONDecoder().decode


def encode_entry(commands: list[dict[str, Any]]) -> bytes:
    return bytes((ENTRY_FORMAT_V1,)) + _encoder.encode(commands).encode()


def encode_command(command: dict[str, Any]) -> bytes:
    """One command's encoding; `join_entry` builds an entry from these without re-encoding."""
    return _encoder.encode(command).encode()


def join_entry(encoded_commands: list[bytes]) -> bytes:
    """The same bytes as encode_entry(commands), from commands encoded one by one."""
    return bytes((ENTRY_FORMAT_V1,)) + b"[" + b",".join(encoded_commands) + b"]"


def decode_entry(payload: bytes) -> list[dict[str, Any]]:
    if not payload or payload[0] != ENTRY_FORMAT_V1:
        version = payload[0] if payload else None
        raise UnknownCommand(f"log entry format {version!r} is not supported by this node")
    commands = _decode(payload[1:].decode())
    if not isinstance(commands, list):
        raise UnknownCommand("log entry does not hold a list of commands")
    return commands


def noop() -> dict[str, Any]:
    return {"t": CommandType.NOOP}


def submit_tasks(now_ms: int, tasks: list[list[Any]], idempotency_key: str | None, dag_id: str = "",
                 parent: tuple[str, int, str] | None = None, trace_parent: str = "") -> dict[str, Any]:
    """dag_id (stamped by the proposer for a DAG submission) names the submission as a whole.
    parent = (task_id, attempt, executor_id): subtasks delegated by a running task; fenced like
    any executor report, and they join the parent's DAG. trace_parent: the submitting span's W3C
    traceparent, stored with every task of the submission ("" = not traced)."""
    command: dict[str, Any] = {"t": CommandType.SUBMIT_TASKS, "now": now_ms, "key": idempotency_key, "tasks": tasks}
    if dag_id:
        command["dag"] = dag_id
    if trace_parent:
        command["tp"] = trace_parent
    if parent is not None:
        command["parent"] = list(parent)
    return command


def cancel_task(now_ms: int, task_id: str, reason: str) -> dict[str, Any]:
    return {"t": CommandType.CANCEL_TASK, "now": now_ms, "id": task_id, "reason": reason}


def register_executor(now_ms: int, executor: dict[str, Any]) -> dict[str, Any]:
    return {"t": CommandType.REGISTER_EXECUTOR, "now": now_ms, "ex": executor}


def unregister_executor(now_ms: int, executor_id: str) -> dict[str, Any]:
    return {"t": CommandType.UNREGISTER_EXECUTOR, "now": now_ms, "id": executor_id}



def assign_tasks(now_ms: int, lease_ms: int, items: list[list[Any]]) -> dict[str, Any]:
    """items: [task_id, executor_id, attempt]"""
    return {"t": CommandType.ASSIGN_TASKS, "now": now_ms, "lease_ms": lease_ms, "items": items}


def start_task(now_ms: int, task_id: str, attempt: int, executor_id: str) -> dict[str, Any]:
    return {"t": CommandType.START_TASK, "now": now_ms, "id": task_id, "attempt": attempt, "ex": executor_id}


def complete_task(now_ms: int, task_id: str, attempt: int, executor_id: str, result_json: str,
                  implies_started: bool = False) -> dict[str, Any]:
    command = {"t": CommandType.COMPLETE_TASK, "now": now_ms, "id": task_id, "attempt": attempt, "ex": executor_id,
               "result": result_json}
    if implies_started:
        command["st"] = True  # no START_TASK was proposed for this attempt: apply records the start too
    return command


def fail_task(now_ms: int, task_id: str, attempt: int, executor_id: str, error: str, retryable: bool,
              backoff_ms: int, implies_started: bool = False) -> dict[str, Any]:
    """backoff_ms is stamped by the proposer (exponential with jitter), so apply stays pure."""
    command = {"t": CommandType.FAIL_TASK, "now": now_ms, "id": task_id, "attempt": attempt, "ex": executor_id,
               "error": error, "retryable": retryable, "backoff_ms": backoff_ms}
    if implies_started:
        command["st"] = True
    return command


def executor_lost(now_ms: int, executor_id: str, reason: str) -> dict[str, Any]:
    return {"t": CommandType.EXECUTOR_LOST, "now": now_ms, "id": executor_id, "reason": reason}


def requeue_task(now_ms: int, task_id: str, extra_attempts: int) -> dict[str, Any]:
    return {"t": CommandType.REQUEUE_TASK, "now": now_ms, "id": task_id, "extra_attempts": extra_attempts}


def mark_unschedulable(now_ms: int, items: list[list[str]]) -> dict[str, Any]:
    """items: [task_id, reason]"""
    return {"t": CommandType.MARK_UNSCHEDULABLE, "now": now_ms, "items": items}


def cancel_dag(now_ms: int, dag_id: str, reason: str) -> dict[str, Any]:
    return {"t": CommandType.CANCEL_DAG, "now": now_ms, "dag": dag_id, "reason": reason}


def report_progress(now_ms: int, task_id: str, attempt: int, executor_id: str, fraction: float,
                    message: str) -> dict[str, Any]:
    return {"t": CommandType.REPORT_PROGRESS, "now": now_ms, "id": task_id, "attempt": attempt, "ex": executor_id,
            "fraction": fraction, "message": message}


def audit_decisions(node_id: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    """items: {"p", "r", "act", "res", "o", "now", "d", "s"} — one signed access decision each."""
    return {"t": CommandType.AUDIT_DECISIONS, "n": node_id, "items": items}


def audit_head(now_ms: int, node_id: str, seq: int, head_hash: str, signature: str) -> dict[str, Any]:
    return {"t": CommandType.AUDIT_HEAD, "now": now_ms, "n": node_id, "seq": seq, "hash": head_hash, "s": signature}


def put_secret(now_ms: int, name: str, envelope: dict[str, str]) -> dict[str, Any]:
    """envelope: kek_id, key_nonce, wrapped_key, nonce, ciphertext (security/secrets.py seal)."""
    return {"t": CommandType.PUT_SECRET, "now": now_ms, "name": name, "env": envelope}


def delete_secret(now_ms: int, name: str) -> dict[str, Any]:
    return {"t": CommandType.DELETE_SECRET, "now": now_ms, "name": name}


def rewrap_secrets(now_ms: int, from_kek_id: str, items: dict[str, dict[str, str]]) -> dict[str, Any]:
    """items: name -> the envelope with its data key re-wrapped (kek_id, key_nonce, wrapped_key
    change; the ciphertext does not)."""
    return {"t": CommandType.REWRAP_SECRETS, "now": now_ms, "from": from_kek_id, "items": items}


def save_checkpoint(now_ms: int, task_id: str, attempt: int, executor_id: str, record: dict[str, Any]) -> dict[str, Any]:
    """record: the CHECKPOINT_FIELDS of a CheckpointRecord. Fenced like START/COMPLETE by
    ("id", "attempt", "ex"); `now` also drives the expiry of ended tasks' checkpoints."""
    return {"t": CommandType.SAVE_CHECKPOINT, "now": now_ms, "id": task_id, "attempt": attempt, "ex": executor_id,
            "cp": record}
