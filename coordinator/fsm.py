"""CoordinatorFSM: the pure, deterministic replicated state machine.

    apply(index, command) -> ApplyResult      one command of a committed log entry
    apply_entry(index, payload) -> [results]  a whole entry (a group-committed batch)
    snapshot() / snapshot_chunks(view)        a canonical encoding of the whole state
    restore(data) / restore_chunks(chunks)

No sockets, clocks, uuids or randomness in here: the proposer stamps ids and times into each
command before it is proposed, so every replica that applies the same log reaches the same
state and the same `state_hash()`.

Records are immutable once stored: an update replaces the record. That lets `snapshot_view()`
take a consistent view in O(n) reference copies on the apply thread while the (slow) encoding
runs elsewhere.

Checkpoints (DESIGN.md §7) are kept per task as an ordered chain of immutable CheckpointRecords:

    SAVE_CHECKPOINT ─► fenced (lease holder only) ─► validate_new (sequence, bounds, chain)
                    ─► store bound (checkpoint_store_bytes_max) ─► append ─► retention
    task reaches a final status ─► (final_at_ms, task_id) on a heap ─► every command carrying
                    `now` drops the chains of tasks final for checkpoint_retention_after_final_ms

A chain list is never mutated in place (a save replaces it), so a snapshot view can share it.

Expected failures (bad dependency, cancelling a finished task, ...) are *results*, not
exceptions, and leave the state untouched: a command is validated completely before anything
is written. Only an unknown command type raises, because a node that cannot apply the log must
stop rather than diverge.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from coordinator.checkpoints import (
    ChainPosition,
    CheckpointRecord,
    Recovery,
    canonical_json,
    chain_position,
    checkpoint_id,
    recover,
    retention,
    validate_new,
)
from coordinator.audit import AuditChain, AuditHead
from coordinator.commands import CommandType, decode_entry
from coordinator.dag import find_cycle
from coordinator.errors import Compacted, CoordinatorError, UnknownCommand, invariant
from coordinator.limits import StateLimits

SNAPSHOT_FORMAT = 1
# Bumped whenever the encoded state of the same log intentionally changes (new fields, new
# events), so recorded logs of an older version are checked by their semantic digest instead.
# 4: checkpoints (a "checkpoints" snapshot section, TaskRecord.checkpoint_sequence, events).
# 5: ExecutorRecord.resumable; TaskRecord.progress/progress_message/progress_ms (REPORT_PROGRESS).
# 6: ExecutorRecord.owner; the audit chain (an "audit" snapshot section, header audit_heads /
#    audit_anchor); ownership checks (PERMISSION_DENIED results); envelope-encrypted secrets.
# 7: TaskRecord.trace_parent (the submitter's W3C traceparent, from SUBMIT_TASKS "tp").
FSM_STATE_VERSION = 7
SNAPSHOT_ROWS_PER_CHUNK = 1000
SNAPSHOT_CHECKPOINT_ROWS_PER_CHUNK = 16  # a record holds up to checkpoint_bytes_max of payload

FINAL_STATUSES = frozenset({"completed", "failed", "cancelled", "dead_letter"})
LEASED_STATUSES = frozenset({"assigned", "executing"})
UNSUCCESSFUL_STATUSES = frozenset({"failed", "cancelled", "dead_letter"})
HISTORY_ENTRIES_MAX = 100  # per task: attempts beyond this keep only the newest
ENVELOPE_FIELDS = ("kek_id", "key_nonce", "wrapped_key", "nonce", "ciphertext")

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class TaskRecord(NamedTuple):
    """One task as the state machine keeps it: an immutable tuple (cheap to build for a
    10,000-task DAG, ~150 bytes of overhead per task); updates go through `replace`."""

    id: str
    name: str
    type: str
    description: str
    input_json: str
    priority: int
    deadline_ms: int
    dependencies: tuple[str, ...]
    max_attempts: int
    metadata: dict[str, str] | None
    status: str
    assigned_executor: str | None
    created_at_ms: int
    updated_at_ms: int
    created_index: int
    cancel_reason: str
    # Execution (appended fields keep defaults, so older snapshot rows still load)
    attempt: int = 0  # the current (or last) attempt; 0 = never assigned
    lease_expires_ms: int = 0
    not_before_ms: int = 0  # retry backoff: not assignable before this time
    result_json: str = ""
    error: str = ""
    history: tuple = ()  # ((attempt, executor_id, outcome, error, started_ms, ended_ms), ...)
    dag_id: str = ""  # the DAG submission it belongs to ("" for a single task)
    parent_id: str = ""  # the running task that delegated it ("" if submitted by a client)
    # The newest checkpoint sequence the task saved (0 = none). Kept after retention drops the
    # records, so sequence numbers keep increasing for the life of the task.
    checkpoint_sequence: int = 0
    # The current attempt's last progress report (reset when a new attempt is assigned).
    progress: float = 0.0
    progress_message: str = ""
    progress_ms: int = 0
    # The W3C traceparent of the span that submitted it ("" = not traced): scheduling and
    # execution spans join that trace on whichever node and executor run them.
    trace_parent: str = ""

    def row(self) -> list[Any]:
        return list(self)

    def replace(self, **changes: Any) -> TaskRecord:
        return self._replace(**changes)


class ExecutorRecord(NamedTuple):
    id: str
    name: str
    type: str
    task_types: tuple[str, ...]
    capacity: int
    status: str
    registered_at_ms: int
    input_schema_json: str
    output_schema_json: str
    performance_profile_json: str
    context_window_size: int
    metadata: dict[str, str] | None
    tasks_completed: int = 0
    tasks_failed: int = 0
    resumable: bool = False  # resumes from checkpoints; else a checkpointed task restarts from scratch
    # The principal (JWT subject) that registered it; with an own-only permission only that
    # principal may report for it, re-register or unregister it ("" = registered without
    # security, --insecure-dev).
    owner: str = ""

    def row(self) -> list[Any]:
        return list(self)


class ApplyResult:
    __slots__ = ("ok", "value", "code", "message")

    def __init__(self, ok: bool, value: Any = None, code: str = "", message: str = "") -> None:
        self.ok = ok
        self.value = value
        self.code = code
        self.message = message

    @classmethod
    def error(cls, code: str, message: str) -> ApplyResult:
        return cls(False, None, code, message)

    def __repr__(self) -> str:
        if self.ok:
            return f"ApplyResult(ok, {self.value!r})"
        return f"ApplyResult({self.code}: {self.message})"


# An event is a tuple, to keep a 100k-event ring small:
# (index, seq, kind, task_id, executor_id, time_ms, data_json)
Event = tuple[int, int, str, str, str, int, str]


class SnapshotView:
    """A consistent, frozen view of the state for encoding off the apply thread."""

    __slots__ = ("header", "tasks", "executors", "idempotency", "events", "checkpoints", "audit", "secrets")

    def __init__(self, header: dict[str, Any], tasks: list, executors: list, idempotency: list, events: list,
                 checkpoints: list | None = None, audit: list | None = None, secrets: list | None = None) -> None:
        self.secrets = secrets or []  # [name, envelope] (envelopes only)
        self.header = header
        self.tasks = tasks
        self.executors = executors
        self.idempotency = idempotency
        self.events = events
        self.checkpoints = checkpoints or []  # CheckpointRecords, grouped by task, oldest first
        self.audit = audit or []  # AuditRecords, oldest first


class CoordinatorFSM:
    def __init__(self, limits: StateLimits | None = None) -> None:
        self.limits = limits or StateLimits()
        self.tasks: dict[str, TaskRecord] = {}
        self.executors: dict[str, ExecutorRecord] = {}
        self.status_counts: dict[str, int] = {}
        # idempotency key -> (index, task ids); FIFO-bounded so memory stays bounded
        self._idempotency: OrderedDict[str, tuple[int, tuple[str, ...]]] = OrderedDict()
        self._events: deque[Event] = deque()
        self.events_compacted_through = 0  # highest index some of whose events were evicted
        self.last_applied_index = 0
        self._event_index = 0
        self._event_seq = 0
        # Derived indexes (rebuilt on restore, never snapshotted): reverse dependency edges, the
        # pending tasks whose dependencies all completed (in the order they became ready), and
        # the tasks each executor holds.
        self.dependents: dict[str, list[str]] = {}
        self.ready: dict[str, None] = {}
        self.executor_tasks: dict[str, dict[str, None]] = {}
        self.dag_tasks: dict[str, list[str]] = {}
        self.children: dict[str, list[str]] = {}
        # Checkpoint chains per task, oldest first (snapshotted). Derived: the payload bytes they
        # hold, and when each ended task that still holds some became final, on a heap of
        # (final_at_ms, task_id) for expiry; an entry whose time no longer matches _final_at
        # (the task was re-queued since) is stale and skipped.
        self._checkpoints: dict[str, list[CheckpointRecord]] = {}
        self.checkpoint_bytes = 0
        self._final_at: dict[str, int] = {}
        self._expiry: list[tuple[int, str]] = []
        # The audit hash chain (coordinator/audit.py): one record per command that carries an
        # audit stamp "a" (the proposer's signature) and per access decision; snapshotted.
        self.audit = AuditChain(self.limits.audit)
        # Secrets as envelopes only (name -> kek_id, key_nonce, wrapped_key, nonce, ciphertext,
        # updated_ms): the proposer sealed them; no replica ever holds a plaintext.
        self.secrets: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ apply
    def apply_entry(self, index: int, payload: bytes) -> list[ApplyResult]:
        commands = decode_entry(payload)
        return [self.apply(index, command) for command in commands]

    def apply(self, index: int, command: dict[str, Any]) -> ApplyResult:
        invariant(index >= self.last_applied_index, f"apply index {index} < last applied {self.last_applied_index}")
        self.last_applied_index = index
        kind = command.get("t")
        handler = self._HANDLERS.get(kind)
        if handler is None and not command.get("ign"):
            raise UnknownCommand(f"command type {kind!r} at index {index} is unknown to this node")
        if self._expiry:  # any command carrying `now`, ignorable ones too, so versions agree
            now_ms = command.get("now")
            if type(now_ms) is int and self._expiry[0][0] + self.limits.checkpoints.checkpoint_retention_after_final_ms <= now_ms:
                self._expire_checkpoints(index, now_ms)
        if handler is None:
            return ApplyResult(True, None)
        own = command.get("own")
        if own is not None:
            denial = self._ownership_denial(kind, command, own)
            result = ApplyResult.error("PERMISSION_DENIED", denial) if denial else handler(self, index, command)
        else:
            result = handler(self, index, command)
        stamp = command.get("a")
        if stamp is not None and kind != CommandType.AUDIT_DECISIONS:
            self._audit_command(index, kind, command, stamp, result)
        return result

    # ------------------------------------------------------------------ security
    def _ownership_denial(self, kind: int, command: dict[str, Any], own: Any) -> str:
        """A caller whose permission covers only its own resources ("own": its subject) may act
        only on executors it registered and on tasks leased to them. Decided here, on the
        replicated state, so it holds whichever node took the call. "" = allowed."""
        if type(own) is not str:
            return "own: a principal subject is required"
        if kind == CommandType.REGISTER_EXECUTOR:
            spec = command.get("ex")
            executor_id = spec.get("id") if type(spec) is dict else None
            existing = self.executors.get(executor_id)
            if existing is not None and existing.owner != own:
                return f"executor {executor_id!r} is registered by another principal; {own!r} may not take it over"
            return ""
        if kind in (CommandType.UNREGISTER_EXECUTOR,):
            executor_id = command.get("id")
        elif kind in (CommandType.START_TASK, CommandType.COMPLETE_TASK, CommandType.FAIL_TASK,
                      CommandType.REPORT_PROGRESS, CommandType.SAVE_CHECKPOINT):
            executor_id = command.get("ex")
        elif kind == CommandType.SUBMIT_TASKS and type(command.get("parent")) is list and len(command["parent"]) == 3:
            executor_id = command["parent"][2]
        else:
            return f"{_command_name(kind)}: not allowed with a permission limited to the caller's own resources"
        executor = self.executors.get(executor_id)
        if executor is None:
            return ""  # nothing of anyone's: the handler reports NOT_FOUND / a stale lease
        if executor.owner != own:
            return f"executor {executor_id!r} and its tasks belong to another principal, not {own!r}"
        return ""

    def _audit_command(self, index: int, kind: int, command: dict[str, Any], stamp: Any, result: ApplyResult) -> None:
        """Link the command's audit record: the proposer signed who / what / which resource /
        when / the command's digest; apply adds the outcome and the Raft index."""
        if type(stamp) is not dict:
            return
        roles = command.get("r")
        self.audit.append(
            index=index, time_ms=_int_or_zero(command.get("now")), node=_str(stamp.get("n")), who=_str(command.get("p")),
            roles=tuple(r for r in roles if type(r) is str) if type(roles) is list else (),
            action=_command_name(kind), resource=audit_resource(kind, command),
            outcome="ok" if result.ok else result.code, digest=_str(stamp.get("d")), sig=_str(stamp.get("s")))

    def _apply_audit_decisions(self, index: int, command: dict[str, Any]) -> ApplyResult:
        """Access decisions (allowed / denied) a node made, each signed by it; a decision that
        repeated within the node's flush window is one record with "xN" on its outcome."""
        items = command.get("items")
        node = _str(command.get("n"))
        if type(items) is not list:
            return ApplyResult.error("INVALID_ARGUMENT", "items: a list of decisions")
        for item in items:
            if type(item) is not dict:
                continue
            roles = item.get("r")
            self.audit.append(
                index=index, time_ms=_int_or_zero(item.get("now")), node=node, who=_str(item.get("p")),
                roles=tuple(r for r in roles if type(r) is str) if type(roles) is list else (),
                action=_str(item.get("act")), resource=_str(item.get("res")), outcome=_str(item.get("o")),
                digest=_str(item.get("d")), sig=_str(item.get("s")))
        return ApplyResult(True, {"index": index, "records": len(items)})

    def _envelope_problem(self, name: Any, envelope: Any) -> str:
        if type(name) is not str or not 1 <= len(name) <= 128:
            return "name: 1..128 chars"
        if type(envelope) is not dict or set(envelope) != set(ENVELOPE_FIELDS):
            return f"secret {name!r}: an envelope with exactly {', '.join(ENVELOPE_FIELDS)}"
        if any(type(v) is not str for v in envelope.values()):
            return f"secret {name!r}: envelope fields are strings"
        if sum(len(v) for v in envelope.values()) > self.limits.secret_envelope_chars_max:
            return f"secret {name!r}: envelope over secret_envelope_chars_max={self.limits.secret_envelope_chars_max}"
        return ""

    def _apply_put_secret(self, index: int, command: dict[str, Any]) -> ApplyResult:
        name, envelope = command.get("name"), command.get("env")
        problem = self._envelope_problem(name, envelope)
        if problem:
            return ApplyResult.error("INVALID_ARGUMENT", problem)
        if name not in self.secrets and len(self.secrets) >= self.limits.secrets_max:
            return ApplyResult.error("RESOURCE_EXHAUSTED", f"secrets: at most secrets_max={self.limits.secrets_max}")
        now_ms = _int_or_zero(command.get("now"))
        self.secrets[name] = {**envelope, "updated_ms": now_ms}
        self._events.append(self._event(index, "SecretPut", "", "", now_ms, _encoder.encode({"name": name})))
        self._trim_events()
        return ApplyResult(True, {"name": name, "index": index})

    def _apply_delete_secret(self, index: int, command: dict[str, Any]) -> ApplyResult:
        name = command.get("name")
        if self.secrets.pop(name, None) is None:
            return ApplyResult.error("NOT_FOUND", f"name: no secret {str(name)[:128]!r}")
        now_ms = _int_or_zero(command.get("now"))
        self._events.append(self._event(index, "SecretDeleted", "", "", now_ms, _encoder.encode({"name": name})))
        self._trim_events()
        return ApplyResult(True, {"name": name, "index": index})

    def _apply_rewrap_secrets(self, index: int, command: dict[str, Any]) -> ApplyResult:
        """All or nothing: the items must cover exactly the secrets wrapped by the old KEK, and
        only the key-wrapping fields may change."""
        items, from_id = command.get("items"), command.get("from")
        if type(items) is not dict:
            return ApplyResult.error("INVALID_ARGUMENT", "items: an object of name -> envelope")
        wrapped_by_old = {n for n, e in self.secrets.items() if e.get("kek_id") == from_id}
        if set(items) != wrapped_by_old:
            return ApplyResult.error("FAILED_PRECONDITION", "rewrap: the secrets wrapped by KEK "
                                     f"{str(from_id)[:32]} changed meanwhile; run the rotation again")
        for name, envelope in items.items():
            problem = self._envelope_problem(name, envelope)
            held = self.secrets[name]
            if problem or envelope["nonce"] != held["nonce"] or envelope["ciphertext"] != held["ciphertext"]:
                return ApplyResult.error("INVALID_ARGUMENT", problem or f"secret {name!r}: a rewrap changes only the "
                                                                       "wrapped data key")
        now_ms = _int_or_zero(command.get("now"))
        for name, envelope in items.items():
            self.secrets[name] = {**envelope, "updated_ms": now_ms}
        return ApplyResult(True, {"rewrapped": len(items), "index": index})

    def _apply_audit_head(self, index: int, command: dict[str, Any]) -> ApplyResult:
        """A signed checkpoint of the chain head by the leader: lets old records be pruned and
        covers what the per-record signatures do not (outcomes, indexes)."""
        try:
            head = AuditHead(command["seq"], command["hash"], command["n"], command["now"], command["s"])
        except KeyError as exc:
            return ApplyResult.error("INVALID_ARGUMENT", f"audit head: missing {exc.args[0]!r}")
        problem = self.audit.add_head(head)
        if problem:
            return ApplyResult.error("FAILED_PRECONDITION", problem)
        return ApplyResult(True, {"index": index, "seq": head.seq})

    def _apply_noop(self, index: int, command: dict[str, Any]) -> ApplyResult:
        return ApplyResult(True, {"index": index})

    def _apply_submit_tasks(self, index: int, command: dict[str, Any]) -> ApplyResult:
        key = command.get("key")
        if key:
            seen = self._idempotency.get(key)
            if seen is not None:
                first = self.tasks.get(seen[1][0]) if seen[1] else None
                return ApplyResult(True, {"ids": list(seen[1]), "duplicate": True, "index": seen[0],
                                          "dag_id": first.dag_id if first is not None else ""})
        now_ms = command["now"]
        specs = command["tasks"]
        tasks = self.tasks
        parent_id = ""
        if "parent" in command:
            parent_id, parent_attempt, parent_executor = command["parent"]
            parent = tasks.get(parent_id)
            if (parent is None or parent.status not in LEASED_STATUSES or parent.attempt != parent_attempt
                    or parent.assigned_executor != parent_executor):
                return ApplyResult.error(
                    "FAILED_PRECONDITION",
                    f"StaleFencingToken: delegating task {parent_id!r} attempt {parent_attempt} on "
                    f"{parent_executor!r} is not the current lease",
                )
        new_ids: dict[str, list[str]] = {}
        for position, spec in enumerate(specs):
            task_id = spec[0]
            if task_id in tasks or task_id in new_ids:
                return ApplyResult.error("INVALID_ARGUMENT", f"tasks[{position}].id: task {task_id!r} already exists")
            new_ids[task_id] = spec[7]
        for position, spec in enumerate(specs):
            for dep_position, dep in enumerate(spec[7]):
                if dep not in tasks and dep not in new_ids:
                    return ApplyResult.error(
                        "INVALID_ARGUMENT",
                        f"tasks[{position}].depends_on[{dep_position}]: unknown task {dep!r}",
                    )
        cycle = find_cycle(new_ids)
        if cycle is not None:
            return ApplyResult.error("INVALID_ARGUMENT", f"depends_on: dependency cycle {' -> '.join(cycle)}")
        # Validated: from here on nothing can fail, so the submission is all or nothing.
        events = self._events
        dependents = self.dependents
        dag_id = command.get("dag", "")
        if parent_id:
            dag_id = tasks[parent_id].dag_id  # subtasks become part of the parent's DAG
            self.children.setdefault(parent_id, []).extend(spec[0] for spec in specs)
            if dag_id:
                self.dag_tasks[dag_id].extend(spec[0] for spec in specs)
        elif dag_id:
            if dag_id in self.dag_tasks:
                return ApplyResult.error("INVALID_ARGUMENT", f"dag_id: {dag_id!r} already exists")
            self.dag_tasks[dag_id] = [spec[0] for spec in specs]
        trace_parent = command.get("tp", "")
        for spec in specs:
            task_id = spec[0]
            deps = tuple(spec[7])
            record = TaskRecord(
                task_id, spec[1], spec[2], spec[3], spec[4], spec[5], spec[6], deps, spec[8], spec[9],
                "pending", None, now_ms, now_ms, index, "", dag_id=dag_id, parent_id=parent_id,
                trace_parent=trace_parent,
            )
            tasks[task_id] = record
            events.append(self._event(index, "TaskCreated", task_id, "", now_ms, ""))
            for dep in deps:
                dependents.setdefault(dep, []).append(task_id)
        self.status_counts["pending"] = self.status_counts.get("pending", 0) + len(specs)
        for spec in specs:  # after all are stored: a dependency may come later in the same DAG
            record = tasks[spec[0]]
            if record.status != "pending":
                continue  # already failed below, through an earlier task of this batch
            dead = next((d for d in record.dependencies if tasks[d].status in UNSUCCESSFUL_STATUSES), None)
            if dead is not None:
                # A dependency that already ended without success: fail now, never wait forever.
                self._fail_upstream(index, record, f"upstream_failed:{dead}", now_ms)
                self._fail_dependents(index, record.id, now_ms)
            else:
                self._release_if_ready(index, record, now_ms)
        self._trim_events()
        ids = list(new_ids)
        if key:
            self._idempotency[key] = (index, tuple(ids))
            if len(self._idempotency) > self.limits.idempotency_keys_max:
                self._idempotency.popitem(last=False)
        return ApplyResult(True, {"ids": ids, "duplicate": False, "index": index, "dag_id": dag_id})

    def _apply_cancel_task(self, index: int, command: dict[str, Any]) -> ApplyResult:
        task_id = command["id"]
        record = self.tasks.get(task_id)
        if record is None:
            return ApplyResult.error("NOT_FOUND", f"task_id: no task {task_id!r}")
        if record.status in FINAL_STATUSES:
            return ApplyResult.error("FAILED_PRECONDITION", f"task {task_id!r} is already {record.status}")
        now_ms = command["now"]
        # The task and, transitively, the subtasks it delegated that have not finished.
        cancelled, stack = [], [task_id]
        while stack:
            current = self.tasks[stack.pop()]
            if current.status in FINAL_STATUSES:
                continue
            self._cancel(index, current, command.get("reason", ""), now_ms)
            cancelled.append(current.id)
            stack.extend(reversed(self.children.get(current.id, ())))
        for cancelled_id in cancelled:
            self._fail_dependents(index, cancelled_id, now_ms)
        self._trim_events()
        return ApplyResult(True, {"id": task_id, "cancelled": cancelled, "index": index})

    def _cancel(self, index: int, record: TaskRecord, reason: str, now_ms: int) -> None:
        executor_id = record.assigned_executor if record.status in LEASED_STATUSES else ""
        self._release_slot(record)
        self.ready.pop(record.id, None)
        self._set_status(record, "cancelled", now_ms, cancel_reason=reason)
        # executor_id tells the node holding that executor's stream to stop the attempt
        self._events.append(self._event(index, "TaskCancelled", record.id, executor_id or "", now_ms,
                                        _encoder.encode({"reason": reason, "attempt": record.attempt})))

    def _apply_cancel_dag(self, index: int, command: dict[str, Any]) -> ApplyResult:
        """Cancels every task of the DAG that has not finished — all of them cancelled, none
        'upstream_failed' by another — then fails what depends on them from outside the DAG."""
        dag_id = command["dag"]
        task_ids = self.dag_tasks.get(dag_id)
        if task_ids is None:
            return ApplyResult.error("NOT_FOUND", f"dag_id: no DAG {dag_id!r}")
        now_ms = command["now"]
        cancelled = [t for t in task_ids if self.tasks[t].status not in FINAL_STATUSES]
        for task_id in cancelled:
            self._cancel(index, self.tasks[task_id], command.get("reason", ""), now_ms)
        for task_id in cancelled:
            self._fail_dependents(index, task_id, now_ms)
        self._trim_events()
        return ApplyResult(True, {"dag_id": dag_id, "cancelled": cancelled, "index": index})

    def _apply_register_executor(self, index: int, command: dict[str, Any]) -> ApplyResult:
        spec = command["ex"]
        now_ms = command["now"]
        executor_id = spec["id"]
        existing = self.executors.get(executor_id)
        registered_at_ms = existing.registered_at_ms if existing is not None else now_ms
        record = ExecutorRecord(
            executor_id, spec["name"], spec["type"], tuple(spec["task_types"]), spec["capacity"], "online",
            registered_at_ms, spec["input_schema_json"], spec["output_schema_json"],
            spec["performance_profile_json"], spec["context_window_size"], spec["metadata"],
            existing.tasks_completed if existing else 0, existing.tasks_failed if existing else 0,
            bool(spec.get("resumable", False)), _str(command.get("p")) or (existing.owner if existing else ""),
        )
        self.executors[executor_id] = record
        self.executor_tasks.setdefault(executor_id, {})
        self._events.append(self._event(index, "ExecutorRegistered", "", executor_id, now_ms, ""))
        self._trim_events()
        return ApplyResult(True, {"id": executor_id, "index": index, "reregistered": existing is not None})

    def _apply_unregister_executor(self, index: int, command: dict[str, Any]) -> ApplyResult:
        executor_id = command["id"]
        if executor_id not in self.executors:
            return ApplyResult.error("NOT_FOUND", f"executor_id: no executor {executor_id!r}")
        requeued = self._take_back_tasks(index, executor_id, command["now"], "executor unregistered")
        del self.executors[executor_id]
        self.executor_tasks.pop(executor_id, None)
        self._events.append(self._event(index, "ExecutorUnregistered", "", executor_id, command["now"], ""))
        self._trim_events()
        return ApplyResult(True, {"id": executor_id, "index": index, "requeued": requeued})

    # ------------------------------------------------------------------ execution
    def _apply_assign_tasks(self, index: int, command: dict[str, Any]) -> ApplyResult:
        """A scheduling plan from the leader, re-validated item by item against current state:
        a stale item is rejected (with the reason), the others are applied."""
        now_ms = command["now"]
        lease_ms = command["lease_ms"]
        assigned: list[str] = []
        rejected: list[list[str]] = []
        for task_id, executor_id, attempt in command["items"]:
            reason = self._assign_rejection(task_id, executor_id, attempt, now_ms)
            if reason:
                rejected.append([task_id, reason])
                continue
            record = self.tasks[task_id]
            self.ready.pop(task_id)
            self.executor_tasks[executor_id][task_id] = None
            error = "" if record.error.startswith("unschedulable:") else record.error
            self._set_status(record, "assigned", now_ms, assigned_executor=executor_id, attempt=attempt,
                             lease_expires_ms=now_ms + lease_ms, not_before_ms=0, error=error,
                             progress=0.0, progress_message="", progress_ms=0)
            data = {"attempt": attempt, "lease_expires_ms": now_ms + lease_ms}
            if record.checkpoint_sequence:
                # Decided here, on replicated state, so every node records the same: the attempt
                # resumes from the task's checkpoints, or restarts from scratch on an executor
                # that cannot resume (recorded as such).
                if self.executors[executor_id].resumable:
                    data["resume_from_sequence"] = record.checkpoint_sequence
                else:
                    data["restart_from_scratch"] = f"executor {executor_id} is not resumable"
            self._events.append(self._event(index, "TaskAssigned", task_id, executor_id, now_ms, _encoder.encode(data)))
            assigned.append(task_id)
        self._trim_events()
        return ApplyResult(True, {"assigned": assigned, "rejected": rejected, "index": index})

    def _assign_rejection(self, task_id: str, executor_id: str, attempt: int, now_ms: int) -> str:
        record = self.tasks.get(task_id)
        if record is None:
            return "no such task"
        if task_id not in self.ready:
            return f"task is {record.status}, not ready"
        if record.not_before_ms > now_ms:
            return "task is backing off"
        if attempt != record.attempt + 1:
            return f"attempt {attempt} is not the next attempt {record.attempt + 1}"
        executor = self.executors.get(executor_id)
        if executor is None or executor.status != "online":
            return "executor is not online"
        if executor.task_types and record.type not in executor.task_types:
            return f"executor does not run type {record.type!r}"
        if len(self.executor_tasks[executor_id]) >= executor.capacity:
            return "executor is at capacity"
        return ""

    def _fenced(self, command: dict[str, Any]) -> tuple[TaskRecord | None, ApplyResult | None]:
        """The fencing check every executor report passes: the task is leased to this executor
        under this attempt. A stale attempt (a paused executor waking up) is rejected."""
        task_id = command["id"]
        record = self.tasks.get(task_id)
        if record is None:
            return None, ApplyResult.error("NOT_FOUND", f"task_id: no task {task_id!r}")
        if (record.status not in LEASED_STATUSES or record.attempt != command["attempt"]
                or record.assigned_executor != command["ex"]):
            return None, ApplyResult.error(
                "FAILED_PRECONDITION",
                f"StaleFencingToken: task {task_id!r} attempt {command['attempt']} on {command['ex']!r} is not the "
                f"current lease (status {record.status}, attempt {record.attempt}, executor {record.assigned_executor!r})",
            )
        return record, None

    def _apply_start_task(self, index: int, command: dict[str, Any]) -> ApplyResult:
        record, error = self._fenced(command)
        if error is not None:
            return error
        if record.status == "assigned":
            self._mark_started(index, record, command["now"])
            self._trim_events()
        return ApplyResult(True, {"id": record.id, "index": index})

    def _apply_report_progress(self, index: int, command: dict[str, Any]) -> ApplyResult:
        record, error = self._fenced(command)
        if error is not None:
            return error
        now_ms = command["now"]
        if record.status == "assigned":  # progress means it runs: its `started` may still be on the way
            record = self._mark_started(index, record, now_ms)
        self.tasks[record.id] = record.replace(progress=command["fraction"], progress_message=command["message"],
                                               progress_ms=now_ms)
        self._events.append(self._event(index, "TaskProgress", record.id, record.assigned_executor, now_ms,
                                        _encoder.encode({"attempt": record.attempt, "fraction": command["fraction"],
                                                         "message": command["message"]})))
        self._trim_events()
        return ApplyResult(True, {"id": record.id, "index": index})

    def _mark_started(self, index: int, record: TaskRecord, now_ms: int) -> TaskRecord:
        self._set_status(record, "executing", now_ms)
        self._events.append(self._event(index, "TaskStarted", record.id, record.assigned_executor, now_ms,
                                        _encoder.encode({"attempt": record.attempt})))
        return self.tasks[record.id]

    def _implied_start(self, index: int, record: TaskRecord, command: dict[str, Any]) -> TaskRecord:
        """A terminal report that stands for the attempt's `started` too (the executor finished
        before sending it): record the start first, so events and history read the same as with
        a separate START_TASK."""
        if command.get("st") and record.status == "assigned":
            return self._mark_started(index, record, command["now"])
        return record

    def _end_attempt(self, index: int, command: dict[str, Any], completed: bool) -> tuple[TaskRecord | None, ApplyResult | None]:
        """What ending an attempt (COMPLETE or FAIL) starts with: the fencing check, the start a
        terminal report may stand for, the executor's slot back and its outcome counted."""
        record, error = self._fenced(command)
        if error is not None:
            return None, error
        record = self._implied_start(index, record, command)
        self._release_slot(record)
        self._count_outcome(record.assigned_executor, completed=completed)
        return record, None

    def _apply_complete_task(self, index: int, command: dict[str, Any]) -> ApplyResult:
        record, error = self._end_attempt(index, command, completed=True)
        if error is not None:
            return error
        now_ms = command["now"]
        executor_id = record.assigned_executor
        history = self._history(record, "completed", "", now_ms)
        self._set_status(record, "completed", now_ms, result_json=command["result"], error="", history=history)
        self._events.append(self._event(index, "TaskCompleted", record.id, executor_id, now_ms,
                                        _encoder.encode({"attempt": record.attempt})))
        for dependent in self.dependents.get(record.id, ()):
            self._release_if_ready(index, self.tasks[dependent], now_ms)
        self._trim_events()
        return ApplyResult(True, {"id": record.id, "index": index})

    def _apply_fail_task(self, index: int, command: dict[str, Any]) -> ApplyResult:
        record, error = self._end_attempt(index, command, completed=False)
        if error is not None:
            return error
        now_ms = command["now"]
        executor_id = record.assigned_executor
        history = self._history(record, "failed", command["error"], now_ms)
        retry = command["retryable"] and record.attempt < record.max_attempts
        if retry:
            status = "pending"
        else:
            status = "dead_letter" if command["retryable"] else "failed"
        self._set_status(record, status, now_ms, error=command["error"], history=history,
                         not_before_ms=now_ms + command["backoff_ms"] if retry else 0)
        self._events.append(self._event(index, "TaskFailed", record.id, executor_id, now_ms, _encoder.encode({
            "attempt": record.attempt, "error": command["error"], "status": status,
            "retry_at_ms": now_ms + command["backoff_ms"] if retry else 0})))
        if retry:
            self._release_if_ready(index, self.tasks[record.id], now_ms)
        else:
            self._fail_dependents(index, record.id, now_ms)
        self._trim_events()
        return ApplyResult(True, {"id": record.id, "status": status, "index": index})

    def _apply_executor_lost(self, index: int, command: dict[str, Any]) -> ApplyResult:
        executor_id = command["id"]
        executor = self.executors.get(executor_id)
        if executor is None:
            return ApplyResult.error("NOT_FOUND", f"executor_id: no executor {executor_id!r}")
        now_ms = command["now"]
        requeued = self._take_back_tasks(index, executor_id, now_ms, f"executor lost: {command['reason']}")
        self.executors[executor_id] = executor._replace(status="offline")
        self._events.append(self._event(index, "ExecutorLost", "", executor_id, now_ms,
                                        _encoder.encode({"reason": command["reason"], "requeued": requeued})))
        self._trim_events()
        return ApplyResult(True, {"id": executor_id, "requeued": requeued, "index": index})

    def _apply_requeue_task(self, index: int, command: dict[str, Any]) -> ApplyResult:
        task_id = command["id"]
        record = self.tasks.get(task_id)
        if record is None:
            return ApplyResult.error("NOT_FOUND", f"task_id: no task {task_id!r}")
        if record.status not in ("dead_letter", "failed"):
            return ApplyResult.error("FAILED_PRECONDITION", f"task {task_id!r} is {record.status}; only dead_letter "
                                                            "or failed tasks can be re-queued")
        dead = next((d for d in record.dependencies if self.tasks[d].status in UNSUCCESSFUL_STATUSES), None)
        if dead is not None:
            return ApplyResult.error("FAILED_PRECONDITION", f"task {task_id!r} depends on {dead!r}, which is "
                                                            f"{self.tasks[dead].status}; re-queue that one first")
        now_ms = command["now"]
        self._set_status(record, "pending", now_ms, max_attempts=record.attempt + command["extra_attempts"],
                         not_before_ms=0, error="")
        self._events.append(self._event(index, "TaskRequeued", task_id, "", now_ms, ""))
        self._release_if_ready(index, self.tasks[task_id], now_ms)
        self._trim_events()
        return ApplyResult(True, {"id": task_id, "index": index})

    def _apply_mark_unschedulable(self, index: int, command: dict[str, Any]) -> ApplyResult:
        """Records why a pending task cannot run (no executor supports its type); it stays queued
        and is assigned as soon as a capable executor registers."""
        now_ms = command["now"]
        marked = []
        for task_id, reason in command["items"]:
            record = self.tasks.get(task_id)
            error = f"unschedulable: {reason}"
            if record is None or record.status != "pending" or record.error == error:
                continue
            self.tasks[task_id] = record.replace(error=error, updated_at_ms=now_ms)
            self._events.append(self._event(index, "TaskUnschedulable", task_id, "", now_ms,
                                            _encoder.encode({"reason": reason})))
            marked.append(task_id)
        self._trim_events()
        return ApplyResult(True, {"marked": marked, "index": index})

    def _take_back_tasks(self, index: int, executor_id: str, now_ms: int, reason: str) -> list[str]:
        """The executor's leased tasks go back to the queue (or dead-letter when out of attempts)."""
        requeued = []
        # Sorted: the index's order depends on history (assignment order live, creation order after
        # a restore), and apply must not depend on anything a snapshot does not carry.
        for task_id in sorted(self.executor_tasks.get(executor_id, ())):
            record = self.tasks[task_id]
            self._release_slot(record)
            history = self._history(record, "lost", reason, now_ms)
            if record.attempt < record.max_attempts:
                self._set_status(record, "pending", now_ms, error=reason, history=history, not_before_ms=0)
                self._events.append(self._event(index, "TaskRequeued", task_id, executor_id, now_ms,
                                                _encoder.encode({"reason": reason, "attempt": record.attempt})))
                self._release_if_ready(index, self.tasks[task_id], now_ms)
                requeued.append(task_id)
            else:
                self._set_status(record, "dead_letter", now_ms, error=reason, history=history)
                self._events.append(self._event(index, "TaskFailed", task_id, executor_id, now_ms, _encoder.encode(
                    {"attempt": record.attempt, "error": reason, "status": "dead_letter", "retry_at_ms": 0})))
                self._fail_dependents(index, task_id, now_ms)
        return requeued

    # ------------------------------------------------------------------ checkpoints
    def _apply_save_checkpoint(self, index: int, command: dict[str, Any]) -> ApplyResult:
        """Only the current lease holder may checkpoint; the record is validated against the
        task's chain and the store's bound before anything is written, so a rejected save
        leaves the previous checkpoint valid. A retry of the newest record is a duplicate."""
        task, error = self._fenced(command)
        if error is not None:
            return error
        limits = self.limits.checkpoints
        fields = command.get("cp")
        if type(fields) is not dict:
            return ApplyResult.error("INVALID_ARGUMENT", "checkpoint: an object of the record's fields is required")
        try:
            record = CheckpointRecord.from_dict({**fields, "task_id": task.id})
        except CoordinatorError as exc:
            return ApplyResult.error(exc.code, exc.message)
        chain = self._checkpoints.get(task.id, [])
        last = chain[-1] if chain else None
        if last is not None and _same_record(last, record):
            return ApplyResult(True, {"id": checkpoint_id(task.id, last.sequence_number),
                                      "sequence_number": last.sequence_number, "index": index, "duplicate": True})
        position = chain_position(chain) if chain else ChainPosition(0, 0)
        problem = validate_new(last, record, limits, chain=position, last_sequence=task.checkpoint_sequence)
        if problem is not None:
            return ApplyResult.error(problem.code, problem.message)
        candidate = [*chain, record]
        dropped = retention(candidate, keep_full_max=limits.keep_full_max)  # a prefix: the chain is ordered
        kept = candidate[len(dropped):]
        invariant(not dropped or candidate[len(dropped) - 1].sequence_number == dropped[-1],
                  f"task {task.id}: retention dropped a record that is not a prefix of the chain")
        held_bytes = self.checkpoint_bytes + record.payload_bytes - sum(r.payload_bytes for r in candidate[:len(dropped)])
        if held_bytes > limits.checkpoint_store_bytes_max:
            return ApplyResult.error(
                "RESOURCE_EXHAUSTED",
                f"checkpoint: the coordinator holds at most checkpoint_store_bytes_max={limits.checkpoint_store_bytes_max} "
                f"bytes of checkpoints; {self.checkpoint_bytes} are held and this one ({record.payload_bytes} bytes) would "
                f"make {held_bytes}; the previous checkpoint stays valid",
            )
        # Validated: from here on nothing can fail.
        now_ms = command["now"]
        self._checkpoints[task.id] = kept
        self.checkpoint_bytes = held_bytes
        self.tasks[task.id] = task.replace(checkpoint_sequence=record.sequence_number)
        self._events.append(self._event(index, "CheckpointSaved", task.id, task.assigned_executor or "", now_ms,
                                        _encoder.encode({"attempt": task.attempt, "sequence_number": record.sequence_number,
                                                         "kind": record.kind, "payload_bytes": record.payload_bytes})))
        self._trim_events()
        return ApplyResult(True, {"id": checkpoint_id(task.id, record.sequence_number),
                                  "sequence_number": record.sequence_number, "index": index, "duplicate": False})

    def _expire_checkpoints(self, index: int, now_ms: int) -> None:
        """Drops the chains of tasks final for checkpoint_retention_after_final_ms. The work is
        amortized: each entry is pushed once, when its task becomes final."""
        window_ms = self.limits.checkpoints.checkpoint_retention_after_final_ms
        expiry = self._expiry
        while expiry and expiry[0][0] + window_ms <= now_ms:
            final_at_ms, task_id = heapq.heappop(expiry)
            if self._final_at.get(task_id) != final_at_ms:
                continue  # re-queued since it ended (and maybe ended again later): not yet due
            del self._final_at[task_id]
            chain = self._checkpoints.pop(task_id)
            invariant(self.tasks[task_id].status in FINAL_STATUSES, f"expiring checkpoints of {task_id}, which is not final")
            self.checkpoint_bytes -= sum(r.payload_bytes for r in chain)
            self._events.append(self._event(index, "CheckpointsExpired", task_id, "", now_ms, _encoder.encode(
                {"sequence_number": chain[-1].sequence_number, "records": len(chain), "final_at_ms": final_at_ms})))
        self._trim_events()

    def checkpoints_of(self, task_id: str) -> list[CheckpointRecord]:
        """The task's held checkpoints, oldest first (a copy; records are immutable)."""
        return list(self._checkpoints.get(task_id, ()))

    def recover_task(self, task_id: str) -> Recovery:
        """What the next attempt of `task_id` resumes from (see checkpoints.recover). Raises
        nothing for an unknown task: it simply holds no checkpoint."""
        # The chain first, then the task: read without the apply lock, a save landing in between
        # makes last_sequence newer than the chain, never older (the recovery then asks for a full).
        chain = self._checkpoints.get(task_id, ())
        task = self.tasks.get(task_id)
        return recover(chain, last_sequence=task.checkpoint_sequence if task else None)

    _HANDLERS = {
        CommandType.NOOP: _apply_noop,
        CommandType.SUBMIT_TASKS: _apply_submit_tasks,
        CommandType.CANCEL_TASK: _apply_cancel_task,
        CommandType.REGISTER_EXECUTOR: _apply_register_executor,
        CommandType.UNREGISTER_EXECUTOR: _apply_unregister_executor,
        CommandType.ASSIGN_TASKS: _apply_assign_tasks,
        CommandType.START_TASK: _apply_start_task,
        CommandType.COMPLETE_TASK: _apply_complete_task,
        CommandType.FAIL_TASK: _apply_fail_task,
        CommandType.EXECUTOR_LOST: _apply_executor_lost,
        CommandType.REQUEUE_TASK: _apply_requeue_task,
        CommandType.MARK_UNSCHEDULABLE: _apply_mark_unschedulable,
        CommandType.CANCEL_DAG: _apply_cancel_dag,
        CommandType.SAVE_CHECKPOINT: _apply_save_checkpoint,
        CommandType.REPORT_PROGRESS: _apply_report_progress,
        CommandType.AUDIT_DECISIONS: _apply_audit_decisions,
        CommandType.AUDIT_HEAD: _apply_audit_head,
        CommandType.PUT_SECRET: _apply_put_secret,
        CommandType.DELETE_SECRET: _apply_delete_secret,
        CommandType.REWRAP_SECRETS: _apply_rewrap_secrets,
    }

    # ------------------------------------------------------------------ helpers
    def _set_status(self, record: TaskRecord, status: str, now_ms: int, **changes: Any) -> None:
        counts = self.status_counts
        counts[record.status] -= 1
        counts[status] = counts.get(status, 0) + 1
        self.tasks[record.id] = record.replace(status=status, updated_at_ms=now_ms, **changes)
        if record.id in self._checkpoints:
            # A final task's updated_at_ms stays the time it became final (nothing updates a final
            # task), which is how restore rebuilds _final_at.
            if status in FINAL_STATUSES and record.status not in FINAL_STATUSES:
                self._final_at[record.id] = now_ms
                heapq.heappush(self._expiry, (now_ms, record.id))
            elif record.status in FINAL_STATUSES and status not in FINAL_STATUSES:
                self._final_at.pop(record.id, None)  # re-queued: its checkpoints stay

    def _release_if_ready(self, index: int, record: TaskRecord, now_ms: int) -> None:
        if record.status != "pending" or record.id in self.ready:
            return
        tasks = self.tasks
        if all(tasks[dep].status == "completed" for dep in record.dependencies):
            self.ready[record.id] = None
            self._events.append(self._event(index, "TaskReady", record.id, "", now_ms, ""))

    def _fail_dependents(self, index: int, root_id: str, now_ms: int) -> None:
        """Every not-yet-final task downstream of `root_id` fails with upstream_failed:<root>,
        so nothing waits forever on a dependency that will never complete."""
        stack = list(self.dependents.get(root_id, ()))
        cause = f"upstream_failed:{root_id}"
        while stack:
            record = self.tasks[stack.pop()]
            if record.status in FINAL_STATUSES:
                continue
            invariant(record.status == "pending", f"task {record.id} is {record.status} before its dependencies ended")
            self._fail_upstream(index, record, cause, now_ms)
            stack.extend(self.dependents.get(record.id, ()))

    def _fail_upstream(self, index: int, record: TaskRecord, cause: str, now_ms: int) -> None:
        self.ready.pop(record.id, None)
        self._set_status(record, "failed", now_ms, error=cause)
        self._events.append(self._event(index, "TaskFailed", record.id, "", now_ms, _encoder.encode(
            {"attempt": record.attempt, "error": cause, "status": "failed", "retry_at_ms": 0})))

    def _release_slot(self, record: TaskRecord) -> None:
        if record.status in LEASED_STATUSES:
            self.executor_tasks.get(record.assigned_executor, {}).pop(record.id, None)

    def _count_outcome(self, executor_id: str, completed: bool) -> None:
        executor = self.executors.get(executor_id)
        if executor is not None:
            if completed:
                self.executors[executor_id] = executor._replace(tasks_completed=executor.tasks_completed + 1)
            else:
                self.executors[executor_id] = executor._replace(tasks_failed=executor.tasks_failed + 1)

    @staticmethod
    def _history(record: TaskRecord, outcome: str, error: str, now_ms: int) -> tuple:
        started_ms = record.lease_expires_ms and record.updated_at_ms
        entry = (record.attempt, record.assigned_executor or "", outcome, error[:500], started_ms, now_ms)
        return (record.history + (entry,))[-HISTORY_ENTRIES_MAX:]

    def _event(self, index: int, kind: str, task_id: str, executor_id: str, time_ms: int, data_json: str) -> Event:
        if index != self._event_index:
            self._event_index = index
            self._event_seq = 0
        seq = self._event_seq
        self._event_seq = seq + 1
        return (index, seq, kind, task_id, executor_id, time_ms, data_json)

    def _trim_events(self) -> None:
        events = self._events
        excess = len(events) - self.limits.events_retained_max
        for _ in range(max(0, excess)):
            self.events_compacted_through = events.popleft()[0]

    # ------------------------------------------------------------------ reads
    def events_from(self, from_index: int, limit: int, after_seq: int = -1) -> list[Event]:
        """Events at or after (from_index, after_seq + 1), oldest first, at most `limit`.

        One index can hold thousands of events (a DAG submission), so a reader resumes inside an
        index with `after_seq`. Raises Compacted when requested events were already evicted."""
        if from_index <= self.events_compacted_through:
            raise Compacted(
                f"from_index: events up to index {self.events_compacted_through} were compacted; "
                f"resume from {self.events_compacted_through + 1} or later, after resynchronizing from current state"
            )
        events = self._events
        if not events or events[-1][0] < from_index:
            return []
        lo, hi = 0, len(events)
        while lo < hi:  # first event with (index, seq) > (from_index, after_seq)
            mid = (lo + hi) // 2
            event = events[mid]
            if event[0] < from_index or (event[0] == from_index and event[1] <= after_seq):
                lo = mid + 1
            else:
                hi = mid
        return [events[i] for i in range(lo, min(lo + limit, len(events)))]

    @property
    def oldest_event_index(self) -> int:
        return self._events[0][0] if self._events else self.last_applied_index + 1

    def idempotent_result(self, key: str) -> tuple[int, tuple[str, ...]] | None:
        return self._idempotency.get(key)

    # ------------------------------------------------------------------ snapshots
    def snapshot_view(self) -> SnapshotView:
        header = {
            "format": SNAPSHOT_FORMAT,
            "last_applied_index": self.last_applied_index,
            "events_compacted_through": self.events_compacted_through,
            "event_index": self._event_index,
            "event_seq": self._event_seq,
            "audit_heads": [h.row() for h in self.audit.heads],
            "audit_anchor": self.audit.anchor.row() if self.audit.anchor else None,
        }
        return SnapshotView(
            header,
            list(self.tasks.values()),
            list(self.executors.values()),
            [(key, index, list(ids)) for key, (index, ids) in self._idempotency.items()],
            list(self._events),
            [record for chain in self._checkpoints.values() for record in chain],
            self.audit.records_from(0, len(self.audit)),
            sorted(self.secrets.items()),
        )

    @staticmethod
    def snapshot_chunks(view: SnapshotView) -> Iterator[bytes]:
        """Encode a view as chunks of canonical JSON; each chunk is small so that encoding on
        a background thread lets the apply thread run between chunks."""
        yield _encoder.encode(view.header).encode()
        sections = (
            ("tasks", (record.row() for record in view.tasks), len(view.tasks)),
            ("executors", (record.row() for record in view.executors), len(view.executors)),
            ("idempotency", iter(view.idempotency), len(view.idempotency)),
            ("events", iter(view.events), len(view.events)),
            ("checkpoints", (_checkpoint_row(record) for record in view.checkpoints), len(view.checkpoints)),
            ("audit", (record.row() for record in view.audit), len(view.audit)),
            ("secrets", ([name, envelope] for name, envelope in view.secrets), len(view.secrets)),
        )
        for name, rows, count in sections:
            yield _encoder.encode({"section": name, "count": count}).encode()
            rows_per_chunk = SNAPSHOT_CHECKPOINT_ROWS_PER_CHUNK if name == "checkpoints" else SNAPSHOT_ROWS_PER_CHUNK
            batch: list[Any] = []
            for row in rows:
                batch.append(row)
                if len(batch) == rows_per_chunk:
                    yield _encoder.encode(batch).encode()
                    batch = []
            if batch:
                yield _encoder.encode(batch).encode()

    def snapshot(self) -> bytes:
        chunks = self.snapshot_chunks(self.snapshot_view())
        return b"\n".join(chunks)

    def restore(self, data: bytes) -> None:
        self.restore_chunks(data.split(b"\n"))

    def restore_chunks(self, chunks: Iterable[bytes]) -> None:
        decode = json.JSONDecoder().decode
        it = iter(chunks)
        header = decode(next(it).decode())
        if header.get("format") != SNAPSHOT_FORMAT:
            raise UnknownCommand(f"snapshot format {header.get('format')!r} is not supported by this node")
        tasks: dict[str, TaskRecord] = {}
        executors: dict[str, ExecutorRecord] = {}
        idempotency: OrderedDict[str, tuple[int, tuple[str, ...]]] = OrderedDict()
        events: deque[Event] = deque()
        checkpoints: dict[str, list[CheckpointRecord]] = {}  # absent before FSM_STATE_VERSION 4
        audit_rows: list[list[Any]] = []  # absent before FSM_STATE_VERSION 6
        secrets: dict[str, dict[str, Any]] = {}  # absent before FSM_STATE_VERSION 6
        section, remaining = None, 0
        for chunk in it:
            item = decode(chunk.decode())
            if isinstance(item, dict):
                invariant(remaining == 0, f"snapshot section {section} is short by {remaining} rows")
                section, remaining = item["section"], item["count"]
                continue
            remaining -= len(item)
            if section == "tasks":
                for row in item:
                    row[7] = tuple(row[7])
                    if len(row) > 21:
                        row[21] = tuple(tuple(h) for h in row[21])
                    tasks[row[0]] = TaskRecord(*row)
            elif section == "executors":
                for row in item:
                    row[3] = tuple(row[3])
                    executors[row[0]] = ExecutorRecord(*row)
            elif section == "idempotency":
                for key, index, ids in item:
                    idempotency[key] = (index, tuple(ids))
            elif section == "events":
                events.extend(tuple(row) for row in item)
            elif section == "checkpoints":
                for row in item:
                    checkpoints.setdefault(row[0], []).append(CheckpointRecord(*row))
            elif section == "audit":
                audit_rows.extend(item)
            elif section == "secrets":
                secrets.update((name, envelope) for name, envelope in item)
            else:
                raise UnknownCommand(f"snapshot section {section!r} is unknown to this node")
        invariant(remaining == 0, f"snapshot section {section} is short by {remaining} rows")
        counts: dict[str, int] = {}
        for record in tasks.values():
            counts[record.status] = counts.get(record.status, 0) + 1
        self.tasks, self.executors, self._idempotency, self._events = tasks, executors, idempotency, events
        self._checkpoints = checkpoints
        # Every link and hash is recomputed: a chain edited in the snapshot is refused here.
        self.audit = AuditChain.from_rows({"records": audit_rows, "heads": header.get("audit_heads", []),
                                           "anchor": header.get("audit_anchor")}, self.limits.audit)
        self.secrets = secrets
        self.status_counts = counts
        self._rebuild_indexes()
        self.last_applied_index = header["last_applied_index"]
        self.events_compacted_through = header["events_compacted_through"]
        self._event_index = header["event_index"]
        self._event_seq = header["event_seq"]

    def _rebuild_indexes(self) -> None:
        self.dependents, self.ready, self.dag_tasks, self.children = {}, {}, {}, {}
        self.executor_tasks = {executor_id: {} for executor_id in self.executors}
        tasks = self.tasks
        for record in tasks.values():
            if record.dag_id:
                self.dag_tasks.setdefault(record.dag_id, []).append(record.id)
            if record.parent_id:
                self.children.setdefault(record.parent_id, []).append(record.id)
            for dep in record.dependencies:
                self.dependents.setdefault(dep, []).append(record.id)
            if record.status == "pending" and all(tasks[d].status == "completed" for d in record.dependencies):
                self.ready[record.id] = None
            elif record.status in LEASED_STATUSES:
                self.executor_tasks.setdefault(record.assigned_executor, {})[record.id] = None
        self.checkpoint_bytes, self._final_at, self._expiry = 0, {}, []
        for task_id, chain in self._checkpoints.items():
            invariant(chain and all(a.sequence_number < b.sequence_number for a, b in zip(chain, chain[1:])),
                      f"snapshot: checkpoints of {task_id} are empty or out of order")
            record = tasks[task_id]
            invariant(record.checkpoint_sequence == chain[-1].sequence_number,
                      f"snapshot: task {task_id} saved checkpoint {record.checkpoint_sequence}, holds {chain[-1].sequence_number}")
            self.checkpoint_bytes += sum(r.payload_bytes for r in chain)
            if record.status in FINAL_STATUSES:
                self._final_at[task_id] = record.updated_at_ms
                self._expiry.append((record.updated_at_ms, task_id))
        heapq.heapify(self._expiry)

    def semantic_digest(self) -> str:
        """A digest of what a user sees of each task — stable across FSM_STATE_VERSIONs."""
        digest = hashlib.sha256()
        for record in self.tasks.values():
            digest.update(_encoder.encode([record.id, record.type, record.status, record.priority,
                                           list(record.dependencies), record.created_index]).encode())
        for task_id in sorted(self._checkpoints):  # nothing added while none is held: old digests hold
            for cp in self._checkpoints[task_id]:
                digest.update(_encoder.encode([task_id, cp.sequence_number, cp.kind, cp.checksum]).encode())
        return digest.hexdigest()

    def state_hash(self) -> str:
        digest = hashlib.sha256()
        for chunk in self.snapshot_chunks(self.snapshot_view()):
            digest.update(chunk)
            digest.update(b"\n")
        return digest.hexdigest()

    def domain_hash(self) -> str:
        """state_hash without the audit chain and the applied index: reads and access decisions
        append audit records (and so move both), the domain state stays."""
        view = self.snapshot_view()
        for name in ("last_applied_index", "audit_heads", "audit_anchor"):
            view.header.pop(name, None)
        view.audit = []
        digest = hashlib.sha256()
        for chunk in self.snapshot_chunks(view):
            digest.update(chunk)
            digest.update(b"\n")
        return digest.hexdigest()


