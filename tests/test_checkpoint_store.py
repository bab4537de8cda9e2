"""CheckpointStore (wal/checkpoint_store.py) over a one-node log applying to a real
CoordinatorFSM, and the proposer-side build_checkpoint_command."""

from __future__ import annotations

import json

import pytest

from coordinator import commands as cmd
from coordinator.checkpoints import CheckpointLimits, canonical_json, make_checkpoint
from coordinator.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    StaleFencingToken,
)
from coordinator.fsm import CoordinatorFSM
from coordinator.limits import StateLimits
from coordinator.validation import build_checkpoint_command
from wal.checkpoint_store import CheckpointStore, InMemoryCommandLog

LIMITS = CheckpointLimits(checkpoint_bytes_max=4096, checkpoint_store_bytes_max=6000)


def document(step: int, blob: str = "") -> dict:
    return {"state_snapshot": {"step": step, "blob": blob, "notes": "n" * 200},
            "executed_actions": [{"id": f"a{k}", "ok": True} for k in range(step)],
            "remaining_plan": [{"tool": "search", "n": k} for k in range(step, 6)]}


class Clock:
    def __init__(self) -> None:
        self.ms = 1_800_000_000_000

    def __call__(self) -> int:
        self.ms += 7
        return self.ms


class Agent:
    """What an executor does: keeps its last document and makes the next record."""

    def __init__(self, task_id: str, attempt: int = 1, executor_id: str = "x") -> None:
        self.task_id, self.attempt, self.executor_id = task_id, attempt, executor_id
        self.prev: dict | None = None
        self.sequence = 0
        self.chain = (0, 0)

    def request(self, doc: dict, **extra) -> dict:
        record = make_checkpoint(self.prev, self.sequence, doc, task_id=self.task_id, timestamp_ms=0,
                                 full_every=LIMITS.full_every, delta_chain_bytes_max=LIMITS.delta_chain_bytes_max,
                                 chain_deltas_so_far=self.chain[0], chain_bytes_so_far=self.chain[1],
                                 model_versions={"planner": "p-7"})
        fields = {k: v for k, v in record.as_dict().items() if k not in ("task_id", "timestamp_ms")}
        return {"task_id": self.task_id, "attempt": self.attempt, "executor_id": self.executor_id, **fields, **extra}

    def saved(self, request: dict, doc: dict) -> None:
        self.prev, self.sequence = doc, request["sequence_number"]
        self.chain = (0, 0) if request["kind"] == "full" else (self.chain[0] + 1, self.chain[1] + request["payload_bytes"])


@pytest.fixture
def node():
    fsm = CoordinatorFSM(StateLimits(checkpoints=LIMITS))
    log = InMemoryCommandLog(fsm)
    clock = Clock()
    store = CheckpointStore(log, fsm, clock, LIMITS)
    return fsm, log, clock, store


async def lease(log: InMemoryCommandLog, clock: Clock, *task_ids: str, executor_id: str = "x") -> None:
    spec = {"id": executor_id, "name": executor_id, "type": "algorithmic", "task_types": [], "capacity": 8,
            "input_schema_json": "null", "output_schema_json": "null", "performance_profile_json": "null",
            "context_window_size": 0, "metadata": None}
    assert (await log.propose(cmd.register_executor(clock(), spec))).ok
    rows = [[t, "", "echo", "", "null", 50, 0, [], 3, None] for t in task_ids]
    assert (await log.propose(cmd.submit_tasks(clock(), rows, None))).ok
    items = [[t, executor_id, log.fsm.tasks[t].attempt + 1] for t in task_ids]
    assert (await log.propose(cmd.assign_tasks(clock(), 60_000, items))).value["assigned"] == list(task_ids)


async def test_create_then_restore_round_trip(node) -> None:
    fsm, log, clock, store = node
    await lease(log, clock, "t1")
    agent = Agent("t1")
    for step in range(5):
        doc = document(step)
        request = agent.request(doc)
        saved = await store.create_checkpoint(request)
        assert saved.id == f"t1:{step + 1}" and saved.sequence_number == step + 1 and not saved.duplicate
        assert saved.index == log.index  # acknowledged only once its entry was applied
        agent.saved(request, doc)
    assert [r.kind for r in fsm.checkpoints_of("t1")] == ["full"] + ["delta"] * 4
    assert fsm.checkpoints_of("t1")[-1].timestamp_ms == clock.ms  # the coordinator's time
    recovery = await store.restore_from_checkpoint("t1")
    assert canonical_json(recovery.restored.document) == canonical_json(document(4))
    assert recovery.remaining_plan == document(4)["remaining_plan"] and recovery.model_versions == {"planner": "p-7"}
    assert recovery.base_document is not None and recovery.last_sequence == 5
    before = log.index
    again = await store.restore_from_checkpoint("t1", linearizable=True)
    assert log.index == before + 1 and again == recovery  # a barrier was committed first


async def test_a_retry_after_an_unknown_outcome_is_a_duplicate(node) -> None:
    fsm, log, clock, store = node
    await lease(log, clock, "t1")
    request = Agent("t1").request(document(0))
    first = await store.create_checkpoint(request)
    retry = await store.create_checkpoint(request)
    assert retry.duplicate and retry.id == first.id and len(fsm.checkpoints_of("t1")) == 1


