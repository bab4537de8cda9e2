"""Signed audit chains (security/audit.py): a chain of 55 records signed by three node keys with
heads every 10; every single edit, removal or swap — in memory and in the JSONL export — is
pinned on the record where it happened; an attacker who recomputes hashes is caught by the
record signature or a head (and, honestly, not in the tail after the newest head); pruning,
foreign keys, rotation and key files."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.audit import AuditChain, AuditHead, AuditLimits, AuditRecord, recompute_hash
from security.audit import (
    AuditError,
    AuditSigner,
    VerifyReport,
    command_digest,
    export_jsonl,
    generate_node_key,
    load_export,
    load_known_keys,
    load_node_key,
    verify_chain,
)

NODES = ("n1", "n2", "n3")
RECORDS = 55
HEAD_EVERY = 10  # heads at 10, 20, 30, 40, 50; records 51..55 are the unsigned tail
LAST_HEAD = 50
EDITABLE = ("who", "action", "resource", "outcome", "time_ms", "index", "digest", "sig")
IN_BODY = ("who", "action", "resource", "time_ms", "digest", "sig")  # covered by the record signature
SETTINGS = settings(max_examples=60, deadline=None)


def _fill(chain: AuditChain, signers: dict[str, AuditSigner], count: int, *, head_every: int, start: int = 1) -> None:
    leader = signers[NODES[0]]
    for i in range(start, start + count):
        signer = signers[NODES[i % len(signers)]] if len(signers) > 1 else next(iter(signers.values()))
        body = dict(who=f"agent-{i % 4}", roles=("agent", "reader") if i % 2 else ("operator",),
                    action="access:GetTask" if i % 5 == 0 else "SUBMIT_TASKS", resource=f"task:t-{i}",
                    time_ms=1_700_000_000_000 + i, digest=command_digest(f"command {i}".encode()))
        sig = signer.sign_record(**body)
        chain.append(index=100 + 2 * i, node=signer.node_id, outcome="denied:UNAUTHENTICATED" if i % 7 == 0 else "ok",
                     sig=sig, **body)
        if i % head_every == 0:
            head = (signers.get(NODES[0]) or leader).sign_head(chain.last_seq, chain.last_hash, 1_700_000_001_000 + i)
            assert chain.add_head(head) is None


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    certs = tmp_path_factory.mktemp("certs")
    for node in NODES:
        generate_node_key(certs, node)
    signers = {n: AuditSigner.from_dir(certs, n) for n in NODES}
    chain = AuditChain()
    _fill(chain, signers, RECORDS, head_every=HEAD_EVERY)
    records = chain.records_from(1, RECORDS)
    export = certs / "export.jsonl"
    export_jsonl(export, records, chain.heads, chain.anchor)
    return {"certs": certs, "signers": signers, "keys": load_known_keys(certs / "audit-keys.json"),
            "records": records, "heads": chain.heads, "export": export, "scratch": tmp_path_factory.mktemp("edits")}


def _verify(world: dict, records: list, heads: list | None = None, anchor: AuditHead | None = None) -> VerifyReport:
    return verify_chain(records, world["heads"] if heads is None else heads, anchor, world["keys"])


def _export_lines(world: dict) -> list[str]:
    return world["export"].read_text().splitlines()


def _verify_lines(world: dict, lines: list[str]) -> VerifyReport:
    path = world["scratch"] / "edited.jsonl"
    path.write_text("\n".join(lines) + "\n")
    records, heads, anchor = load_export(path)
    return verify_chain(records, heads, anchor, world["keys"])


def _changed(record: AuditRecord, name: str, data: st.DataObject, sigs: list[str]) -> object:
    """A different value for one field: for sig, a flipped character or another record's valid signature."""
    old = getattr(record, name)
    if isinstance(old, int):
        return data.draw(st.integers(-2**40, 2**40).filter(lambda v: v != old), label=name)
    if name == "sig":
        other = data.draw(st.sampled_from(range(RECORDS)), label="other record's signature")
        flipped = ("B" if old[0] == "A" else "A") + old[1:]
        return flipped if other == record.seq - 1 else data.draw(st.sampled_from([flipped, sigs[other]]))
    return data.draw(st.text(max_size=20).filter(lambda v: v != old), label=name)


