"""coordctl end to end: a real cluster started by `coordctl cluster up`, every command with
`--output json`, and clear errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from cluster.local import LocalCluster, pid_alive

pytestmark = pytest.mark.cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def coordctl(data_dir: str, *args: str, expect: int = 0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "COORDCTL_DATA_DIR": data_dir, "COORDCTL_ENDPOINTS": "", **(env or {})},
    )
    assert result.returncode == expect, (args, result.stdout, result.stderr)
    return result


def as_json(result: subprocess.CompletedProcess):
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("coordctl") / "cluster")
    try:
        up = as_json(coordctl(path, "cluster", "up", "--nodes", "3", "--output", "json"))
        assert up["leader"] in {"n1", "n2", "n3"} and len(up["nodes"]) == 3
        yield path
    finally:
        LocalCluster(path).down()


def test_cluster_file_has_private_secret(data_dir) -> None:
    assert os.stat(os.path.join(data_dir, "cluster.secret")).st_mode & 0o777 == 0o600
    status = as_json(coordctl(data_dir, "cluster", "status", "--output", "json"))
    roles = sorted(n["role"] for n in status["nodes"])
    assert roles == ["follower", "follower", "leader"]
    for node in status["nodes"]:
        assert node["healthy"] and pid_alive(node["pid"]) and node["commit_index"] >= 1


def test_dag_submit_list_show_wait_cancel(data_dir, tmp_path) -> None:
    dag_file = tmp_path / "dag.yaml"
    dag_file.write_text(
        "tasks:\n"
        "  - {name: a, type: echo, input: {x: 1}, priority: 70}\n"
        "  - {name: b, type: echo, depends_on: [a], deadline: +30s, max_attempts: 4}\n"
    )
    submitted = as_json(coordctl(data_dir, "dag", "submit", str(dag_file), "--output", "json"))
    ids = submitted["task_ids"]
    assert set(ids) == {"a", "b"}
    shown = as_json(coordctl(data_dir, "task", "show", ids["b"], "--linearizable", "--output", "json"))
    assert shown["dependencies"] == [ids["a"]] and shown["max_attempts"] == 4 and shown["status"] == "pending"
    assert shown["deadline_unix_ms"] > shown["created_at_unix_ms"]
    listed = as_json(coordctl(data_dir, "task", "list", "--status", "pending", "--output", "json"))
    assert {ids["a"], ids["b"]} <= {t["id"] for t in listed["tasks"]}
    waited = coordctl(data_dir, "task", "wait", ids["a"], "--timeout", "0.2", "--output", "json", expect=3)
    assert as_json(waited)["all_final"] is False
    cancelled = as_json(coordctl(data_dir, "task", "cancel", ids["a"], "--reason", "test", "--output", "json"))
    assert cancelled["status"] == "cancelled"
    assert as_json(coordctl(data_dir, "task", "wait", ids["a"], "--output", "json"))["all_final"] is True


def test_task_submit_idempotency_and_events(data_dir) -> None:
    first = as_json(coordctl(data_dir, "task", "submit", "--type", "echo", "--input", '{"k": 1}',
                             "--idempotency-key", "cli-k", "--output", "json"))
    again = as_json(coordctl(data_dir, "task", "submit", "--type", "echo", "--idempotency-key", "cli-k",
                             "--output", "json"))
    assert again["task_id"] == first["task_id"] and again["duplicate"] is True
    lines = coordctl(data_dir, "events", "watch", "--from-index", str(first["index"]), "--count", "1",
                     "--output", "json").stdout.splitlines()
    event = json.loads(lines[0])
    assert event["kind"] == "TaskCreated" and event["task_id"] == first["task_id"]


@pytest.mark.parametrize(("args", "message"), [
    (["task", "submit", "--type", "echo", "--priority", "101"], "task.priority: must be between 0 and 100"),
    (["task", "submit", "--type", "echo", "--input", "{bad"], "--input: not valid JSON"),
    (["task", "submit", "--type", "echo", "--deadline", "tomorrow"], "--deadline: RFC 3339"),
    (["task", "show", "t-nope"], "NOT_FOUND"),
    (["task", "list", "--status", "weird"], "status: unknown"),
    (["task", "list", "--limit", "5000"], "limit: must be between 1 and 1000"),
])
def test_bad_input_is_a_clear_error(data_dir, args, message) -> None:
    result = coordctl(data_dir, *args, expect=1)
    assert message in result.stderr.replace("\n", " ")


def test_bad_dag_files(data_dir, tmp_path) -> None:
    cases = {
        "cycle.yaml": ("tasks:\n  - {name: a, type: echo, depends_on: [b]}\n  - {name: b, type: echo, depends_on: [a]}\n",
                       "dependency cycle"),
        "unknown.yaml": ("tasks:\n  - {name: a, type: echo, colour: red}\n", "tasks[0]: unknown fields ['colour']"),
        "shape.json": ('{"jobs": []}', 'expected {"tasks"'),
        "broken.yaml": ("tasks: [", "not valid YAML"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        result = coordctl(data_dir, "dag", "submit", str(path), expect=1)
        assert message in result.stderr.replace("\n", " "), name


def test_endpoints_flag_and_env(data_dir) -> None:
    endpoint = LocalCluster(data_dir).endpoints[1]
    status = as_json(coordctl(data_dir, "cluster", "status", "--endpoints", endpoint, "--output", "json"))
    assert [n["grpc_address"] for n in status["nodes"]] == [endpoint]
    # Away from the cluster's directory: the endpoint from the environment, the certificate
    # directory and a token given explicitly.
    token = coordctl(data_dir, "token", "issue", "--subject", "ops", "--role", "operator:level1").stdout.strip()
    status = as_json(coordctl("/nonexistent", "--certs-dir", os.path.join(data_dir, "certs"), "cluster", "status",
                              "--output", "json", env={"COORDCTL_ENDPOINTS": endpoint, "COORD_TOKEN": token}))
    assert [n["grpc_address"] for n in status["nodes"]] == [endpoint]
    result = coordctl("/nonexistent", "cluster", "status", env={"COORDCTL_ENDPOINTS": endpoint}, expect=1)
    assert "no token" in result.stderr and "COORD_TOKEN" in result.stderr
    result = coordctl("/nonexistent", "task", "list", expect=1)
    assert "no endpoints" in result.stderr


def test_node_run_refuses_without_secret(tmp_path) -> None:
    cluster_file = tmp_path / "c.json"
    cluster_file.write_text(json.dumps({"nodes": [{"id": "n1", "raft_address": "127.0.0.1:1", "grpc_address": "127.0.0.1:2"}]}))
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "node", "run", "--cluster-file", str(cluster_file), "--node-id", "n1",
         "--data-dir", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, "COORD_CLUSTER_SECRET": ""},
    )
    assert result.returncode != 0 and "cluster secret: required" in result.stderr


def test_executor_profile_is_registered_for_the_scheduler(data_dir, tmp_path) -> None:
    profile_path = tmp_path / "profile.json"
    profile = as_json(coordctl(data_dir, "executor", "profile", "--type", "algorithmic", "--repeats", "2",
                               "--write", str(profile_path), "--output", "json"))
    assert profile["task_types"]["sleep"]["latency_s_p50"] >= 0.005 and json.loads(profile_path.read_text()) == profile
    agent = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "executor", "run", "--type", "algorithmic", "--name", "profiled",
         "--profile-file", str(profile_path)],
        env={**os.environ, "COORDCTL_DATA_DIR": data_dir, "COORDCTL_ENDPOINTS": ""}, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        registered = None
        for _ in range(200):                                         # bounded: ~20 s
            listed = as_json(coordctl(data_dir, "executor", "list", "--output", "json"))
            registered = next((e for e in listed["executors"] if e["id"] == "profiled"), None)
            if registered is not None:
                break
            time.sleep(0.1)
        assert registered is not None, "the profiled executor never registered"
        declared = json.loads(registered["performance_profile_json"])
        assert declared["latency_s_p50"] == profile["latency_s_p50"] and declared["format"] == profile["format"]
    finally:
        agent.kill()
        agent.wait(10)
    bad = coordctl(data_dir, "executor", "run", "--type", "algorithmic", "--name", "x", "--profile-file",
                   str(tmp_path / "missing.json"), expect=1)
    assert "--profile-file" in bad.stderr
