"""CoordinatorFSM: unit tests, a model-based state machine test and replay determinism."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

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
    assert again.ok and again.value == {"ids": ["a"], "duplicate": True, "index": 2, "dag_id": ""}
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
    events = fsm.events_from(1, 100)
    assert [(e[0], e[1], e[2], e[3]) for e in events] == [
        (2, 0, "TaskCreated", "a"), (2, 1, "TaskCreated", "b"), (2, 2, "TaskReady", "a"), (2, 3, "TaskReady", "b"),
    ]
    fsm.apply_entry(3, encode_entry([cmd.submit_tasks(1, [task_row("c")], None), cmd.cancel_task(2, "c", "")]))
    with pytest.raises(Compacted, match="from_index"):
        fsm.events_from(2, 100)
    assert [(e[0], e[1], e[2]) for e in fsm.events_from(3, 100)] == [
        (3, 0, "TaskCreated"), (3, 1, "TaskReady"), (3, 2, "TaskCancelled")]
    assert [(e[0], e[1]) for e in fsm.events_from(3, 100, after_seq=1)] == [(3, 2)]
    assert fsm.events_from(4, 100) == []
    assert fsm.events_from(5, 100) == []


def test_unschedulable_is_recorded_and_cleared_on_assignment() -> None:
    fsm = CoordinatorFSM()
    fsm.apply(2, cmd.submit_tasks(1, [[ "g", "", "gpu_job", "", "null", 50, 0, [], 3, None]], None))
    marked = fsm.apply(3, cmd.mark_unschedulable(2, [["g", "no executor supports type 'gpu_job'"], ["nope", "x"]]))
    assert marked.value["marked"] == ["g"] and fsm.tasks["g"].status == "pending"
    assert fsm.tasks["g"].error == "unschedulable: no executor supports type 'gpu_job'"
    assert fsm.apply(4, cmd.mark_unschedulable(3, [["g", "no executor supports type 'gpu_job'"]])).value["marked"] == []
    spec = executor_spec("gpu")
    spec["task_types"] = ["gpu_job"]
    fsm.apply(5, cmd.register_executor(4, spec))
    assert fsm.apply(6, cmd.assign_tasks(5, 1000, [["g", "gpu", 1]])).value["assigned"] == ["g"]
    assert fsm.tasks["g"].error == ""


def test_delegated_subtasks_are_fenced_join_the_dag_and_are_cancelled_with_the_parent() -> None:
    fsm = CoordinatorFSM()
    fsm.apply(2, cmd.register_executor(1, executor_spec("e1")))
    fsm.apply(3, cmd.submit_tasks(1, [task_row("p"), task_row("q", ["p"])], None, "d-1"))
    fsm.apply(4, cmd.assign_tasks(2, 1000, [["p", "e1", 1]]))
    stale = fsm.apply(5, cmd.submit_tasks(3, [task_row("c0")], None, "", ("p", 2, "e1")))
    assert "StaleFencingToken" in stale.message and "c0" not in fsm.tasks
    ok = fsm.apply(6, cmd.submit_tasks(3, [task_row("c1"), task_row("c2", ["c1"])], "delegate:p:1", "", ("p", 1, "e1")))
    assert ok.ok and ok.value["dag_id"] == "d-1" and fsm.dag_tasks["d-1"] == ["p", "q", "c1", "c2"]
    assert fsm.tasks["c1"].parent_id == "p" and "c1" in fsm.ready
    cancelled = fsm.apply(7, cmd.cancel_task(4, "p", "stop"))
    assert sorted(cancelled.value["cancelled"]) == ["c1", "c2", "p"]
    assert fsm.tasks["q"].status == "failed" and fsm.tasks["q"].error == "upstream_failed:p"
    restored = CoordinatorFSM()
    restored.restore(fsm.snapshot())
    assert restored.children == fsm.children and restored.dag_tasks == fsm.dag_tasks


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
POOL = [f"t{i}" for i in range(24)]
EXECUTORS = ["e1", "e2", "e3"]
FINAL = {"completed", "failed", "cancelled", "dead_letter"}


class Model:
    """The lifecycle rules written as plainly as possible: readiness is recomputed from scratch."""

    def __init__(self) -> None:
        self.tasks: dict[str, dict] = {}
        self.executors: dict[str, dict] = {}
        self.keys: dict[str, list[str]] = {}
        self.key_order: list[str] = []

    def ready(self, task_id: str) -> bool:
        task = self.tasks[task_id]
        return task["status"] == "pending" and all(self.tasks[d]["status"] == "completed" for d in task["deps"])

    def load(self, executor_id: str) -> int:
        return sum(1 for t in self.tasks.values()
                   if t["status"] in ("assigned", "executing") and t["executor"] == executor_id)

    def fail_downstream(self, root: str) -> None:
        changed = True
        while changed:
            changed = False
            for task in self.tasks.values():
                if task["status"] not in FINAL and any(self.tasks[d]["status"] in ("failed", "cancelled", "dead_letter")
                                                       for d in task["deps"]):
                    task["status"] = "failed"
                    changed = True

    def take_back(self, executor_id: str) -> None:
        for task_id, task in self.tasks.items():
            if task["status"] in ("assigned", "executing") and task["executor"] == executor_id:
                if task["attempt"] < task["max_attempts"]:
                    task.update(status="pending", not_before=0)
                else:
                    task["status"] = "dead_letter"
                    self.fail_downstream(task_id)


class FSMAgainstModel(RuleBasedStateMachine):
    """Drives the FSM with random commands — submissions, cancels, executors, assignments, starts,
    completions, failures, lost executors, re-queues — and checks it against `Model`."""

    def __init__(self) -> None:
        super().__init__()
        self.fsm = CoordinatorFSM(StateLimits(events_retained_max=50, idempotency_keys_max=5))
        self.index = 1
        self.model = Model()
        self.log: list[tuple[int, bytes]] = []

    def _apply(self, command: dict):
        self.index += 1
        payload = encode_entry([command])
        self.log.append((self.index, payload))
        return self.fsm.apply_entry(self.index, payload)[0]

    @initialize()
    def some_executors_and_a_dag(self) -> None:
        # Start where the lifecycle can happen; the rules still add, lose and remove executors.
        for executor_id in EXECUTORS[:2]:
            self.register(executor_id)
        rows = [task_row("t0"), task_row("t1", ["t0"]), task_row("t2", ["t0"]), task_row("t3", ["t1", "t2"])]
        assert self._apply(cmd.submit_tasks(self.index, rows, None)).ok
        for task_id, deps in (("t0", []), ("t1", ["t0"]), ("t2", ["t0"]), ("t3", ["t1", "t2"])):
            self.model.tasks[task_id] = {"status": "pending", "deps": deps, "attempt": 0, "max_attempts": 3,
                                         "executor": None, "not_before": 0, "dag": ""}

    @rule(data=st.data(), key=st.one_of(st.none(), st.sampled_from([f"k{i}" for i in range(8)])))
    def submit(self, data, key) -> None:
        model = self.model
        fresh = [t for t in POOL if t not in model.tasks]
        new = data.draw(st.lists(st.sampled_from(fresh or POOL), min_size=1, max_size=4, unique=True), "new")
        rows, deps_of = [], {}
        for i, task_id in enumerate(new):
            candidates = sorted(model.tasks) + new[:i]
            deps = data.draw(st.lists(st.sampled_from(candidates), max_size=3, unique=True), "deps") if candidates else []
            if data.draw(st.integers(0, 9), "bad") == 0:
                deps = deps + [data.draw(st.sampled_from(POOL + new), "bad dep")]  # unknown, self or a cycle
            deps = list(dict.fromkeys(deps))
            deps_of[task_id] = deps
            rows.append(task_row(task_id, deps))
        dag_id = f"d{self.index}" if len(new) > 1 else ""
        result = self._apply(cmd.submit_tasks(self.index, rows, key, dag_id))
        if key is not None and key in model.keys:
            assert result.ok and result.value["duplicate"] and result.value["ids"] == model.keys[key]
            return
        expect_ok = (not set(new) & set(model.tasks)
                     and all(d in model.tasks or d in deps_of for deps in deps_of.values() for d in deps)
                     and not _has_cycle(deps_of))
        assert result.ok == expect_ok, (result, deps_of)
        if result.ok:
            for task_id in new:
                model.tasks[task_id] = {"status": "pending", "deps": deps_of[task_id], "attempt": 0, "max_attempts": 3,
                                        "executor": None, "not_before": 0, "dag": dag_id}
            model.fail_downstream(new[0])  # a dependency that already ended unsuccessfully fails them now
            if key is not None:
                model.keys[key] = new
                model.key_order.append(key)
                if len(model.key_order) > 5:
                    del model.keys[model.key_order.pop(0)]

    @rule(data=st.data())
    def cancel(self, data) -> None:
        model = self.model
        parents = sorted({t["parent"] for t in model.tasks.values() if t.get("parent")})
        aim = parents and data.draw(st.booleans(), "aim at a parent")
        task_id = data.draw(st.sampled_from(parents if aim else POOL), "task")
        result = self._apply(cmd.cancel_task(self.index, task_id, "r"))
        task = model.tasks.get(task_id)
        if task is None:
            assert result.code == "NOT_FOUND"
        elif task["status"] in FINAL:
            assert result.code == "FAILED_PRECONDITION"
        else:
            assert result.ok, result
            stack = [task_id]  # the task and the subtasks it delegated, transitively
            while stack:
                current = stack.pop()
                if model.tasks[current]["status"] not in FINAL:
                    model.tasks[current]["status"] = "cancelled"
                    stack.extend(k for k, t in model.tasks.items() if t.get("parent") == current)
            model.fail_downstream(task_id)

    @rule(data=st.data())
    def delegate(self, data) -> None:
        """A running task delegates subtasks: fenced like a report; they join its DAG."""
        model = self.model
        leased = [t for t, v in model.tasks.items() if v["status"] in ("assigned", "executing")]
        fresh = [t for t in POOL if t not in model.tasks]
        if not fresh:
            return
        parent_id = data.draw(st.sampled_from(leased or POOL), "parent")
        parent = model.tasks.get(parent_id)
        attempt = (parent["attempt"] if parent else 1) + data.draw(st.sampled_from([0, 0, 0, 1]), "stale")
        executor_id = (parent or {}).get("executor") or "e1"
        new = data.draw(st.lists(st.sampled_from(fresh), min_size=1, max_size=2, unique=True), "children")
        rows = [task_row(t, [new[0]] if i else []) for i, t in enumerate(new)]
        result = self._apply(cmd.submit_tasks(self.index, rows, None, "", (parent_id, attempt, executor_id)))
        fenced_ok = (parent is not None and parent["status"] in ("assigned", "executing")
                     and attempt == parent["attempt"] and executor_id == parent["executor"])
        assert result.ok == fenced_ok, (result, parent, attempt)
        if fenced_ok:
            for i, task_id in enumerate(new):
                model.tasks[task_id] = {"status": "pending", "deps": [new[0]] if i else [], "attempt": 0,
                                        "max_attempts": 3, "executor": None, "not_before": 0,
                                        "dag": parent["dag"], "parent": parent_id}
        else:
            assert "StaleFencingToken" in result.message

    @rule(data=st.data())
    def cancel_dag(self, data) -> None:
        model = self.model
        dags = sorted({t["dag"] for t in model.tasks.values() if t["dag"]})
        dag_id = data.draw(st.sampled_from(dags + ["d-unknown"]), "dag")
        result = self._apply(cmd.cancel_dag(self.index + 1, dag_id, "r"))
        if dag_id not in dags:
            assert result.code == "NOT_FOUND"
            return
        assert result.ok
        members = [k for k, t in model.tasks.items() if t["dag"] == dag_id and t["status"] not in FINAL]
        assert sorted(result.value["cancelled"]) == sorted(members)
        assert set(self.fsm.dag_tasks[dag_id]) == {k for k, t in model.tasks.items() if t["dag"] == dag_id}
        for task_id in members:
            model.tasks[task_id]["status"] = "cancelled"
        if members:
            model.fail_downstream(members[0])

    @rule(executor_id=st.sampled_from(EXECUTORS))
    def register(self, executor_id) -> None:
        assert self._apply(cmd.register_executor(self.index, executor_spec(executor_id))).ok
        self.model.executors[executor_id] = {"online": True}

    @rule(executor_id=st.sampled_from(EXECUTORS))
    def unregister(self, executor_id) -> None:
        result = self._apply(cmd.unregister_executor(self.index, executor_id))
        assert result.ok == (executor_id in self.model.executors)
        if result.ok:
            self.model.take_back(executor_id)
            del self.model.executors[executor_id]

    @rule(executor_id=st.sampled_from(EXECUTORS))
    def lost(self, executor_id) -> None:
        result = self._apply(cmd.executor_lost(self.index, executor_id, "no heartbeat"))
        assert result.ok == (executor_id in self.model.executors)
        if result.ok:
            self.model.take_back(executor_id)
            self.model.executors[executor_id]["online"] = False

    @rule(data=st.data())
    def assign(self, data) -> None:
        model = self.model
        ready = [t for t in model.tasks if model.ready(t)]
        online = [e for e, v in model.executors.items() if v["online"]]
        aim = data.draw(st.integers(0, 4), "aim") != 0  # mostly a plausible plan, sometimes a stale one
        task_id = data.draw(st.sampled_from(ready if aim and ready else POOL), "task")
        executor_id = data.draw(st.sampled_from(online if aim and online else EXECUTORS), "executor")
        task = model.tasks.get(task_id)
        attempt = (task["attempt"] if task else 0) + data.draw(st.sampled_from([1, 1, 1, 1, 0, 2]), "attempt delta")
        now = self.index + 1
        result = self._apply(cmd.assign_tasks(now, 1000, [[task_id, executor_id, attempt]]))
        executor = model.executors.get(executor_id)
        expect = (task is not None and model.ready(task_id) and task["not_before"] <= now
                  and attempt == task["attempt"] + 1 and executor is not None and executor["online"]
                  and model.load(executor_id) < 2)
        assert result.ok and (result.value["assigned"] == [task_id]) == expect, (result, task, executor)
        if expect:
            task.update(status="assigned", executor=executor_id, attempt=attempt, not_before=0)

    def _report(self, data, make):
        model = self.model
        leased = [t for t, v in model.tasks.items() if v["status"] in ("assigned", "executing")]
        aim = data.draw(st.integers(0, 4), "aim") != 0
        task_id = data.draw(st.sampled_from(leased if aim and leased else POOL), "task")
        task = model.tasks.get(task_id)
        right_attempt = task["attempt"] if task else 1
        attempt = right_attempt + data.draw(st.sampled_from([0, 0, 0, 0, -1, 1]), "stale")
        executor_id = (task or {}).get("executor") or "e1"
        if data.draw(st.integers(0, 6), "wrong executor") == 0:
            executor_id = data.draw(st.sampled_from(EXECUTORS), "executor")
        result = self._apply(make(task_id, attempt, executor_id))
        fenced_ok = (task is not None and task["status"] in ("assigned", "executing")
                     and attempt == task["attempt"] and executor_id == task["executor"])
        if task is None:
            assert result.code == "NOT_FOUND"
        else:
            assert result.ok == fenced_ok, (result, task, attempt, executor_id)
            if not fenced_ok:
                assert "StaleFencingToken" in result.message
        return task, fenced_ok

    @rule(data=st.data())
    def start(self, data) -> None:
        task, ok = self._report(data, lambda t, a, e: cmd.start_task(self.index + 1, t, a, e))
        if ok:
            task["status"] = "executing"

    def _check_implied_start(self, task, implied: bool) -> None:
        """A terminal report that stands for `started` records TaskStarted first, in the same entry."""
        kinds = [e[2] for e in self.fsm.events_from(self.index, 10) if e[0] == self.index]
        if implied and task["status"] == "assigned":
            assert kinds[:1] == ["TaskStarted"] and len(kinds) >= 2, kinds
        else:
            assert "TaskStarted" not in kinds, kinds

    @rule(data=st.data(), fraction=st.sampled_from([0.0, 0.5, 1.0]))
    def progress(self, data, fraction) -> None:
        task, ok = self._report(data, lambda t, a, e: cmd.report_progress(self.index + 1, t, a, e, fraction, "half"))
        if ok:
            task["status"] = "executing"  # progress from an assigned attempt also records its start
            record = self.fsm.tasks[next(k for k, v in self.model.tasks.items() if v is task)]
            assert (record.progress, record.progress_message, record.progress_ms) == (fraction, "half", self.index)

    @rule(data=st.data(), implied=st.booleans())
    def complete(self, data, implied) -> None:
        task, ok = self._report(data, lambda t, a, e: cmd.complete_task(self.index + 1, t, a, e, '{"ok":1}', implied))
        if ok:
            self._check_implied_start(task, implied)
            task["status"] = "completed"

    @rule(data=st.data(), retryable=st.booleans(), backoff_ms=st.sampled_from([0, 5, 1000]), implied=st.booleans())
    def fail(self, data, retryable, backoff_ms, implied) -> None:
        now = self.index + 1
        task, ok = self._report(
            data, lambda t, a, e: cmd.fail_task(now, t, a, e, "boom", retryable, backoff_ms, implied))
        if ok:
            self._check_implied_start(task, implied)
            if retryable and task["attempt"] < task["max_attempts"]:
                task.update(status="pending", not_before=now + backoff_ms)
            else:
                task["status"] = "dead_letter" if retryable else "failed"
                self.model.fail_downstream(next(k for k, v in self.model.tasks.items() if v is task))

    @rule(task_id=st.sampled_from(POOL))
    def requeue(self, task_id) -> None:
        task = self.model.tasks.get(task_id)
        result = self._apply(cmd.requeue_task(self.index + 1, task_id, 2))
        if task is None:
            assert result.code == "NOT_FOUND"
        elif task["status"] in ("dead_letter", "failed") and not any(
                self.model.tasks[d]["status"] in ("failed", "cancelled", "dead_letter") for d in task["deps"]):
            assert result.ok
            task.update(status="pending", max_attempts=task["attempt"] + 2, not_before=0)
        else:
            assert result.code == "FAILED_PRECONDITION"

    @rule()
    def noop(self) -> None:
        assert self._apply(cmd.noop()).ok

    @precondition(lambda self: self.index > 1)
    @rule()
    def snapshot_restore(self) -> None:
        restored = CoordinatorFSM(self.fsm.limits)
        restored.restore(self.fsm.snapshot())
        assert restored.state_hash() == self.fsm.state_hash()
        assert restored.ready == {k: None for k in self.fsm.tasks if k in self.fsm.ready} or \
            set(restored.ready) == set(self.fsm.ready)
        assert {k: set(v) for k, v in restored.executor_tasks.items() if v} == \
            {k: set(v) for k, v in self.fsm.executor_tasks.items() if v}
        self.fsm = restored

    @invariant()
    def matches_model(self) -> None:
        model = self.model
        assert {k: v.status for k, v in self.fsm.tasks.items()} == {k: v["status"] for k, v in model.tasks.items()}
        assert {k: list(v.dependencies) for k, v in self.fsm.tasks.items()} == {k: v["deps"] for k, v in model.tasks.items()}
        assert set(self.fsm.ready) == {k for k in model.tasks if model.ready(k)}
        assert {k: v.status == "online" for k, v in self.fsm.executors.items()} == \
            {k: v["online"] for k, v in model.executors.items()}
        for executor_id in model.executors:
            assert len(self.fsm.executor_tasks.get(executor_id, {})) == model.load(executor_id)
        counts = {s: n for s, n in self.fsm.status_counts.items() if n}
        expected: dict[str, int] = {}
        for task in model.tasks.values():
            expected[task["status"]] = expected.get(task["status"], 0) + 1
        assert counts == expected

    @invariant()
    def replay_gives_same_hash(self) -> None:
        if len(self.log) % 13:
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
TestFSMAgainstModel.settings = settings(max_examples=200, stateful_step_count=50, deadline=None,
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