def _rehash_from(records: list[AuditRecord], position: int) -> list[AuditRecord]:
    """What an attacker with write access does after an edit: recompute every link after it."""
    out = list(records)
    for i in range(position, len(out)):
        record = out[i]._replace(prev=out[i - 1].hash) if i else out[i]
        out[i] = record._replace(hash=recompute_hash(record))
    return out


def _assert_pinned(report: VerifyReport, position: int) -> None:
    assert not report.ok, "the damage went unnoticed"
    assert (report.first_bad_seq, report.first_bad_position) == (position + 1, position), report.problem
    assert f"record seq {position + 1} (position {position})" in report.problem
    assert report.records_checked == position


# ------------------------------------------------------------------------------ the intact chain
def test_the_intact_chain_and_its_export_verify(world: dict) -> None:
    report = _verify(world, world["records"])
    assert report.ok and report.problem == "", report.problem
    assert (report.records_checked, report.heads_checked) == (RECORDS, RECORDS // HEAD_EVERY)
    assert report.unsigned_tail_from_seq == LAST_HEAD + 1
    records, heads, anchor = load_export(world["export"])
    assert records == world["records"] and heads == world["heads"] and anchor is None
    assert verify_chain(records, heads, anchor, world["keys"]).ok
    assert len({r.node for r in records}) == 3
    first = json.loads(_export_lines(world)[1])
    assert first["seq"] == 1 and first["roles"] == list(records[0].roles)  # named fields, not positional
    assert stat.S_IMODE(world["export"].stat().st_mode) == 0o600


# ------------------------------------------------------------------------------ one edit, removal or swap
@SETTINGS
@given(data=st.data(), position=st.integers(0, RECORDS - 1), name=st.sampled_from(EDITABLE), in_file=st.booleans())
def test_an_edited_field_is_pinned_on_its_record(world: dict, data: st.DataObject, position: int, name: str,
                                                 in_file: bool) -> None:
    record = world["records"][position]
    value = _changed(record, name, data, [r.sig for r in world["records"]])
    if in_file:
        lines = _export_lines(world)
        obj = json.loads(lines[position + 1])
        obj[name] = value
        lines[position + 1] = json.dumps(obj)
        report = _verify_lines(world, lines)
    else:
        records = list(world["records"])
        records[position] = record._replace(**{name: value})
        report = _verify(world, records)
    _assert_pinned(report, position)
    assert "hash does not match its contents" in report.problem


@SETTINGS
@given(position=st.integers(0, RECORDS - 2), in_file=st.booleans())
def test_a_removed_record_is_pinned_on_its_seq(world: dict, position: int, in_file: bool) -> None:
    if in_file:
        lines = _export_lines(world)
        del lines[position + 1]
        report = _verify_lines(world, lines)
    else:
        records = list(world["records"])
        del records[position]
        report = _verify(world, records)
    _assert_pinned(report, position)
    assert "removed" in report.problem or "truncated" in report.problem


@SETTINGS
@given(position=st.integers(0, RECORDS - 2), in_file=st.booleans())
def test_swapped_neighbours_are_pinned_on_the_first_position(world: dict, position: int, in_file: bool) -> None:
    if in_file:
        lines = _export_lines(world)
        lines[position + 1], lines[position + 2] = lines[position + 2], lines[position + 1]
        report = _verify_lines(world, lines)
    else:
        records = list(world["records"])
        records[position], records[position + 1] = records[position + 1], records[position]
        report = _verify(world, records)
    _assert_pinned(report, position)
    assert "reordered" in report.problem


def test_cutting_the_tail_is_caught_only_at_a_head(world: dict) -> None:
    """Honest limit: records after the newest head can be cut from the end unnoticed; a cut that
    takes a head's record with it is caught (the head names a record that is gone)."""
    tail_cut = _verify(world, world["records"][:-3])
    assert tail_cut.ok and tail_cut.unsigned_tail_from_seq == LAST_HEAD + 1
    head_cut = _verify(world, world["records"][: LAST_HEAD - 1])
    assert not head_cut.ok and f"head at seq {LAST_HEAD}: no such record" in head_cut.problem


# ------------------------------------------------------------------------------ an attacker who recomputes hashes
@SETTINGS
@given(data=st.data(), position=st.integers(0, RECORDS - 1), name=st.sampled_from(EDITABLE))
def test_recomputed_hashes_are_caught_by_the_signature_or_a_head(world: dict, data: st.DataObject, position: int,
                                                                 name: str) -> None:
    records = list(world["records"])
    value = _changed(records[position], name, data, [r.sig for r in world["records"]])
    records[position] = records[position]._replace(**{name: value})
    report = _verify(world, _rehash_from(records, position))
    seq = position + 1
    if name in IN_BODY:
        _assert_pinned(report, position)
        assert "signature does not verify with node" in report.problem
    elif seq <= LAST_HEAD:  # outcome, index: not signed per record, committed to by the next head
        head_seq = -(-seq // HEAD_EVERY) * HEAD_EVERY
        assert not report.ok and report.first_bad_seq == head_seq
        assert report.problem.startswith(f"head at seq {head_seq}: hash differs from record {head_seq}")
        assert f"seq {head_seq - HEAD_EVERY + 1}..{head_seq}" in report.problem  # the range holding the edit
    else:  # the tail after the newest head: the chain alone cannot tell
        assert report.ok and report.unsigned_tail_from_seq is not None and report.unsigned_tail_from_seq <= seq


@pytest.mark.parametrize("position", [3, RECORDS - 2])
def test_a_broken_link_with_a_matching_hash_is_caught_by_prev(world: dict, position: int) -> None:
    """prev is neither signed nor visible to the hash check once the record's own hash is
    recomputed; in the tail after the newest head the link is the only thing that catches it."""
    records = list(world["records"])
    relinked = records[position]._replace(prev=records[position - 2].hash)  # as if the record before were gone
    records[position] = relinked._replace(hash=recompute_hash(relinked))
    report = _verify(world, records)
    _assert_pinned(report, position)
    assert f"prev does not match record seq {position}'s hash" in report.problem


def test_a_head_re_signed_by_a_foreign_key_is_refused(world: dict) -> None:
    forger = AuditSigner("n1", Ed25519PrivateKey.generate())
    records = list(world["records"])
    records[14] = records[14]._replace(outcome="ok" if records[14].outcome != "ok" else "PERMISSION_DENIED")
    records = _rehash_from(records, 14)
    heads = [forger.sign_head(h.seq, records[h.seq - 1].hash, h.time_ms) if h.seq >= 15 else h for h in world["heads"]]
    report = _verify(world, records, heads)
    assert not report.ok and report.first_bad_seq == 20
    assert report.problem == "head at seq 20: signature does not verify with node n1's keys"


# ------------------------------------------------------------------------------ keys
def test_a_foreign_key_or_an_unknown_node_is_refused(world: dict) -> None:
    records = list(world["records"])
    forger = AuditSigner("n2", Ed25519PrivateKey.generate())
    target = records[8]
    body = dict(who="mallory", roles=target.roles, action=target.action, resource=target.resource,
                time_ms=target.time_ms, digest=target.digest)
    forged = target._replace(node="n2", who="mallory", sig=forger.sign_record(**body))
    records[8] = forged._replace(hash=recompute_hash(forged))
    report = _verify(world, _rehash_from(records, 8))
    assert report.problem == "record seq 9 (position 8): signature does not verify with node n2's keys"
    renamed = target._replace(node="n9")
    records[8] = renamed._replace(hash=recompute_hash(renamed))
    report = _verify(world, _rehash_from(records, 8))
    assert (report.first_bad_seq, report.problem) == (9, "record seq 9 (position 8): unknown node 'n9' "
                                                         "(no audit key listed for it)")


def test_rotation_keeps_old_records_verifiable(tmp_path: Path) -> None:
    key_path = generate_node_key(tmp_path, "n1")
    chain = AuditChain()
    _fill(chain, {"n1": AuditSigner.from_dir(tmp_path, "n1")}, 5, head_every=5)
    old_pem = key_path.read_bytes()
    assert generate_node_key(tmp_path, "n1") == key_path and key_path.read_bytes() == old_pem  # idempotent
    generate_node_key(tmp_path, "n1", rotate=True)
    assert key_path.read_bytes() != old_pem
    _fill(chain, {"n1": AuditSigner.from_dir(tmp_path, "n1")}, 5, head_every=5, start=6)
    doc = json.loads((tmp_path / "audit-keys.json").read_text())
    assert doc["format"] == "agent-coordinator-audit-keys-v1" and len(doc["retired"]["n1"]) == 1
    keys = load_known_keys(tmp_path / "audit-keys.json")
    records = chain.records_from(1, 100)
    assert verify_chain(records, chain.heads, None, keys).ok
    current_only = {"n1": keys["n1"][:1]}
    report = verify_chain(records, chain.heads, None, current_only)
    assert report.first_bad_seq == 1 and "signature does not verify" in report.problem


def test_key_files_are_private_and_a_lost_listing_is_repaired(tmp_path: Path) -> None:
    key_path = generate_node_key(tmp_path, "node-1.a_b")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_path.parent.stat().st_mode) == 0o700
    assert key_path == tmp_path / "audit" / "node-1.a_b.key"
    assert "BEGIN PRIVATE KEY" in key_path.read_text()
    (tmp_path / "audit-keys.json").unlink()
    generate_node_key(tmp_path, "node-1.a_b")  # re-lists the key on disk
    signer = AuditSigner("node-1.a_b", load_node_key(tmp_path, "node-1.a_b"))
    listed = load_known_keys(tmp_path / "audit-keys.json")["node-1.a_b"]
    assert [k.public_bytes_raw() for k in listed] == [signer.public_key.public_bytes_raw()]


@pytest.mark.parametrize("node_id", ["", "-n1", "n/1", "a" * 65, "n 1", None])
def test_bad_node_ids_are_refused_naming_the_field(tmp_path: Path, node_id: object) -> None:
    with pytest.raises(AuditError, match="node_id"):
        generate_node_key(tmp_path, node_id)  # type: ignore[arg-type]
    with pytest.raises(AuditError, match="node_id"):
        AuditSigner(node_id, Ed25519PrivateKey.generate())  # type: ignore[arg-type]


def test_missing_or_broken_key_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="no audit key"):
        load_node_key(tmp_path, "n1")
    with pytest.raises(AuditError, match="no audit keys file"):
        load_known_keys(tmp_path / "audit-keys.json")
    (tmp_path / "audit-keys.json").write_text('{"format": "agent-coordinator-audit-keys-v1", "keys": {"n1": "!!"}}')
    with pytest.raises(AuditError, match="node n1: base64"):
        load_known_keys(tmp_path / "audit-keys.json")


