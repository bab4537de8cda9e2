"""The audit chain's pure core (coordinator/audit.py): determinism, linking, pruning at heads,
head refusals, snapshots, and a model-based test against the full history. No keys here:
signatures are opaque strings to the chain (tests/test_security_audit.py signs and verifies)."""

from __future__ import annotations

import json

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from coordinator.audit import (
    GENESIS_HASH,
    AuditChain,
    AuditHead,
    AuditLimits,
    AuditRecord,
    head_body,
    record_hash,
    recompute_hash,
    signed_body,
)
from coordinator.errors import InvalidArgument


def _fields(i: int, **over) -> dict:
    fields = dict(index=10 + i, time_ms=1_000 + i, node=f"n{i % 3 + 1}", who=f"user-{i}", roles=("operator",),
                  action="SUBMIT_TASKS", resource=f"task:t-{i}", outcome="ok", digest=f"{i:064x}", sig=f"sig-{i}")
    fields.update(over)
    return fields


def _head(chain: AuditChain, seq: int | None = None, *, hash: str | None = None) -> AuditHead:  # noqa: A002
    seq = chain.last_seq if seq is None else seq
    if hash is None:
        hash = next(r.hash for r in chain.records_from(seq, 1))  # noqa: A001
    return AuditHead(seq, hash, "n1", 5_000 + seq, f"head-sig-{seq}")


def _chain(n: int, limits: AuditLimits | None = None, head_every: int | None = None) -> AuditChain:
    chain = AuditChain(limits)
    for i in range(1, n + 1):
        chain.append(**_fields(i))
        if head_every and i % head_every == 0:
            assert chain.add_head(_head(chain)) is None
    return chain


def _all(chain: AuditChain) -> list[AuditRecord]:
    return chain.records_from(0, len(chain))


# ------------------------------------------------------------------------------ determinism, links
def test_same_appends_give_the_same_chain() -> None:
    a, b = _chain(30, head_every=7), _chain(30, head_every=7)
    assert a.to_rows() == b.to_rows()
    assert a.last_hash == b.last_hash != GENESIS_HASH


def test_records_link_from_genesis_and_hash_their_contents() -> None:
    chain = _chain(5)
    records = _all(chain)
    assert [r.seq for r in records] == [1, 2, 3, 4, 5]
    assert records[0].prev == GENESIS_HASH
    for before, after in zip(records, records[1:]):
        assert after.prev == before.hash
    for r in records:
        assert recompute_hash(r) == r.hash
    assert chain.last_seq == 5 and chain.last_hash == records[-1].hash and chain.anchor is None


@pytest.mark.parametrize("name", [f for f in AuditRecord._fields if f != "hash"])
def test_every_field_changes_the_record_hash(name: str) -> None:
    record = _all(_chain(1))[0]
    value = getattr(record, name)
    changed = value + 1 if isinstance(value, int) else (("other",) if name == "roles" else value + "x")
    assert recompute_hash(record._replace(**{name: changed})) != record.hash


def test_signed_body_is_canonical_and_leaves_out_what_apply_adds() -> None:
    body = dict(node="n1", who="alice", roles=("admin", "ops"), action="CANCEL_DAG", resource="dag:d-1",
                time_ms=123, digest="ab" * 32)
    assert signed_body(**body) == signed_body(**dict(reversed(list(body.items()))))
    assert signed_body(**body).startswith(b"agent-coordinator/audit-record/v1\n")
    for name in body:
        changed = {**body, name: body[name] + 1 if name == "time_ms" else (("x",) if name == "roles" else "x")}
        assert signed_body(**changed) != signed_body(**body), name
    assert b"outcome" not in signed_body(**body) and b"seq" not in signed_body(**body)
    assert head_body(3, "ab" * 32, "n1", 9).startswith(b"agent-coordinator/audit-head/v1\n")
    assert head_body(3, "ab" * 32, "n1", 9) != head_body(4, "ab" * 32, "n1", 9)


def test_record_hash_matches_the_named_function() -> None:
    r = _all(_chain(2))[1]
    assert r.hash == record_hash(r.prev, r.seq, r.index, r.time_ms, r.node, r.who, r.roles, r.action, r.resource,
                                 r.outcome, r.digest, r.sig)


