"""Tasks run on real executor agent processes against a real 3-node cluster: a 1,000-task
workflow in dependency order, an executor SIGKILLed or paused mid-task, the leader killed mid-DAG.
What must hold: every task completes exactly once, never before its dependencies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest


from proto import coordinator_pb2 as pb
from tests.executor_pool import ROOT, wait_final, wait_online

pytestmark = [pytest.mark.cluster, pytest.mark.chaos]

WORKLOADS = os.path.join(os.path.dirname(ROOT), "shared", "workloads")
RUNTIME_SCALE = 0.0005  # a 13 s task of the trace sleeps 6.5 ms


def events_by_task(cluster, endpoint: str, kinds: set[str], until_index: int) -> dict[str, list[tuple[int, str, str]]]:
    """Every event of `kinds` up to and including index `until_index`, by task. One index can hold
    many events, so the stream is read until it passes that index or goes quiet."""
    import grpc

    out: dict[str, list[tuple[int, str, str]]] = {}
    with cluster.client([endpoint]) as client:
        try:
            for event in client.watch(from_index=1, kinds=sorted(kinds), timeout_s=5):
                if event.index > until_index:
                    break
                out.setdefault(event.task_id, []).append((event.index, event.kind, event.executor_id))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:  # quiet: everything was delivered
                raise
    return out


def test_workflow_runs_in_dependency_order_on_four_executors(cluster3, executors) -> None:
    with open(os.path.join(WORKLOADS, "Montage_1000.dag.json")) as f:
        workflow = json.load(f)["tasks"]
    specs = [pb.TaskSpec(name=t["id"], type="sleep", input_json=json.dumps({"ms": int(t["runtime_s"] * 1000 * RUNTIME_SCALE)}),
                         depends_on=t["deps"]) for t in workflow]
    for i in range(4):
        executors.start(f"w{i}", capacity=4)
    with cluster3.client(cluster3.endpoints) as client:
        wait_online(client, 4)
        submitted = client.submit_dag(specs, "montage")
        ids = list(submitted.ordered_ids)
        tasks = wait_final(client, ids, timeout_s=240)
        assert {t.status for t in tasks} == {"completed"}
        final_index = client.call("ClusterStatus", pb.ClusterStatusRequest()).node.applied_index
    events = events_by_task(cluster3, cluster3.endpoints[0], {"TaskAssigned", "TaskCompleted"}, final_index)
    name_of = dict(zip(ids, (t["id"] for t in workflow), strict=True))
    id_of = {v: k for k, v in name_of.items()}
    completed_at = {}
    used = set()
    for task_id in ids:
        kinds = [e[1] for e in events[task_id]]
        assert kinds.count("TaskCompleted") == 1, (task_id, kinds)  # exactly once
        completed_at[task_id] = next(e[0] for e in events[task_id] if e[1] == "TaskCompleted")
        used.update(e[2] for e in events[task_id])
    for t in workflow:
        assigned_at = min(e[0] for e in events[id_of[t["id"]]] if e[1] == "TaskAssigned")
        for dep in t["deps"]:
            assert completed_at[id_of[dep]] < assigned_at, f"{t['id']} assigned before {dep} completed"
    assert used == {"w0", "w1", "w2", "w3"}  # the work was spread


def test_executor_killed_mid_task_its_tasks_complete_elsewhere_once(cluster3, executors) -> None:
    executors.start("doomed", capacity=4)
    with cluster3.client(cluster3.endpoints) as client:
        wait_online(client, 1)
        ids = list(client.submit_dag([pb.TaskSpec(name=f"s{i}", type="sleep", input_json='{"ms": 3000}')
                                      for i in range(4)]).ordered_ids)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if all(client.get_task(t).status == "executing" for t in ids):
                break
            time.sleep(0.05)
        executors.signal("doomed", signal.SIGKILL)
        executors.start("rescuer", capacity=4)
        tasks = wait_final(client, ids, timeout_s=60)
    for task in tasks:
        assert task.status == "completed" and task.assigned_executor == "rescuer"
        assert [(a.executor_id, a.outcome) for a in task.attempts] == [("doomed", "lost"), ("rescuer", "completed")]


def test_paused_executor_past_its_lease_is_fenced_out(cluster3, executors) -> None:
    """SIGSTOP an executor mid-task for longer than its lease: the leader declares it lost, the
    task runs again elsewhere, and the paused executor's late result is rejected."""
    executors.start("sleepy", capacity=1)
    with cluster3.client(cluster3.endpoints) as client:
        wait_online(client, 1)
        task_id = client.submit_task(pb.TaskSpec(type="sleep", input_json='{"ms": 1500}')).task_id
        deadline = time.monotonic() + 20
        while client.get_task(task_id).status != "executing" and time.monotonic() < deadline:
            time.sleep(0.05)
        executors.signal("sleepy", signal.SIGSTOP)
        executors.start("awake", capacity=1)
        done = wait_final(client, [task_id], timeout_s=60)[0]
        assert done.status == "completed" and done.assigned_executor == "awake"
        executors.signal("sleepy", signal.SIGCONT)  # it finishes its stale attempt and reports it
        log_path = os.path.join(cluster3.data_dir, "executor-sleepy.log")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with open(log_path) as f:
                if "StaleFencingToken" in f.read():
                    break
            time.sleep(0.1)
        with open(log_path) as f:
            assert "StaleFencingToken" in f.read(), "the late completion was not rejected"
        again = client.get_task(task_id, linearizable=True)
        wait_online(client, 2)  # talking again after the pause: re-registered, back online
    assert again.status == "completed" and again.assigned_executor == "awake"
    assert [(a.attempt, a.executor_id, a.outcome) for a in again.attempts] == [
        (1, "sleepy", "lost"), (2, "awake", "completed")]