# ------------------------------------------------------------------------------ pruning
def test_a_pruned_chain_verifies_from_its_anchor(world: dict, tmp_path: Path) -> None:
    limits = AuditLimits(records_max=20, head_every_records=5, heads_max=8)
    chain = AuditChain(limits)
    _fill(chain, world["signers"], 77, head_every=5)
    anchor, records = chain.anchor, chain.records_from(0, 100)
    assert anchor is not None and records[0].seq == anchor.seq + 1 and len(records) <= 20
    report = verify_chain(records, chain.heads, anchor, world["keys"])
    assert report.ok and report.records_checked == len(records), report.problem
    assert report.unsigned_tail_from_seq == 76  # head at 75
    export_jsonl(tmp_path / "pruned.jsonl", records, chain.heads, anchor)
    assert verify_chain(*load_export(tmp_path / "pruned.jsonl"), world["keys"]).ok
    edited = [records[0]._replace(resource="task:other"), *records[1:]]
    report = verify_chain(edited, chain.heads, anchor, world["keys"])
    assert (report.first_bad_seq, report.first_bad_position) == (anchor.seq + 1, 0)
    forged = AuditSigner("n1", Ed25519PrivateKey.generate()).sign_head(anchor.seq, anchor.hash, anchor.time_ms)
    report = verify_chain(records, chain.heads, forged, world["keys"])
    assert report.problem == f"anchor (head at seq {anchor.seq}): signature does not verify with node n1's keys"
    report = verify_chain(records, chain.heads, None, world["keys"])
    assert report.first_bad_seq == 1 and "truncated" in report.problem