def _str(value: Any) -> str:
    return value if type(value) is str else ""


def _int_or_zero(value: Any) -> int:
    return value if type(value) is int else 0


def _command_name(kind: Any) -> str:
    try:
        return CommandType(kind).name
    except ValueError:
        return f"COMMAND_{kind}"


def audit_resource(kind: Any, command: dict[str, Any]) -> str:
    """What a command acts on, as its audit record names it. Pure, so the proposer (which signs
    it) and apply (which records it) agree."""
    if kind == CommandType.SUBMIT_TASKS:
        tasks = command.get("tasks")
        first = tasks[0][0] if type(tasks) is list and tasks and type(tasks[0]) is list and tasks[0] else ""
        if command.get("dag"):
            return f"dag:{command['dag']} ({len(tasks)} tasks from task:{first})"
        return f"task:{first}" if type(tasks) is list and len(tasks) == 1 else f"tasks:{first}+{len(tasks or ()) - 1}"
    if kind in (CommandType.REGISTER_EXECUTOR,):
        spec = command.get("ex")
        return f"executor:{spec.get('id', '')}" if type(spec) is dict else "executor:"
    if kind in (CommandType.UNREGISTER_EXECUTOR, CommandType.EXECUTOR_LOST):
        return f"executor:{command.get('id', '')}"
    if kind == CommandType.CANCEL_DAG:
        return f"dag:{command.get('dag', '')}"
    if kind in (CommandType.PUT_SECRET, CommandType.DELETE_SECRET):
        return f"secret:{command.get('name', '')}"
    if kind == CommandType.REWRAP_SECRETS:
        items = command.get("items")
        return f"secrets:{len(items) if type(items) is dict else 0}"
    if kind in (CommandType.ASSIGN_TASKS, CommandType.MARK_UNSCHEDULABLE):
        items = command.get("items")
        if type(items) is list and items and type(items[0]) is list and items[0]:
            return f"task:{items[0][0]}" if len(items) == 1 else f"tasks:{items[0][0]}+{len(items) - 1}"
        return "tasks:"
    if "id" in command:
        return f"task:{command.get('id')}"
    return ""


def _checkpoint_row(record: CheckpointRecord) -> list[Any]:
    return [record.task_id, record.sequence_number, record.kind, record.base_sequence, record.payload,
            record.checksum, record.timestamp_ms, record.payload_bytes, record.model_versions]


def _same_record(held: CheckpointRecord, new: CheckpointRecord) -> bool:
    """A client's retry of a record already saved (its timestamp may be stamped anew)."""
    return (held.sequence_number == new.sequence_number and held.kind == new.kind
            and held.base_sequence == new.base_sequence and held.checksum == new.checksum
            and held.payload_bytes == new.payload_bytes and held.model_versions == new.model_versions
            and _canonical_or_none(held.payload) == _canonical_or_none(new.payload))


def _canonical_or_none(value: Any) -> str | None:
    try:
        return canonical_json(value)
    except CoordinatorError:
        return None
