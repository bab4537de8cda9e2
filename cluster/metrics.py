"""Prometheus metrics of a node (issue 7, first part): read from the node's state when scraped,
so serving them costs nothing on the request path.

    GET http://<metrics address>/metrics      coordctl node run --metrics-address 127.0.0.1:9464
    GET http://<metrics address>/healthz      200 while the process answers
    GET http://<metrics address>/readyz       200 / 503 + JSON: leader, WAL writable, disk space, apply lag

What is exported now (names follow Prometheus conventions: base units, `_total` for counters, no
task ids as labels):

    raft_is_leader, raft_term, raft_commit_index, raft_applied_index, raft_apply_lag_entries
    task_queue_depth{status}, executors{status}, audit_records, secrets
    proposer_commands_in_flight, grpc_access_denied_total
    grpc_server_handled_total{method, code}, grpc_server_handling_seconds{method} (histogram)

Not built yet (issue 7 continues): histograms of task, dispatch and executor latency, counters of
tasks by type and final status, elections, WAL fsync and snapshot durations, LLM tokens and cost,
traces, alert rules, dashboards, `coordctl top`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from coordinator.model import TaskStatus


class NodeCollector(Collector):
    """Everything comes from `snapshot()`, taken under the node's FSM lock in one go."""

    def __init__(self, node_id: str, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.node_id = node_id
        self._snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        s = self._snapshot()
        labels = ["node"]
        node = [self.node_id]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric(node, value)
            return family

        yield gauge("raft_is_leader", "1 if this node is the Raft leader", 1.0 if s["role"] == "leader" else 0.0)
        yield gauge("raft_term", "the current Raft term", s["term"])
        yield gauge("raft_commit_index", "the highest log index known committed", s["commit_index"])
        yield gauge("raft_applied_index", "the highest log index applied to the state machine", s["applied_index"])
        yield gauge("raft_apply_lag_entries", "committed entries not applied yet",
                    max(0, s["commit_index"] - s["applied_index"]))
        depth = GaugeMetricFamily("task_queue_depth", "tasks by status (replicated state as applied here)",
                                  labels=["node", "status"])
        for status in TaskStatus:
            depth.add_metric([self.node_id, status.value], s["task_statuses"].get(status.value, 0))
        yield depth
        executors = GaugeMetricFamily("executors", "registered executors by status", labels=["node", "status"])
        for status, count in sorted(s["executor_statuses"].items()):
            executors.add_metric([self.node_id, status], count)
        yield executors
        yield gauge("audit_records", "audit records retained in the replicated chain", s["audit_records"])
        yield gauge("secrets", "envelope-encrypted secrets held", s["secrets"])
        yield gauge("proposer_commands_in_flight", "commands proposed here and not answered yet",
                    s["commands_in_flight"])
        denied = CounterMetricFamily("grpc_access_denied", "calls refused by authentication, rate limits or RBAC "
                                                          "on this node", labels=labels)
        denied.add_metric(node, s["denied_total"])
        yield denied


def node_registry(node_id: str, snapshot: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node_id, snapshot))
    return registry


# ------------------------------------------------------------------------------ HTTP: metrics and health
DISK_FREE_BYTES_MIN = 256 << 20       # below this a node reports not ready (the WAL may not grow)
APPLY_LAG_ENTRIES_MAX = 1000          # more committed-but-unapplied entries than this: not ready


def readiness(snapshot: dict[str, Any], data_dir: str) -> tuple[bool, dict[str, Any]]:
    """Ready = has a leader, the WAL's directory is writable, the disk has room, and the applied
    index is close to the commit index. Each check is reported with what it saw."""
    import os
    import shutil

    try:
        free = shutil.disk_usage(data_dir).free
    except OSError:
        free = 0
    lag = max(0, snapshot["commit_index"] - snapshot["applied_index"])
    checks = {
        "leader": {"ok": bool(snapshot.get("leader")), "leader": snapshot.get("leader", "")},
        "wal": {"ok": os.access(data_dir, os.W_OK), "data_dir": data_dir},
        "disk": {"ok": free >= DISK_FREE_BYTES_MIN, "free_bytes": free, "min_bytes": DISK_FREE_BYTES_MIN},
        "apply": {"ok": lag <= APPLY_LAG_ENTRIES_MAX, "lag_entries": lag, "max_entries": APPLY_LAG_ENTRIES_MAX},
    }
    return all(c["ok"] for c in checks.values()), checks