# ------------------------------------------------------------------------------ damaged exports
@pytest.mark.parametrize("value,expected", [("abc", "field 'time_ms' must be an int"), (None, "field 'time_ms'"),
                                            (True, "field 'time_ms'"), (1.5, "field 'time_ms'")])
def test_a_wrongly_typed_field_in_the_export_is_pinned_not_raised(world: dict, value: object, expected: str) -> None:
    lines = _export_lines(world)
    obj = json.loads(lines[12])
    obj["time_ms"] = value
    lines[12] = json.dumps(obj)
    report = _verify_lines(world, lines)
    _assert_pinned(report, 11)
    assert expected in report.problem


def test_a_missing_field_in_the_export_is_pinned(world: dict) -> None:
    lines = _export_lines(world)
    obj = json.loads(lines[31])
    del obj["roles"]
    lines[31] = json.dumps(obj)
    report = _verify_lines(world, lines)
    _assert_pinned(report, 30)
    assert "field 'roles'" in report.problem


@pytest.mark.parametrize("line,expected", [("{not json", "line 8: not JSON"), ("[1, 2]", "line 8: a JSON object"),
                                           ('{"seq": 7, "note": "x"}', "line 8: unexpected fields ['note']")])
def test_an_export_line_that_is_no_record_names_the_line(world: dict, line: str, expected: str) -> None:
    lines = _export_lines(world)
    lines[7] = line
    with pytest.raises(AuditError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        _verify_lines(world, lines)


def test_a_bad_head_in_the_export_header_is_reported(world: dict) -> None:
    lines = _export_lines(world)
    header = json.loads(lines[0])
    header["heads"][1]["seq"] = "20"
    lines[0] = json.dumps(header)
    assert _verify_lines(world, lines).problem == "head #1: field 'seq' must be an int, got '20'"
    header["heads"][1]["seq"] = 21
    lines[0] = json.dumps(header)
    report = _verify_lines(world, lines)
    assert report.first_bad_seq == 21 and report.problem.startswith("head at seq 21: signature does not verify")
    lines[0] = '{"format": "something-else", "anchor": null, "heads": []}'
    with pytest.raises(AuditError, match="line 1: not an audit export header"):
        _verify_lines(world, lines)


def test_signer_cuts_long_fields_like_apply_so_the_signature_still_verifies(world: dict) -> None:
    signer = world["signers"]["n2"]
    chain = AuditChain()
    body = dict(who="w" * 5_000, roles=tuple(f"role-{i}" for i in range(100)), action="a" * 600, resource="r" * 513,
                time_ms=1, digest=command_digest(b"x"))
    chain.append(index=1, node="n2", outcome="ok", sig=signer.sign_record(**body), **body)
    assert len(chain.records_from(1, 1)[0].who) == AuditLimits().field_chars_max
    assert verify_chain(chain.records_from(1, 1), [], None, world["keys"]).ok
