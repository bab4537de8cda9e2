"""Task checkpoints as pure functions: canonical encoding, deltas, chains, restore and retention.

The FSM keeps a task's `CheckpointRecord`s and calls these from `apply`. Nothing here reads a
clock, draws an id or touches a disk (the proposer stamps `timestamp_ms`), so every replica
reaches the same decision from the same records.

    document  = {"state_snapshot": {...}, "executed_actions": [...], "remaining_plan": [...]}
    chain     = full(f) <- delta(f+1, base f) <- delta(f+2, base f+1) <- ...
    restore   = the newest full whose checksum verifies, then its deltas in order, each result
                checked against its record's checksum; stop at the first gap, bad delta or
                mismatch and return the last verified point, never unverified state
    retention = keep the newest `keep_full_max` fulls and everything after the oldest of them
    recover   = restore plus what the next attempt needs to go on checkpointing (`Recovery`)

Delta ops, applied in order; a path is a list of object keys and list indexes:
    {"op": "set",    "path": [...], "value": v}       add or replace ([] replaces the document)
    {"op": "del",    "path": [...]}                    remove an object key or a list item
    {"op": "append", "path": [...], "values": [...]}  extend a list

Errors:
    CoordinatorError
    ├── InvalidArgument        a record or document that breaks a rule or a bound
    │   └── BadDelta           an op that cannot apply; names the op index
    └── FailedPrecondition     a checkpoint out of sequence for its task, or a delta where
                               the chain's bounds call for a full one
    InvariantViolation         our own delta does not reproduce its document (a bug)

Documents are decoded JSON: objects with str keys, lists, str, int, float, bool and None.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

from coordinator.errors import CoordinatorError, FailedPrecondition, InvalidArgument, invariant

KIB = 1024
MIB = 1024 * KIB
DOCUMENT_KEYS = ("state_snapshot", "executed_actions", "remaining_plan")
KINDS = ("full", "delta")
OPS = ("set", "del", "append")

# Dropping k items from the front of a list (a plan being consumed) costs k "del" ops; past
# this many, one "set" of the list is about as small and replays faster.
LIST_TRIM_OPS_MAX = 16

_CHECKSUM_RE = re.compile(r"^[0-9a-f]{64}$")
# The FSM hashes with the same settings, so a document hashes alike wherever it is encoded.
_encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_decode = json.JSONDecoder().decode


@dataclass(frozen=True)
class CheckpointLimits:
    """Bounds on checkpoints. They shape `apply`, so every node must use the same values."""

    checkpoint_bytes_max: int = 1 * MIB  # encoded payload of one record (an agent's state of a few 100 KiB fits)
    full_every: int = 20  # deltas after a full before the next one must be full
    delta_chain_bytes_max: int = 1024 * KIB  # payload bytes of the deltas after a full
    keep_full_max: int = 2  # fulls kept per task; 2 so a corrupt newest full has a fallback
    model_versions_entries_max: int = 16
    model_version_chars_max: int = 128
    # All records the FSM holds, summed over tasks (payload bytes; a record's Python overhead is
    # not counted). Past it a save is RESOURCE_EXHAUSTED and the previous checkpoint stays valid.
    checkpoint_store_bytes_max: int = 256 * MIB
    # A task's checkpoints are dropped this long after it reaches a final status; an operator
    # re-queue within the window keeps them, so the next attempt resumes from the last one.
    checkpoint_retention_after_final_ms: int = 10 * 60 * 1000


class BadDelta(InvalidArgument):
    def __init__(self, op_index: int, reason: str) -> None:
        super().__init__(f"delta op {op_index}: {reason}")
        self.op_index = op_index


@dataclass(frozen=True)
class CheckpointRecord:
    task_id: str
    sequence_number: int  # 1, 2, 3, ... per task
    kind: str  # "full" | "delta"
    base_sequence: int | None  # a delta applies on sequence_number - 1; None for a full
    payload: Any  # full: the document; delta: a list of ops over the previous document
    checksum: str  # sha256 of the canonical *resulting* document, for either kind
    timestamp_ms: int
    payload_bytes: int  # canonical UTF-8 size of `payload`
    model_versions: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointRecord:
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            raise InvalidArgument(f"checkpoint: fields differ from the record's: {sorted(set(data) ^ names)}")
        return cls(**data)


class RestoreResult(NamedTuple):
    document: dict[str, Any] | None  # None when no full checkpoint verifies
    sequence_number: int  # the last verified sequence (0 when none)
    used: list[int]  # sequences replayed, full first
    problem: str | None  # what was wrong, if the restore stopped short or fell back


class ChainPosition(NamedTuple):
    deltas: int  # delta records after the newest full
    delta_bytes: int


class Recovery(NamedTuple):
    """What the next attempt of a task needs: the newest verified document, split into its
    parts, and where to continue the chain. Fields are None when no checkpoint verifies."""

    restored: RestoreResult
    state_snapshot: dict[str, Any] | None
    executed_actions: list[Any] | None
    remaining_plan: list[Any] | None
    model_versions: dict[str, str]  # recorded with the restored sequence ({} when none)
    sequence_number: int  # the restored (last verified) sequence; 0 when none
    last_sequence: int  # the newest sequence the task saved: the next checkpoint is last_sequence + 1
    chain: ChainPosition  # of the held records: chain_deltas_so_far / chain_bytes_so_far for make_checkpoint
    problem: str | None  # why the restore stopped short of last_sequence, if it did

    @property
    def base_document(self) -> dict[str, Any] | None:
        """`prev_document` for the next `make_checkpoint`: the restored document when it is the
        newest saved one; None when the restore fell back, so the next checkpoint is a full one
        (a delta over a document the chain does not reproduce would be wrong)."""
        if self.restored.document is not None and self.sequence_number == self.last_sequence:
            return self.restored.document
        return None


def checkpoint_id(task_id: str, sequence_number: int) -> str:
    """Derived, never drawn: every replica names a record alike."""
    return f"{task_id}:{sequence_number}"


# --- canonical encoding -------------------------------------------------------------------

def canonical_json(value: Any) -> str:
    try:
        return _encoder.encode(value)
    except (ValueError, TypeError, RecursionError) as exc:
        raise InvalidArgument(f"checkpoint: not encodable as canonical JSON ({exc})") from None


def canonical_bytes(value: Any) -> bytes:
    try:
        return canonical_json(value).encode()
    except UnicodeEncodeError as exc:  # a lone surrogate decoded from "\ud800"
        raise InvalidArgument(f"checkpoint: not encodable as UTF-8 ({exc.reason})") from None


def state_checksum(state: Any) -> str:
    return hashlib.sha256(canonical_bytes(state)).hexdigest()


def _clone(value: Any) -> Any:
    # A deep copy by round trip: C speed, and it proves the value is canonical JSON.
    return _decode(canonical_json(value))


def _same(a: Any, b: Any) -> bool:
    """Equality as the canonical encoding sees it; Python's `==` says 1 == 1.0 == True."""
    if a is b:
        return True
    kind = type(a)
    if kind is not type(b):
        return False
    if kind is dict:
        return a.keys() == b.keys() and all(_same(value, b[key]) for key, value in a.items())
    if kind is list:
        return len(a) == len(b) and all(map(_same, a, b))
    if kind is float:
        return repr(a) == repr(b)  # 0.0 and -0.0 encode differently
    return a == b


