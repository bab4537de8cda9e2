"""Traces (issue 7): W3C context across coordctl, nodes and executor agents, stored with each
task so the trace survives a leader failover. Unit tests for the pure parts; one real 3-node
cluster with two executor processes for the end-to-end trace, read back from the JSON-lines
files every process writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from opentelemetry import trace

from cluster import tracing
from cluster.tracing import (
    JsonLinesSpanExporter,
    TraceSettings,
    TracingConfigError,
    context_from_metadata,
    context_from_traceparent,
    read_spans,
    trace_ids,
    trace_rows,
    traceparent_of,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"


@pytest.fixture
def traced(tmp_path):
    path = str(tmp_path / "spans.jsonl")
    tracing.configure(TraceSettings("test", "t1", file=path, sample_ratio=1.0))
    try:
        yield path
    finally:
        tracing.shutdown()


# ---------------------------------------------------------------------------------- W3C context
def test_traceparent_round_trip_keeps_ids_and_sampling() -> None:
    context = context_from_traceparent(f"00-{TRACE_ID}-{SPAN_ID}-01")
    span_context = trace.get_current_span(context).get_span_context()
    assert f"{span_context.trace_id:032x}" == TRACE_ID and f"{span_context.span_id:016x}" == SPAN_ID
    assert span_context.is_remote and span_context.trace_flags.sampled
    unsampled = context_from_traceparent(f"00-{TRACE_ID}-{SPAN_ID}-00")
    assert not trace.get_current_span(unsampled).get_span_context().trace_flags.sampled


@pytest.mark.parametrize("value", [
    "", "garbage", f"00-{TRACE_ID}-{SPAN_ID}", f"00-{TRACE_ID[:-1]}-{SPAN_ID}-01", f"00-{'0' * 32}-{SPAN_ID}-01",
    f"00-{TRACE_ID}-{'0' * 16}-01", f"00-{'z' * 32}-{SPAN_ID}-01",
])
def test_malformed_traceparent_starts_nothing(value: str) -> None:
    assert context_from_traceparent(value) is None


def test_context_from_metadata_finds_the_header_among_others() -> None:
    metadata = [("authorization", "Bearer x"), ("traceparent", f"00-{TRACE_ID}-{SPAN_ID}-01")]
    context = context_from_metadata(metadata)
    assert f"{trace.get_current_span(context).get_span_context().trace_id:032x}" == TRACE_ID
    assert context_from_metadata([("authorization", "Bearer x")]) is None
    assert context_from_metadata(None) is None


def test_only_sampled_spans_are_worth_storing(tmp_path) -> None:
    assert traceparent_of() == ""   # no span at all
    tracing.configure(TraceSettings("test", file=str(tmp_path / "s.jsonl"), sample_ratio=1.0))
    try:
        with tracing.tracer().start_as_current_span("sampled") as span:
            stored = traceparent_of()
            assert stored == f"00-{span.get_span_context().trace_id:032x}-{span.get_span_context().span_id:016x}-01"
        unsampled = context_from_traceparent(f"00-{TRACE_ID}-{SPAN_ID}-00")
        with tracing.tracer().start_as_current_span("child of unsampled", context=unsampled):
            assert traceparent_of() == ""   # ParentBased: the root's decision holds downstream
    finally:
        tracing.shutdown()


def test_settings_are_validated_and_zero_ratio_turns_tracing_off(tmp_path) -> None:
    with pytest.raises(TracingConfigError, match="sample ratio"):
        tracing.configure(TraceSettings("test", file=str(tmp_path / "s.jsonl"), sample_ratio=1.5))
    assert tracing.configure(TraceSettings("test", file=str(tmp_path / "s.jsonl"), sample_ratio=0.0)) is None
    assert not tracing.enabled()
    assert tracing.child_span("x", f"00-{TRACE_ID}-{SPAN_ID}-01") is None   # off: nothing recorded


# ---------------------------------------------------------------------------------- files
def test_child_spans_of_a_stored_parent_reach_the_file(traced) -> None:
    span = tracing.child_span("schedule", f"00-{TRACE_ID}-{SPAN_ID}-01", attributes={"task.id": "t-1"},
                              start_time_ns=time.time_ns() - 5_000_000)
    assert span is not None
    span.end()
    tracing.shutdown()   # flushes
    [written] = read_spans([traced])
    assert written["name"] == "schedule"
    assert written["context"]["trace_id"] == "0x" + TRACE_ID
    assert written["parent_id"] == "0x" + SPAN_ID
    assert written["attributes"]["task.id"] == "t-1"
    assert written["resource"]["attributes"]["service.instance.id"] == "t1"


def test_the_file_rotates_at_its_bound(tmp_path) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    path = str(tmp_path / "spans.jsonl")
    exporter = JsonLinesSpanExporter(path, bytes_max=4096)
    tracer = TracerProvider().get_tracer("t")
    for _ in range(40):
        span = tracer.start_span("s" * 50)
        span.end()
        exporter.export([span])
    exporter.shutdown()
    assert os.path.getsize(path) <= 4096
    assert os.path.getsize(path + ".1") <= 4096
    assert len(read_spans([path])) < 40                 # the oldest rotated out
    assert all(s["name"] == "s" * 50 for s in read_spans([path]))


def test_a_line_cut_short_by_kill_is_skipped(tmp_path) -> None:
    path = tmp_path / "spans.jsonl"
    good = {"name": "a", "context": {"trace_id": "0x" + TRACE_ID, "span_id": "0x" + SPAN_ID}, "parent_id": None}
    path.write_text(json.dumps(good) + "\n" + json.dumps(good)[:20])
    assert [s["name"] for s in read_spans([str(path)])] == ["a"]


def _span(name: str, span_id: str, parent: str | None, start: str, service: str = "n1") -> dict:
    return {"name": name, "context": {"trace_id": "0x" + TRACE_ID, "span_id": "0x" + span_id},
            "parent_id": ("0x" + parent) if parent else None, "start_time": start, "end_time": start,
            "status": {"status_code": "UNSET"}, "attributes": {},
            "resource": {"attributes": {"service.instance.id": service}}}


def test_trace_rows_nest_children_and_name_missing_parents() -> None:
    spans = [
        _span("execute", "3" * 16, "2" * 16, "2026-11-22T08:00:02Z", "x1"),
        _span("submit", "1" * 16, None, "2026-11-22T08:00:00Z", "coordctl"),
        _span("SubmitDag", "2" * 16, "1" * 16, "2026-11-22T08:00:01Z"),
        _span("orphan", "4" * 16, "9" * 16, "2026-11-22T08:00:03Z"),
    ]
    rows, missing = trace_rows(spans, TRACE_ID)
    assert [(r.depth, r.name) for r in rows] == [(0, "submit"), (1, "SubmitDag"), (2, "execute"), (0, "orphan")]
    assert missing == ["9" * 16]
    summary = trace_ids(spans)[TRACE_ID]
    assert summary["root"] == "submit" and summary["spans"] == 4 and summary["services"] == {"coordctl", "n1", "x1"}


# ---------------------------------------------------------------------------------- a real cluster
def _coordctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, env={**os.environ, **(env or {})})


def _dag_file(path: str, tasks: int) -> None:
    """A chain of `sleep` steps fanned out in parallel lanes: long enough to kill the leader mid-run."""
    lines = ["tasks:"]
    for i in range(tasks):
        lines += [f"  - name: s{i}", "    type: sleep", "    input: {ms: 400}"]
        if i >= 2:
            lines.append(f"    depends_on: [s{i - 2}]")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


@pytest.mark.cluster
@pytest.mark.chaos
def test_a_dag_run_is_one_connected_trace_across_processes_and_a_failover(make_cluster, tmp_path) -> None:
    from tests.executor_pool import Executors, wait_final, wait_online

    cluster = make_cluster(3, extra_args=["--trace-sample-ratio", "1.0"])
    pool = Executors(cluster)
    executor_files = {name: str(tmp_path / f"{name}.jsonl") for name in ("x1", "x2")}
    try:
        for name, path in executor_files.items():
            pool.start(name, capacity=2, args=["--trace-file", path, "--trace-sample-ratio", "1.0"])
        with cluster.client() as client:
            wait_online(client, 2)
        leader = cluster.wait_leader()
        follower = next(n for n in cluster.nodes if n.id != leader)
        dag = str(tmp_path / "dag.yaml")
        _dag_file(dag, 30)   # 2 lanes of 15 steps: ~6 s, most of it after the kill
        cli_file = str(tmp_path / "coordctl.jsonl")
        submitted = _coordctl("--trace-file", cli_file, "dag", "submit", dag, "--endpoints", follower.grpc_address,
                              "--data-dir", cluster.data_dir, "-o", "json")
        assert submitted.returncode == 0, submitted.stderr
        trace_id = submitted.stderr.strip().rsplit("trace: ", 1)[-1].strip()
        ids = list(json.loads(submitted.stdout)["task_ids"].values())

        with cluster.client([follower.grpc_address]) as client:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:   # some steps done on the first leader, then kill it
                done = sum(t.status == "completed" for t in client.wait_tasks(ids, 1).tasks)
                if done >= 3:
                    break
            assert done >= 3
            time.sleep(1.0)   # the first leader's spans leave its export queue (500 ms) before the kill
            killed_ms = time.time() * 1000
            cluster.kill_node(leader)
            new_leader = cluster.wait_leader(exclude=leader)
            tasks = wait_final(client, ids, 60)
        assert all(t.status == "completed" for t in tasks), [(t.id, t.status, t.error) for t in tasks]
        for t in tasks:
            assert t.trace_parent.split("-")[1] == trace_id   # stored with the task, on every node
        for proc in pool.procs.values():   # SIGTERM: an agent flushes its queued spans on the way out
            proc.terminate()
        for proc in pool.procs.values():
            proc.wait(20)
    finally:
        pool.stop_all()   # whatever is still running: SIGKILL, by PID
        cluster.down()    # nodes stop on SIGTERM and flush

    files = [cli_file, *executor_files.values(), *(os.path.join(n.data_dir, "traces.jsonl") for n in cluster.nodes)]
    rows, missing = trace_rows(read_spans(files), trace_id)
    assert missing == []                                  # connected: every parent is in the trace
    assert [r.depth for r in rows].count(0) == 1 and rows[0].name == "coordctl dag"
    services = {r.service for r in rows}
    assert {"x1", "x2"} & services and follower.id in services and len(services) >= 3
    by_name: dict[str, list] = {}
    for row in rows:
        by_name.setdefault(row.name, []).append(row)
    assert "Coordinator/SubmitDag" in by_name and "raft.propose" in by_name
    # Scheduled by both leaders: the new leader's spans join the trace from replicated state.
    assert {r.service for r in by_name["schedule"]} >= {leader, new_leader}
    executed = {r.attributes["task.id"] for r in by_name["execute"]}
    assert executed == set(ids)
    assert all(any(c.parent_id == r.span_id for c in rows if c.name.startswith("adapter")) for r in by_name["execute"]
               if r.status != "ERROR")
    # A report span lives on the node the agent reported to; those the killed leader had not
    # exported yet (≤ 500 ms of them) died with it. Every task that completed well after the kill
    # was reported to a survivor, which flushed on its way down.
    reported = {r.attributes["task.id"] for r in by_name["report.completed"]}
    late = {t.id for t in tasks if t.updated_at_unix_ms > killed_ms + 2000}
    assert late and late <= reported

    listed = _coordctl("trace", "show", trace_id, "--data-dir", cluster.data_dir, "--file", cli_file,
                       *(a for f in executor_files.values() for a in ("--file", f)), "-o", "json")
    assert listed.returncode == 0, listed.stderr
    shown = json.loads(listed.stdout)
    assert shown["missing_parents"] == [] and len(shown["spans"]) == len(rows)


def test_spans_go_to_an_otlp_collector_when_an_endpoint_is_configured() -> None:
    """A real OTLP/gRPC TraceService (the collector's protocol) on a free loopback port receives
    what the exporter sends, resource and parent included; nothing goes to a file."""
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received: list = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):  # noqa: N802 — the protocol's name
            received.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        tracing.configure(TraceSettings("coordinator-node", "n9", otlp_endpoint=f"127.0.0.1:{port}", sample_ratio=1.0))
        span = tracing.child_span("schedule", f"00-{TRACE_ID}-{SPAN_ID}-01", attributes={"task.id": "t-7"})
        assert span is not None
        span.end()
        tracing.shutdown()   # flushes through the exporter
    finally:
        server.stop(grace=None)
    spans = [(resource_spans.resource, s) for request in received for resource_spans in request.resource_spans
             for scope in resource_spans.scope_spans for s in scope.spans]
    assert len(spans) == 1
    resource, exported = spans[0]
    assert exported.name == "schedule" and exported.trace_id.hex() == TRACE_ID and exported.parent_span_id.hex() == SPAN_ID
    assert {a.key: a.value.string_value for a in resource.attributes}["service.instance.id"] == "n9"
