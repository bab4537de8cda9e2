"""Task metrics folded from FSM events (cluster/event_metrics.py) and the timing hooks of the
journal, the snapshot writer and the proposer — no cluster: synthetic event tuples, a real
CoordinatorFSM driven by commands, and NodeMetrics' Prometheus output."""

from __future__ import annotations

import json
import threading
import time

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cluster.event_metrics import (
    OTHER_TYPE,
    EventFolder,
    EventReader,
    LeaderWatch,
    Observations,
    TypeLabels,
    ready_since_ms,
)
from coordinator import commands as cmd
from coordinator.commands import encode_entry
from coordinator.fsm import CoordinatorFSM
from coordinator.limits import StateLimits


def ev(index: int, kind: str, task_id: str = "", executor_id: str = "", time_ms: int = 0, data=None, seq: int = 0):
    return (index, seq, kind, task_id, executor_id, time_ms, json.dumps(data) if data is not None else "")


def failed(status: str, error: str = "boom", retry_at_ms: int = 0) -> dict:
    return {"attempt": 1, "error": error, "status": status, "retry_at_ms": retry_at_ms}


# ---------------------------------------------------------------------------- the pure fold
def test_duration_and_dispatch_latency_come_from_the_event_times() -> None:
    folder = EventFolder()
    tasks = {"t1": ("echo", 1_000)}
    out = folder.fold([
        ev(2, "TaskCreated", "t1", time_ms=1_000), ev(2, "TaskReady", "t1", time_ms=1_000, seq=1),
        ev(3, "TaskAssigned", "t1", "e1", 1_250, {"attempt": 1}),
        ev(4, "TaskStarted", "t1", "e1", 1_300), ev(5, "TaskCompleted", "t1", "e1", 4_000, {"attempt": 1}),
    ], tasks)
    assert out.finished == {("echo", "completed"): 1}
    assert out.durations_s == [("echo", 3.0)]
    assert out.dispatch_s == [("echo", 0.25)]
    assert not out.retries and out.lease_expirations == 0
    assert folder.waiting == 0


def test_a_retry_is_counted_and_its_dispatch_latency_starts_at_its_retry_time() -> None:
    folder = EventFolder()
    tasks = {"t1": ("echo", 0)}
    out = folder.fold([
        ev(2, "TaskReady", "t1", time_ms=0), ev(3, "TaskAssigned", "t1", "e1", 100),
        ev(4, "TaskFailed", "t1", "e1", 3_000, failed("pending", retry_at_ms=5_000)),
        ev(4, "TaskReady", "t1", time_ms=3_000, seq=1),
        ev(5, "TaskAssigned", "t1", "e1", 5_500),
        ev(6, "TaskFailed", "t1", "e1", 6_000, failed("dead_letter")),
    ], tasks)
    assert out.retries == {"echo": 1}
    assert out.dispatch_s == [("echo", 0.1), ("echo", 0.5)]   # 5.5 s − retry at 5.0 s, not − 3.0 s
    assert out.finished == {("echo", "dead_letter"): 1}
    assert out.durations_s == [("echo", 6.0)]


def test_final_statuses_each_counted_once_and_a_retry_is_not_final() -> None:
    folder = EventFolder()
    tasks = {t: ("t", 0) for t in "abcde"}
    out = folder.fold([
        ev(2, "TaskCompleted", "a", "e", 10), ev(2, "TaskCancelled", "b", "", 20, seq=1),
        ev(2, "TaskFailed", "c", "", 30, failed("failed", "upstream_failed:b"), seq=2),
        ev(2, "TaskFailed", "d", "e", 40, failed("dead_letter"), seq=3),
        ev(2, "TaskFailed", "e", "e", 50, failed("pending", retry_at_ms=60), seq=4),
        ev(2, "TaskProgress", "a", "e", 5, {"fraction": 0.5}, seq=5),
    ], tasks)
    assert out.finished == {("t", "completed"): 1, ("t", "cancelled"): 1, ("t", "failed"): 1, ("t", "dead_letter"): 1}
    assert sorted(s for _, s in out.durations_s) == [0.01, 0.02, 0.03, 0.04]