# --- deltas ---------------------------------------------------------------------------------

def diff(old: Any, new: Any) -> list[dict[str, Any]]:
    """Ops that turn `old` into `new`. Op values share structure with `new`; `apply_delta`
    copies them, so applying never aliases the ops."""
    ops: list[dict[str, Any]] = []
    _diff(old, new, [], ops)
    return ops


def _diff(old: Any, new: Any, path: list[Any], ops: list[dict[str, Any]]) -> None:
    if type(old) is dict and type(new) is dict:
        ops.extend({"op": "del", "path": [*path, key]} for key in old if key not in new)
        for key, value in new.items():
            if key in old:
                _diff(old[key], value, [*path, key], ops)
            else:
                ops.append({"op": "set", "path": [*path, key], "value": value})
    elif type(old) is list and type(new) is list:
        trim = _front_trim(old, new)
        if trim is None:
            ops.append({"op": "set", "path": path, "value": new})
            return
        ops.extend({"op": "del", "path": [*path, 0]} for _ in range(trim))
        kept = len(old) - trim
        if len(new) > kept:
            ops.append({"op": "append", "path": path, "values": new[kept:]})
    elif not _same(old, new):
        ops.append({"op": "set", "path": path, "value": new})


def _front_trim(old: list[Any], new: list[Any]) -> int | None:
    """k when `new` is `old` without its first k items and with items appended, else None.

    An agent's log grows at the back and its plan is consumed from the front; any other
    change rewrites the list. Only the first candidate k is tried: with repeated items this
    may miss a cheaper delta, never produce a wrong one."""
    if not old:
        return 0
    if not new:
        return None
    for trim in range(min(len(old), LIST_TRIM_OPS_MAX + 1)):
        if _same(old[trim], new[0]):
            kept = len(old) - trim
            matches = kept <= len(new) and all(map(_same, old[trim + 1:], new[1:kept]))
            return trim if matches else None
    return None