def test_long_fields_are_cut_not_refused() -> None:
    limits = AuditLimits(field_chars_max=100, roles_max=2)
    chain = AuditChain(limits)
    record = chain.append(**_fields(1, who="w" * 10_000, action="a" * 101, resource="r" * 100, outcome="o" * 200,
                                    roles=("x" * 150, "y", "z")))
    assert (len(record.who), len(record.action), len(record.resource), len(record.outcome)) == (100, 100, 100, 100)
    assert record.roles == ("x" * 100, "y")
    assert recompute_hash(record) == record.hash


@pytest.mark.parametrize("name,value", [("index", "7"), ("time_ms", True), ("who", None), ("roles", "admin"),
                                        ("roles", (1,)), ("sig", b"raw")])
def test_a_field_of_the_wrong_type_is_invalid_argument(name: str, value: object) -> None:
    chain = _chain(1)
    with pytest.raises(InvalidArgument, match=f"'{name}'"):
        chain.append(**_fields(2, **{name: value}))
    assert len(chain) == 1 and chain.last_seq == 1


@pytest.mark.parametrize("kwargs,field", [
    ({"records_max": 0}, "records_max"), ({"heads_max": -1}, "heads_max"),
    ({"field_chars_max": 87}, "field_chars_max"), ({"head_every_records": 0}, "head_every_records"),
    ({"records_max": 10, "head_every_records": 11}, "head_every_records"), ({"roles_max": "3"}, "roles_max"),
    ({"heads_max": True}, "heads_max"),
])
def test_limits_are_validated_and_the_message_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidArgument, match=f"AuditLimits.{field}"):
        AuditLimits(**kwargs)


def test_records_from_pages_and_starts_at_the_oldest_retained() -> None:
    chain = _chain(10)
    assert [r.seq for r in chain.records_from(4, 3)] == [4, 5, 6]
    assert [r.seq for r in chain.records_from(9, 100)] == [9, 10]
    assert chain.records_from(11, 5) == [] and chain.records_from(1, 0) == []
    with pytest.raises(InvalidArgument):
        chain.records_from(1, -1)
    pruned = _chain(40, AuditLimits(records_max=10, head_every_records=5), head_every=5)
    first = pruned.records_from(0, 1)[0]
    assert first.seq == pruned.anchor.seq + 1 and pruned.records_from(1, 1) == [first]


# ------------------------------------------------------------------------------ heads
def test_add_head_refuses_unknown_mismatched_and_stale_heads() -> None:
    chain = _chain(10)
    assert "no such retained record" in chain.add_head(_head(chain, 11, hash="0" * 64))
    assert "no such retained record" in chain.add_head(_head(chain, 0, hash=GENESIS_HASH))
    assert "differs from the record's" in chain.add_head(_head(chain, 5, hash="f" * 64))
    assert chain.add_head(_head(chain, 5)) is None
    assert "not newer" in chain.add_head(_head(chain, 5))
    assert "not newer" in chain.add_head(_head(chain, 3))
    assert "an AuditHead" in chain.add_head(("5", "x"))  # type: ignore[arg-type]
    assert "'seq' must be an int" in chain.add_head(AuditHead("7", "x", "n1", 1, "s"))  # type: ignore[arg-type]
    assert "longer than" in chain.add_head(_head(chain, 7)._replace(sig="s" * 10_000))
    assert [h.seq for h in chain.heads] == [5]


def test_only_the_newest_heads_max_heads_are_kept() -> None:
    chain = _chain(10, AuditLimits(heads_max=3), head_every=1)
    assert [h.seq for h in chain.heads] == [8, 9, 10]


# ------------------------------------------------------------------------------ pruning
def test_pruning_bounds_the_chain_and_sets_the_anchor() -> None:
    limits = AuditLimits(records_max=100, head_every_records=10)
    chain = AuditChain(limits)
    for i in range(1, 1001):
        chain.append(**_fields(i))
        assert len(chain) <= limits.records_max + limits.head_every_records
        assert len(chain) <= limits.records_max  # stronger: a head every 10 keeps it within records_max
        if chain.anchor is not None:  # once cutting, it cuts at the oldest head in the window
            assert len(chain) >= limits.records_max - limits.head_every_records
        if i % 10 == 0:
            assert chain.add_head(_head(chain)) is None
    anchor = chain.anchor
    assert anchor is not None and anchor.seq % 10 == 0
    records = _all(chain)
    assert records[0].seq == anchor.seq + 1 and records[0].prev == anchor.hash
    assert records[-1].seq == 1000 == chain.last_seq
    assert all(h.seq > anchor.seq for h in chain.heads)
    assert len(chain) >= limits.records_max - limits.head_every_records


