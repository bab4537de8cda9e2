"""The audit chain: a tamper-evident, hash-linked log of every state change and access decision,
kept in replicated state.

Who does what:

    proposer (cluster/)   stamps time_ms, computes the command's digest, signs the record body
                          with its node key (Ed25519; security/audit.py) — BEFORE proposing
    apply (every replica) appends: adds what only apply knows (Raft index, seq, outcome) and
                          links it into the chain (prev, hash); deterministic, no crypto keys
    leader, periodically  proposes a signed head (seq + hash of a record); apply checks it
                          against the chain and keeps it
    auditor               security/audit.verify_chain: signatures, links, hashes, heads

The chain, the anchor and the heads:

      pruned: 1..a           retained records (AuditChain)
                         ┌──────────────────────────────────────────────────────────────┐
    anchor = head at a ◄─prev─ r(a+1) ◄─ ... ◄─ r(h) ◄─ ... ◄─ r(k) ◄─prev─ r(k+1) ◄─ ... ◄─ r(last)
    (signed; the verified                        ▲              ▲
     starting point)                      signed head h   signed head k (newest)
                         └──── covered by signed heads ──────────┘ └─ tail: chain only ──┘

    r.sig  = Ed25519 of the proposing node over signed_body(node, who, roles, action,
             resource, time_ms, digest)
    r.hash = record_hash(prev, seq, index, time_ms, node, who, roles, action, resource,
             outcome, digest, sig)                       (sha256, domain-tagged)
    head   = (seq, hash of r(seq), node, time_ms), signed over head_body(...) by the leader

What each protection covers, and what it does not:

* The record signature covers who, roles, action, resource, time_ms, node and digest: forging or
  editing any of them needs the proposing node's key. It cannot cover seq, index, outcome or
  prev, which apply adds after signing.
* The hash chain makes any edit, removal or reordering of retained records visible at the first
  broken link. On its own it stops only naive edits: anyone able to rewrite the stored records
  can also recompute every hash after the edit.
* A signed head commits, through the chain, to the whole prefix up to its seq — outcome and
  index included. A rewrite that recomputes hashes changes the hash at the head and is caught;
  it needs the leader's key to re-sign a head.
* Records after the newest head are protected by the chain and their signatures only: until the
  next head, their outcome and index can be rewritten (with recomputed hashes) unnoticed, and
  the tail can be cut off from the end. The leader proposes a head at least every
  `head_every_records` records, which bounds that window. (Every replica holds the same chain,
  so comparing replicas catches a rewrite of one replica's copy even in the tail.)

Pruning by size keeps the chain bounded while verification still works: records are dropped only
up to a head, and that head becomes the anchor (the first retained record's prev is its hash).

Nothing here reads a clock, draws an id or touches a key: signatures are opaque strings to
apply, and verifying them is the auditor's job, so apply stays cheap and deterministic.

Errors (the core's tree, coordinator/errors.py):
    CoordinatorError
    └── InvalidArgument     bad limits; a field of the wrong type; a snapshot that does not
                            reproduce its own hashes or links
    InvariantViolation      the chain's own bookkeeping broken (a bug)
`add_head` refuses a bad head with a message (a result, not an exception): a stale or wrong head
proposed by an old leader must not fail the log.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

from coordinator.errors import InvalidArgument, invariant

GENESIS_HASH = "0" * 64

RECORD_BODY_TAG = b"agent-coordinator/audit-record/v1\n"
RECORD_HASH_TAG = b"agent-coordinator/audit-record-hash/v1\n"
HEAD_BODY_TAG = b"agent-coordinator/audit-head/v1\n"

# An Ed25519 signature (64 bytes) in base64; a digest is 64 hex chars. Cutting fields shorter than
# this would break every signature.
FIELD_CHARS_MIN = 88

# Canonical JSON: the same bytes on every replica and in every auditor. "surrogatepass" when
# encoding so a lone surrogate in a string hashes (deterministically) instead of raising in apply.
_encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _canonical(tag: bytes, obj: Any) -> bytes:
    return tag + _encoder.encode(obj).encode("utf-8", "surrogatepass")


@dataclass(frozen=True)
class AuditLimits:
    """Bounds of the audit chain. They shape `apply`, so every node must use the same values."""

    records_max: int = 20_000  # records retained; pruning cuts only at a head (see AuditChain)
    heads_max: int = 64  # signed heads retained (the newest)
    # who/action/resource/outcome (and each role) are cut to this many characters in apply:
    # apply must never fail on a long field — the proposer validates its input, this only
    # bounds replicated state. The signer cuts the same way, so signatures still verify.
    field_chars_max: int = 512
    roles_max: int = 32  # roles kept per record (the first ones), for the same reason
    # The leader proposes a head at least this often. Not used by apply; exposed for the shell.
    head_every_records: int = 1000

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"AuditLimits.{f.name}: a positive int, got {value!r}")
        if self.field_chars_max < FIELD_CHARS_MIN:
            raise InvalidArgument(f"AuditLimits.field_chars_max: at least {FIELD_CHARS_MIN} (a signature is that "
                                  f"many base64 chars, and is cut like any field), got {self.field_chars_max}")
        if self.head_every_records > self.records_max:
            # Otherwise the retained window could hold no head, and pruning would stall.
            raise InvalidArgument(f"AuditLimits.head_every_records: at most records_max ({self.records_max}), "
                                  f"got {self.head_every_records}")

    def clip(self, text: str) -> str:
        return text if len(text) <= self.field_chars_max else text[: self.field_chars_max]

    def clip_roles(self, roles: Iterable[str]) -> tuple[str, ...]:
        return tuple(self.clip(role) for role in list(roles)[: self.roles_max])


def signed_body(*, node: str, who: str, roles: Sequence[str], action: str, resource: str, time_ms: int,
                digest: str) -> bytes:
    """The bytes a proposer signs: everything it knows before the command is committed."""
    return _canonical(RECORD_BODY_TAG, {
        "node": node, "who": who, "roles": list(roles), "action": action, "resource": resource,
        "time_ms": time_ms, "digest": digest,
    })


def record_hash(prev: str, seq: int, index: int, time_ms: int, node: str, who: str, roles: Sequence[str],
                action: str, resource: str, outcome: str, digest: str, sig: str) -> str:
    """The chain link: sha256 over every field of the record, and the previous record's hash."""
    return hashlib.sha256(_canonical(RECORD_HASH_TAG, {
        "prev": prev, "seq": seq, "index": index, "time_ms": time_ms, "node": node, "who": who,
        "roles": list(roles), "action": action, "resource": resource, "outcome": outcome,
        "digest": digest, "sig": sig,
    })).hexdigest()