def test_leader_killed_mid_dag_completes_without_duplicates(cluster3, executors) -> None:
    specs = [pb.TaskSpec(name=f"n{i}", type="sleep", input_json='{"ms": 20}',
                         depends_on=[f"n{i - 1}"] if i % 10 else []) for i in range(200)]
    executors.start("a", capacity=4)
    executors.start("b", capacity=4)
    with cluster3.client(cluster3.endpoints) as client:
        wait_online(client, 2)
        ids = list(client.submit_dag(specs, "chains").ordered_ids)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            done = client.list_tasks(status=["completed"], limit=1).total_matching
            if done >= 40:
                break
            time.sleep(0.05)
        leader = cluster3.wait_leader()
        cluster3.kill_node(leader)
        tasks = wait_final(client, ids, timeout_s=120)
        assert {t.status for t in tasks} == {"completed"}
    cluster3.start_node(leader)
    cluster3.wait_converged(timeout_s=60)
    status = cluster3.statuses()[leader]
    events = events_by_task(cluster3, cluster3.node(leader).grpc_address, {"TaskCompleted"}, status.applied_index)
    assert all([e[1] for e in events[t]].count("TaskCompleted") == 1 for t in ids)


def test_retries_dead_letter_requeue_unschedulable_and_cancel(cluster3, executors, tmp_path) -> None:
    executors.start("worker", capacity=1)
    data_dir = cluster3.data_dir
    with cluster3.client(cluster3.endpoints) as client:
        wait_online(client, 1)
        flaky = client.submit_task(pb.TaskSpec(type="fail", input_json='{"times": 1}', max_attempts=3)).task_id
        doomed = client.submit_task(pb.TaskSpec(type="fail", input_json='{"times": 2}', max_attempts=2)).task_id
        gpu = client.submit_task(pb.TaskSpec(type="gpu_job")).task_id
        flaky_done, doomed_done = wait_final(client, [flaky, doomed], timeout_s=60)
        assert flaky_done.status == "completed" and [a.outcome for a in flaky_done.attempts] == ["failed", "completed"]
        assert doomed_done.status == "dead_letter" and [a.outcome for a in doomed_done.attempts] == ["failed", "failed"]
        # the operator's view, then the operator's fix
        listed = subprocess.run(
            [sys.executable, "-m", "cluster.cli", "task", "list", "--status", "dead_letter", "--output", "json"],
            capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, "COORDCTL_DATA_DIR": data_dir})
        assert [t["id"] for t in json.loads(listed.stdout)["tasks"]] == [doomed]
        client.call("RequeueTask", pb.RequeueTaskRequest(task_id=doomed, extra_attempts=1), retry=False)
        requeued = wait_final(client, [doomed], timeout_s=60)[0]
        assert requeued.status == "completed" and requeued.attempt == 3
        # no executor runs gpu_job: reported, not silently queued
        deadline = time.monotonic() + 10
        while "unschedulable" not in client.get_task(gpu).error and time.monotonic() < deadline:
            time.sleep(0.1)
        shown = client.get_task(gpu)
        assert shown.status == "pending" and "no executor" in shown.error, shown.error
        # cancelling a running task reaches its executor and frees its only slot
        long = client.submit_task(pb.TaskSpec(type="sleep", input_json='{"ms": 60000}')).task_id
        deadline = time.monotonic() + 20
        while client.get_task(long).status != "executing" and time.monotonic() < deadline:
            time.sleep(0.05)
        client.cancel_task(long, "changed my mind")
        after = client.submit_task(pb.TaskSpec(type="echo", input_json='{"x": 1}')).task_id
        assert wait_final(client, [after], timeout_s=20)[0].status == "completed"
    with open(os.path.join(data_dir, "executor-worker.log")) as f:
        assert f"cancel ('{long}', 1)" in f.read()
    listed = subprocess.run([sys.executable, "-m", "cluster.cli", "executor", "list", "--output", "json",
                             "--endpoints", cluster3.node(cluster3.wait_leader()).grpc_address,
                             "--data-dir", data_dir],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    [worker] = json.loads(listed.stdout)["executors"]
    assert worker["status"] == "online" and worker["capacity"] == 1 and worker["tasks_completed"] >= 3
    assert 0 <= worker["heartbeat_age_s"] < 10  # the leader hears every executor


def test_cancelling_a_dag_stops_its_running_tasks_and_cancels_the_rest(cluster3, executors) -> None:
    executors.start("worker", capacity=2)
    env = {**os.environ, "COORDCTL_DATA_DIR": cluster3.data_dir}
    with cluster3.client(cluster3.endpoints) as client:
        wait_online(client, 1)
        done = client.submit_dag([pb.TaskSpec(name="quick", type="echo")])
        client.wait_tasks(list(done.ordered_ids), 20)
        dag = client.submit_dag([pb.TaskSpec(name=f"s{i}", type="sleep", input_json='{"ms": 60000}') for i in range(4)]
                                + [pb.TaskSpec(name="after", type="echo", depends_on=["s0", "s1"])])
        outside = client.submit_task(pb.TaskSpec(type="echo", depends_on=[dag.task_ids["after"]])).task_id
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if sum(client.get_task(t).status == "executing" for t in dag.ordered_ids) == 2:
                break
            time.sleep(0.05)
        result = subprocess.run([sys.executable, "-m", "cluster.cli", "dag", "cancel", dag.dag_id, "--reason", "stop",
                                 "--output", "json"], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
        assert result.returncode == 0, result.stderr
        assert sorted(json.loads(result.stdout)["cancelled"]) == sorted(dag.ordered_ids)
        shown = subprocess.run([sys.executable, "-m", "cluster.cli", "dag", "show", dag.dag_id, "--output", "json"],
                               capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
        assert json.loads(shown.stdout)["statuses"] == {"cancelled": 5}
        assert client.get_task(outside).error == f"upstream_failed:{dag.task_ids['after']}"
        # both slots are free again: the executor stopped the cancelled attempts
        follow = client.submit_dag([pb.TaskSpec(name=f"e{i}", type="echo") for i in range(2)])
        assert {t.status for t in wait_final(client, list(follow.ordered_ids), timeout_s=20)} == {"completed"}
        rejected = subprocess.run([sys.executable, "-m", "cluster.cli", "dag", "cancel", "d-nope"],
                                  capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
        assert rejected.returncode == 1 and "NOT_FOUND" in rejected.stderr
    with open(os.path.join(cluster3.data_dir, "executor-worker.log")) as f:
        log = f.read()
    assert log.count("cancel ('") >= 2


def test_a_running_task_delegates_subtasks_and_waits_for_them(cluster3, executors) -> None:
    executors.start("worker", capacity=4)
    children = [{"type": "echo", "input": {"i": i}} for i in range(3)]
    with cluster3.client(cluster3.endpoints) as client:
        wait_online(client, 1)
        dag = client.submit_dag([pb.TaskSpec(name="parent", type="fanout", input_json=json.dumps({"children": children})),
                                 pb.TaskSpec(name="after", type="echo", depends_on=["parent"])])
        parent_id = dag.task_ids["parent"]
        done = wait_final(client, list(dag.ordered_ids), timeout_s=60)
        assert {t.status for t in done} == {"completed"}
        parent = client.get_task(parent_id)
        output = json.loads(parent.result_json)
        assert [c["output"] for c in output["children"]] == [{"i": 0}, {"i": 1}, {"i": 2}]
        subtasks = client.list_tasks(dag_id=dag.dag_id, limit=100).tasks
        assert {t.id for t in subtasks} == set(dag.ordered_ids) | {c["id"] for c in output["children"]}
        # a stale or foreign delegation is fenced out
        with pytest.raises(Exception, match="StaleFencingToken"):
            client.call("Delegate", pb.DelegateRequest(parent_task_id=parent_id, parent_attempt=1, executor_id="worker",
                                                       request_id="late", tasks=[pb.TaskSpec(type="echo")]))