def test_lease_expiration_counts_every_attempt_the_lost_executor_had() -> None:
    """What fsm._take_back_tasks records for EXECUTOR_LOST: a TaskRequeued (+ TaskReady) per task
    with attempts left, a TaskFailed dead_letter per task out of attempts, then ExecutorLost
    listing only the re-queued ones — all at one index."""
    folder = EventFolder()
    tasks = {"t1": ("a", 0), "t2": ("b", 0), "t3": ("a", 0)}
    lost = "executor lost: no heartbeat for 5.0 s"
    out = folder.fold([
        ev(7, "TaskRequeued", "t1", "e1", 900, {"reason": lost, "attempt": 1}, seq=0),
        ev(7, "TaskReady", "t1", "", 900, seq=1),
        ev(7, "TaskFailed", "t2", "e1", 900, failed("dead_letter", lost), seq=2),
        # another executor's task failing for good in the same entry: not this expiration
        ev(7, "TaskFailed", "t3", "e2", 900, failed("dead_letter", "bad input"), seq=3),
        ev(7, "ExecutorLost", "", "e1", 900, {"reason": "no heartbeat for 5.0 s", "requeued": ["t1"]}, seq=4),
    ], tasks)
    assert out.lease_expirations == 2
    assert out.retries == {"a": 1}                    # t1's lost attempt is put back for another
    assert out.finished == {("b", "dead_letter"): 1, ("a", "dead_letter"): 1}


def test_an_unregistered_executors_take_back_is_a_retry_but_no_lease_expiration() -> None:
    folder = EventFolder()
    out = folder.fold([
        ev(3, "TaskRequeued", "t1", "e1", 10, {"reason": "executor unregistered", "attempt": 1}),
        ev(3, "TaskReady", "t1", "", 10, seq=1),
        ev(3, "ExecutorUnregistered", "", "e1", 10, seq=2),
        ev(4, "TaskRequeued", "t2", "", 20),              # an operator's re-queue: not a retry
    ], {"t1": ("x", 0), "t2": ("x", 0)})
    assert out.lease_expirations == 0
    assert out.retries == {"x": 1}


def test_an_index_split_between_two_reads_still_counts_its_take_backs() -> None:
    folder = EventFolder()
    lost = "executor lost: gone"
    tasks = {"t1": ("a", 0)}
    first = folder.fold([ev(9, "TaskFailed", "t1", "e1", 5, failed("dead_letter", lost), seq=0)], tasks)
    second = folder.fold([ev(9, "ExecutorLost", "", "e1", 5, {"reason": "gone", "requeued": []}, seq=1)], tasks)
    assert first.lease_expirations + second.lease_expirations == 1
    # ...but a take-back of an earlier index is not added to a later ExecutorLost
    later = folder.fold([ev(10, "TaskFailed", "t1", "e1", 6, failed("dead_letter", lost)),
                         ev(11, "ExecutorLost", "", "e1", 7, {"reason": "x", "requeued": []})], tasks)
    assert later.lease_expirations == 0


def test_type_labels_are_bounded() -> None:
    labels = TypeLabels(distinct_max=64)
    names = [f"type-{i}" for i in range(70)]
    assert [labels(n) for n in names[:64]] == names[:64]
    assert {labels(n) for n in names[64:]} == {OTHER_TYPE}
    assert labels("type-3") == "type-3"               # known names keep theirs

    folder = EventFolder()
    tasks = {f"t{i}": (f"type-{i}", 0) for i in range(70)}
    out = folder.fold([ev(2, "TaskCompleted", f"t{i}", "e", 1, seq=i) for i in range(70)], tasks)
    assert len(out.finished) == 65
    assert out.finished[(OTHER_TYPE, "completed")] == 6


def test_an_event_of_an_unknown_task_counts_as_other_without_a_duration() -> None:
    out = EventFolder().fold([ev(2, "TaskCompleted", "ghost", "e", 10)], {})
    assert out.finished == {(OTHER_TYPE, "completed"): 1} and out.durations_s == []