def serve_http(address: str, registry: CollectorRegistry, snapshot: Callable[[], dict[str, Any]],
               data_dir: str) -> Any:
    """/metrics (Prometheus text), /healthz (the process answers), /readyz (200 or 503 with the
    per-check details as JSON), on a daemon thread. Returns the server (call shutdown())."""
    import json
    import threading
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client import make_wsgi_app
    from prometheus_client.exposition import ThreadingWSGIServer

    metrics_app = make_wsgi_app(registry)

    def app(environ: dict, start_response: Callable) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/healthz", "/readyz"):
            if path == "/healthz":
                ok, body = True, {"status": "alive"}
            else:
                ok, checks = readiness(snapshot(), data_dir)
                body = {"status": "ready" if ok else "not ready", "checks": checks}
            data = json.dumps(body).encode()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
            return [data]
        return metrics_app(environ, start_response)

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 — scrapes are not news
            pass

    host, _, port = address.rpartition(":")
    server = make_server(host or "127.0.0.1", int(port), app, ThreadingWSGIServer, handler_class=Quiet)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


# ------------------------------------------------------------------------------ gRPC calls
class GrpcMetricsInterceptor:
    """Counts and times every call by method and status code (bounded labels: the service's
    methods and gRPC's codes). Outermost, so refusals by authentication and RBAC count too."""

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Histogram

        self.handled = Counter("grpc_server_handled", "gRPC calls finished, by method and status code",
                               ["method", "code"], registry=registry)
        self.seconds = Histogram("grpc_server_handling_seconds", "gRPC call duration (streams: until they end)",
                                 ["method"], registry=registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60))

    def as_grpc(self) -> Any:
        from cluster.interceptors import WrappingInterceptor

        outer = self

        class _Interceptor(WrappingInterceptor):
            def wrap(self, method: str, handler: Any) -> Any:
                return outer._wrap(method.rsplit("/", 1)[-1], handler)

        return _Interceptor()

    def _finish(self, method: str, context: Any, started: float, failed: bool) -> None:
        import time

        code = context.code()
        name = code.name if code is not None else ("UNKNOWN" if failed else "OK")
        self.handled.labels(method, name).inc()
        self.seconds.labels(method).observe(time.perf_counter() - started)

    def _wrap(self, method: str, handler: Any) -> Any:
        import time

        import grpc

        finish = self._finish
        req, res = handler.request_deserializer, handler.response_serializer
        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            async def unary_unary(request, context):
                started, failed = time.perf_counter(), True
                try:
                    response = await behavior(request, context)
                    failed = False
                    return response
                finally:
                    finish(method, context, started, failed)

            return grpc.unary_unary_rpc_method_handler(unary_unary, req, res)
        if handler.unary_stream is not None or handler.stream_stream is not None:
            streaming = handler.unary_stream or handler.stream_stream

            async def stream(request, context):
                started, failed = time.perf_counter(), True
                try:
                    async for response in streaming(request, context):
                        yield response
                    failed = False
                finally:
                    finish(method, context, started, failed)

            make = (grpc.unary_stream_rpc_method_handler if handler.unary_stream is not None
                    else grpc.stream_stream_rpc_method_handler)
            return make(stream, req, res)
        behavior = handler.stream_unary

        async def stream_unary(requests, context):
            started, failed = time.perf_counter(), True
            try:
                response = await behavior(requests, context)
                failed = False
                return response
            finally:
                finish(method, context, started, failed)

        return grpc.stream_unary_rpc_method_handler(stream_unary, req, res)