def apply_delta(state: Any, ops: list[dict[str, Any]]) -> Any:
    """The state after `ops`. Neither `state` nor `ops` is modified."""
    return _apply_in_place(_clone(state), ops)


def _apply_in_place(document: Any, ops: Any) -> Any:
    if type(ops) is not list:
        raise InvalidArgument(f"delta: ops must be a list, got {type(ops).__name__}")
    for index, op in enumerate(ops):
        document = _apply_op(document, op, index)
    return document


def _check_op(op: Any, index: int) -> None:
    if type(op) is not dict:
        raise BadDelta(index, f"not an object but {type(op).__name__}")
    if op.get("op") not in OPS:
        raise BadDelta(index, f"unknown op {op.get('op')!r}; known: {', '.join(OPS)}")
    if type(op.get("path")) is not list:
        raise BadDelta(index, "path: missing or not a list")
    if op["op"] == "set" and "value" not in op:
        raise BadDelta(index, "value: missing")
    if op["op"] == "append" and type(op.get("values")) is not list:
        raise BadDelta(index, "values: missing or not a list")
    if op["op"] == "del" and not op["path"]:
        raise BadDelta(index, "path: the document itself cannot be deleted")


def _step(container: Any, key: Any, position: int, index: int, must_exist: bool) -> None:
    if type(container) is dict:
        if type(key) is not str:
            raise BadDelta(index, f"path[{position}]: {key!r} is not an object key")
        if must_exist and key not in container:
            raise BadDelta(index, f"path[{position}]: no key {key!r}")
    elif type(container) is list:
        if type(key) is not int or not 0 <= key < len(container):
            raise BadDelta(index, f"path[{position}]: {key!r} is not an index of a list of {len(container)}")
    else:
        raise BadDelta(index, f"path[{position}]: a {type(container).__name__} is not a container")


def _apply_op(document: Any, op: Any, index: int) -> Any:
    _check_op(op, index)
    name, path = op["op"], op["path"]
    if not path and name == "set":
        return _clone(op["value"])
    parent = document
    for position, key in enumerate(path[:-1]):
        _step(parent, key, position, index, must_exist=True)
        parent = parent[key]
    if path:
        _step(parent, path[-1], len(path) - 1, index, must_exist=name != "set")
    if name == "set":
        parent[path[-1]] = _clone(op["value"])
    elif name == "del":
        del parent[path[-1]]
    else:
        target = parent[path[-1]] if path else parent
        if type(target) is not list:
            raise BadDelta(index, f"append: path holds a {type(target).__name__}, not a list")
        target.extend(_clone(op["values"]))
    return document


# --- records --------------------------------------------------------------------------------

def _check_document(document: Any, where: str) -> None:
    if type(document) is not dict or sorted(document) != sorted(DOCUMENT_KEYS):
        raise InvalidArgument(f"{where}: must be an object with exactly {', '.join(DOCUMENT_KEYS)}")
    for key, kind in zip(DOCUMENT_KEYS, (dict, list, list)):
        if type(document[key]) is not kind:
            raise InvalidArgument(f"{where}.{key}: must be a {'object' if kind is dict else 'list'}")


def chain_position(records: Iterable[CheckpointRecord]) -> ChainPosition:
    """How long the delta chain after the newest full is: the input to `make_checkpoint`."""
    deltas = delta_bytes = 0
    for record in sorted(records, key=lambda r: r.sequence_number, reverse=True):
        if record.kind == "full":
            break
        deltas, delta_bytes = deltas + 1, delta_bytes + record.payload_bytes
    return ChainPosition(deltas, delta_bytes)