def test_tasks_waiting_for_assignment_are_bounded() -> None:
    folder = EventFolder(ready_tracked_max=3)
    out = folder.fold([ev(2, "TaskReady", f"t{i}", "", i, seq=i) for i in range(5)]
                      + [ev(3, "TaskAssigned", f"t{i}", "e", 100, seq=i) for i in range(5)],
                      {f"t{i}": ("x", 0) for i in range(5)})
    assert folder.ready_forgotten == 2
    assert len(out.dispatch_s) == 3 and folder.waiting == 0   # the two oldest were forgotten


def test_malformed_event_data_never_raises() -> None:
    out = EventFolder().fold([ev(2, "TaskFailed", "t", "e", 1, None), (3, 0, "ExecutorLost", "", "e", 1, "{not json"),
                              (4, 0, "TaskFailed", "t", "e", 1, "[1, 2]")], {"t": ("x", 0)})
    assert out == Observations()


def test_leader_watch_counts_changes_of_leader_or_term() -> None:
    watch = LeaderWatch()
    seen = [watch.observe(leader, term) for leader, term in [
        ("", 0), ("a", 1), ("a", 1), ("", 2), ("a", 2), ("b", 3), ("b", 3), ("", 3), ("b", 3)]]
    # a leader lost and found again in the same term (a missed heartbeat seen by a poll) is no election
    assert seen == [False, True, False, False, True, True, False, False, False]


# ---------------------------------------------------------------------------- against a real FSM
def task_row(task_id: str, task_type: str = "echo", deps: list[str] | None = None, max_attempts: int = 3) -> list:
    return [task_id, "", task_type, "", "null", 50, 0, deps or [], max_attempts, None]


def executor_spec(executor_id: str, capacity: int = 8) -> dict:
    return {
        "id": executor_id, "name": executor_id, "type": "algorithmic", "task_types": [], "capacity": capacity,
        "input_schema_json": "null", "output_schema_json": "null", "performance_profile_json": "null",
        "context_window_size": 0, "metadata": None,
    }


class Driver:
    """Applies one command per log entry to a real FSM, at increasing times."""

    def __init__(self, limits: StateLimits | None = None) -> None:
        self.fsm = CoordinatorFSM(limits)
        self.index = 1
        self.now = 1_000

    def apply(self, command: dict):
        self.index += 1
        [result] = self.fsm.apply_entry(self.index, encode_entry([command]))
        assert result.ok, result
        return result

    def tick(self, ms: int) -> int:
        self.now += ms
        return self.now


def fold_all(reader: EventReader, folder: EventFolder) -> tuple[list[Observations], int]:
    observations, missed = [], 0
    for _ in range(10_000):
        batch = reader.read()
        missed += batch.missed_entries
        folder.seed_ready(batch.seeds)
        if not batch.events and not batch.missed_entries:
            return observations, missed
        observations.append(folder.fold(batch.events, batch.tasks))
    raise AssertionError("reader never caught up")


def merged(observations: list[Observations]) -> Observations:
    total = Observations()
    for o in observations:
        total.finished.update(o.finished)
        total.durations_s += o.durations_s
        total.dispatch_s += o.dispatch_s
        total.retries.update(o.retries)
        total.lease_expirations += o.lease_expirations
    return total


