"""Keys, signatures, verification and export for the audit chain (issue 6). The chain itself —
its encoding, links and pruning — is pure and lives in coordinator/audit.py; this module holds
what needs a key or a file.

    <certs dir>/audit/<node>.key     a node's Ed25519 audit key (PEM PKCS8, 0600; dir 0700)
    <certs dir>/audit-keys.json      every node's public keys, current and retired:
        {"format": "agent-coordinator-audit-keys-v1",
         "keys": {"n1": "<base64 raw public key>", ...},
         "retired": {"n1": ["<base64>", ...]}}

    generate_node_key(dir, "n1")     once per node; again with rotate=True to replace the key
    AuditSigner.from_dir(dir, "n1")  sign_record(...) before proposing; sign_head(...) as leader
    verify_chain(records, heads, anchor, load_known_keys(path)) -> VerifyReport
    export_jsonl(path, ...) / load_export(path)

A record names only its node, so verification accepts a signature by any current or retired key
of that node: a rotation leaves older records verifiable. Retiring a key is not revoking it —
a stolen key must be removed from the file by hand, which makes the records it signed fail.

Verification never raises on bad input: an edited export (wrong types, missing fields, records
removed or swapped) is a `VerifyReport` whose `problem` names the first bad record. Only an
export line that is not a JSON object at all (nothing to name a record by) or has fields that no
record has is refused by `load_export`, as `AuditError("line N: ...")`.

Errors:
    AuditError     a bad node id, a key or keys file that does not load, an unreadable export
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from coordinator.audit import (
    GENESIS_HASH,
    AuditHead,
    AuditLimits,
    AuditRecord,
    head_body,
    head_type_problem,
    recompute_hash,
    record_type_problem,
    signed_body,
)

KEYS_FORMAT = "agent-coordinator-audit-keys-v1"
EXPORT_FORMAT = "agent-coordinator-audit-export-v1"
NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
KEYS_FILE = "audit-keys.json"
KEYS_DIR = "audit"
RETIRED_KEYS_PER_NODE_MAX = 64
EXPORT_LINE_BYTES_MAX = 256 * 1024  # a record of 13 fields of <= 512 chars (and 32 roles) fits with room


class AuditError(Exception):
    """A bad node id, a key or keys file that does not load, or an unreadable export."""


def _check_node_id(node_id: object, field: str = "node_id") -> str:
    if not isinstance(node_id, str) or not NODE_ID_RE.match(node_id):
        raise AuditError(f"{field}: 1..64 chars of [A-Za-z0-9_.-] starting with a letter or digit, got {node_id!r:.80}")
    return node_id


def command_digest(data: bytes) -> str:
    """The digest a proposer puts in a record: hex sha256 of the command's encoded bytes."""
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------ key files
def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)  # O_CREAT's mode is filtered by the umask, and an old tmp keeps its own
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def _keys_lock(certs_dir: Path) -> Iterator[None]:
    """Serializes read-modify-write of the keys file between processes (nodes set up in parallel)."""
    with open(certs_dir / (KEYS_FILE + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _public_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return base64.b64encode(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


def _read_keys_doc(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {"format": KEYS_FORMAT, "keys": {}, "retired": {}}
    except (OSError, ValueError) as exc:
        raise AuditError(f"{path}: not a readable JSON keys file ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != KEYS_FORMAT:
        raise AuditError(f"{path}: format is not {KEYS_FORMAT!r}")
    keys, retired = doc.get("keys", {}), doc.get("retired", {})
    if not isinstance(keys, dict) or not all(isinstance(v, str) for v in keys.values()):
        raise AuditError(f"{path}: 'keys' must map node ids to base64 public keys")
    if not isinstance(retired, dict) or not all(
            isinstance(v, list) and all(isinstance(k, str) for k in v) for v in retired.values()):
        raise AuditError(f"{path}: 'retired' must map node ids to lists of base64 public keys")
    return {"format": KEYS_FORMAT, "keys": keys, "retired": retired}


def _write_keys_doc(path: Path, doc: dict[str, Any]) -> None:
    doc = {"format": KEYS_FORMAT, "keys": dict(sorted(doc["keys"].items())),
           "retired": {n: v for n, v in sorted(doc["retired"].items()) if v}}
    _write_atomic(path, (json.dumps(doc, indent=2) + "\n").encode(), 0o644)


def _set_current(doc: dict[str, Any], node_id: str, public: str) -> None:
    """`public` becomes node_id's current key; a different current key moves to retired."""
    old = doc["keys"].get(node_id)
    retired = [k for k in doc["retired"].get(node_id, []) if k != public]
    if old is not None and old != public and old not in retired:
        retired.append(old)
    if len(retired) > RETIRED_KEYS_PER_NODE_MAX:
        raise AuditError(f"node {node_id}: at most {RETIRED_KEYS_PER_NODE_MAX} retired keys "
                         "(RETIRED_KEYS_PER_NODE_MAX); prune old ones from the keys file by hand")
    doc["keys"][node_id] = public
    doc["retired"][node_id] = retired


def generate_node_key(certs_dir: str | Path, node_id: str, *, rotate: bool = False) -> Path:
    """Create node_id's audit key and list its public key; returns the key file's path.

    Idempotent: an existing key is kept (and re-listed as current if the keys file lost it)
    unless rotate=True, which replaces it and keeps the old public key under "retired".
    Crash-safe ordering: the new key is written to a temporary file, the keys file is updated,
    then the key is renamed into place — after a crash in between, the next call re-lists the
    key actually on disk as current (the never-used new public key is merely retired)."""
    _check_node_id(node_id)
    certs_dir = Path(certs_dir)
    key_dir = certs_dir / KEYS_DIR
    key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_path, keys_path = key_dir / f"{node_id}.key", certs_dir / KEYS_FILE
    with _keys_lock(certs_dir):
        doc = _read_keys_doc(keys_path)
        if key_path.exists() and not rotate:
            public = _public_b64(load_node_key(certs_dir, node_id))
            if doc["keys"].get(node_id) != public:
                _set_current(doc, node_id, public)
                _write_keys_doc(keys_path, doc)
            return key_path
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        staged = key_path.with_name(key_path.name + ".new")
        _write_atomic(staged, pem, 0o600)
        _set_current(doc, node_id, _public_b64(key))
        _write_keys_doc(keys_path, doc)
        os.replace(staged, key_path)
    return key_path


def load_node_key(certs_dir: str | Path, node_id: str) -> Ed25519PrivateKey:
    _check_node_id(node_id)
    path = Path(certs_dir) / KEYS_DIR / f"{node_id}.key"
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise AuditError(f"node {node_id}: no audit key at {path} (generate_node_key creates it)") from None
    except (OSError, ValueError, TypeError) as exc:
        raise AuditError(f"{path}: not a PEM PKCS8 private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditError(f"{path}: an Ed25519 key expected, got {type(key).__name__}")
    return key


def _public_key(text: str, where: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (ValueError, binascii.Error):
        raise AuditError(f"{where}: base64 of a 32-byte Ed25519 public key expected") from None


def load_known_keys(path: str | Path) -> dict[str, list[Ed25519PublicKey]]:
    """node id -> its public keys, the current one first, then the retired ones."""
    path = Path(path)
    if not path.exists():
        raise AuditError(f"{path}: no audit keys file")
    doc = _read_keys_doc(path)
    known: dict[str, list[Ed25519PublicKey]] = {}
    for node_id in sorted(set(doc["keys"]) | set(doc["retired"])):
        _check_node_id(node_id, f"{path}: node id")
        texts = ([doc["keys"][node_id]] if node_id in doc["keys"] else []) + doc["retired"].get(node_id, [])
        known[node_id] = [_public_key(t, f"{path}: node {node_id}") for t in texts]
    return known


# ------------------------------------------------------------------------------ signing
class AuditSigner:
    """Signs what this node proposes. Fields are cut to the chain's limits before signing, exactly
    as apply cuts them, so the stored record's body is the one that was signed."""

    def __init__(self, node_id: str, private_key: Ed25519PrivateKey, limits: AuditLimits | None = None) -> None:
        self.node_id = _check_node_id(node_id)
        if not isinstance(private_key, Ed25519PrivateKey):
            raise AuditError(f"private_key: an Ed25519PrivateKey, got {type(private_key).__name__}")
        self._key = private_key
        self.limits = limits or AuditLimits()

    def __repr__(self) -> str:
        return f"AuditSigner({self.node_id}, public={_public_b64(self._key)})"

    @classmethod
    def from_dir(cls, certs_dir: str | Path, node_id: str, limits: AuditLimits | None = None) -> AuditSigner:
        return cls(node_id, load_node_key(certs_dir, node_id), limits)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def sign_record(self, *, who: str, roles: Sequence[str], action: str, resource: str, time_ms: int,
                    digest: str) -> str:
        for name, value in (("who", who), ("action", action), ("resource", resource), ("digest", digest)):
            if not isinstance(value, str):
                raise AuditError(f"{name}: a string, got {type(value).__name__}")
        if isinstance(roles, str) or not all(isinstance(r, str) for r in roles):
            raise AuditError("roles: a list of strings")
        if isinstance(time_ms, bool) or not isinstance(time_ms, int):
            raise AuditError(f"time_ms: an int, got {type(time_ms).__name__}")
        lim = self.limits
        body = signed_body(node=self.node_id, who=lim.clip(who), roles=lim.clip_roles(roles), action=lim.clip(action),
                           resource=lim.clip(resource), time_ms=time_ms, digest=lim.clip(digest))
        return base64.b64encode(self._key.sign(body)).decode()

    def sign_head(self, seq: int, hash: str, time_ms: int) -> AuditHead:  # noqa: A002 (the field's name)
        sig = base64.b64encode(self._key.sign(head_body(seq, hash, self.node_id, time_ms))).decode()
        return AuditHead(seq, hash, self.node_id, time_ms, sig)


# ------------------------------------------------------------------------------ verification
@dataclass
class VerifyReport:
    ok: bool
    records_checked: int  # records that passed every check before the first problem
    heads_checked: int  # heads (and the anchor) whose signature and hash were checked and matched
    first_bad_seq: int | None  # the seq of the first bad record (for a missing one: the missing seq)
    first_bad_position: int | None  # 0-based position in the given list
    problem: str  # a sentence naming the record; "" when ok
    unsigned_tail_from_seq: int | None  # records from here on are after the newest head: chain-protected only

    def __str__(self) -> str:
        if self.ok:
            tail = f"; seq {self.unsigned_tail_from_seq}.. after the newest head" if self.unsigned_tail_from_seq else ""
            return f"ok: {self.records_checked} records, {self.heads_checked} heads{tail}"
        return f"BAD: {self.problem}"


Keys = Mapping[str, Ed25519PublicKey | Sequence[Ed25519PublicKey]]


def _signature_problem(node: str, body: bytes, sig: str, keys: Keys) -> str | None:
    """None if `sig` verifies with one of node's keys; else why not."""
    known = keys.get(node)
    if known is None:
        return f"unknown node {node!r:.80} (no audit key listed for it)"
    candidates = [known] if isinstance(known, Ed25519PublicKey) else list(known)
    try:
        raw = base64.b64decode(sig, validate=True)
    except (ValueError, binascii.Error):
        return f"signature is not base64 (node {node})"
    for key in candidates:
        try:
            key.verify(raw, body)
            return None
        except InvalidSignature:
            continue
    return f"signature does not verify with node {node}'s keys"


def _head_problem(head: AuditHead, keys: Keys) -> str | None:
    problem = head_type_problem(head)
    if problem:
        return problem
    return _signature_problem(head.node, head_body(head.seq, head.hash, head.node, head.time_ms), head.sig, keys)


def verify_chain(records: Sequence[AuditRecord], heads: Sequence[AuditHead], anchor: AuditHead | None,
                 keys: Keys) -> VerifyReport:
    """Check a chain (or a pruned suffix of one) and name the FIRST bad record.

    Order: the anchor's signature and the first record's link to it (or GENESIS_HASH at seq 1);
    then record by record — field types, seq = previous + 1 (a gap is a removal, a seq met again
    later a reordering), prev = the previous hash, the recomputed hash, the signature — and
    after each record the heads at its seq (signature, equal hash). A head that fails names the
    range it covers since the last good head: an edit of outcome or index with hashes
    recomputed shows up only there. Heads for seqs that no given record has are reported last.
    """
    report = _Verifier(keys)
    report.run(records, heads, anchor)
    return report.result()


class _Verifier:
    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self.records_checked = 0
        self.heads_checked = 0
        self.bad: tuple[int | None, int | None, str] | None = None
        self.newest_good_head_seq: int | None = None
        self.last_seq: int | None = None

    def fail(self, seq: int | None, position: int | None, problem: str) -> bool:
        self.bad = (seq, position, problem)
        return False

    def run(self, records: Sequence[Any], heads: Sequence[Any], anchor: Any) -> bool:
        records, heads = list(records), list(heads)
        for i, head in enumerate(heads):
            if not isinstance(head, AuditHead):
                return self.fail(None, None, f"head #{i}: not an audit head ({type(head).__name__})")
            problem = head_type_problem(head)
            if problem:
                return self.fail(None, None, f"head #{i}: {problem}")
        prev, seq = GENESIS_HASH, 0
        if anchor is not None:
            if not isinstance(anchor, AuditHead):
                return self.fail(None, None, f"anchor: not an audit head ({type(anchor).__name__})")
            problem = _head_problem(anchor, self.keys)
            if problem:
                return self.fail(None, None, f"anchor (head at seq {anchor.seq}): {problem}")
            self.heads_checked += 1
            prev, seq = anchor.hash, anchor.seq
            self.newest_good_head_seq = anchor.seq
        heads_at: dict[int, list[AuditHead]] = {}
        for head in sorted(heads, key=lambda h: h.seq):
            heads_at.setdefault(head.seq, []).append(head)
        seqs_present = {r.seq for r in records if isinstance(r, AuditRecord) and type(r.seq) is int}
        for position, record in enumerate(records):
            expected = seq + 1
            where = f"record seq {expected} (position {position})"
            if not isinstance(record, AuditRecord):
                return self.fail(expected, position, f"{where}: not an audit record ({type(record).__name__})")
            problem = record_type_problem(record)
            if problem:
                return self.fail(expected, position, f"{where}: {problem}")
            if record.seq != expected:
                return self.fail(expected, position, self._seq_problem(position, expected, record.seq, seqs_present,
                                                                       anchor is None and position == 0))
            if record.prev != prev:
                before = f"record seq {seq}'s hash" if position else (
                    f"the anchor's hash (head at seq {seq})" if anchor is not None else "the genesis hash")
                return self.fail(expected, position, f"{where}: prev does not match {before} — a record was "
                                                     "removed or reordered")
            if recompute_hash(record) != record.hash:
                return self.fail(expected, position, f"{where}: hash does not match its contents — edited")
            body = signed_body(node=record.node, who=record.who, roles=record.roles, action=record.action,
                               resource=record.resource, time_ms=record.time_ms, digest=record.digest)
            problem = _signature_problem(record.node, body, record.sig, self.keys)
            if problem:
                return self.fail(expected, position, f"{where}: {problem}")
            for head in heads_at.pop(record.seq, []):
                problem = _head_problem(head, self.keys)
                if problem is None and head.hash != record.hash:
                    since = self.newest_good_head_seq or 0
                    problem = (f"hash differs from record {record.seq} — a record in seq {since + 1}..{record.seq} "
                               f"was rewritten after this head was signed")
                if problem:
                    return self.fail(record.seq, position, f"head at seq {head.seq}: {problem}")
                self.heads_checked += 1
                self.newest_good_head_seq = head.seq
            self.records_checked += 1
            seq, prev = record.seq, record.hash
        self.last_seq = seq
        for head_seq, left in sorted(heads_at.items()):
            if anchor is not None and head_seq <= anchor.seq:
                if head_seq == anchor.seq and any(h.hash != anchor.hash for h in left):
                    return self.fail(None, None, f"head at seq {head_seq}: hash differs from the anchor's")
                continue  # older than the anchor: its records were pruned, nothing to compare with
            return self.fail(None, None, f"head at seq {head_seq}: no such record in the chain "
                                         f"(records end at seq {seq})")
        return True

    def _seq_problem(self, position: int, expected: int, found: int, seqs_present: set[int], at_start: bool) -> str:
        where = f"record seq {expected} (position {position})"
        if expected in seqs_present:
            return f"{where}: found seq {found} here and seq {expected} later — records were reordered"
        if at_start and found > expected:
            return (f"{where}: the chain starts at seq {found} without an anchor — records "
                    f"{expected}..{found - 1} were truncated")
        if found == expected + 1 or (found > expected and all(s not in seqs_present for s in range(expected, found))):
            return f"{where}: missing, the next record is seq {found} — a record was removed"
        return f"{where}: found seq {found} here — records were removed or reordered, or a seq was edited"

    def result(self) -> VerifyReport:
        tail = None
        if self.bad is None and self.last_seq is not None:
            newest = self.newest_good_head_seq or 0
            tail = newest + 1 if self.last_seq > newest else None
        seq, position, problem = self.bad or (None, None, "")
        return VerifyReport(ok=self.bad is None, records_checked=self.records_checked, heads_checked=self.heads_checked,
                            first_bad_seq=seq, first_bad_position=position, problem=problem,
                            unsigned_tail_from_seq=tail)


# ------------------------------------------------------------------------------ export
def _record_dict(record: AuditRecord) -> dict[str, Any]:
    return {**record._asdict(), "roles": list(record.roles)}


def export_jsonl(path_or_file: str | Path | IO[str], records: Sequence[AuditRecord], heads: Sequence[AuditHead],
                 anchor: AuditHead | None) -> None:
    """A header line {"format", "anchor", "heads"}, then one JSON object per record, named fields.
    A path is written atomically; ASCII-only JSON so any string (even a lone surrogate) round-trips."""
    lines = [json.dumps({"format": EXPORT_FORMAT, "anchor": anchor._asdict() if anchor else None,
                         "heads": [h._asdict() for h in heads]})]
    lines.extend(json.dumps(_record_dict(r)) for r in records)
    text = "\n".join(lines) + "\n"
    if isinstance(path_or_file, (str, Path)):
        _write_atomic(Path(path_or_file), text.encode(), 0o600)
    else:
        path_or_file.write(text)


def _named(cls: type, obj: dict[str, Any], line: int) -> Any:
    """The tuple from a JSON object; missing fields become None (verify reports them), unknown
    fields are refused (they are not covered by any hash, so they would pass unnoticed)."""
    extra = sorted(set(obj) - set(cls._fields))
    if extra:
        raise AuditError(f"line {line}: unexpected fields {extra} for {'a record' if cls is AuditRecord else 'a head'}")
    values = {name: obj.get(name) for name in cls._fields}
    if cls is AuditRecord and isinstance(values["roles"], list):
        values["roles"] = tuple(values["roles"])
    return cls(**values)


def load_export(path_or_file: str | Path | IO[str]) -> tuple[list[AuditRecord], list[AuditHead], AuditHead | None]:
    """Parse an export. Field-level damage (wrong types, missing fields) is kept for verify_chain
    to pinpoint; a line that is not a JSON object, is too long or has unknown fields raises
    AuditError("line N: ...") — line 1 is the header. Blank lines are skipped."""
    if isinstance(path_or_file, (str, Path)):
        try:
            with open(path_or_file, encoding="utf-8", errors="strict") as f:
                return _parse_export(f)
        except (OSError, UnicodeDecodeError) as exc:
            raise AuditError(f"{path_or_file}: cannot read the export ({exc})") from None
    return _parse_export(path_or_file)


def _parse_export(f: IO[str]) -> tuple[list[AuditRecord], list[AuditHead], AuditHead | None]:
    header: dict[str, Any] | None = None
    records: list[AuditRecord] = []
    number = 0
    while True:
        line = f.readline(EXPORT_LINE_BYTES_MAX + 1)
        if not line:
            break
        number += 1
        if len(line) > EXPORT_LINE_BYTES_MAX:
            raise AuditError(f"line {number}: longer than {EXPORT_LINE_BYTES_MAX} chars (EXPORT_LINE_BYTES_MAX)")
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise AuditError(f"line {number}: not JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise AuditError(f"line {number}: a JSON object expected, got {type(obj).__name__}")
        if header is None:
            if obj.get("format") != EXPORT_FORMAT or set(obj) != {"format", "anchor", "heads"}:
                raise AuditError(f"line {number}: not an audit export header (format {EXPORT_FORMAT!r}, anchor, heads)")
            if not isinstance(obj["heads"], list) or not all(isinstance(h, dict) for h in obj["heads"]):
                raise AuditError(f"line {number}: 'heads' must be a list of objects")
            if obj["anchor"] is not None and not isinstance(obj["anchor"], dict):
                raise AuditError(f"line {number}: 'anchor' must be an object or null")
            header = obj
            continue
        records.append(_named(AuditRecord, obj, number))
    if header is None:
        raise AuditError("line 1: the export is empty (no header)")
    heads = [_named(AuditHead, h, 1) for h in header["heads"]]
    anchor = _named(AuditHead, header["anchor"], 1) if header["anchor"] is not None else None
    return records, heads, anchor
