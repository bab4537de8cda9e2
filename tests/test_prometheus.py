"""deploy/ against the real tools (issue 7): promtool checks the alert rules and the example config
and runs the rules' unit tests; the Grafana dashboard uses only metrics the cluster exports; the
metrics text of a real 3-node cluster (and of an executor agent) passes `promtool check metrics`;
and a real Prometheus scraping that cluster answers a PromQL query for pending tasks with the
count `coordctl task list` shows.

promtool and prometheus come from the Debian package `prometheus` (`make test` installs it). Without
them these tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from cluster.local import LocalCluster, free_port
from proto import coordinator_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES_TESTS = sorted((DEPLOY / "prometheus" / "tests").glob("*_test.yml"))
DASHBOARD = DEPLOY / "grafana" / "agent-coordinator.json"

PENDING_TASKS = 7
PROMTOOL_TIMEOUT_S = 60
PROMETHEUS_READY_WAIT_S = 20
PROMETHEUS_START_TRIES_MAX = 3          # a free port taken before prometheus binds it: try another
SCRAPE_WAIT_S = 30
POLL_INTERVAL_S = 0.25

# What nodes and executor agents export (cluster/metrics.py, cluster/agent_metrics.py).
NODE_METRICS = {
    "raft_is_leader", "raft_term", "raft_commit_index", "raft_applied_index", "raft_apply_lag_entries",
    "raft_leader_elections_total", "raft_batch_size", "wal_fsync_seconds", "snapshot_duration_seconds",
    "task_queue_depth", "tasks_total", "task_duration_seconds", "dispatch_latency_seconds", "task_retries_total",
    "lease_expirations_total", "dead_letter_tasks", "executor_load", "executors", "audit_records", "secrets",
    "proposer_commands_in_flight", "grpc_access_denied_total", "grpc_server_handled_total",
    "grpc_server_handling_seconds", "metrics_events_missed_total",
}
AGENT_METRICS = {
    "executor_latency_seconds", "executor_attempts_total", "executor_load", "executor_running_attempts",
    "executor_queued_attempts", "llm_tokens_total", "llm_cost_usd_total",
}
HISTOGRAMS = {"raft_batch_size", "wal_fsync_seconds", "snapshot_duration_seconds", "task_duration_seconds",
              "dispatch_latency_seconds", "grpc_server_handling_seconds", "executor_latency_seconds"}
# Series Prometheus makes itself: `up` for every target, `probe_success` from the blackbox exporter.
PROMETHEUS_METRICS = {"up", "probe_success"}

PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                   "offset", "inf", "nan"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not on PATH: install the Debian package prometheus (make tools)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def promtool(*args: str, stdin: bytes | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool"), *args], input=stdin, capture_output=True,
                          timeout=PROMTOOL_TIMEOUT_S, cwd=cwd)


def described(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout.decode()}\nstderr:\n{result.stderr.decode()}"


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression, roughly: strings, label matchers, ranges and label
    lists are removed; what is left that is not a function, keyword or number is a name."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        if word.lower() in PROMQL_KEYWORDS or text[match.end():].lstrip().startswith("("):
            continue
        names.add(word)
    return names


def base_name(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
            return name[: -len(suffix)]
    return name


def recorded_names() -> set[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return {rule["record"] for group in rules["groups"] for rule in group["rules"] if "record" in rule}


# ------------------------------------------------------------------------------ static: rules, config, dashboard
def test_alert_rules_pass_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, described(result)
    assert b"SUCCESS" in result.stdout


def test_example_config_passes_promtool_check_config(tmp_path) -> None:
    shutil.copy(PROM_CONFIG, tmp_path / "prometheus.yml")
    shutil.copy(ALERTS, tmp_path / "alerts.yml")      # rule_files are relative to the config
    result = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0, described(result)
    assert b"1 rule files found" in result.stdout


def test_alert_rules_unit_tests_pass_and_cover_firing_and_silence() -> None:
    assert RULES_TESTS
    result = promtool("test", "rules", *map(str, RULES_TESTS))
    assert result.returncode == 0, described(result)
    cases = [case for path in RULES_TESTS for case in yaml.safe_load(path.read_text())["tests"]]
    checks = [check for case in cases for check in case["alert_rule_test"]]
    for alert in ("CoordinatorNoLeader", "CoordinatorApplyLag", "CoordinatorDeadLettersRising"):
        outcomes = {bool(check["exp_alerts"]) for check in checks if check["alertname"] == alert}
        assert outcomes == {True, False}, f"{alert}: the unit tests must show it firing and staying silent"
    alerts = {rule["alert"] for group in yaml.safe_load(ALERTS.read_text())["groups"]
              for rule in group["rules"] if "alert" in rule}
    untested = alerts - {check["alertname"] for check in checks if check["exp_alerts"]}
    assert untested <= {"CoordinatorNotReady", "ExecutorAgentDown"}, untested   # plain `== 0` rules


def test_alert_rules_use_known_metrics_and_carry_severity_and_text() -> None:
    known = NODE_METRICS | AGENT_METRICS | PROMETHEUS_METRICS | recorded_names()
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            unknown = {base_name(n) for n in metric_names(rule["expr"])} - known
            assert not unknown, (rule.get("alert") or rule.get("record"), unknown)
            if "alert" in rule:
                assert "for" in rule and rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
                assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_metric_name_parsing_finds_names_and_skips_the_rest() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, type) (max without (node, instance) '
            '(rate(task_duration_seconds_bucket{job=~"$job", status!="ok"}[$__rate_interval])))) '
            '/ on (job) group_left scalar(agent_coordinator:llm_budget_usd_per_day) > 1e3 and up offset 5m')
    assert metric_names(expr) == {"task_duration_seconds_bucket", "agent_coordinator:llm_budget_usd_per_day", "up"}
    assert base_name("task_duration_seconds_bucket") == "task_duration_seconds"
    assert base_name("tasks_total") == "tasks_total"


def test_dashboard_is_grafana_json_whose_panels_query_known_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36 and dashboard["title"] and dashboard["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"]), "panel ids must be unique"
    known = NODE_METRICS | AGENT_METRICS | PROMETHEUS_METRICS | recorded_names()
    used: set[str] = set()
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        exprs = [t["expr"] for t in panel.get("targets", []) if t.get("expr", "").strip()]
        assert exprs, f"panel {panel['title']!r} has no target with an expr"
        for expr in exprs:
            names = {base_name(n) for n in metric_names(expr)}
            assert names, (panel["title"], expr)
            assert not names - known, (panel["title"], names - known)
            used |= names
    missing = (NODE_METRICS | AGENT_METRICS) - used
    assert not missing, f"metrics with no panel: {sorted(missing)}"


# ------------------------------------------------------------------------------ a real cluster and Prometheus
def scrape_text(address: str) -> bytes:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        return reply.read()


def assert_promtool_accepts_metrics(name: str, text: bytes) -> None:
    result = promtool("check", "metrics", stdin=text)
    problems = (result.stdout + result.stderr).decode().strip()
    assert result.returncode == 0 and not problems, f"{name}: promtool check metrics: {problems}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    """A secure 3-node cluster holding PENDING_TASKS tasks that no executor runs, and a cancelled
    one (so the task counters and histograms have samples)."""
    tool("promtool")
    local = LocalCluster(str(tmp_path_factory.mktemp("prometheus") / "cluster"))
    try:
        local.up(3, wait_leader_s=30)
        with local.client() as client:
            for _ in range(PENDING_TASKS):
                client.submit_task(pb.TaskSpec(type="nobody-runs-this"))
            cancelled = client.submit_task(pb.TaskSpec(type="nobody-runs-this")).task_id
            client.cancel_task(cancelled, reason="a final status for tasks_total")
        local.wait_converged()
        yield local
    finally:
        local.down()


def coordctl_json(cluster: LocalCluster, *args: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args, "--output", "json"], capture_output=True, text=True,
        timeout=120, cwd=ROOT, env={**os.environ, "COORDCTL_DATA_DIR": cluster.data_dir, "COORDCTL_ENDPOINTS": ""},
    )
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return json.loads(result.stdout)


@pytest.mark.cluster
def test_every_nodes_metrics_pass_promtool_check_metrics(cluster) -> None:
    for node in cluster.nodes:
        text = scrape_text(node.metrics_address)
        assert b"task_queue_depth{" in text
        assert_promtool_accepts_metrics(f"node {node.id}", text)


class PrometheusServer:
    """A real Prometheus on a free loopback port, scraping `targets` every second with the example
    config's coordinator job and rules (deploy/prometheus). Always stopped by PID."""

    def __init__(self, workdir: Path, targets: list[str]) -> None:
        self.workdir = workdir
        config = yaml.safe_load(PROM_CONFIG.read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
        jobs = [job for job in config["scrape_configs"] if job["job_name"] == "agent-coordinator"]
        assert len(jobs) == 1, "the example config's coordinator job"
        jobs[0]["static_configs"] = [{"targets": targets}]
        config["scrape_configs"] = jobs           # no executor agents or blackbox exporter here
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        shutil.copy(ALERTS, workdir / "alerts.yml")
        self.proc: subprocess.Popen | None = None
        self.address = ""

    def start(self) -> None:
        for attempt in range(PROMETHEUS_START_TRIES_MAX):
            self.address = f"127.0.0.1:{free_port()}"
            log = open(self.workdir / "prometheus.log", "ab")  # noqa: SIM115
            self.proc = subprocess.Popen(
                [tool("prometheus"), f"--config.file={self.workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.workdir / f'data-{attempt}'}", f"--web.listen-address={self.address}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            log.close()
            if self._wait_ready():
                return
            self.stop()
            if "address already in use" not in self.log():
                break
        raise AssertionError(f"prometheus did not become ready:\n{self.log()[-3000:]}")

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + PROMETHEUS_READY_WAIT_S
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://{self.address}/-/ready", timeout=2) as reply:
                    if reply.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(POLL_INTERVAL_S)
        return False

    def log(self) -> str:
        return (self.workdir / "prometheus.log").read_text(errors="replace")

    def api(self, path: str, **params: str) -> dict:
        url = f"http://{self.address}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                body = json.loads(reply.read())
        except urllib.error.HTTPError as exc:      # 400 / 422: a bad query, with the reason as JSON
            body = json.loads(exc.read())
        assert body["status"] == "success", (params, body)
        return body["data"]

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None


@pytest.fixture(scope="module")
def prometheus(cluster, tmp_path_factory) -> Iterator[PrometheusServer]:
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus-server"),
                              [node.metrics_address for node in cluster.nodes])
    try:
        server.start()
        yield server
    finally:
        server.stop()


def poll(fetch, done, wait_s: float):
    """fetch() until done(value) or wait_s passes (at most wait_s / POLL_INTERVAL_S tries);
    returns the last value, for the caller to assert on."""
    value = fetch()
    for _ in range(int(wait_s / POLL_INTERVAL_S)):
        if done(value):
            break
        time.sleep(POLL_INTERVAL_S)
        value = fetch()
    return value


@pytest.mark.cluster
def test_prometheus_answers_the_pending_count_the_cli_shows(cluster, prometheus) -> None:
    listed = coordctl_json(cluster, "task", "list", "--status", "pending", "--linearizable", "--limit", "1000")
    assert listed["total_matching"] == PENDING_TASKS
    node_ids = {node.id for node in cluster.nodes}

    def seen() -> dict[str, float]:
        result = prometheus.api("query", query='task_queue_depth{status="pending"}')
        return {r["metric"]["node"]: float(r["value"][1]) for r in result["result"]}

    values = poll(seen, lambda v: set(v) == node_ids and all(x == listed["total_matching"] for x in v.values()),
                  SCRAPE_WAIT_S)
    assert values == {node_id: float(listed["total_matching"]) for node_id in node_ids}, prometheus.log()[-2000:]

    targets = prometheus.api("targets")["activeTargets"]
    assert sorted(t["labels"]["instance"] for t in targets) == sorted(n.metrics_address for n in cluster.nodes)
    assert all(t["labels"]["job"] == "agent-coordinator" and t["health"] == "up" for t in targets), targets

    # The example rules load and evaluate against the real series without errors.
    def rules() -> list[dict]:
        return [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]

    loaded = poll(rules, lambda rs: rs and all(r["health"] != "unknown" for r in rs), SCRAPE_WAIT_S)
    expected = {rule.get("alert") or rule.get("record") for group in yaml.safe_load(ALERTS.read_text())["groups"]
                for rule in group["rules"]}
    assert {rule["name"] for rule in loaded} == expected
    assert all(rule["health"] == "ok" for rule in loaded), [(r["name"], r.get("lastError")) for r in loaded]


@pytest.mark.cluster
def test_every_dashboard_query_evaluates_on_the_real_prometheus(prometheus) -> None:
    """Catches what parsing JSON cannot: PromQL syntax, and errors only evaluation finds (such as
    many-to-many matches). The dashboard's variables are given the values Grafana would."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {"$executor_job": ".*", "$job": "agent-coordinator", "$__rate_interval": "1m"}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    for expr in exprs:
        for name, value in variables.items():
            expr = expr.replace(name, value)
        assert "$" not in expr, expr
        prometheus.api("query", query=expr)       # asserts status "success"
    assert prometheus.api("query", query="max(raft_term)")["result"], "the queries ran against real series"


@pytest.mark.cluster
def test_an_executor_agents_metrics_pass_promtool_check_metrics(cluster) -> None:
    """Last in this module: the agent may take the pending tasks above."""
    from tests.executor_pool import Executors, wait_final, wait_online

    address = f"127.0.0.1:{free_port()}"
    pool = Executors(cluster)
    try:
        pool.start("prom-agent", capacity=2, args=["--metrics-address", address])
        with cluster.client() as client:
            wait_online(client, 1)
            ids = [client.submit_task(pb.TaskSpec(type="echo", input_json='{"x": 1}')).task_id for _ in range(2)]
            failed = client.submit_task(pb.TaskSpec(type="fail", max_attempts=1)).task_id
            wait_final(client, [*ids, failed], timeout_s=30)

        def scraped() -> bytes:
            try:
                return scrape_text(address)
            except (urllib.error.URLError, OSError):
                return b""

        text = poll(scraped, lambda t: b'outcome="completed"' in t, SCRAPE_WAIT_S)
        assert b"executor_latency_seconds_bucket{" in text, text.decode()[:2000]
        assert_promtool_accepts_metrics("executor agent", text)
    finally:
        pool.stop_all()