@given(
    outcomes=st.lists(st.lists(st.sampled_from(["complete", "retry", "fail", "lost", "cancel"]), min_size=1, max_size=4),
                      min_size=1, max_size=8),
    read_size=st.integers(1, 9),
    gaps=st.lists(st.integers(0, 5_000), min_size=4, max_size=4),
)
def test_folded_counts_agree_with_the_fsm_whatever_the_read_size(outcomes, read_size, gaps) -> None:
    """Random lives of tasks (each attempt completes, fails and retries, fails for good, is lost
    with its executor, or the task is cancelled) through the real FSM; events read `read_size`
    at a time. tasks_total by status equals the FSM's final status counts, every assignment has
    one dispatch observation, durations are the records' creation → final times, retries and
    lease expirations equal the attempts the task histories say were put back or lost."""
    d = Driver()
    d.apply(cmd.register_executor(d.now, executor_spec("e0")))
    ids = [f"t{i}" for i in range(len(outcomes))]
    d.apply(cmd.submit_tasks(d.now, [task_row(t, f"type{i % 3}", max_attempts=4) for i, t in enumerate(ids)], None))
    executor, executors = "e0", 1
    assignments = 0
    for task_id, plan in zip(ids, outcomes, strict=True):
        for attempt, outcome in enumerate(plan, start=1):
            record = d.fsm.tasks[task_id]
            if record.status != "pending":
                break
            d.now = max(d.tick(gaps[0]), record.not_before_ms)
            d.apply(cmd.assign_tasks(d.tick(gaps[1]), 30_000, [[task_id, executor, attempt]]))
            assignments += 1
            now = d.tick(gaps[2])
            if outcome == "complete":
                d.apply(cmd.complete_task(now, task_id, attempt, executor, "null", implies_started=True))
            elif outcome == "retry":
                d.apply(cmd.fail_task(now, task_id, attempt, executor, "flaky", True, gaps[3], implies_started=True))
            elif outcome == "fail":
                d.apply(cmd.fail_task(now, task_id, attempt, executor, "bad", False, 0, implies_started=True))
            elif outcome == "cancel":
                d.apply(cmd.cancel_task(now, task_id, "no longer needed"))
            else:
                d.apply(cmd.executor_lost(now, executor, "no heartbeat"))
                executor = f"e{executors}"
                executors += 1
                d.apply(cmd.register_executor(now, executor_spec(executor)))
    reader, folder = EventReader(d.fsm, threading.RLock(), events_per_read_max=read_size), EventFolder()
    observations, missed = fold_all(reader, folder)
    total = merged(observations)
    assert missed == 0
    final = {s: n for s, n in d.fsm.status_counts.items() if s in ("completed", "failed", "cancelled", "dead_letter") and n}
    by_status: dict[str, int] = {}
    for (_, status), n in total.finished.items():
        by_status[status] = by_status.get(status, 0) + n
    assert by_status == final
    assert len(total.dispatch_s) == assignments and all(s >= 0 for _, s in total.dispatch_s)
    expected_durations = sorted((r.type, (r.updated_at_ms - r.created_at_ms) / 1000) for r in d.fsm.tasks.values()
                                if r.status in final)
    assert sorted(total.durations_s) == expected_durations
    history = [h for r in d.fsm.tasks.values() for h in r.history]
    put_back = sum(1 for r in d.fsm.tasks.values() for h in r.history
                   if h[2] in ("failed", "lost") and (h[0] < r.attempt or r.status == "pending"))
    assert sum(total.retries.values()) == put_back
    assert total.lease_expirations == sum(1 for h in history if h[2] == "lost")


def test_the_reader_resumes_after_evicted_events_and_counts_what_it_skipped() -> None:
    d = Driver(StateLimits(events_retained_max=6))
    reader, folder = EventReader(d.fsm, threading.RLock(), events_per_read_max=100), EventFolder()
    d.apply(cmd.submit_tasks(d.now, [task_row("a")], None))          # index 2: created, ready
    assert len(reader.read().events) == 2
    for i in range(5):                                                 # indexes 3..7: 10 events, 6 kept
        d.apply(cmd.submit_tasks(d.now, [task_row(f"b{i}")], None))
    batch = reader.read()
    assert batch.missed_entries == 2                                  # 3 and 4 were evicted unread
    assert [e[0] for e in batch.events] == [5, 5, 6, 6, 7, 7]
    d.apply(cmd.cancel_task(d.tick(10), "b4", ""))
    out = folder.fold(reader.read().events, {"b4": ("echo", 1_000)})
    assert out.finished == {("echo", "cancelled"): 1}
    assert reader.read().events == []
    for i in range(3):                                                 # evicts index 8, read in full
        d.apply(cmd.submit_tasks(d.now, [task_row(f"c{i}")], None))
    batch = reader.read()
    assert batch.missed_entries == 0 and [e[0] for e in batch.events] == [9, 9, 10, 10, 11, 11]


