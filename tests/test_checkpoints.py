"""Checkpoint chains (coordinator/checkpoints.py): delta round trips, restore equals the last
document, damage is detected and restore stops at the last verified point, retention keeps
restore correct and storage bounded, and deltas save bytes on an append-mostly agent state."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.checkpoints import (
    BadDelta,
    CheckpointLimits,
    CheckpointRecord,
    apply_delta,
    canonical_json,
    chain_position,
    check_record,
    checkpoint_id,
    diff,
    make_checkpoint,
    recover,
    restore,
    retention,
    state_checksum,
    validate_new,
)
from coordinator.errors import FailedPrecondition, InvalidArgument

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIMITS = CheckpointLimits()

scalars = (st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False, allow_infinity=False)
           | st.text(max_size=6))
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=4),
    max_leaves=16)
json_dicts = st.dictionaries(st.text(max_size=3), json_values, max_size=5)
# Histories draw many values; generation, not the code under test, dominates their run time.
small_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=2), inner, max_size=3), max_leaves=5)
HISTORIES = settings(FAST, max_examples=80)


def copy(value):
    return json.loads(json.dumps(value))


def same(a, b) -> bool:
    return canonical_json(a) == canonical_json(b)


@st.composite
def histories(draw, steps_max: int = 25) -> list[dict]:
    """Documents an agent might checkpoint: mostly appended actions and a consumed plan, with
    some rewrites of lists and nested values so every op kind shows up."""
    doc = {"state_snapshot": draw(json_dicts), "executed_actions": [],
           "remaining_plan": draw(st.lists(small_values, max_size=6))}
    docs = [copy(doc)]
    for step in range(draw(st.integers(0, steps_max))):
        doc = copy(doc)
        change = draw(st.sampled_from(["append", "append", "append", "plan", "state", "drop", "rewrite", "nested"]))
        if change == "append":
            doc["executed_actions"].append({"id": f"a{step}", "out": draw(small_values)})
        elif change == "plan":
            del doc["remaining_plan"][:draw(st.integers(0, 3))]
            doc["remaining_plan"].extend(draw(st.lists(small_values, max_size=2)))
        elif change == "state":
            doc["state_snapshot"][draw(st.text(max_size=3))] = draw(small_values)
        elif change == "drop" and doc["state_snapshot"]:
            del doc["state_snapshot"][draw(st.sampled_from(sorted(doc["state_snapshot"])))]
        elif change == "rewrite" and doc["executed_actions"]:
            doc["executed_actions"][draw(st.integers(0, len(doc["executed_actions"]) - 1))]["out"] = draw(small_values)
        elif change == "nested":
            doc["state_snapshot"]["n"] = {"list": draw(st.lists(scalars, max_size=4)), "v": draw(scalars)}
        docs.append(doc)
    return docs


def build(docs: list[dict], *, full_every: int = 20, delta_chain_bytes_max: int = 1024 * 1024,
          keep_full_max: int | None = None) -> list[CheckpointRecord]:
    """Checkpoint every document in order, as the FSM would (validating, and optionally
    applying retention after each write)."""
    records: list[CheckpointRecord] = []
    prev = None
    for sequence, doc in enumerate(docs, start=1):
        deltas, delta_bytes = chain_position(records)
        record = make_checkpoint(prev, sequence - 1, doc, task_id="t", timestamp_ms=1000 + sequence,
                                 full_every=full_every, delta_chain_bytes_max=delta_chain_bytes_max,
                                 chain_deltas_so_far=deltas, chain_bytes_so_far=delta_bytes)
        assert validate_new(records[-1] if records else None, record, LIMITS) is None
        records.append(record)
        if keep_full_max is not None:
            dropped = set(retention(records, keep_full_max=keep_full_max))
            records = [r for r in records if r.sequence_number not in dropped]
        prev = doc
    return records


# --- deltas ---------------------------------------------------------------------------------

@FAST
@given(json_values, json_values)
def test_delta_round_trip_on_any_values(old, new) -> None:
    before = canonical_json(old)
    ops = diff(old, new)
    assert same(apply_delta(old, ops), new)
    assert canonical_json(old) == before  # the input is never modified
    assert same(apply_delta(old, json.loads(json.dumps(ops))), new)  # ops survive the wire


@HISTORIES
@given(histories())
def test_delta_round_trip_along_histories(docs) -> None:
    for old, new in zip(docs, docs[1:]):
        assert same(apply_delta(old, diff(old, new)), new)


def test_appends_and_consumed_plans_are_cheap_ops() -> None:
    old = {"log": [1, 2], "plan": ["a", "b", "c"], "flag": 1}
    new = {"log": [1, 2, 3], "plan": ["c", "d"], "flag": True}
    assert diff(old, new) == [
        {"op": "append", "path": ["log"], "values": [3]},
        {"op": "del", "path": ["plan", 0]}, {"op": "del", "path": ["plan", 0]},
        {"op": "append", "path": ["plan"], "values": ["d"]},
        {"op": "set", "path": ["flag"], "value": True},  # 1 == True in Python, not in JSON
    ]
    assert diff({"log": [1, 2]}, {"log": [0, 1, 2]}) == [{"op": "set", "path": ["log"], "value": [0, 1, 2]}]


@pytest.mark.parametrize("ops, fragment", [
    ([{"op": "set", "path": ["a"], "value": 1}, {"op": "move", "path": ["a"]}], "delta op 1: unknown op 'move'"),
    ([{"op": "set", "value": 1}], "delta op 0: path: missing"),
    ([{"op": "append", "path": ["a"], "values": [1]}], "delta op 0: append: path holds a int"),
    ([{"op": "set", "path": ["a", "x"], "value": 1}], "delta op 0: path[1]: a int is not a container"),
    ([{"op": "del", "path": ["l", 5]}], "delta op 0: path[1]: 5 is not an index of a list of 2"),
    ([{"op": "del", "path": ["zz"]}], "delta op 0: path[0]: no key 'zz'"),
    ([{"op": "del", "path": []}], "delta op 0: path: the document itself"),
])
def test_bad_ops_name_their_index(ops, fragment) -> None:
    state = {"a": 1, "l": [1, 2]}
    with pytest.raises(BadDelta) as info:
        apply_delta(state, ops)
    assert fragment in info.value.message
    assert state == {"a": 1, "l": [1, 2]}


def test_checksum_is_canonical() -> None:
    assert state_checksum({"b": 1, "a": [1.5, "é"]}) == state_checksum({"a": [1.5, "é"], "b": 1})
    assert state_checksum({"a": 1}) != state_checksum({"a": True})
    with pytest.raises(InvalidArgument):
        state_checksum({"a": float("nan")})


# --- chains and restore ----------------------------------------------------------------------

chain_settings = st.tuples(st.integers(1, 6), st.sampled_from([150, 1000, 1024 * 1024]))


@HISTORIES
@given(histories(), chain_settings)
def test_restore_equals_the_last_document(docs, chain) -> None:
    full_every, delta_chain_bytes_max = chain
    records = build(docs, full_every=full_every, delta_chain_bytes_max=delta_chain_bytes_max)
    result = restore(reversed(records))  # order of the input does not matter
    assert result.problem is None and result.sequence_number == len(docs)
    assert same(result.document, docs[-1])
    assert records[0].kind == "full"
    for record in records:
        assert json.loads(json.dumps(record.as_dict())) == record.as_dict()  # JSON-serializable
        chain = restore(r for r in records if r.sequence_number <= record.sequence_number)
        assert chain.used[-1] == record.sequence_number
    # the chain after each full stays within its bounds
    deltas_since_full = delta_bytes_since_full = 0
    for record in records:
        if record.kind == "full":
            deltas_since_full = delta_bytes_since_full = 0
        else:
            deltas_since_full += 1
            delta_bytes_since_full += record.payload_bytes
        assert deltas_since_full <= full_every and delta_bytes_since_full <= delta_chain_bytes_max


@HISTORIES
@given(histories(steps_max=20), chain_settings, st.data())
def test_damage_is_detected_and_restore_stops_at_the_last_verified_point(docs, chain, data) -> None:
    records = build(docs, full_every=chain[0], delta_chain_bytes_max=chain[1])
    by_sequence = {0: None} | {n: doc for n, doc in enumerate(docs, start=1)}
    last = len(docs)
    newest_full = max(r.sequence_number for r in records if r.kind == "full")
    victim = data.draw(st.integers(1, last), label="victim")
    damage = data.draw(st.sampled_from(["drop", "checksum", "payload"]), label="damage")
    damaged = []
    for record in records:
        if record.sequence_number != victim:
            damaged.append(record)
        elif damage == "checksum":
            damaged.append(dataclasses.replace(record, checksum=state_checksum("corrupt")))
        elif damage == "payload" and record.kind == "full":
            payload = copy(record.payload)
            payload["state_snapshot"]["__corrupt__"] = 1
            damaged.append(dataclasses.replace(record, payload=payload))
        elif damage == "payload":
            payload = copy(record.payload) + [{"op": "set", "path": ["state_snapshot", "__corrupt__"], "value": 1}]
            damaged.append(dataclasses.replace(record, payload=payload))
    result = restore(damaged)
    assert result.document == by_sequence[result.sequence_number] or same(result.document, by_sequence[result.sequence_number])
    if victim < newest_full:
        assert result.sequence_number == last and result.problem is None  # not on the restore path
    else:
        assert result.sequence_number == victim - 1
        silent = damage == "drop" and victim == last  # a missing newest record is just not written yet
        assert (result.problem is None) == silent, result.problem


def test_a_corrupt_newest_full_falls_back_to_the_previous_full() -> None:
    docs = [{"state_snapshot": {"i": i, "notes": "n" * 200}, "executed_actions": [{"id": n} for n in range(i)],
             "remaining_plan": []} for i in range(10)]
    records = build(docs, full_every=3)
    fulls = [r.sequence_number for r in records if r.kind == "full"]
    assert fulls == [1, 5, 9]
    damaged = [dataclasses.replace(r, checksum="0" * 64) if r.sequence_number == 9 else r for r in records]
    result = restore(damaged)
    assert result.sequence_number == 8 and result.used == [5, 6, 7, 8]
    assert same(result.document, docs[7]) and "full checkpoint 9: checksum mismatch" in result.problem


# --- retention -------------------------------------------------------------------------------

@HISTORIES
@given(histories(steps_max=40), st.integers(1, 5), st.integers(1, 3))
def test_retention_keeps_restore_correct_and_storage_bounded(docs, full_every, keep_full_max) -> None:
    records = build(docs, full_every=full_every, keep_full_max=keep_full_max)
    assert len(records) <= keep_full_max * (full_every + 1)
    assert sum(r.kind == "full" for r in records) <= keep_full_max
    result = restore(records)
    assert result.problem is None and result.sequence_number == len(docs) and same(result.document, docs[-1])


def test_retention_drops_everything_before_the_oldest_kept_full() -> None:
    docs = [{"state_snapshot": {"notes": "n" * 200}, "executed_actions": list(range(i)), "remaining_plan": []}
            for i in range(12)]
    records = build(docs, full_every=3)
    assert [r.sequence_number for r in records if r.kind == "full"] == [1, 5, 9]
    assert retention(records, keep_full_max=2) == [1, 2, 3, 4]
    assert retention(records, keep_full_max=3) == []


# --- size, bounds and sequencing ------------------------------------------------------------

def test_deltas_store_at_least_five_times_fewer_bytes_on_an_append_mostly_state() -> None:
    steps = 200
    plan = [{"step": n, "tool": "search"} for n in range(steps)]
    docs = []
    for step in range(1, steps + 1):
        action = {"id": f"action-{step:04d}", "tool": "web_search", "result": "r" * 140, "ok": True}
        prev_actions = docs[-1]["executed_actions"] if docs else []
        docs.append({"state_snapshot": {"step": step, "tokens_used": 1000 * step},
                     "executed_actions": [*prev_actions, action], "remaining_plan": plan[step:]})
    assert 180 <= len(canonical_json(docs[0]["executed_actions"][0])) <= 220  # ~200-byte actions
    records = build(docs)
    full_bytes = sum(len(canonical_json(doc).encode()) for doc in docs)
    stored_bytes = sum(r.payload_bytes for r in records)
    ratio = full_bytes / stored_bytes
    print(f"\nfull snapshots {full_bytes} B, with deltas {stored_bytes} B, ratio {ratio:.1f}x")
    assert ratio >= 5, ratio
    assert same(restore(records).document, docs[-1])


def test_oversize_checkpoint_is_rejected_naming_the_limit() -> None:
    big = {"state_snapshot": {"blob": "x" * (LIMITS.checkpoint_bytes_max + 1)}, "executed_actions": [], "remaining_plan": []}
    small = {"state_snapshot": {}, "executed_actions": [], "remaining_plan": []}
    first = make_checkpoint(None, 0, small, task_id="t", timestamp_ms=1, full_every=20,
                            delta_chain_bytes_max=LIMITS.delta_chain_bytes_max, chain_deltas_so_far=0, chain_bytes_so_far=0)
    assert validate_new(None, first, LIMITS) is None
    record = make_checkpoint(None, 1, big, task_id="t", timestamp_ms=2, full_every=20,
                             delta_chain_bytes_max=LIMITS.delta_chain_bytes_max, chain_deltas_so_far=0, chain_bytes_so_far=0)
    error = validate_new(first, record, LIMITS)
    assert isinstance(error, InvalidArgument)
    assert f"checkpoint_bytes_max={LIMITS.checkpoint_bytes_max}" in error.message and "checkpoint.payload" in error.message


def test_validate_new_rejects_gaps_bad_bases_and_lies() -> None:
    docs = [{"state_snapshot": {"i": i}, "executed_actions": [], "remaining_plan": []} for i in range(3)]
    records = build(docs[:2])
    third = make_checkpoint(docs[1], 2, docs[2], task_id="t", timestamp_ms=3, full_every=20,
                            delta_chain_bytes_max=LIMITS.delta_chain_bytes_max, chain_deltas_so_far=1, chain_bytes_so_far=0)
    assert validate_new(records[-1], third, LIMITS) is None
    gap = validate_new(records[0], third, LIMITS)
    assert isinstance(gap, FailedPrecondition) and "expects 2, got 3" in gap.message
    first_is_not_one = validate_new(None, third, LIMITS)
    assert isinstance(first_is_not_one, FailedPrecondition)
    first_delta = validate_new(None, dataclasses.replace(third, sequence_number=1, base_sequence=0), LIMITS)
    assert isinstance(first_delta, InvalidArgument) and "base_sequence" in first_delta.message
    wrong_base = validate_new(records[-1], dataclasses.replace(third, base_sequence=1), LIMITS)
    assert isinstance(wrong_base, InvalidArgument) and "base_sequence" in wrong_base.message
    lying_size = validate_new(records[-1], dataclasses.replace(third, payload_bytes=1), LIMITS)
    assert isinstance(lying_size, InvalidArgument) and "payload_bytes" in lying_size.message
    bad_op = validate_new(records[-1], dataclasses.replace(third, payload=[{"op": "nope", "path": []}], payload_bytes=25), LIMITS)
    assert isinstance(bad_op, BadDelta) and bad_op.op_index == 0
    assert CheckpointRecord.from_dict(third.as_dict()) == third


def test_validate_new_enforces_the_chain_bounds_that_keep_retention_bounded() -> None:
    limits = dataclasses.replace(LIMITS, full_every=2)
    docs = [{"state_snapshot": {"i": i, "notes": "n" * 200}, "executed_actions": list(range(i)), "remaining_plan": []}
            for i in range(5)]
    records = build(docs[:3], full_every=20)  # full, delta, delta
    assert [r.kind for r in records] == ["full", "delta", "delta"]
    fourth = make_checkpoint(docs[2], 3, docs[3], task_id="t", timestamp_ms=4, full_every=20,
                             delta_chain_bytes_max=LIMITS.delta_chain_bytes_max, chain_deltas_so_far=2, chain_bytes_so_far=0)
    assert fourth.kind == "delta"
    assert validate_new(records[-1], fourth, limits) is None  # no chain given: not checked
    too_long = validate_new(records[-1], fourth, limits, chain=chain_position(records))
    assert isinstance(too_long, FailedPrecondition) and "full_every=2" in too_long.message
    tight = dataclasses.replace(LIMITS, delta_chain_bytes_max=fourth.payload_bytes)
    too_big = validate_new(records[-1], fourth, tight, chain=chain_position(records))
    assert isinstance(too_big, FailedPrecondition) and f"delta_chain_bytes_max={fourth.payload_bytes}" in too_big.message


def test_validate_new_continues_the_sequence_after_retention_dropped_everything() -> None:
    doc = {"state_snapshot": {}, "executed_actions": [], "remaining_plan": []}
    full = make_checkpoint(None, 7, doc, task_id="t", timestamp_ms=1, full_every=20,
                           delta_chain_bytes_max=LIMITS.delta_chain_bytes_max, chain_deltas_so_far=0, chain_bytes_so_far=0)
    assert full.sequence_number == 8
    assert validate_new(None, full, LIMITS, last_sequence=7) is None
    restart = validate_new(None, dataclasses.replace(full, sequence_number=1), LIMITS, last_sequence=7)
    assert isinstance(restart, FailedPrecondition) and "expects 8, got 1" in restart.message
    delta = validate_new(None, dataclasses.replace(full, kind="delta", base_sequence=7, payload=[], payload_bytes=2),
                         LIMITS, last_sequence=7)
    assert isinstance(delta, InvalidArgument) and "send a full checkpoint" in delta.message


def test_check_record_rejects_wrong_types_naming_the_field() -> None:
    doc = {"state_snapshot": {}, "executed_actions": [], "remaining_plan": []}
    record = make_checkpoint(None, 0, doc, task_id="t", timestamp_ms=1, full_every=20,
                             delta_chain_bytes_max=LIMITS.delta_chain_bytes_max, chain_deltas_so_far=0, chain_bytes_so_far=0)
    check_record(record, LIMITS)
    for change, field_name in [({"sequence_number": True}, "sequence_number"), ({"sequence_number": 0}, "sequence_number"),
                               ({"task_id": ""}, "task_id"), ({"checksum": "ABC"}, "checksum"),
                               ({"timestamp_ms": -1}, "timestamp_ms"), ({"model_versions": {"m": 3}}, "model_versions"),
                               ({"kind": "diff"}, "kind")]:
        with pytest.raises(InvalidArgument, match=f"checkpoint.{field_name}"):
            check_record(dataclasses.replace(record, **change), LIMITS)


@HISTORIES
@given(histories(), st.integers(0, 12), st.integers(0, 3))
def test_recover_gives_the_next_attempt_the_last_document_or_asks_for_a_full(docs, damaged_from_end, extra) -> None:
    records = build(docs)
    last = records[-1].sequence_number
    whole = recover(records)
    assert same(whole.restored.document, docs[-1]) and whole.base_document is whole.restored.document
    assert (whole.sequence_number, whole.last_sequence, whole.problem) == (last, last, None)
    assert same([whole.state_snapshot, whole.executed_actions, whole.remaining_plan],
                [docs[-1][k] for k in ("state_snapshot", "executed_actions", "remaining_plan")])
    assert whole.chain == chain_position(records)
    # Damage one record: the restore stops at the last verified point and the next save must be full.
    position = max(0, len(records) - 1 - damaged_from_end)
    bad = dataclasses.replace(records[position], checksum="0" * 64)
    damaged = recover(records[:position] + [bad] + records[position + 1:])
    if any(r.kind == "full" for r in records[position + 1:]):  # a newer full supersedes the damage
        assert damaged.sequence_number == last and damaged.base_document is not None
        return
    assert damaged.last_sequence == last and damaged.problem
    assert damaged.sequence_number < bad.sequence_number
    if damaged.restored.document is not None:
        assert same(damaged.restored.document, docs[damaged.sequence_number - 1])
    assert damaged.base_document is None
    # Retention dropped everything (task ended, re-queued later): nothing to resume, sequence goes on.
    gone = recover([], last_sequence=last + extra)
    assert gone.base_document is None and gone.last_sequence == last + extra
    assert (gone.problem is None) == (last + extra == 0)


def test_recover_reports_the_model_versions_of_the_restored_sequence() -> None:
    docs = [{"state_snapshot": {"i": i}, "executed_actions": [{"id": i}], "remaining_plan": []} for i in range(3)]
    records, prev = [], None
    for sequence, doc in enumerate(docs, start=1):
        records.append(make_checkpoint(prev, sequence - 1, doc, task_id="t", timestamp_ms=sequence, full_every=20,
                                       delta_chain_bytes_max=LIMITS.delta_chain_bytes_max,
                                       chain_deltas_so_far=sequence - 1, chain_bytes_so_far=0,
                                       model_versions={"planner": f"v{sequence}"}))
        prev = doc
    assert recover(records).model_versions == {"planner": "v3"}
    records[2] = dataclasses.replace(records[2], checksum="f" * 64)
    fallen = recover(records)
    assert fallen.sequence_number == 2 and fallen.model_versions == {"planner": "v2"} and "checkpoint 3" in fallen.problem
    assert checkpoint_id("t", 3) == "t:3"
