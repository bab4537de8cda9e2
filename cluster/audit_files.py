"""Reading and checking the audit chain outside a running node (`coordctl audit verify`).

`read_node_audit` takes the chain straight from a (stopped) node's snapshot file, row by row and
without the restore-time consistency check, so an edited record is reported by `verify` at its
position rather than refusing the whole file. Entries after the snapshot live in the node's WAL
and are checked live (`coordctl audit verify` against the running node).

`verify_with_decisions` adds one check to security.audit.verify_chain: an access-decision
record's digest is recomputed from its fields, so its outcome is covered by its signature too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from cluster.auth import decision_digest
from coordinator.audit import AuditHead, AuditRecord
from security.audit import AuditError, VerifyReport, verify_chain
from wal.snapshot import SnapshotCorrupt, read_snapshot

SNAPSHOT_FILE = "snapshot.bin"


def _tuple(cls: type, row: Any, where: str) -> Any:
    if not isinstance(row, list) or len(row) != len(cls._fields):
        raise AuditError(f"{where}: not a {cls.__name__} row")
    values = list(row)
    if cls is AuditRecord and isinstance(values[5], list):
        values[5] = tuple(values[5])
    return cls(*values)


def read_node_audit(node_data_dir: str) -> tuple[list[AuditRecord], list[AuditHead], AuditHead | None]:
    path = os.path.join(node_data_dir, SNAPSHOT_FILE)
    if not os.path.exists(path):
        raise AuditError(f"{path}: no snapshot (the chain is still only in the WAL: verify the running node)")
    try:
        _header, chunks = read_snapshot(path)
    except (SnapshotCorrupt, OSError) as exc:
        raise AuditError(f"{path}: {exc}") from None
    decode = json.JSONDecoder().decode
    try:
        state_header = decode(chunks[2].decode())
        section = None
        rows: list[Any] = []
        for chunk in chunks[3:]:
            item = decode(chunk.decode())
            if isinstance(item, dict):
                section = item.get("section")
            elif section == "audit":
                rows.extend(item)
    except (ValueError, UnicodeDecodeError, IndexError) as exc:
        raise AuditError(f"{path}: the state in it does not decode ({exc})") from None
    records = [_tuple(AuditRecord, row, f"{path}: audit row {n}") for n, row in enumerate(rows)]
    heads = [_tuple(AuditHead, row, f"{path}: audit head {n}") for n, row in enumerate(state_header.get("audit_heads", []))]
    anchor_row = state_header.get("audit_anchor")
    anchor = _tuple(AuditHead, anchor_row, f"{path}: audit anchor") if anchor_row is not None else None
    return records, heads, anchor


def verify_with_decisions(records: Sequence[AuditRecord], heads: Sequence[AuditHead], anchor: AuditHead | None,
                          keys: Any) -> VerifyReport:
    report = verify_chain(records, heads, anchor, keys)
    limit = report.first_bad_position if report.first_bad_position is not None else len(records)
    for position, record in enumerate(records[:limit]):
        if not isinstance(record.action, str) or not record.action.startswith("access:"):
            continue
        try:
            expected = decision_digest(record.who, record.roles, record.action, record.resource, record.outcome,
                                       record.time_ms)
        except TypeError:
            expected = None
        if record.digest != expected:
            return replace(report, ok=False, records_checked=position, first_bad_seq=record.seq,
                           first_bad_position=position,
                           problem=f"record seq {record.seq} (position {position}): the access decision's digest "
                                   "does not match its fields — its outcome or subject was edited")
    return report