def make_checkpoint(prev_document: dict[str, Any] | None, prev_sequence: int, new_document: dict[str, Any], *,
                    task_id: str, timestamp_ms: int, full_every: int, delta_chain_bytes_max: int,
                    chain_deltas_so_far: int, chain_bytes_so_far: int,
                    model_versions: dict[str, str] | None = None) -> CheckpointRecord:
    """The record for `new_document` at `prev_sequence + 1`: a delta over `prev_document` when
    there is one, the chain is still short (`full_every` deltas, `delta_chain_bytes_max`
    bytes) and the delta is smaller than the full document; otherwise a full snapshot."""
    _check_document(new_document, "checkpoint")
    full_text = canonical_json(new_document)
    full_bytes = len(full_text.encode())
    checksum = hashlib.sha256(full_text.encode()).hexdigest()
    kind, payload_text, payload_bytes = "full", full_text, full_bytes
    if prev_document is not None and prev_sequence > 0 and chain_deltas_so_far < full_every:
        delta_text = canonical_json(diff(prev_document, new_document))
        delta_bytes = len(delta_text.encode())
        if delta_bytes < full_bytes and chain_bytes_so_far + delta_bytes <= delta_chain_bytes_max:
            # Verify on write: a wrong delta would otherwise surface only at restore, as a fallback.
            replayed = state_checksum(apply_delta(prev_document, _decode(delta_text)))
            invariant(replayed == checksum, f"task {task_id}: delta {prev_sequence + 1} does not reproduce its document")
            kind, payload_text, payload_bytes = "delta", delta_text, delta_bytes
    return CheckpointRecord(
        task_id=task_id, sequence_number=prev_sequence + 1, kind=kind,
        base_sequence=prev_sequence if kind == "delta" else None,
        payload=_decode(payload_text),  # a private copy: later edits of new_document cannot leak in
        checksum=checksum, timestamp_ms=timestamp_ms, payload_bytes=payload_bytes,
        model_versions=dict(model_versions or {}),
    )


def validate_new(existing_last: CheckpointRecord | None, record: CheckpointRecord, limits: CheckpointLimits, *,
                 chain: ChainPosition | None = None, last_sequence: int | None = None) -> CoordinatorError | None:
    """None when `record` may follow `existing_last` (None: the task holds no checkpoint); else
    the error to return to the client. The previous checkpoint stays valid either way.

    chain: the position of the held records (`chain_position`); when given, a delta past
    `full_every` deltas or `delta_chain_bytes_max` bytes is refused, which is what keeps
    retention's bound. last_sequence: the newest sequence the task ever saved, when retention
    may have dropped it (defaults to existing_last's)."""
    try:
        _validate_new(existing_last, record, limits, chain, last_sequence)
    except CoordinatorError as exc:
        return exc
    return None


def _validate_new(existing_last: CheckpointRecord | None, record: CheckpointRecord, limits: CheckpointLimits,
                  chain: ChainPosition | None, last_sequence: int | None) -> None:
    if existing_last is not None:
        invariant(existing_last.task_id == record.task_id, f"checkpoint of {record.task_id} validated against {existing_last.task_id}")
    if last_sequence is None:
        last_sequence = existing_last.sequence_number if existing_last is not None else 0
    invariant(existing_last is None or existing_last.sequence_number <= last_sequence,
              f"task {record.task_id}: held sequence {existing_last and existing_last.sequence_number} > last {last_sequence}")
    _check_sequence_type(record)
    expected = last_sequence + 1
    if record.sequence_number != expected:
        raise FailedPrecondition(f"checkpoint.sequence_number: task {record.task_id} expects {expected}, got {record.sequence_number}")
    check_record(record, limits)
    if record.kind == "delta":
        if existing_last is None or existing_last.sequence_number != record.base_sequence:
            raise InvalidArgument(f"checkpoint.base_sequence: a delta applies on a held checkpoint {record.base_sequence}, "
                                  f"but task {record.task_id} holds {'none' if existing_last is None else existing_last.sequence_number}; "
                                  "send a full checkpoint")
        if chain is not None and chain.deltas + 1 > limits.full_every:
            raise FailedPrecondition(f"checkpoint.kind: at most full_every={limits.full_every} deltas after a full; "
                                     "send a full checkpoint")
        if chain is not None and chain.delta_bytes + record.payload_bytes > limits.delta_chain_bytes_max:
            raise FailedPrecondition(f"checkpoint.kind: the deltas after a full hold at most delta_chain_bytes_max="
                                     f"{limits.delta_chain_bytes_max} bytes, this one would make "
                                     f"{chain.delta_bytes + record.payload_bytes}; send a full checkpoint")


