"""CoordinatorFSM: unit tests, a model-based state machine test and replay determinism."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from coordinator import commands as cmd
from coordinator.commands import encode_entry
from coordinator.errors import Compacted, UnknownCommand
from coordinator.fsm import CoordinatorFSM
from coordinator.limits import StateLimits


def task_row(task_id: str, deps: list[str] | None = None, priority: int = 50) -> list:
    return [task_id, "", "echo", "", "null", priority, 0, deps or [], 3, None]


def executor_spec(executor_id: str) -> dict:
    return {
        "id": executor_id, "name": executor_id, "type": "algorithmic", "task_types": ["echo"], "capacity": 2,
        "input_schema_json": "null", "output_schema_json": "null", "performance_profile_json": "null",
        "context_window_size": 0, "metadata": None,
    }


def test_submit_dag_all_or_nothing() -> None:
    fsm = CoordinatorFSM()
    ok = fsm.apply(2, cmd.submit_tasks(1000, [task_row("a"), task_row("b", ["a"])], None))
    assert ok.ok and ok.value["ids"] == ["a", "b"]
    before = fsm.state_hash()
    bad = fsm.apply(3, cmd.submit_tasks(1001, [task_row("c"), task_row("d", ["zzz"])], None))
    assert not bad.ok and bad.code == "INVALID_ARGUMENT" and "tasks[1].depends_on[0]" in bad.message
    assert "c" not in fsm.tasks
    # only last_applied_index moved
    fsm.last_applied_index = 2
    assert fsm.state_hash() == before


def test_cycle_rejected_and_state_unchanged() -> None:
    fsm = CoordinatorFSM()
    res = fsm.apply(2, cmd.submit_tasks(1, [task_row("a", ["b"]), task_row("b", ["a"])], None))
    assert not res.ok and "cycle" in res.message
    assert fsm.tasks == {} and fsm.status_counts == {}


def test_duplicate_task_id_rejected() -> None:
    fsm = CoordinatorFSM()
    assert fsm.apply(2, cmd.submit_tasks(1, [task_row("a")], None)).ok
    res = fsm.apply(3, cmd.submit_tasks(1, [task_row("a")], None))
    assert not res.ok and "already exists" in res.message


def test_idempotency_key_returns_original_ids() -> None:
    fsm = CoordinatorFSM()
    first = fsm.apply(2, cmd.submit_tasks(1, [task_row("a")], "k1"))
    again = fsm.apply(5, cmd.submit_tasks(2, [task_row("b")], "k1"))
    assert again.ok and again.value == {"ids": ["a"], "duplicate": True, "index": 2}
    assert first.value["duplicate"] is False
    assert list(fsm.tasks) == ["a"]


def test_idempotency_keys_bounded() -> None:
    fsm = CoordinatorFSM(StateLimits(idempotency_keys_max=3))
    for i in range(5):
        fsm.apply(2 + i, cmd.submit_tasks(1, [task_row(f"t{i}")], f"k{i}"))
    assert fsm.idempotent_result("k0") is None and fsm.idempotent_result("k4") is not None


def test_cancel() -> None:
    fsm = CoordinatorFSM()
    fsm.apply(2, cmd.submit_tasks(1, [task_row("a")], None))
    res = fsm.apply(3, cmd.cancel_task(5, "a", "no longer needed"))
    assert res.ok and fsm.tasks["a"].status == "cancelled" and fsm.tasks["a"].updated_at_ms == 5
    assert fsm.status_counts == {"pending": 0, "cancelled": 1}
    again = fsm.apply(4, cmd.cancel_task(6, "a", ""))
    assert again.code == "FAILED_PRECONDITION"
    missing = fsm.apply(5, cmd.cancel_task(6, "nope", ""))
    assert missing.code == "NOT_FOUND"


def test_executors_register_unregister() -> None:
    fsm = CoordinatorFSM()
    assert fsm.apply(2, cmd.register_executor(10, executor_spec("e1"))).value["reregistered"] is False
    assert fsm.apply(3, cmd.register_executor(20, executor_spec("e1"))).value["reregistered"] is True
    assert fsm.executors["e1"].registered_at_ms == 10
    assert fsm.apply(4, cmd.unregister_executor(30, "e1")).ok
    assert fsm.apply(5, cmd.unregister_executor(30, "e1")).code == "NOT_FOUND"


def test_events_numbered_by_index_and_compacted() -> None:
    fsm = CoordinatorFSM(StateLimits(events_retained_max=4))
    fsm.apply_entry(2, encode_entry([cmd.submit_tasks(1, [task_row("a"), task_row("b")], None)]))
    fsm.apply_entry(3, encode_entry([cmd.submit_tasks(1, [task_row("c")], None), cmd.cancel_task(2, "c", "")]))
    events = fsm.events_from(1, 100)
    assert [(e[0], e[1], e[2]) for e in events] == [
        (2, 0, "TaskCreated"), (2, 1, "TaskCreated"), (3, 0, "TaskCreated"), (3, 1, "TaskCancelled")]
    fsm.apply(4, cmd.submit_tasks(1, [task_row("d")], None))
    with pytest.raises(Compacted, match="from_index"):
        fsm.events_from(2, 100)
    assert [e[0] for e in fsm.events_from(3, 100)] == [3, 3, 4]
    assert [(e[0], e[1]) for e in fsm.events_from(3, 100, after_seq=0)] == [(3, 1), (4, 0)]
    assert fsm.events_from(5, 100) == []


def test_entry_joined_from_encoded_commands_equals_encoded_entry() -> None:
    commands = [cmd.submit_tasks(1, [task_row("a", ["b"])], "k"), cmd.noop(), cmd.cancel_task(2, "a", "é")]
    assert cmd.join_entry([cmd.encode_command(c) for c in commands]) == encode_entry(commands)


def test_records_are_immutable() -> None:
    fsm = CoordinatorFSM()
    fsm.apply(2, cmd.submit_tasks(1, [task_row("a")], None))
    with pytest.raises(AttributeError):
        fsm.tasks["a"].status = "completed"  # type: ignore[misc]


def test_unknown_command_fails_loudly_unless_ignorable() -> None:
    fsm = CoordinatorFSM()
    with pytest.raises(UnknownCommand):
        fsm.apply(2, {"t": 999})
    assert fsm.apply(3, {"t": 999, "ign": True}).ok
    with pytest.raises(UnknownCommand):
        fsm.apply_entry(4, b"\x07[]")


def test_snapshot_round_trip() -> None:
    fsm = CoordinatorFSM()
    rows = [task_row(f"t{i}", [f"t{i-1}"] if i else []) for i in range(2500)]
    fsm.apply(2, cmd.submit_tasks(1, rows, "key"))
    fsm.apply(3, cmd.register_executor(2, executor_spec("e")))
    fsm.apply(4, cmd.cancel_task(3, "t7", "x"))
    other = CoordinatorFSM()
    other.restore(fsm.snapshot())
    assert other.state_hash() == fsm.state_hash()
    assert other.status_counts == fsm.status_counts
    assert other.tasks["t8"].dependencies == ("t7",)
    # and they keep agreeing after more commands
    for target in (fsm, other):
        target.apply(5, cmd.submit_tasks(4, [task_row("z", ["t1"])], "key2"))
    assert other.state_hash() == fsm.state_hash()


# --------------------------------------------------------------------------- model-based test
ids = st.sampled_from([f"t{i}" for i in range(12)])


class FSMAgainstModel(RuleBasedStateMachine):
    """Drives the FSM with random commands and checks it against a plain-dict model."""

    def __init__(self) -> None:
        super().__init__()
        self.fsm = CoordinatorFSM(StateLimits(events_retained_max=50, idempotency_keys_max=5))
        self.index = 1
        self.model_tasks: dict[str, str] = {}  # id -> status
        self.model_deps: dict[str, list[str]] = {}
        self.model_keys: dict[str, list[str]] = {}
        self.model_key_order: list[str] = []
        self.model_executors: set[str] = set()
        self.log: list[tuple[int, bytes]] = []

    def _apply(self, command: dict):
        self.index += 1
        payload = encode_entry([command])
        self.log.append((self.index, payload))
        return self.fsm.apply_entry(self.index, payload)[0]

    @rule(new=st.lists(st.tuples(ids, st.lists(ids, max_size=3)), min_size=1, max_size=4),
          key=st.one_of(st.none(), st.sampled_from(["k1", "k2", "k3", "k4", "k5", "k6", "k7"])))
    def submit(self, new, key) -> None:
        rows = [task_row(task_id, list(dict.fromkeys(deps))) for task_id, deps in new]
        result = self._apply(cmd.submit_tasks(self.index, rows, key))
        if key is not None and key in self.model_keys:
            assert result.ok and result.value["duplicate"] and result.value["ids"] == self.model_keys[key]
            return
        batch_ids = [task_id for task_id, _ in new]
        expect_ok = len(set(batch_ids)) == len(batch_ids) and not set(batch_ids) & set(self.model_tasks)
        batch_deps = {task_id: list(dict.fromkeys(deps)) for task_id, deps in new}
        if expect_ok:
            expect_ok = all(d in self.model_tasks or d in batch_deps for deps in batch_deps.values() for d in deps)
        if expect_ok:
            expect_ok = not _has_cycle(batch_deps)
        assert result.ok == expect_ok, (result, new)
        if result.ok:
            for task_id in batch_ids:
                self.model_tasks[task_id] = "pending"
                self.model_deps[task_id] = batch_deps[task_id]
            if key is not None:
                self.model_keys[key] = batch_ids
                self.model_key_order.append(key)
                if len(self.model_key_order) > 5:
                    del self.model_keys[self.model_key_order.pop(0)]

    @rule(task_id=ids)
    def cancel(self, task_id) -> None:
        result = self._apply(cmd.cancel_task(self.index, task_id, "r"))
        if task_id not in self.model_tasks:
            assert result.code == "NOT_FOUND"
        elif self.model_tasks[task_id] == "cancelled":
            assert result.code == "FAILED_PRECONDITION"
        else:
            assert result.ok
            self.model_tasks[task_id] = "cancelled"

    @rule(executor_id=st.sampled_from(["e1", "e2", "e3"]))
    def register(self, executor_id) -> None:
        assert self._apply(cmd.register_executor(self.index, executor_spec(executor_id))).ok
        self.model_executors.add(executor_id)

    @rule(executor_id=st.sampled_from(["e1", "e2", "e3"]))
    def unregister(self, executor_id) -> None:
        result = self._apply(cmd.unregister_executor(self.index, executor_id))
        assert result.ok == (executor_id in self.model_executors)
        self.model_executors.discard(executor_id)

    @rule()
    def noop(self) -> None:
        assert self._apply(cmd.noop()).ok

    @precondition(lambda self: self.index > 1)
    @rule()
    def snapshot_restore(self) -> None:
        restored = CoordinatorFSM(self.fsm.limits)
        restored.restore(self.fsm.snapshot())
        assert restored.state_hash() == self.fsm.state_hash()
        self.fsm = restored

    @invariant()
    def matches_model(self) -> None:
        assert {k: v.status for k, v in self.fsm.tasks.items()} == self.model_tasks
        assert {k: list(v.dependencies) for k, v in self.fsm.tasks.items()} == self.model_deps
        assert set(self.fsm.executors) == self.model_executors
        counts = {s: n for s, n in self.fsm.status_counts.items() if n}
        expected: dict[str, int] = {}
        for status in self.model_tasks.values():
            expected[status] = expected.get(status, 0) + 1
        assert counts == expected

    @invariant()
    def replay_gives_same_hash(self) -> None:
        if len(self.log) % 7:
            return
        replica = CoordinatorFSM(self.fsm.limits)
        for index, payload in self.log:
            replica.apply_entry(index, payload)
        assert replica.state_hash() == self.fsm.state_hash()


def _has_cycle(edges: dict[str, list[str]]) -> bool:
    visiting: set[str] = set()
    done: set[str] = set()

    def visit(node: str) -> bool:
        if node in done or node not in edges:
            return False
        if node in visiting:
            return True
        visiting.add(node)
        found = any(visit(dep) for dep in edges[node])
        visiting.discard(node)
        done.add(node)
        return found

    return any(visit(node) for node in edges)


TestFSMAgainstModel = FSMAgainstModel.TestCase
TestFSMAgainstModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow])


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 30)), max_size=60), st.integers(1, 59))
@settings(max_examples=60, deadline=None)
def test_two_replicas_one_restored_mid_log_agree(ops, cut) -> None:
    """Replaying the same log on two replicas — one of them restored from a snapshot taken part
    way through — gives the same state hash."""
    log = []
    for i, (kind, n) in enumerate(ops):
        if kind == 0:
            command = cmd.submit_tasks(i, [task_row(f"t{n}", [f"t{n - 1}"] if n % 3 and n else [])], f"k{n % 4}")
        elif kind == 1:
            command = cmd.cancel_task(i, f"t{n}", "")
        elif kind == 2:
            command = cmd.register_executor(i, executor_spec(f"e{n % 3}"))
        else:
            command = cmd.unregister_executor(i, f"e{n % 3}")
        log.append((i + 2, encode_entry([command])))
    a, b = CoordinatorFSM(), CoordinatorFSM()
    for index, payload in log[:cut]:
        a.apply_entry(index, payload)
        b.apply_entry(index, payload)
    c = CoordinatorFSM()
    c.restore(b.snapshot())
    for index, payload in log[cut:]:
        a.apply_entry(index, payload)
        c.apply_entry(index, payload)
    assert a.state_hash() == c.state_hash()
