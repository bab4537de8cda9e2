"""Checkpoints as replicated state (SAVE_CHECKPOINT in CoordinatorFSM): fencing, bounds,
retention, expiry after a task ends, snapshot/restore, and a model-based test that drives random
full/delta chains with stale, oversize, out-of-sequence and corrupt saves."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from coordinator import commands as cmd
from coordinator.checkpoints import CheckpointLimits, CheckpointRecord, canonical_json, chain_position, make_checkpoint
from coordinator.commands import encode_entry
from coordinator.fsm import CoordinatorFSM
from coordinator.limits import StateLimits

WINDOW_MS = 10_000


def task_row(task_id: str) -> list:
    return [task_id, "", "echo", "", "null", 50, 0, [], 3, None]


def executor_spec(executor_id: str, capacity: int = 8) -> dict:
    return {"id": executor_id, "name": executor_id, "type": "algorithmic", "task_types": ["echo"], "capacity": capacity,
            "input_schema_json": "null", "output_schema_json": "null", "performance_profile_json": "null",
            "context_window_size": 0, "metadata": None}


def fields_of(record: CheckpointRecord) -> dict:
    return {k: v for k, v in record.as_dict().items() if k != "task_id"}


def doc(i: int, actions: int = 0, blob: str = "") -> dict:
    return {"state_snapshot": {"i": i, "blob": blob, "notes": "n" * 300}, "executed_actions": [{"id": f"a{k}"} for k in range(actions)],
            "remaining_plan": [{"step": k} for k in range(actions, 8)]}


def same(a, b) -> bool:
    return canonical_json(a) == canonical_json(b)


class Harness:
    """A FSM fed through the codec, as the log feeds it; one executor "x" runs the tasks."""

    def __init__(self, limits: CheckpointLimits | None = None, tasks: tuple[str, ...] = ("a",)) -> None:
        self.fsm = CoordinatorFSM(StateLimits(checkpoints=limits or CheckpointLimits()))
        self.index, self.now = 1, 1_000
        self.log: list[tuple[int, bytes]] = []
        self.run(cmd.register_executor(self.now, executor_spec("x")))
        self.run(cmd.submit_tasks(self.now, [task_row(t) for t in tasks], None))
        # the agent's side: what it saved last, per task
        self.prev: dict[str, tuple[dict | None, int]] = {t: (None, 0) for t in tasks}

    def run(self, command: dict):
        self.index += 1
        self.now += 1
        if "now" in command:
            command["now"] = self.now
        payload = encode_entry([command])
        self.log.append((self.index, payload))
        return self.fsm.apply_entry(self.index, payload)[0]

    def lease(self, task_id: str) -> int:
        attempt = self.fsm.tasks[task_id].attempt + 1
        assert self.run(cmd.assign_tasks(0, 60_000, [[task_id, "x", attempt]])).value["assigned"] == [task_id]
        assert self.run(cmd.start_task(0, task_id, attempt, "x")).ok
        return attempt

    def record(self, task_id: str, document: dict, *, full: bool = False, models: dict | None = None) -> CheckpointRecord:
        prev_doc, prev_seq = self.prev[task_id]
        limits = self.fsm.limits.checkpoints
        deltas, delta_bytes = chain_position(self.fsm.checkpoints_of(task_id))
        return make_checkpoint(None if full else prev_doc, prev_seq, document, task_id=task_id, timestamp_ms=self.now,
                               full_every=limits.full_every, delta_chain_bytes_max=limits.delta_chain_bytes_max,
                               chain_deltas_so_far=deltas, chain_bytes_so_far=delta_bytes, model_versions=models)

    def save(self, task_id: str, record: CheckpointRecord, *, attempt: int | None = None, executor: str = "x"):
        attempt = self.fsm.tasks[task_id].attempt if attempt is None else attempt
        result = self.run(cmd.save_checkpoint(0, task_id, attempt, executor, fields_of(record)))
        return result

    def checkpoint(self, task_id: str, document: dict, **kwargs):
        result = self.save(task_id, self.record(task_id, document, **kwargs))
        if result.ok:
            self.prev[task_id] = (document, result.value["sequence_number"])
        return result

    def tick(self, ms: int):
        """A command carrying `now` that changes nothing else (time jumps by `ms`)."""
        self.now += ms - 1
        return self.run(cmd.mark_unschedulable(0, []))


# --------------------------------------------------------------------------- unit tests
def test_save_then_recover_returns_the_last_document_with_its_model_versions() -> None:
    h = Harness()
    h.lease("a")
    first = h.checkpoint("a", doc(0), models={"planner": "m1"})
    assert first.ok and first.value == {"id": "a:1", "sequence_number": 1, "index": h.index, "duplicate": False}
    second = h.checkpoint("a", doc(1, actions=2), models={"planner": "m2"})
    assert second.ok and second.value["id"] == "a:2"
    assert [r.kind for r in h.fsm.checkpoints_of("a")] == ["full", "delta"]
    recovery = h.fsm.recover_task("a")
    assert same(recovery.restored.document, doc(1, actions=2)) and recovery.problem is None
    assert recovery.executed_actions == [{"id": "a0"}, {"id": "a1"}] and recovery.model_versions == {"planner": "m2"}
    assert (recovery.sequence_number, recovery.last_sequence) == (2, 2)
    assert h.fsm.tasks["a"].checkpoint_sequence == 2
    saved = [json.loads(e[6]) for e in h.fsm.events_from(1, 1000) if e[2] == "CheckpointSaved"]
    assert saved[-1] == {"attempt": 1, "sequence_number": 2, "kind": "delta",
                         "payload_bytes": h.fsm.checkpoints_of("a")[-1].payload_bytes}
    assert h.fsm.checkpoint_bytes == sum(r.payload_bytes for r in h.fsm.checkpoints_of("a"))
    assert h.fsm.recover_task("nobody").restored.document is None


def test_only_the_current_lease_holder_may_checkpoint() -> None:
    h = Harness(tasks=("a", "b"))
    record = h.record("a", doc(0))
    pending = h.save("a", record, attempt=0)
    assert pending.code == "FAILED_PRECONDITION" and pending.message.startswith("StaleFencingToken:")
    h.lease("a")
    assert h.checkpoint("a", doc(0)).ok
    h.run(cmd.executor_lost(0, "x", "gone"))  # attempt 1 is over; the task goes back to the queue
    h.run(cmd.register_executor(0, executor_spec("x")))
    assert h.lease("a") == 2
    stale = h.save("a", h.record("a", doc(1)), attempt=1)
    assert stale.code == "FAILED_PRECONDITION" and "StaleFencingToken" in stale.message
    other = h.save("a", h.record("a", doc(1)), executor="y")
    assert other.code == "FAILED_PRECONDITION" and "StaleFencingToken" in other.message
    missing = h.run(cmd.save_checkpoint(0, "zzz", 1, "x", fields_of(record)))
    assert missing.code == "NOT_FOUND"
    # the new attempt resumes from the checkpoint of the lost one
    assert same(h.fsm.recover_task("a").restored.document, doc(0))
    assert h.checkpoint("a", doc(1)).ok and h.fsm.checkpoints_of("a")[-1].sequence_number == 2


def test_rejected_saves_leave_the_previous_checkpoint_valid() -> None:
    limits = CheckpointLimits(checkpoint_bytes_max=2048)
    h = Harness(limits)
    h.lease("a")
    assert h.checkpoint("a", doc(0)).ok
    before = h.fsm.checkpoints_of("a")
    oversize = h.checkpoint("a", doc(1, blob="x" * 3000), full=True)
    assert oversize.code == "INVALID_ARGUMENT" and "checkpoint_bytes_max=2048" in oversize.message
    gap = h.save("a", dataclasses.replace(h.record("a", doc(1)), sequence_number=5, base_sequence=4))
    assert gap.code == "FAILED_PRECONDITION" and "expects 2, got 5" in gap.message
    lie = h.save("a", dataclasses.replace(h.record("a", doc(1), full=True), checksum="0" * 64))
    assert lie.code == "INVALID_ARGUMENT" and "checkpoint.checksum" in lie.message
    bad_fields = h.run(cmd.save_checkpoint(0, "a", 1, "x", {"sequence_number": 2}))
    assert bad_fields.code == "INVALID_ARGUMENT"
    assert h.fsm.checkpoints_of("a") == before and same(h.fsm.recover_task("a").restored.document, doc(0))
    assert h.fsm.tasks["a"].checkpoint_sequence == 1


def test_a_retried_save_is_a_duplicate_not_an_error() -> None:
    h = Harness()
    h.lease("a")
    record = h.record("a", doc(0))
    assert h.save("a", record).value["duplicate"] is False
    again = h.save("a", dataclasses.replace(record, timestamp_ms=record.timestamp_ms + 50))
    assert again.ok and again.value["duplicate"] is True and again.value["id"] == "a:1"
    assert len(h.fsm.checkpoints_of("a")) == 1
    different = h.save("a", dataclasses.replace(record, model_versions={"planner": "m9"}))
    assert different.code == "FAILED_PRECONDITION" and "expects 2, got 1" in different.message


def test_the_store_bound_rejects_with_resource_exhausted_and_keeps_the_previous_checkpoint() -> None:
    one = len(canonical_json(doc(0, blob="x" * 900)).encode())
    limits = CheckpointLimits(checkpoint_store_bytes_max=2 * one + 10, keep_full_max=1)
    h = Harness(limits, tasks=("a", "b", "c"))
    for task in ("a", "b", "c"):
        h.lease(task)
    assert h.checkpoint("a", doc(0, blob="x" * 900)).ok
    assert h.checkpoint("b", doc(0, blob="x" * 900)).ok
    full = h.checkpoint("c", doc(0, blob="x" * 900))
    assert full.code == "RESOURCE_EXHAUSTED" and f"checkpoint_store_bytes_max={2 * one + 10}" in full.message
    assert h.fsm.checkpoints_of("c") == [] and h.fsm.checkpoint_bytes == 2 * one
    assert same(h.fsm.recover_task("b").restored.document, doc(0, blob="x" * 900))
    # a new full of "a" drops a's old one (keep_full_max=1), so the net total fits
    replaced = h.checkpoint("a", doc(1, blob="y" * 900), full=True)
    assert replaced.ok and [r.sequence_number for r in h.fsm.checkpoints_of("a")] == [2]
    assert h.fsm.checkpoint_bytes == sum(r.payload_bytes for t in "abc" for r in h.fsm.checkpoints_of(t))


def test_thousands_of_checkpoints_keep_storage_bounded() -> None:
    limits = CheckpointLimits(full_every=5, keep_full_max=2, delta_chain_bytes_max=4096)
    tasks = ("a", "b", "c")
    h = Harness(limits, tasks=tasks)
    for task in tasks:
        h.lease(task)
    documents = {t: doc(0) for t in tasks}
    peak_bytes = 0
    for step in range(3000):
        task = tasks[step % 3]
        document = json.loads(json.dumps(documents[task]))
        document["executed_actions"].append({"id": f"s{step}", "out": "o" * (step % 50)})
        document["executed_actions"] = document["executed_actions"][-30:]
        document["state_snapshot"]["i"] = step
        assert h.checkpoint(task, document).ok
        documents[task] = document
        held = h.fsm.checkpoints_of(task)
        assert len(held) <= limits.keep_full_max * (limits.full_every + 1)
        peak_bytes = max(peak_bytes, h.fsm.checkpoint_bytes)
    assert h.fsm.tasks["a"].checkpoint_sequence == 1000
    per_task_max = limits.keep_full_max * (limits.checkpoint_bytes_max + limits.delta_chain_bytes_max)
    assert peak_bytes <= len(tasks) * per_task_max
    sizes = sum(len(canonical_json(documents[t])) for t in tasks)
    assert h.fsm.checkpoint_bytes < 3 * limits.keep_full_max * sizes + 3 * limits.keep_full_max * 4096
    for task in tasks:
        assert same(h.fsm.recover_task(task).restored.document, documents[task])
    assert h.fsm.checkpoint_bytes == sum(r.payload_bytes for t in tasks for r in h.fsm.checkpoints_of(t))


def test_checkpoints_are_dropped_a_window_after_the_task_ends_even_when_now_jumps() -> None:
    h = Harness(CheckpointLimits(checkpoint_retention_after_final_ms=WINDOW_MS), tasks=("a", "b"))
    h.lease("a")
    h.lease("b")
    assert h.checkpoint("a", doc(0)).ok and h.checkpoint("b", doc(0)).ok
    assert h.run(cmd.complete_task(0, "a", 1, "x", "{}")).ok
    ended = h.now
    h.tick(WINDOW_MS - 5)
    assert h.fsm.checkpoints_of("a")
    h.tick(3 * WINDOW_MS)  # one jump well past the window
    assert h.fsm.checkpoints_of("a") == [] and h.fsm.checkpoints_of("b")
    assert h.fsm.checkpoint_bytes == sum(r.payload_bytes for r in h.fsm.checkpoints_of("b"))
    expired = [json.loads(e[6]) for e in h.fsm.events_from(1, 1000) if e[2] == "CheckpointsExpired"]
    assert expired == [{"sequence_number": 1, "records": 1, "final_at_ms": ended}]
    assert h.fsm.recover_task("a").last_sequence == 1


def test_requeue_within_the_window_keeps_checkpoints_and_the_sequence_goes_on() -> None:
    h = Harness(CheckpointLimits(checkpoint_retention_after_final_ms=WINDOW_MS))
    h.lease("a")
    assert h.checkpoint("a", doc(0)).ok and h.checkpoint("a", doc(1, actions=1)).ok
    assert h.run(cmd.fail_task(0, "a", 1, "x", "bad input", False, 0)).value["status"] == "failed"
    first_end = h.now
    h.tick(WINDOW_MS // 2)
    assert h.run(cmd.requeue_task(0, "a", 1)).ok
    h.lease("a")
    recovery = h.fsm.recover_task("a")
    assert same(recovery.base_document, doc(1, actions=1)) and recovery.last_sequence == 2
    assert h.checkpoint("a", doc(2, actions=2)).value["sequence_number"] == 3
    assert h.run(cmd.fail_task(0, "a", 2, "x", "bad again", False, 0)).ok
    second_end = h.now
    restored = CoordinatorFSM(h.fsm.limits)  # the expiry index must be rebuilt alike
    restored.restore(h.fsm.snapshot())

    def tick_both(ms: int) -> None:
        h.tick(ms)
        restored.apply(h.index, {"t": cmd.CommandType.MARK_UNSCHEDULABLE, "now": h.now, "items": []})

    tick_both(first_end + WINDOW_MS + 1 - h.now)  # the first end's window is over, not the second's
    assert len(h.fsm.checkpoints_of("a")) == 3 and len(restored.checkpoints_of("a")) == 3
    tick_both(second_end + WINDOW_MS - 1 - h.now)
    assert len(h.fsm.checkpoints_of("a")) == 3 and len(restored.checkpoints_of("a")) == 3
    tick_both(1)
    assert h.fsm.checkpoints_of("a") == [] and restored.checkpoints_of("a") == []
    assert restored.state_hash() == h.fsm.state_hash()
    # re-queued after the window: nothing to resume, and the next checkpoint is a full at 4
    assert h.run(cmd.requeue_task(0, "a", 1)).ok
    h.lease("a")
    h.prev["a"] = (None, h.fsm.recover_task("a").last_sequence)
    result = h.checkpoint("a", doc(3))
    assert result.value["sequence_number"] == 4 and h.fsm.checkpoints_of("a")[0].kind == "full"


def test_snapshot_keeps_checkpoints_byte_identical() -> None:
    h = Harness(tasks=("a", "b"))
    h.lease("a")
    h.lease("b")
    for i in range(30):
        assert h.checkpoint("a" if i % 3 else "b", doc(i, actions=i % 8, blob="é\u2028\n" * i)).ok
    other = CoordinatorFSM(h.fsm.limits)
    other.restore(h.fsm.snapshot())
    assert other.state_hash() == h.fsm.state_hash() and other.semantic_digest() == h.fsm.semantic_digest()
    for task in ("a", "b"):
        assert other.checkpoints_of(task) == h.fsm.checkpoints_of(task)
    assert other.checkpoint_bytes == h.fsm.checkpoint_bytes
    # and the digests see checkpoints: one more save changes both
    digest, state = h.fsm.semantic_digest(), h.fsm.state_hash()
    assert h.checkpoint("a", doc(99)).ok
    assert h.fsm.semantic_digest() != digest and h.fsm.state_hash() != state


def test_a_version_3_snapshot_still_restores() -> None:
    """A v3 snapshot has no checkpoints section and shorter task rows."""
    h = Harness(tasks=("a", "b"))
    h.lease("a")
    v4 = h.fsm.snapshot().split(b"\n")
    cut = next(i for i, chunk in enumerate(v4) if chunk.startswith(b'{"section":"checkpoints"'))
    v3 = v4[:cut]
    tasks_at = next(i for i, chunk in enumerate(v3) if chunk.startswith(b'{"section":"tasks"'))
    rows = json.loads(v3[tasks_at + 1])
    v3[tasks_at + 1] = json.dumps([row[:24] for row in rows], separators=(",", ":"), ensure_ascii=False).encode()
    fsm = CoordinatorFSM()
    fsm.restore(b"\n".join(v3))
    assert fsm.state_hash() == h.fsm.state_hash() and fsm.tasks["a"].checkpoint_sequence == 0
    assert fsm.checkpoints_of("a") == []


# --------------------------------------------------------------------------- model-based test
TASKS = ("a", "b", "c")
LIMITS = CheckpointLimits(checkpoint_bytes_max=1500, full_every=3, delta_chain_bytes_max=600, keep_full_max=2,
                          checkpoint_store_bytes_max=5000, checkpoint_retention_after_final_ms=WINDOW_MS)


class CheckpointChains(RuleBasedStateMachine):
    """An agent per task saves random documents; the model remembers every document it meant to
    save, which of its saves were corrupted, and when the task ended. After every step the FSM's
    recovery must equal the model's expectation: the newest document, or — after a corrupt delta —
    the last one before it, never unverified state."""

    @initialize()
    def setup(self) -> None:
        self.h = Harness(LIMITS, tasks=TASKS)
        self.docs: dict[str, dict[int, dict]] = {t: {} for t in TASKS}  # seq -> the document meant
        self.bad: dict[str, set[int]] = {t: set() for t in TASKS}  # seqs saved corrupted
        self.agent: dict[str, dict | None] = {t: doc(0) for t in TASKS}
        self.final_at: dict[str, int | None] = {t: None for t in TASKS}
        for task_id in TASKS:
            self.h.lease(task_id)

    def leased(self, task_id: str) -> bool:
        return self.h.fsm.tasks[task_id].status in ("assigned", "executing")

    def next_document(self, task_id: str, data) -> dict:
        base = json.loads(json.dumps(self.agent[task_id] or doc(0)))
        change = data.draw(st.sampled_from(["act", "plan", "state", "rewrite"]))
        if change == "act":
            base["executed_actions"].append({"id": f"a{len(base['executed_actions'])}", "n": data.draw(st.integers(0, 9))})
            base["executed_actions"] = base["executed_actions"][-12:]
        elif change == "plan" and base["remaining_plan"]:
            base["remaining_plan"].pop(0)
        elif change == "state":
            base["state_snapshot"][data.draw(st.sampled_from("xyz"))] = data.draw(st.integers() | st.text(max_size=20))
        else:
            base["remaining_plan"] = [{"step": s} for s in range(data.draw(st.integers(0, 6)))]
        return base

    @rule(task_id=st.sampled_from(TASKS))
    def lease(self, task_id) -> None:
        if self.h.fsm.tasks[task_id].status in ("failed", "dead_letter"):
            assert self.h.run(cmd.requeue_task(0, task_id, 1)).ok
            self.final_at[task_id] = None
        if task_id in self.h.fsm.ready:
            self.h.lease(task_id)
            # a new attempt resumes from what the coordinator holds, as a real agent would
            recovery = self.h.fsm.recover_task(task_id)
            self.agent[task_id] = recovery.restored.document
            self.h.prev[task_id] = (recovery.base_document, recovery.last_sequence)

    @rule(task_id=st.sampled_from(TASKS), data=st.data(), count=st.integers(1, 5))
    def save(self, task_id, data, count) -> None:
        for _ in range(count):
            if self.leased(task_id):
                self.save_one(task_id, data, data.draw(st.sampled_from([None] * 6 + ["checksum", "ops"])))

    def save_one(self, task_id, data, corrupt) -> None:
        document = self.next_document(task_id, data)
        record = self.h.record(task_id, document, full=data.draw(st.integers(0, 7)) == 0)
        if corrupt == "checksum":
            record = dataclasses.replace(record, checksum=hashlib.sha256(record.checksum.encode()).hexdigest())
        elif corrupt == "ops" and record.kind == "delta":
            ops = record.payload + [{"op": "set", "path": ["state_snapshot", "corrupt"], "value": True}]
            record = dataclasses.replace(record, payload=ops, payload_bytes=len(canonical_json(ops).encode()))
        else:
            corrupt = None if corrupt == "ops" else corrupt
        before = self.h.fsm.checkpoints_of(task_id)
        result = self.h.save(task_id, record)
        event(f"save {record.kind}{' ' + corrupt if corrupt else ''}: {result.code or 'ok'}")
        if corrupt == "checksum" and record.kind == "full":
            assert result.code == "INVALID_ARGUMENT"  # a full is verified on write
        if not result.ok:
            assert result.code in ("INVALID_ARGUMENT", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED"), result
            assert self.h.fsm.checkpoints_of(task_id) == before
            return
        sequence = result.value["sequence_number"]
        self.docs[task_id][sequence] = document
        if corrupt:
            self.bad[task_id].add(sequence)
        self.agent[task_id] = document
        self.h.prev[task_id] = (document, sequence)

    @rule(task_id=st.sampled_from(TASKS), size=st.sampled_from([1600, 5000]))
    def save_oversize(self, task_id, size) -> None:
        if not self.leased(task_id):
            return
        before = self.h.fsm.checkpoints_of(task_id)
        result = self.h.save(task_id, self.h.record(task_id, doc(0, blob="z" * size), full=True))
        assert result.code == "INVALID_ARGUMENT" and "checkpoint_bytes_max=1500" in result.message
        assert self.h.fsm.checkpoints_of(task_id) == before

    @rule(task_id=st.sampled_from(TASKS), data=st.data())
    def save_stale(self, task_id, data) -> None:
        task = self.h.fsm.tasks[task_id]
        record = self.h.record(task_id, self.next_document(task_id, data))
        attempt = task.attempt - 1 if self.leased(task_id) else task.attempt
        before = self.h.fsm.checkpoints_of(task_id)
        result = self.h.save(task_id, record, attempt=attempt)
        assert result.code == "FAILED_PRECONDITION" and "StaleFencingToken" in result.message
        assert self.h.fsm.checkpoints_of(task_id) == before

    @rule(task_id=st.sampled_from(TASKS), skip=st.integers(1, 3))
    def save_out_of_sequence(self, task_id, skip) -> None:
        if not self.leased(task_id):
            return
        record = self.h.record(task_id, doc(1), full=True)
        result = self.h.save(task_id, dataclasses.replace(record, sequence_number=record.sequence_number + skip))
        assert result.code == "FAILED_PRECONDITION" and "checkpoint.sequence_number" in result.message

    @rule(task_id=st.sampled_from(TASKS), how=st.sampled_from(["complete", "fail", "lost"]))
    def end_attempt(self, task_id, how) -> None:
        task = self.h.fsm.tasks[task_id]
        if not self.leased(task_id):
            return
        if how == "complete":
            assert self.h.run(cmd.complete_task(0, task_id, task.attempt, "x", "{}")).ok
        elif how == "fail":
            assert self.h.run(cmd.fail_task(0, task_id, task.attempt, "x", "no", False, 0)).ok
        else:
            self.h.run(cmd.executor_lost(0, "x", "gone"))
            self.h.run(cmd.register_executor(0, executor_spec("x")))
            for other in TASKS:
                if self.h.fsm.tasks[other].status in ("completed", "failed", "dead_letter") and self.final_at[other] is None:
                    self.final_at[other] = self.h.now - 1  # ran out of attempts when lost
        for other in TASKS:
            if self.h.fsm.tasks[other].status in ("completed", "failed", "dead_letter") and self.final_at[other] is None:
                self.final_at[other] = self.h.now
        self.agent[task_id] = None
        event(f"attempt ends: {how}")

    @rule(ms=st.sampled_from([1, 100, WINDOW_MS // 2, WINDOW_MS, 5 * WINDOW_MS]))
    def time_passes(self, ms) -> None:
        self.h.tick(ms)
        event("time passes")

    @precondition(lambda self: len(self.h.log) > 3)
    @rule()
    def snapshot_restore(self) -> None:
        restored = CoordinatorFSM(self.h.fsm.limits)
        restored.restore(self.h.fsm.snapshot())
        assert restored.state_hash() == self.h.fsm.state_hash()
        for task_id in TASKS:
            assert restored.checkpoints_of(task_id) == self.h.fsm.checkpoints_of(task_id)
        assert restored.checkpoint_bytes == self.h.fsm.checkpoint_bytes
        self.h.fsm = restored

    @invariant()
    def recovery_matches_the_model(self) -> None:
        fsm = self.h.fsm
        for task_id in TASKS:
            held = fsm.checkpoints_of(task_id)
            last = fsm.tasks[task_id].checkpoint_sequence
            assert last == max(self.docs[task_id], default=0)
            final_at = self.final_at[task_id]
            if final_at is not None and final_at + WINDOW_MS <= self.h.now:
                assert held == [], f"{task_id} ended at {final_at}, now {self.h.now}"
                if self.docs[task_id]:
                    event("checkpoints expired")
            recovery = fsm.recover_task(task_id)
            if not held:
                assert recovery.restored.document is None and recovery.last_sequence == last
                continue
            assert held[-1].sequence_number == last
            newest_full = max(r.sequence_number for r in held if r.kind == "full")
            expected = newest_full
            while expected + 1 <= last and expected + 1 not in self.bad[task_id]:
                expected += 1
            assert recovery.sequence_number == expected, (recovery, self.bad[task_id])
            assert same(recovery.restored.document, self.docs[task_id][expected])
            assert (recovery.problem is None) == (expected == last)
            if expected != last:
                event("recovery fell back")
            assert len(held) <= LIMITS.keep_full_max * (LIMITS.full_every + 1)
        assert fsm.checkpoint_bytes == sum(r.payload_bytes for t in TASKS for r in fsm.checkpoints_of(t))
        assert fsm.checkpoint_bytes <= LIMITS.checkpoint_store_bytes_max

    def teardown(self) -> None:
        if not hasattr(self, "h"):
            return
        replica = CoordinatorFSM(self.h.fsm.limits)  # replaying the log gives the same state
        for index, payload in self.h.log:
            replica.apply_entry(index, payload)
        assert replica.state_hash() == self.h.fsm.state_hash()


TestCheckpointChains = CheckpointChains.TestCase
TestCheckpointChains.settings = settings(max_examples=120, stateful_step_count=50, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("keep_full_max", [1, 3])
def test_retention_keeps_only_the_newest_fulls(keep_full_max: int) -> None:
    h = Harness(CheckpointLimits(keep_full_max=keep_full_max, full_every=2))
    h.lease("a")
    for i in range(20):
        assert h.checkpoint("a", doc(i, actions=i % 8, blob="b" * 300)).ok
    held = h.fsm.checkpoints_of("a")
    assert sum(r.kind == "full" for r in held) == keep_full_max and held[0].kind == "full"
    assert [r.sequence_number for r in held] == list(range(held[0].sequence_number, 21))


def test_a_client_that_never_sends_a_full_is_stopped_at_full_every() -> None:
    limits = CheckpointLimits(full_every=3)
    h = Harness(limits)
    h.lease("a")
    assert h.checkpoint("a", doc(0)).ok
    for i in range(1, 4):
        assert h.checkpoint("a", doc(i)).value["sequence_number"] == i + 1
    prev_doc, prev_seq = h.prev["a"]
    sneaky = make_checkpoint(prev_doc, prev_seq, doc(4), task_id="a", timestamp_ms=h.now, full_every=99,
                             delta_chain_bytes_max=limits.delta_chain_bytes_max, chain_deltas_so_far=0,
                             chain_bytes_so_far=0)
    assert sneaky.kind == "delta"
    refused = h.save("a", sneaky)
    assert refused.code == "FAILED_PRECONDITION" and "full_every=3" in refused.message
    assert h.checkpoint("a", doc(4)).ok and h.fsm.checkpoints_of("a")[-1].kind == "full"


def test_the_next_assignment_records_whether_the_attempt_resumes_or_restarts_from_scratch() -> None:
    h = Harness()
    h.run(cmd.register_executor(0, {**executor_spec("resumer"), "resumable": True}))
    h.run(cmd.register_executor(0, executor_spec("plain")))          # declares nothing: cannot resume

    def assigned_data() -> dict:
        return [json.loads(e[6]) for e in h.fsm.events_from(1, 10_000) if e[2] == "TaskAssigned"][-1]

    h.lease("a")
    assert "resume_from_sequence" not in assigned_data()                # no checkpoint yet: nothing to say
    assert h.checkpoint("a", doc(0)).ok and h.checkpoint("a", doc(1, actions=1)).ok
    assert h.run(cmd.executor_lost(0, "x", "test")).ok
    assert h.run(cmd.assign_tasks(0, 60_000, [["a", "plain", 2]])).value["assigned"] == ["a"]
    assert assigned_data() == {"attempt": 2, "lease_expires_ms": h.now + 60_000,
                               "restart_from_scratch": "executor plain is not resumable"}
    assert h.run(cmd.fail_task(0, "a", 2, "plain", "transient", True, 0)).value["status"] == "pending"
    assert h.run(cmd.assign_tasks(0, 60_000, [["a", "resumer", 3]])).value["assigned"] == ["a"]
    assert assigned_data() == {"attempt": 3, "lease_expires_ms": h.now + 60_000, "resume_from_sequence": 2}
    assert h.fsm.executors["resumer"].resumable and not h.fsm.executors["plain"].resumable
