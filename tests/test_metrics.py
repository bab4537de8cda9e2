"""Prometheus metrics of a real 3-node cluster (issue 7, first part): every node serves /metrics,
the text parses, exactly one node says it leads, and task_queue_depth agrees with what the API
lists."""

from __future__ import annotations

import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proto import coordinator_pb2 as pb

pytestmark = [pytest.mark.cluster]


def scrape(address: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_every_node_serves_metrics_that_agree_with_the_api(cluster3) -> None:
    with cluster3.client() as client:
        ids = [client.submit_task(pb.TaskSpec(type="no-executor-runs-this")).task_id for _ in range(5)]
        listed = client.call("ListTasks", pb.ListTasksRequest(status=["pending"], limit=1000,
                                                              consistency=pb.CONSISTENCY_LINEARIZABLE))
    assert {t.id for t in listed.tasks} >= set(ids)
    cluster3.wait_converged()
    leaders, submits_ok = 0, 0.0
    for node in cluster3.nodes:
        assert node.metrics_address
        deadline = time.monotonic() + 20
        while True:
            samples = scrape(node.metrics_address)
            pending = samples[("task_queue_depth", (("node", node.id), ("status", "pending")))]
            if pending == listed.total_matching or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert pending == listed.total_matching
        assert samples[("raft_term", (("node", node.id),))] >= 1
        assert samples[("raft_applied_index", (("node", node.id),))] >= 1
        assert samples[("raft_apply_lag_entries", (("node", node.id),))] >= 0
        leaders += int(samples[("raft_is_leader", (("node", node.id),))])
        submits_ok += samples.get(("grpc_server_handled_total",
                                   (("code", "OK"), ("method", "SubmitTask"), ("node", node.id))), 0)
        count = sum(value for (name, labels), value in samples.items()
                    if name == "grpc_server_handling_seconds_count" and ("method", "ClusterStatus") in labels
                    and ("node", node.id) in labels)   # any code: under load a poll may time out
        assert count >= 1   # the status polls of wait_converged reached every node
    assert leaders == 1
    assert submits_ok == 5


def test_healthz_and_readyz_answer_with_details(cluster3) -> None:
    import json
    import urllib.error

    node = cluster3.nodes[0]
    with urllib.request.urlopen(f"http://{node.metrics_address}/healthz", timeout=5) as reply:
        assert reply.status == 200 and json.loads(reply.read())["status"] == "alive"
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"http://{node.metrics_address}/readyz", timeout=5) as reply:
                body = json.loads(reply.read())
                break
        except urllib.error.HTTPError as exc:   # 503 until the node knows a leader
            body = json.loads(exc.read())
            if time.monotonic() > deadline:
                raise AssertionError(f"never ready: {body}") from None
            time.sleep(0.2)
    assert body["status"] == "ready"
    assert set(body["checks"]) == {"leader", "wal", "disk", "apply"} and all(c["ok"] for c in body["checks"].values())


def test_node_logs_are_json_lines(make_cluster) -> None:
    import json
    import os

    cluster = make_cluster(3, extra_args=["--log-format", "json"], subdir="jsonlogs")
    with cluster.client() as client:
        client.submit_task(pb.TaskSpec(type="echo"))
    cluster.down()
    for node in cluster.nodes:
        with open(os.path.join(node.data_dir, "node.log"), encoding="utf-8", errors="replace") as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        assert lines, node.id
        records = [json.loads(line) for line in lines]   # every line is one JSON object
        assert all({"ts", "level", "node", "component", "message"} <= set(r) for r in records)
        assert {r["node"] for r in records} == {node.id}


def test_a_planted_secret_never_reaches_a_log_line_in_either_format(capsys) -> None:
    import json
    import logging

    from cluster.logs import configure_logging

    planted = "sk-planted-0123456789abcdef"
    token = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXBhcnQ"
    log = logging.getLogger("coordinator.test")
    for log_format in ("json", "text"):
        configure_logging("INFO", log_format, node="n9")
        log.warning("calling with api_key=%s and Bearer %s", planted, token, extra={"task_id": "t-1"})
        try:
            raise RuntimeError(f"upstream said no to {planted}")
        except RuntimeError:
            log.exception("adapter failed")
        err = capsys.readouterr().err
        assert planted not in err and token not in err and "***" in err
        if log_format == "json":
            first, second = (json.loads(line) for line in err.splitlines() if line.startswith("{"))
            assert first["task_id"] == "t-1" and first["node"] == "n9" and first["level"] == "WARNING"
            assert second["exc"].startswith("Traceback") and "RuntimeError" in second["exc"]
    logging.getLogger().handlers.clear()