def head_body(seq: int, hash: str, node: str, time_ms: int) -> bytes:  # noqa: A002 (the field's name)
    """The bytes the leader signs for a head."""
    return _canonical(HEAD_BODY_TAG, {"seq": seq, "hash": hash, "node": node, "time_ms": time_ms})


class AuditRecord(NamedTuple):
    seq: int  # 1, 2, 3, ... for the life of the chain; never reused, survives pruning
    index: int  # the Raft index of the command
    time_ms: int  # stamped by the proposer
    node: str  # the proposing node (whose key signed `sig`)
    who: str  # the principal's subject
    roles: tuple[str, ...]
    action: str  # "SUBMIT_TASKS", "access:GetTask", ...
    resource: str  # "task:t-abc", "dag:d-1", "executor:x-1", or ""
    outcome: str  # "ok", an error code, "allowed", "denied:UNAUTHENTICATED", ...
    digest: str  # hex sha256 of the proposed command
    sig: str  # base64 Ed25519 signature over signed_body(...)
    prev: str  # the previous record's hash (or the anchor's, or GENESIS_HASH)
    hash: str  # record_hash(prev, ...)

    def row(self) -> list[Any]:
        return [self.seq, self.index, self.time_ms, self.node, self.who, list(self.roles), self.action,
                self.resource, self.outcome, self.digest, self.sig, self.prev, self.hash]

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> AuditRecord:
        if not isinstance(row, (list, tuple)) or len(row) != len(cls._fields):
            raise InvalidArgument(f"audit record row: a list of {len(cls._fields)} fields, got {row!r:.200}")
        record = cls(*row[:5], tuple(row[5]) if isinstance(row[5], (list, tuple)) else row[5], *row[6:])
        problem = record_type_problem(record)
        if problem:
            raise InvalidArgument(f"audit record row: {problem}")
        return record


class AuditHead(NamedTuple):
    seq: int  # the record this head checkpoints
    hash: str  # that record's hash
    node: str  # the node (the leader when proposed) whose key signed it
    time_ms: int
    sig: str  # base64 Ed25519 signature over head_body(seq, hash, node, time_ms)

    def row(self) -> list[Any]:
        return [self.seq, self.hash, self.node, self.time_ms, self.sig]

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> AuditHead:
        if not isinstance(row, (list, tuple)) or len(row) != len(cls._fields):
            raise InvalidArgument(f"audit head row: a list of {len(cls._fields)} fields, got {row!r:.200}")
        head = cls(*row)
        problem = head_type_problem(head)
        if problem:
            raise InvalidArgument(f"audit head row: {problem}")
        return head