def test_without_a_head_nothing_is_pruned_and_the_first_head_in_the_window_cuts() -> None:
    limits = AuditLimits(records_max=10, head_every_records=5)
    chain = _chain(25, limits)
    assert len(chain) == 25 and chain.anchor is None  # exceeds records_max: no head to cut at
    assert chain.add_head(_head(chain, 20)) is None
    chain.append(**_fields(26))  # window: seq >= 26 - 10 = 16; the head at 20 is the oldest in it
    assert chain.anchor.seq == 20 and [r.seq for r in _all(chain)] == list(range(21, 27))
    assert chain.heads == []


def test_an_old_head_outside_the_window_does_not_cut() -> None:
    chain = _chain(13, AuditLimits(records_max=10, head_every_records=5))  # no heads: nothing cut
    assert chain.add_head(_head(chain, 2)) is None  # a late head, far behind
    chain.append(**_fields(14))
    assert chain.anchor is None and len(chain) == 14  # 2 < 14 - 10: cutting there would keep 12
    assert chain.add_head(_head(chain, 12)) is None
    chain.append(**_fields(15))
    assert chain.anchor.seq == 12 and len(chain) == 3 and chain.heads == []


def test_an_emptied_chain_continues_from_its_anchor() -> None:
    chain = _chain(3, AuditLimits(records_max=1, head_every_records=1))
    assert chain.add_head(_head(chain)) is None  # head at 3; nothing after it yet
    data = chain.to_rows()
    data["records"] = []  # a snapshot taken right after a cut at the newest record
    restored = AuditChain.from_rows({**data, "anchor": _head(chain).row(), "heads": []},
                                    AuditLimits(records_max=1, head_every_records=1))
    assert len(restored) == 0 and restored.last_seq == 3 and restored.last_hash == chain.last_hash
    record = restored.append(**_fields(4))
    assert record.seq == 4 and record.prev == chain.last_hash


# ------------------------------------------------------------------------------ snapshots
def test_snapshot_round_trip_is_exact_and_json_able() -> None:
    limits = AuditLimits(records_max=30, head_every_records=7, heads_max=3)
    chain = _chain(100, limits, head_every=7)
    chain.append(**_fields(101, who="ünïcode ✓", roles=()))
    data = json.loads(json.dumps(chain.to_rows()))
    restored = AuditChain.from_rows(data, limits)
    assert restored.to_rows() == chain.to_rows()
    assert _all(restored) == _all(chain) and restored.heads == chain.heads and restored.anchor == chain.anchor
    assert restored.append(**_fields(102)) == chain.append(**_fields(102))


@pytest.mark.parametrize("damage", ["hash", "outcome", "remove", "swap", "head", "anchor", "shape"])
def test_a_damaged_snapshot_is_refused(damage: str) -> None:
    limits = AuditLimits(records_max=20, head_every_records=5)
    data = _chain(50, limits, head_every=5).to_rows()
    records = data["records"]
    if damage == "hash":
        records[3][-1] = "0" * 64
    elif damage == "outcome":
        records[3][8] = "PERMISSION_DENIED"
    elif damage == "remove":
        del records[3]
    elif damage == "swap":
        records[3], records[4] = records[4], records[3]
    elif damage == "head":
        data["heads"][0][1] = "0" * 64
    elif damage == "anchor":
        data["anchor"][1] = "0" * 64
    else:
        records[3] = records[3][:5]
    with pytest.raises(InvalidArgument, match="audit"):
        AuditChain.from_rows(data, limits)


# ------------------------------------------------------------------------------ model-based
_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)