def _check_sequence_type(record: CheckpointRecord) -> None:
    if type(record.task_id) is not str or not record.task_id:
        raise InvalidArgument("checkpoint.task_id: a non-empty string")
    if type(record.sequence_number) is not int or record.sequence_number < 1:
        raise InvalidArgument(f"checkpoint.sequence_number: an integer >= 1, got {record.sequence_number!r}")


def check_record(record: CheckpointRecord, limits: CheckpointLimits) -> None:
    """The checks that need no state: bounds, shape, kind and base, checksum format. Raises
    InvalidArgument (or BadDelta) naming the field and the limit. The proposer runs these before
    proposing; `validate_new` runs them again in apply, with the checks that need the chain."""
    _check_sequence_type(record)
    encoded = canonical_bytes(record.payload)
    encoded_bytes = len(encoded)
    if encoded_bytes > limits.checkpoint_bytes_max:
        raise InvalidArgument(f"checkpoint.payload: at most checkpoint_bytes_max={limits.checkpoint_bytes_max} bytes, got {encoded_bytes}")
    if record.payload_bytes != encoded_bytes or type(record.payload_bytes) is not int:
        raise InvalidArgument(f"checkpoint.payload_bytes: declared {record.payload_bytes!r}, the payload encodes to {encoded_bytes}")
    if record.kind == "full":
        if record.base_sequence is not None:
            raise InvalidArgument(f"checkpoint.base_sequence: a full checkpoint has none, got {record.base_sequence}")
        _check_document(record.payload, "checkpoint.payload")
    elif record.kind == "delta":
        if type(record.base_sequence) is not int or record.base_sequence != record.sequence_number - 1:
            raise InvalidArgument(f"checkpoint.base_sequence: a delta applies on {record.sequence_number - 1}, got {record.base_sequence!r}")
        if type(record.payload) is not list:
            raise InvalidArgument("checkpoint.payload: a delta is a list of ops")
        for index, op in enumerate(record.payload):
            _check_op(op, index)
    else:
        raise InvalidArgument(f"checkpoint.kind: one of {', '.join(KINDS)}, got {record.kind!r}")
    if type(record.checksum) is not str or not _CHECKSUM_RE.match(record.checksum):
        raise InvalidArgument("checkpoint.checksum: 64 lowercase hex digits of sha256")
    if record.kind == "full" and hashlib.sha256(encoded).hexdigest() != record.checksum:
        # Verify on write what can be verified cheaply; a delta's result is verified at restore.
        raise InvalidArgument("checkpoint.checksum: not the sha256 of the full payload's canonical encoding")
    if type(record.timestamp_ms) is not int or record.timestamp_ms < 0:
        raise InvalidArgument(f"checkpoint.timestamp_ms: a non-negative integer, got {record.timestamp_ms!r}")
    versions = record.model_versions
    if type(versions) is not dict or len(versions) > limits.model_versions_entries_max:
        raise InvalidArgument(f"checkpoint.model_versions: an object of at most model_versions_entries_max={limits.model_versions_entries_max} entries")
    for name, version in versions.items():
        if type(name) is not str or type(version) is not str or len(name) > limits.model_version_chars_max \
                or len(version) > limits.model_version_chars_max:
            raise InvalidArgument(f"checkpoint.model_versions[{str(name)[:80]!r}]: names and versions are strings of at most "
                                  f"model_version_chars_max={limits.model_version_chars_max} chars")


# --- restore and retention -----------------------------------------------------------------