_RECORD_INTS = ("seq", "index", "time_ms")
_HEAD_INTS = ("seq", "time_ms")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def record_type_problem(record: AuditRecord) -> str | None:
    """What is wrong with the record's field types (a sentence naming the field), or None.
    Shared with the auditor, which reads records from an export that may have been edited."""
    for name, value in zip(AuditRecord._fields, record):
        if name in _RECORD_INTS:
            if not _is_int(value):
                return f"field '{name}' must be an int, got {value!r:.80}"
        elif name == "roles":
            if not isinstance(value, (tuple, list)) or not all(isinstance(r, str) for r in value):
                return f"field 'roles' must be a list of strings, got {value!r:.80}"
        elif not isinstance(value, str):
            return f"field '{name}' must be a string, got {value!r:.80}"
    return None


def head_type_problem(head: AuditHead) -> str | None:
    for name, value in zip(AuditHead._fields, head):
        if name in _HEAD_INTS:
            if not _is_int(value):
                return f"field '{name}' must be an int, got {value!r:.80}"
        elif not isinstance(value, str):
            return f"field '{name}' must be a string, got {value!r:.80}"
    return None


def recompute_hash(record: AuditRecord) -> str:
    return record_hash(record.prev, record.seq, record.index, record.time_ms, record.node, record.who,
                       record.roles, record.action, record.resource, record.outcome, record.digest, record.sig)