class ChainMachine(RuleBasedStateMachine):
    """Drives AuditChain with appends, heads (good and bad) and snapshot round trips, against the
    full history kept in a list: the retained records must always be its exact suffix."""

    @initialize(records_max=st.integers(1, 12), head_every=st.integers(1, 12), heads_max=st.integers(1, 4))
    def setup(self, records_max: int, head_every: int, heads_max: int) -> None:
        self.limits = AuditLimits(records_max=records_max, head_every_records=min(head_every, records_max),
                                  heads_max=heads_max, field_chars_max=88)
        self.chain = AuditChain(self.limits)
        self.history: list[AuditRecord] = []
        self.ops: list[tuple[str, object]] = []
        self.head_in_window_at_append = True

    @rule(who=_text, outcome=st.sampled_from(["ok", "NOT_FOUND", "allowed", "denied:UNAUTHENTICATED"]),
          index=st.integers(0, 2**63), time_ms=st.integers(0, 2**53), roles=st.lists(_text, max_size=3))
    def append(self, who: str, outcome: str, index: int, time_ms: int, roles: list[str]) -> None:
        fields = _fields(0, who=who, outcome=outcome, index=index, time_ms=time_ms, roles=tuple(roles))
        last = self.chain.last_seq + 1
        in_window = [h for h in self.chain.heads if h.seq >= last - self.limits.records_max]
        self.head_in_window_at_append = bool(in_window)
        cuts = len(self.chain) + 1 > self.limits.records_max and in_window
        # the cut is at the OLDEST head that leaves <= records_max records: as many kept as fit
        expected_anchor = in_window[0] if cuts else self.chain.anchor
        record = self.chain.append(**fields)
        assert self.chain.anchor == expected_anchor
        assert len(self.chain) == last - (expected_anchor.seq if expected_anchor else 0)
        self.ops.append(("append", fields))
        assert record.seq == len(self.history) + 1
        assert record.prev == (self.history[-1].hash if self.history else GENESIS_HASH)
        self.history.append(record)

    @precondition(lambda self: self.history)
    @rule(back=st.integers(0, 20), good=st.booleans())
    def add_head(self, back: int, good: bool) -> None:
        seq = max(len(self.history) - back, 1)
        record = self.history[seq - 1]
        head = AuditHead(seq, record.hash if good else "e" * 64, "n1", seq, "sig")
        newest = (self.chain.heads[-1:] or [self.chain.anchor])[0]
        retained = seq > len(self.history) - len(self.chain)
        expect_ok = good and retained and (newest is None or seq > newest.seq)
        problem = self.chain.add_head(head)
        assert (problem is None) == expect_ok, problem
        if problem is None:
            self.ops.append(("head", head))

    @rule()
    def snapshot_round_trip(self) -> None:
        data = json.loads(json.dumps(self.chain.to_rows()))
        restored = AuditChain.from_rows(data, self.limits)
        assert restored.to_rows() == self.chain.to_rows()
        self.chain = restored

    @invariant()
    def retained_is_a_linked_suffix_of_the_history(self) -> None:
        records = _all(self.chain)
        assert records == self.history[len(self.history) - len(records):]
        anchor = self.chain.anchor
        if records:
            assert records[0].prev == (anchor.hash if anchor else GENESIS_HASH)
        if anchor is not None:
            assert self.history[anchor.seq - 1].hash == anchor.hash
            assert len(self.history) - len(records) == anchor.seq
        else:
            assert len(records) == len(self.history)

    @invariant()
    def heads_match_retained_records_and_are_bounded(self) -> None:
        heads = self.chain.heads
        assert len(heads) <= self.limits.heads_max
        assert [h.seq for h in heads] == sorted({h.seq for h in heads})
        floor = self.chain.anchor.seq if self.chain.anchor else 0
        for head in heads:
            assert head.seq > floor and self.history[head.seq - 1].hash == head.hash

    @invariant()
    def the_size_bound_holds_whenever_a_head_was_in_the_window(self) -> None:
        if self.head_in_window_at_append:
            assert len(self.chain) <= self.limits.records_max

    def teardown(self) -> None:
        if not hasattr(self, "ops"):
            return
        replayed = AuditChain(self.limits)
        for kind, arg in self.ops:
            if kind == "append":
                replayed.append(**arg)  # type: ignore[arg-type]
            else:
                assert replayed.add_head(arg) is None  # type: ignore[arg-type]
        assert replayed.to_rows() == self.chain.to_rows()  # same operations, same chain


ChainMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
test_chain_against_its_history = ChainMachine.TestCase