def test_coordctl_top_renders_the_real_clusters_numbers(cluster3) -> None:
    from rich.console import Console

    from cluster.top import TopState, frame

    with cluster3.client() as client:
        for _ in range(3):
            client.submit_task(pb.TaskSpec(type="nobody-runs-this"))
        pending = client.call("ListTasks", pb.ListTasksRequest(status=["pending"], limit=1,
                                                               consistency=pb.CONSISTENCY_LINEARIZABLE)).total_matching
        leader = cluster3.wait_leader()
        console = Console(record=True, width=200)
        state = TopState()
        console.print(frame(client, state))
        console.print(frame(client, state))          # a second frame has rates
        text = console.export_text()
    assert "nodes" in text and "tasks by status" in text and "completed/s" in text
    for node in cluster3.nodes:
        assert node.id in text and node.grpc_address in text
    leader_rows = [line for line in text.splitlines() if " leader " in f" {line} " and leader in line]
    assert leader_rows, text
    lines = text.splitlines()
    header_at = next(i for i, line in enumerate(lines) if "pending" in line and "dead_letter" in line)
    header = [cell.strip() for cell in lines[header_at].replace("┃", "│").split("│") if cell.strip()]
    row = next(line for line in lines[header_at + 1:] if any(ch.isdigit() for ch in line))
    values = [cell.strip() for cell in row.split("│") if cell.strip()]
    assert dict(zip(header, values, strict=True))["pending"] == f"{pending:,}"


def test_task_metrics_count_a_dag_run_on_every_node(cluster3, executors) -> None:
    """A 4-task DAG runs on a real executor; every node (each applies every task) counts the same
    completions by type, and observed durations and dispatch latencies; the WAL's fsyncs and the
    leader's Raft batches are observed through the hooks."""
    from tests.executor_pool import wait_final, wait_online

    executors.start("worker", capacity=2)
    specs = [
        pb.TaskSpec(name="a", type="echo", input_json='{"x": 1}'),
        pb.TaskSpec(name="b", type="sleep", input_json='{"ms": 5}', depends_on=["a"]),
        pb.TaskSpec(name="c", type="echo", input_json='{"x": 2}', depends_on=["a"]),
        pb.TaskSpec(name="d", type="sleep", input_json='{"ms": 5}', depends_on=["b", "c"]),
    ]
    with cluster3.client(cluster3.endpoints) as client:
        wait_online(client, 1)
        ids = list(client.submit_dag(specs).ordered_ids)
        tasks = wait_final(client, ids, timeout_s=20)
    assert [t.status for t in tasks] == ["completed"] * 4
    leaders = 0
    for node in cluster3.nodes:
        n = ("node", node.id)
        deadline = time.monotonic() + 10
        for _ in range(100):   # the events are folded every 0.5 s
            samples = scrape(node.metrics_address)
            done = {t: samples.get(("tasks_total", (n, ("status", "completed"), ("type", t))), 0) for t in ("echo", "sleep")}
            if done == {"echo": 2, "sleep": 2} or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert done == {"echo": 2, "sleep": 2}, node.id
        assert not [k for k, v in samples.items() if k[0] == "tasks_total" and ("status", "completed") not in k[1] and v]
        for task_type in ("echo", "sleep"):
            assert samples[("task_duration_seconds_count", (n, ("type", task_type)))] == 2
            assert samples[("dispatch_latency_seconds_count", (n, ("type", task_type)))] == 2
        assert samples[("wal_fsync_seconds_count", (n,))] > 0
        assert samples[("raft_leader_elections_total", (n,))] >= 1
        assert samples[("metrics_events_missed_total", (n,))] == 0
        assert samples[("lease_expirations_total", (n,))] == 0
        assert samples[("dead_letter_tasks", (n,))] == 0
        assert 0 <= samples[("executor_load", (("executor_type", "algorithmic"), n))] <= 1
        if samples[("raft_is_leader", (n,))] == 1:
            leaders += 1
            assert samples[("raft_batch_size_count", (n,))] > 0
    assert leaders == 1


def test_grpc_health_reports_each_component_and_loses_raft_without_a_majority(cluster3) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    serving = health_pb2.HealthCheckResponse.SERVING
    components = ("coordinator.raft", "coordinator.wal", "coordinator.disk", "coordinator.apply")

    def statuses(endpoint: str) -> dict[str, int]:
        seen = {}
        with cluster3.admin.channel(endpoint) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for name in ("", *components):
                try:
                    seen[name] = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
                except grpc.RpcError as exc:   # NOT_FOUND before the node's first component refresh
                    seen[name] = exc.code().name
        return seen

    for endpoint in cluster3.endpoints:
        deadline = time.monotonic() + 20
        while (seen := statuses(endpoint)) != dict.fromkeys(("", *components), serving):
            assert time.monotonic() < deadline, seen
            time.sleep(0.2)
    # The leader is the harder case: cut off from its majority, it steps down after
    # leaderFallbackTimeout (1 s, cluster/raft_patches.py); a follower loses its leader at once.
    leader = cluster3.wait_leader()
    survivor = cluster3.node(leader)
    others = [n for n in cluster3.nodes if n.id != leader]
    for node in others:
        cluster3.kill_node(node.id)
    deadline = time.monotonic() + 30   # the survivor notices it has no leader, then the next refresh
    while (seen := statuses(survivor.grpc_address))["coordinator.raft"] == serving:
        assert time.monotonic() < deadline, seen
        time.sleep(0.2)
    assert seen[""] == serving and seen["coordinator.wal"] == serving   # alive, its WAL fine: only Raft is out