def restore(records: Iterable[CheckpointRecord]) -> RestoreResult:
    """The newest verified document of one task's records (any order)."""
    ordered = sorted(records, key=lambda r: r.sequence_number)
    if not ordered:
        return RestoreResult(None, 0, [], None)
    invariant(len({r.task_id for r in ordered}) == 1, "restore mixes the checkpoints of several tasks")
    problems: list[str] = []
    fulls = [position for position, record in enumerate(ordered) if record.kind == "full"]
    for position in reversed(fulls):  # a corrupt newest full falls back to the one before it
        result = _replay_from(ordered, position, problems)
        if result is not None:
            return result._replace(problem="; ".join(problems) or None)
    problems.append("no full checkpoint verifies" if fulls else "no full checkpoint")
    return RestoreResult(None, 0, [], "; ".join(problems))


def _replay_from(ordered: list[CheckpointRecord], start: int, problems: list[str]) -> RestoreResult | None:
    full = ordered[start]
    try:
        _check_document(full.payload, "payload")
        text = canonical_json(full.payload)
    except InvalidArgument as exc:
        problems.append(f"full checkpoint {full.sequence_number}: {exc.message}")
        return None
    if hashlib.sha256(text.encode()).hexdigest() != full.checksum:
        problems.append(f"full checkpoint {full.sequence_number}: checksum mismatch")
        return None
    document, sequence, used = _decode(text), full.sequence_number, [full.sequence_number]
    for record in ordered[start + 1:]:
        if record.kind == "full":
            break  # reached only when this newer full failed to verify: already reported
        if record.sequence_number != sequence + 1 or record.base_sequence != sequence or record.kind != "delta":
            problems.append(f"checkpoint {sequence + 1} is missing: found {record.kind} {record.sequence_number} "
                            f"on base {record.base_sequence} after {sequence}")
            break
        try:
            # Decode a fresh copy, so a delta that fails halfway leaves `document` intact.
            candidate = _apply_in_place(_decode(text), record.payload)
            candidate_text = canonical_json(candidate)
        except InvalidArgument as exc:
            problems.append(f"checkpoint {record.sequence_number}: {exc.message}")
            break
        if hashlib.sha256(candidate_text.encode()).hexdigest() != record.checksum:
            problems.append(f"checkpoint {record.sequence_number}: checksum mismatch")
            break
        document, text, sequence = candidate, candidate_text, record.sequence_number
        used.append(sequence)
    return RestoreResult(document, sequence, used, None)


def retention(records: Iterable[CheckpointRecord], *, keep_full_max: int) -> list[int]:
    """Sequence numbers to drop: everything before the oldest of the newest `keep_full_max`
    fulls. What stays is at most keep_full_max * (full_every + 1) records."""
    invariant(keep_full_max >= 1, f"keep_full_max must be >= 1, got {keep_full_max}")
    records = list(records)
    fulls = sorted(r.sequence_number for r in records if r.kind == "full")
    if len(fulls) <= keep_full_max:
        return []
    oldest_kept = fulls[-keep_full_max]
    return sorted(r.sequence_number for r in records if r.sequence_number < oldest_kept)


def recover(records: Iterable[CheckpointRecord], *, last_sequence: int | None = None) -> Recovery:
    """`restore` plus what the next attempt needs. last_sequence: the newest sequence the task
    saved, when retention may have dropped it (defaults to the newest held)."""
    records = sorted(records, key=lambda r: r.sequence_number)
    held_last = records[-1].sequence_number if records else 0
    if last_sequence is None:
        last_sequence = held_last
    invariant(last_sequence >= held_last, f"last_sequence {last_sequence} < newest held checkpoint {held_last}")
    restored = restore(records)
    problem = restored.problem
    if not records and last_sequence:
        problem = f"no checkpoint held: all up to {last_sequence} were dropped by retention"
    document = restored.document
    versions: dict[str, str] = {}
    if document is not None:
        versions = dict(next(r.model_versions for r in records if r.sequence_number == restored.sequence_number))
    return Recovery(
        restored=restored,
        state_snapshot=document["state_snapshot"] if document is not None else None,
        executed_actions=document["executed_actions"] if document is not None else None,
        remaining_plan=document["remaining_plan"] if document is not None else None,
        model_versions=versions,
        sequence_number=restored.sequence_number,
        last_sequence=last_sequence,
        chain=chain_position(records),
        problem=problem,
    )