async def test_errors_are_typed(node) -> None:
    fsm, log, clock, store = node
    await lease(log, clock, "t1", "t2")
    agent = Agent("t1")
    with pytest.raises(StaleFencingToken):
        await store.create_checkpoint(agent.request(document(0), attempt=2))
    with pytest.raises(StaleFencingToken):
        await store.create_checkpoint(agent.request(document(0), executor_id="someone-else"))
    with pytest.raises(NotFound):
        await store.create_checkpoint(Agent("nope").request(document(0)))
    with pytest.raises(FailedPrecondition, match="expects 1, got 2"):
        await store.create_checkpoint(agent.request(document(0), sequence_number=2))
    entries = len(log.entries)
    with pytest.raises(InvalidArgument, match="checkpoint_bytes_max=4096"):
        await store.create_checkpoint(agent.request(document(0, blob="b" * 5000)))
    assert len(log.entries) == entries  # refused before proposing
    assert fsm.checkpoints_of("t1") == []


async def test_the_store_bound_keeps_the_previous_checkpoint(node) -> None:
    fsm, log, clock, store = node
    await lease(log, clock, "t1", "t2")
    a, b = Agent("t1"), Agent("t2")
    doc_a = document(1, blob="a" * 2500)
    request = a.request(doc_a)
    await store.create_checkpoint(request)
    a.saved(request, doc_a)
    with pytest.raises(ResourceExhausted, match="checkpoint_store_bytes_max=6000"):
        await store.create_checkpoint(b.request(document(1, blob="b" * 3500)))
    recovery = await store.restore_from_checkpoint("t1")
    assert canonical_json(recovery.restored.document) == canonical_json(doc_a)
    assert (await store.restore_from_checkpoint("t2")).restored.document is None


async def test_restore_after_a_corrupt_delta_falls_back_and_asks_for_a_full(node) -> None:
    fsm, log, clock, store = node
    await lease(log, clock, "t1")
    agent = Agent("t1")
    for step in range(3):
        doc = document(step)
        request = agent.request(doc)
        if step == 2:
            request["checksum"] = "e" * 64  # a delta is verified at restore, not on write
        await store.create_checkpoint(request)
        agent.saved(request, doc)
    recovery = await store.restore_from_checkpoint("t1")
    assert recovery.sequence_number == 2 and recovery.last_sequence == 3 and "checkpoint 3" in recovery.problem
    assert canonical_json(recovery.restored.document) == canonical_json(document(1))
    assert recovery.base_document is None  # the next attempt must start a new chain with a full
    resumed = Agent("t1")
    resumed.sequence = recovery.last_sequence
    request = resumed.request(document(3))
    assert request["kind"] == "full" and (await store.create_checkpoint(request)).sequence_number == 4
    assert (await store.restore_from_checkpoint("t1")).problem is None


# --------------------------------------------------------------------------- validation
def valid_request() -> dict:
    return Agent("t1").request(document(2))


def test_build_checkpoint_command_accepts_payload_or_payload_json() -> None:
    request = valid_request()
    command = build_checkpoint_command(request, now_ms=42, limits=LIMITS)
    assert command["t"] == cmd.CommandType.SAVE_CHECKPOINT and command["now"] == 42
    assert (command["id"], command["attempt"], command["ex"]) == ("t1", 1, "x")
    assert tuple(command["cp"]) == cmd.CHECKPOINT_FIELDS and command["cp"]["timestamp_ms"] == 42
    text = dict(request)
    text["payload_json"] = json.dumps(text.pop("payload"), indent=2)
    del text["payload_bytes"]  # computed when absent
    assert build_checkpoint_command(text, now_ms=42, limits=LIMITS) == command
    assert json.loads(cmd.encode_command(command)) == command  # the JSON codec carries it


@pytest.mark.parametrize("change, message", [
    ({"surprise": 1}, "unknown fields surprise"),
    ({"task_id": ""}, "checkpoint.task_id"),
    ({"attempt": 0}, "checkpoint.attempt"),
    ({"attempt": True}, "checkpoint.attempt"),
    ({"executor_id": None}, "checkpoint.executor_id"),
    ({"sequence_number": "1"}, "checkpoint.sequence_number"),
    ({"kind": "diff"}, "checkpoint.kind"),
    ({"checksum": "0" * 64}, "checkpoint.checksum"),
    ({"payload_bytes": 3}, "checkpoint.payload_bytes"),
    ({"payload_json": "{}"}, "exactly one"),
    ({"model_versions": {str(i): "v" for i in range(17)}}, "model_versions_entries_max=16"),
    ({"model_versions": "gpt"}, "checkpoint.model_versions"),
])
def test_build_checkpoint_command_names_the_field_and_the_limit(change, message) -> None:
    request = {**valid_request(), **change}
    with pytest.raises(InvalidArgument, match=message):
        build_checkpoint_command(request, now_ms=1, limits=LIMITS)


def test_build_checkpoint_command_refuses_bad_payload_json_before_decoding_much() -> None:
    request = valid_request()
    del request["payload"]
    for text, message in [("{nan", "not valid JSON"), ('{"a": NaN}', "not valid JSON"),
                          (" " * (2 * LIMITS.checkpoint_bytes_max + 1), "2 \\* checkpoint_bytes_max=8192")]:
        with pytest.raises(InvalidArgument, match=message):
            build_checkpoint_command({**request, "payload_json": text}, now_ms=1, limits=LIMITS)
    with pytest.raises(InvalidArgument, match="checkpoint.sequence_number: required"):
        build_checkpoint_command({k: v for k, v in valid_request().items() if k != "sequence_number"}, now_ms=1,
                                 limits=LIMITS)