def test_the_reader_starts_after_history_and_seeds_the_tasks_already_waiting() -> None:
    d = Driver()
    d.apply(cmd.register_executor(d.now, executor_spec("e1")))
    d.apply(cmd.submit_tasks(d.now, [task_row("old"), task_row("dep"), task_row("child", deps=["dep"])], None))
    d.apply(cmd.assign_tasks(d.tick(100), 30_000, [["old", "e1", 1], ["dep", "e1", 1]]))
    d.apply(cmd.complete_task(d.tick(1_000), "old", 1, "e1", "null", True))
    d.apply(cmd.complete_task(d.tick(1_000), "dep", 1, "e1", "null", True))   # child ready at 3100
    history_through = d.index
    reader = EventReader(d.fsm, threading.RLock(), start_after_index=history_through + 2)
    assert reader.read().events == [] and not reader.read().seeds   # not applied that far yet: waits
    reader = EventReader(d.fsm, threading.RLock(), start_after_index=history_through)
    folder = EventFolder()
    batch = reader.read()
    assert batch.events == [] and batch.seeds == [("child", 3_100)]
    folder.seed_ready(batch.seeds)
    d.apply(cmd.assign_tasks(d.tick(400), 30_000, [["child", "e1", 1]]))
    d.apply(cmd.complete_task(d.tick(500), "child", 1, "e1", "null", True))
    batch = reader.read()
    out = folder.fold(batch.events, batch.tasks)
    assert out.finished == {("echo", "completed"): 1}          # "old" and "dep" are history: not counted
    assert out.dispatch_s == [("echo", 0.4)]
    assert out.durations_s == [("echo", 3.0)]


def test_ready_since_of_a_waiting_task() -> None:
    d = Driver()
    d.apply(cmd.register_executor(d.now, executor_spec("e1")))
    d.apply(cmd.submit_tasks(d.now, [task_row("a"), task_row("b")], None))
    d.apply(cmd.assign_tasks(d.tick(10), 30_000, [["a", "e1", 1]]))
    d.apply(cmd.fail_task(d.tick(90), "a", 1, "e1", "flaky", True, 2_000, True))   # failed at 1100, retry at 3100
    d.apply(cmd.mark_unschedulable(d.tick(5_000), [["b", "no executor runs echo"]]))
    tasks = d.fsm.tasks
    assert ready_since_ms(tasks["a"], tasks) == 3_100
    assert ready_since_ms(tasks["b"], tasks) == 1_000          # the mark is not when it became ready


# ---------------------------------------------------------------------------- NodeMetrics' output
def scrape_text(registry) -> dict[tuple[str, tuple], float]:
    samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def fake_snapshot() -> dict:
    return {"leader": "", "role": "follower", "term": 1, "commit_index": 5, "applied_index": 5,
            "task_statuses": {"dead_letter": 2, "pending": 1}, "executor_statuses": {"online": 2, "offline": 1},
            "executor_load": {"algorithmic": [3, 4], "local_llm": [0, 0]}, "audit_records": 0, "secrets": 0,
            "commands_in_flight": 0, "denied_total": 0}