class AuditChain:
    """The retained suffix of the chain, the signed heads over it, and the anchor it starts from.

    State invariants (checked on restore, kept by append/add_head):
      * retained seqs are contiguous; record[0].prev == anchor.hash (or GENESIS_HASH with
        record[0].seq == 1 and no anchor); record[i+1].prev == record[i].hash
      * heads are strictly increasing in seq, each names a retained record with an equal hash,
        all newer than the anchor; at most heads_max of them

    Pruning: when more than records_max records are retained after an append, the records up to
    and including the OLDEST head that leaves at most records_max records are dropped (so as
    many as fit are kept), and that head becomes the anchor. If no retained head lies within
    the newest records_max records, everything is kept until one does: the chain exceeds
    records_max while heads are missing. With a head at least every head_every_records (the
    leader's job) that never happens, and the chain holds between records_max -
    head_every_records and records_max records once full.
    """

    def __init__(self, limits: AuditLimits | None = None) -> None:
        self.limits = limits or AuditLimits()
        self._records: list[AuditRecord] = []
        self._heads: list[AuditHead] = []
        self._anchor: AuditHead | None = None

    # ------------------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self._records)

    @property
    def last_seq(self) -> int:
        if self._records:
            return self._records[-1].seq
        return self._anchor.seq if self._anchor else 0

    @property
    def last_hash(self) -> str:
        if self._records:
            return self._records[-1].hash
        return self._anchor.hash if self._anchor else GENESIS_HASH

    @property
    def anchor(self) -> AuditHead | None:
        return self._anchor

    @property
    def heads(self) -> list[AuditHead]:
        return list(self._heads)

    def _first_seq(self) -> int:
        return self.last_seq - len(self._records) + 1

    def records_from(self, seq_from: int, limit: int) -> list[AuditRecord]:
        """Up to `limit` records with seq >= seq_from, oldest first. A seq_from that was pruned
        starts at the oldest retained record: the caller sees the gap in the first seq."""
        if not _is_int(seq_from) or not _is_int(limit) or limit < 0:
            raise InvalidArgument(f"records_from: seq_from an int and limit an int >= 0, got {seq_from!r}, {limit!r}")
        start = max(seq_from - self._first_seq(), 0)
        return self._records[start:start + limit]

    # ------------------------------------------------------------------------------ writing
    def append(self, *, index: int, time_ms: int, node: str, who: str, roles: Iterable[str], action: str,
               resource: str, outcome: str, digest: str, sig: str) -> AuditRecord:
        """Link one record into the chain and prune. Raises InvalidArgument only for a field of the
        wrong type (a codec bug: the same on every replica); long strings are cut, never refused."""
        roles = tuple(roles) if isinstance(roles, (list, tuple)) else roles
        limits = self.limits
        values = {"index": index, "time_ms": time_ms, "node": node, "who": who, "roles": roles, "action": action,
                  "resource": resource, "outcome": outcome, "digest": digest, "sig": sig}
        problem = record_type_problem(AuditRecord(seq=0, prev="", hash="", **values))
        if problem:
            raise InvalidArgument(f"audit record: {problem}")
        seq, prev = self.last_seq + 1, self.last_hash
        # node, digest and sig are never this long from an honest proposer; cut anyway to bound state
        clip = limits.clip
        node, who, action, resource, outcome = clip(node), clip(who), clip(action), clip(resource), clip(outcome)
        digest, sig, roles = clip(digest), clip(sig), limits.clip_roles(roles)
        link = record_hash(prev, seq, index, time_ms, node, who, roles, action, resource, outcome, digest, sig)
        record = AuditRecord(seq, index, time_ms, node, who, roles, action, resource, outcome, digest, sig, prev, link)
        self._records.append(record)
        if len(self._records) > limits.records_max:
            self._prune()
        return record

    def add_head(self, head: AuditHead) -> str | None:
        """Keep a signed head if it checkpoints a retained record: None, or why it was refused.
        The signature is not verified here (apply stays cheap and holds no keys); the auditor
        verifies it, and a head that does not verify is reported there."""
        if not isinstance(head, AuditHead):
            return f"audit head: an AuditHead, got {type(head).__name__}"
        problem = head_type_problem(head)
        if problem:
            return f"audit head: {problem}"
        newest = self._heads[-1] if self._heads else self._anchor
        if newest is not None and head.seq <= newest.seq:
            return f"audit head at seq {head.seq}: not newer than the newest head (seq {newest.seq})"
        first = self._first_seq()
        if not first <= head.seq <= self.last_seq:
            return (f"audit head at seq {head.seq}: no such retained record "
                    f"(retained seq {first}..{self.last_seq})")
        record = self._records[head.seq - first]
        if record.hash != head.hash:
            return f"audit head at seq {head.seq}: hash {head.hash:.16}… differs from the record's {record.hash:.16}…"
        chars_max = self.limits.field_chars_max
        for name in ("node", "sig"):
            if len(getattr(head, name)) > chars_max:
                return f"audit head at seq {head.seq}: field '{name}' longer than {chars_max} chars (field_chars_max)"
        self._heads.append(head)
        if len(self._heads) > self.limits.heads_max:
            del self._heads[: len(self._heads) - self.limits.heads_max]
        return None

    def _prune(self) -> None:
        cut_min = self.last_seq - self.limits.records_max  # cutting here leaves exactly records_max
        chosen = next((h for h in self._heads if h.seq >= cut_min), None)
        if chosen is None:
            return  # no head in the window yet: keep everything (see the class docstring)
        drop = chosen.seq - self._first_seq() + 1
        invariant(0 < drop <= len(self._records), f"audit prune: drop {drop} of {len(self._records)}")
        invariant(self._records[drop - 1].hash == chosen.hash, f"audit prune: head {chosen.seq} hash")
        del self._records[:drop]
        self._anchor = chosen
        self._heads = [h for h in self._heads if h.seq > chosen.seq]
        invariant(not self._records or self._records[0].prev == chosen.hash, "audit prune: anchor link")

    # ------------------------------------------------------------------------------ snapshots
    def to_rows(self) -> dict[str, Any]:
        return {
            "records": [r.row() for r in self._records],
            "heads": [h.row() for h in self._heads],
            "anchor": self._anchor.row() if self._anchor else None,
        }

    @classmethod
    def from_rows(cls, data: dict[str, Any], limits: AuditLimits | None = None) -> AuditChain:
        """Rebuild from `to_rows()`, checking every link and recomputing every hash (a snapshot is
        verified on read): a chain that does not reproduce itself is refused, not restored."""
        if not isinstance(data, dict) or set(data) != {"records", "heads", "anchor"}:
            raise InvalidArgument("audit snapshot: an object with records, heads and anchor")
        chain = cls(limits)
        chain._anchor = AuditHead.from_row(data["anchor"]) if data["anchor"] is not None else None
        chain._records = [AuditRecord.from_row(row) for row in data["records"]]
        chain._heads = [AuditHead.from_row(row) for row in data["heads"]]
        problem = chain._consistency_problem()
        if problem:
            raise InvalidArgument(f"audit snapshot: {problem}")
        return chain

    def _consistency_problem(self) -> str | None:
        prev = self._anchor.hash if self._anchor else GENESIS_HASH
        seq = self._anchor.seq if self._anchor else 0
        for record in self._records:
            if record.seq != seq + 1:
                return f"record seq {record.seq} follows seq {seq}"
            if record.prev != prev:
                return f"record seq {record.seq}: prev does not link to the record before it"
            if recompute_hash(record) != record.hash:
                return f"record seq {record.seq}: hash does not match its contents"
            seq, prev = record.seq, record.hash
        after = self._anchor.seq if self._anchor else 0
        first = self._first_seq()
        for head in self._heads:
            if head.seq <= after:
                return f"head at seq {head.seq}: not newer than the one before it (seq {after})"
            if not first <= head.seq <= self.last_seq or self._records[head.seq - first].hash != head.hash:
                return f"head at seq {head.seq}: does not match a retained record"
            after = head.seq
        return None