def test_node_metrics_exports_folded_events_polls_and_hooks() -> None:
    from cluster.metrics import NodeMetrics

    class Leader:
        address = "127.0.0.1:1"

    d = Driver()
    d.apply(cmd.register_executor(d.now, executor_spec("e1")))
    metrics = NodeMetrics("n1", fake_snapshot)
    metrics.start_after_index = d.index
    status = {"leader": None, "raft_term": 1}
    metrics.attach(d.fsm, threading.RLock(), lambda: status)
    d.apply(cmd.submit_tasks(d.now, [task_row("a", "kind-a"), task_row("b", "kind-b", max_attempts=1)], None))
    d.apply(cmd.assign_tasks(d.tick(250), 30_000, [["a", "e1", 1], ["b", "e1", 1]]))
    d.apply(cmd.complete_task(d.tick(750), "a", 1, "e1", "null", True))
    d.apply(cmd.executor_lost(d.tick(10), "e1", "no heartbeat"))      # b: out of attempts → dead_letter
    metrics.poll_once()
    status["leader"] = Leader()
    metrics.poll_once()
    metrics.poll_once()
    metrics.observe_batch(3)
    metrics.observe_wal_fsync(0.002)
    metrics.observe_snapshot(0.5)
    s = scrape_text(metrics.registry)
    n = ("node", "n1")
    assert s[("tasks_total", (n, ("status", "completed"), ("type", "kind-a")))] == 1
    assert s[("tasks_total", (n, ("status", "dead_letter"), ("type", "kind-b")))] == 1
    assert s[("task_duration_seconds_sum", (n, ("type", "kind-a")))] == 1.0
    assert s[("task_duration_seconds_count", (n, ("type", "kind-b")))] == 1
    assert s[("dispatch_latency_seconds_count", (n, ("type", "kind-a")))] == 1
    assert s[("dispatch_latency_seconds_sum", (n, ("type", "kind-a")))] == 0.25
    assert s[("lease_expirations_total", (n,))] == 1
    assert s[("raft_leader_elections_total", (n,))] == 1
    assert s[("metrics_events_missed_total", (n,))] == 0
    assert s[("raft_batch_size_count", (n,))] == 1 and s[("raft_batch_size_sum", (n,))] == 3
    assert s[("wal_fsync_seconds_count", (n,))] == 1
    assert s[("snapshot_duration_seconds_count", (n,))] == 1
    assert s[("dead_letter_tasks", (n,))] == 2
    assert s[("executor_load", (("executor_type", "algorithmic"), n))] == 0.75
    assert s[("executor_load", (("executor_type", "local_llm"), n))] == 0


# ---------------------------------------------------------------------------- hooks
def test_the_journal_reports_each_commit_duration(tmp_path) -> None:
    from wal.journal import LmdbJournal

    seen: list[float] = []
    journal = LmdbJournal(str(tmp_path / "wal"), on_fsync_seconds=seen.append)
    try:
        journal.add(b"x", 1, 1)
        journal.flush()
        journal.flush()                      # nothing queued: no commit, nothing reported
        journal.setCurrentTerm(2, None)      # a vote commits at once
    finally:
        journal.close()
    assert len(seen) == 2 and all(s >= 0 for s in seen)


def test_the_snapshot_writer_reports_each_written_snapshot(tmp_path) -> None:
    from pysyncobj.config import SERIALIZER_STATE

    from cluster.raft import SnapshotSerializer

    seen: list[float] = []
    fsm = CoordinatorFSM()
    fsm.apply_entry(2, encode_entry([cmd.submit_tasks(1, [task_row("a")], None)]))
    serializer = SnapshotSerializer(str(tmp_path / "snapshot.bin"), fsm, threading.RLock(), 1 << 16,
                                    on_written_seconds=seen.append)
    serializer.serialize((None, (b"last", 2, 1), (b"prev", 1, 1), []), 1)
    deadline = time.monotonic() + 20
    state = SERIALIZER_STATE.SERIALIZING
    while state == SERIALIZER_STATE.SERIALIZING and time.monotonic() < deadline:
        time.sleep(0.01)
        state, _ = serializer.checkSerializing()
    assert state == SERIALIZER_STATE.SUCCESS
    assert len(seen) == 1 and seen[0] >= 0


async def test_the_proposer_reports_commands_per_entry() -> None:
    import asyncio

    from cluster.proposer import Proposer, ProposerLimits
    from tests.test_proposer import FakeRaftLog, settle, submit

    fake, sizes = FakeRaftLog(), []
    proposer = Proposer(fake, asyncio.get_running_loop(), ProposerLimits(entries_in_flight_max=1),
                        on_batch_commands=sizes.append)
    first = asyncio.ensure_future(proposer.propose(submit(0)))
    await settle()
    rest = [asyncio.ensure_future(proposer.propose(submit(n))) for n in range(1, 6)]
    await settle()
    threading.Thread(target=fake.commit, args=(0,)).start()
    await first
    await settle()
    threading.Thread(target=fake.commit, args=(1,)).start()
    await asyncio.gather(*rest)
    assert sizes == [1, 5]
