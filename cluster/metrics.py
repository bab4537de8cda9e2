"""Prometheus metrics of a node (issue 7). Gauges are read from the node's state when scraped;
counters and histograms of tasks come from the replicated state's events, folded by a daemon
thread off the Raft apply path (cluster/event_metrics.py); Raft, WAL and snapshot timings come
from optional hooks that cost nothing when no metrics address is set.

    GET http://<metrics address>/metrics      coordctl node run --metrics-address 127.0.0.1:9464
    GET http://<metrics address>/healthz      200 while the process answers
    GET http://<metrics address>/readyz       200 / 503 + JSON: leader, WAL writable, disk space, apply lag

What is exported (names follow Prometheus conventions: base units, `_total` for counters, no
task ids as labels; every series has a `node` label):

    read at scrape time
      raft_is_leader, raft_term, raft_commit_index, raft_applied_index, raft_apply_lag_entries
      task_queue_depth{status}, dead_letter_tasks, executors{status}
      executor_load{executor_type}   leased attempts / capacity of the online executors of the type
      audit_records, secrets, proposer_commands_in_flight, grpc_access_denied_total
    from the task events this node applied (see event_metrics.py for what each event counts)
      tasks_total{type, status}            tasks that reached completed / failed / cancelled / dead_letter
      task_duration_seconds{type}          histogram, creation → final status
      dispatch_latency_seconds{type}       histogram, assignable → assigned, one per assignment
      task_retries_total{type}             attempts put back for another attempt
      lease_expirations_total              attempts taken back from executors declared lost
      metrics_events_missed_total          log entries whose events were evicted before being read
    polled (POLL_INTERVAL_S)
      raft_leader_elections_total          leader changes this node saw (the first leader it sees counts)
    hooks
      raft_batch_size                      histogram, commands per Raft entry proposed by this node
      wal_fsync_seconds                    histogram, each durable commit (fsync) of the LMDB journal
      snapshot_duration_seconds            histogram, writing a snapshot
      grpc_server_handled_total{method, code}, grpc_server_handling_seconds{method} (interceptor)

Every node applies every task, so each node's task counters count the same tasks: a dashboard
takes one node's view, e.g. `max by (type, status) (rate(tasks_total[5m]))`, never a sum over
nodes. Counters start at zero when a node starts and do not replay what it applied before (a
counter reset, which rate() and increase() handle). `type` is bounded: the first 64 distinct task
types a node sees keep their name, later ones are `other`.

Not built yet (issue 7 continues): executor_latency_seconds and LLM tokens and cost (executor
agents and the bridge).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from coordinator.model import TaskStatus

# No `<name>_created` series beside every counter and histogram child: nothing here reads them,
# and they made a scrape a third bigger (scrapes cost the node CPU).
disable_created_metrics()


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
        yield gauge("dead_letter_tasks", "tasks out of attempts, waiting for an operator to re-queue them",
                    s["task_statuses"].get(TaskStatus.DEAD_LETTER.value, 0))
        executors = GaugeMetricFamily("executors", "registered executors by status", labels=["node", "status"])
        for status, count in sorted(s["executor_statuses"].items()):
            executors.add_metric([self.node_id, status], count)
        yield executors
        load = GaugeMetricFamily("executor_load", "leased attempts / capacity of the online executors of a type "
                                                  "(0 when none is online; above 1 only transiently)",
                                 labels=["node", "executor_type"])
        for executor_type, (leased, capacity) in sorted(s.get("executor_load", {}).items()):
            load.add_metric([self.node_id, executor_type], leased / capacity if capacity else 0.0)
        yield load
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


# ------------------------------------------------------------------------------ observed: events, polls, hooks
POLL_INTERVAL_S = 0.5              # events and the leader are looked at this often
READS_PER_POLL_MAX = 250           # × EVENTS_PER_READ_MAX events at most per poll, the lock released between reads
TASK_DURATION_BUCKETS_S = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)
DISPATCH_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
                              120, 300, 600)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)   # batch_commands_max 4096
WAL_FSYNC_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
SNAPSHOT_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class NodeMetrics:
    """A node's registry: what is read at scrape time (NodeCollector) and what is observed — task
    events folded by a daemon thread, leader changes it polls, and the hooks given to the
    journal (`observe_wal_fsync`), the snapshot writer (`observe_snapshot`) and the proposer
    (`observe_batch`): each is one histogram observe."""

    def __init__(self, node_id: str, snapshot: Callable[[], dict[str, Any]]) -> None:
        from prometheus_client import Counter, Histogram

        from cluster.event_metrics import EventFolder, LeaderWatch

        self.node_id = node_id
        self.registry = node_registry(node_id, snapshot)
        r = self.registry
        self.tasks = Counter("tasks", "tasks that reached a final status, by type (bounded: 64 names, then "
                                      "'other') and status", ["node", "type", "status"], registry=r)
        self.task_duration = Histogram("task_duration_seconds", "task creation to final status (proposer times)",
                                       ["node", "type"], registry=r, buckets=TASK_DURATION_BUCKETS_S)
        self.dispatch_latency = Histogram("dispatch_latency_seconds", "task assignable (ready, or its retry time) "
                                                                      "to assigned, per assignment",
                                          ["node", "type"], registry=r, buckets=DISPATCH_LATENCY_BUCKETS_S)
        self.retries = Counter("task_retries", "attempts that ended without success and were put back for "
                                               "another attempt", ["node", "type"], registry=r)
        self.lease_expirations = Counter("lease_expirations", "attempts taken back because their executor's "
                                                              "lease expired", ["node"], registry=r).labels(node_id)
        self.events_missed = Counter("metrics_events_missed", "log entries whose events were evicted before the "
                                                              "metrics reader saw them (task counters under-count)",
                                     ["node"], registry=r).labels(node_id)
        self.elections = Counter("raft_leader_elections", "leader changes this node saw (a new leader, or a new "
                                                          "term with a leader)", ["node"], registry=r).labels(node_id)
        self.observe_batch = Histogram("raft_batch_size", "commands per Raft entry proposed by this node",
                                       ["node"], registry=r, buckets=BATCH_SIZE_BUCKETS).labels(node_id).observe
        self.observe_wal_fsync = Histogram("wal_fsync_seconds", "each durable commit (fsync) of the LMDB journal",
                                           ["node"], registry=r, buckets=WAL_FSYNC_BUCKETS_S).labels(node_id).observe
        self.observe_snapshot = Histogram("snapshot_duration_seconds", "writing one snapshot (encode, write, fsync)",
                                          ["node"], registry=r, buckets=SNAPSHOT_BUCKETS_S).labels(node_id).observe
        self.folder = EventFolder()
        self.leader_watch = LeaderWatch()
        self.start_after_index = 0   # the last entry the journal held at start: applied (and counted) before
        self._reader: Any = None
        self._raft_status: Callable[[], dict[str, Any]] = dict
        self._stop: Any = None
        self._thread: Any = None
        self._http: Any = None

    def skip_history(self, journal: Any) -> None:
        """Called right after the journal opens, before Raft replays it: counting starts after it."""
        self.start_after_index = journal[-1][1] if len(journal) else 0

    def record(self, observations: Any) -> None:
        node = self.node_id
        for (task_type, status), count in observations.finished.items():
            self.tasks.labels(node, task_type, status).inc(count)
        for task_type, seconds in observations.durations_s:
            self.task_duration.labels(node, task_type).observe(seconds)
        for task_type, seconds in observations.dispatch_s:
            self.dispatch_latency.labels(node, task_type).observe(seconds)
        for task_type, count in observations.retries.items():
            self.retries.labels(node, task_type).inc(count)
        if observations.lease_expirations:
            self.lease_expirations.inc(observations.lease_expirations)

    def poll_once(self) -> None:
        """Leader change, then the events applied since the last poll (bounded reads)."""
        status = self._raft_status() or {}
        leader = status.get("leader")
        if self.leader_watch.observe(getattr(leader, "address", "") if leader is not None else "",
                                     int(status.get("raft_term") or 0)):
            self.elections.inc()
        reader = self._reader
        if reader is None:
            return
        for _ in range(READS_PER_POLL_MAX):
            batch = reader.read()
            if batch.missed_entries:
                self.events_missed.inc(batch.missed_entries)
            if batch.seeds:
                self.folder.seed_ready(batch.seeds)
            if batch.events:
                self.record(self.folder.fold(batch.events, batch.tasks))
            if len(batch.events) < reader.events_per_read_max:
                break

    def attach(self, fsm: Any, fsm_lock: Any, raft_status: Callable[[], dict[str, Any]]) -> None:
        """What poll_once reads: the FSM's events (from after start_after_index) and Raft's status."""
        from cluster.event_metrics import EventReader

        self._reader = EventReader(fsm, fsm_lock, self.start_after_index)
        self._raft_status = raft_status

    def start(self, address: str, snapshot: Callable[[], dict[str, Any]], data_dir: str, *, fsm: Any,
              fsm_lock: Any, raft_status: Callable[[], dict[str, Any]]) -> NodeMetrics:
        """Serves HTTP and starts the thread that polls events and the leader. Returns self
        (`shutdown()` stops both)."""
        import threading

        self.attach(fsm, fsm_lock, raft_status)
        self._http = serve_http(address, self.registry, lambda: readiness(snapshot(), data_dir))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll_loop, name="metrics-events", daemon=True)
        self._thread.start()
        return self

    def _poll_loop(self) -> None:
        import logging

        log = logging.getLogger("coordinator.metrics")
        while not self._stop.wait(POLL_INTERVAL_S):
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 — metrics never take a node down; the next poll goes on
                log.exception("metrics poll failed")

    def shutdown(self) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._http is not None:
            self._http.shutdown()
        if self._thread is not None:
            self._thread.join(2.0)


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
        "leader": {"ok": bool(snapshot.get("leader")), "leader": snapshot.get("leader", ""),
                   "role": snapshot.get("role", "")},
        "wal": {"ok": os.access(data_dir, os.W_OK), "data_dir": data_dir},
        "disk": {"ok": free >= DISK_FREE_BYTES_MIN, "free_bytes": free, "min_bytes": DISK_FREE_BYTES_MIN},
        "apply": {"ok": lag <= APPLY_LAG_ENTRIES_MAX, "lag_entries": lag, "max_entries": APPLY_LAG_ENTRIES_MAX},
    }
    return all(c["ok"] for c in checks.values()), checks


def parse_address(address: str) -> tuple[str, int]:
    """HOST:PORT (port 0: any free port) → (host, port); ValueError naming the expected form."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"HOST:PORT with a port in 0..65535, got {address!r}")
    return host, int(port)


def serve_http(address: str, registry: CollectorRegistry, ready: Callable[[], tuple[bool, dict[str, Any]]],
               thread_name: str = "metrics-http") -> Any:
    """/metrics (Prometheus text), /healthz (the process answers), /readyz (200 or 503 with the
    per-check details `ready()` returns, as JSON), on a daemon thread — for nodes and executor
    agents alike. Returns the server (its `server_address` names the bound port; call shutdown()).
    ValueError for a malformed address, OSError when it cannot be bound."""
    import json
    import threading
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client import make_wsgi_app
    from prometheus_client.exposition import ThreadingWSGIServer

    host, port = parse_address(address)
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict, start_response: Callable) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path not in ("/healthz", "/readyz"):
            return metrics_app(environ, start_response)
        if path == "/healthz":
            ok, body = True, {"status": "alive"}
        else:
            ok, checks = ready()
            body = {"status": "ready" if ok else "not ready", "checks": checks}
        data = json.dumps(body).encode()
        start_response("200 OK" if ok else "503 Service Unavailable",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 — scrapes are not news
            pass

    server = make_server(host, port, app, ThreadingWSGIServer, handler_class=Quiet)
    threading.Thread(target=server.serve_forever, name=thread_name, daemon=True).start()
    return server


# ------------------------------------------------------------------------------ gRPC calls
class GrpcMetricsInterceptor:
    """Counts and times every call by method and status code (bounded labels: the service's
    methods and gRPC's codes). Outermost, so refusals by authentication and RBAC count too."""

    def __init__(self, registry: CollectorRegistry, node_id: str, *, trace_calls: bool = False) -> None:
        from prometheus_client import Counter, Histogram

        self.node_id = node_id
        # Unary calls also run in their trace span (cluster/tracing.py traced_unary), inside this
        # wrapper: one interceptor hop per call instead of two (each hop costs more than its code).
        self.trace_calls = trace_calls
        self.handled = Counter("grpc_server_handled", "gRPC calls finished, by method and status code",
                               ["node", "method", "code"], registry=registry)
        # By method only, as is usual: a code label would multiply the scraped page by the codes seen.
        self.seconds = Histogram("grpc_server_handling_seconds", "gRPC call duration by method (streams: until "
                                 "they end)", ["node", "method"], registry=registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60))
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}  # (method, code) -> label children

    def as_grpc(self) -> Any:
        from cluster.interceptors import WrappingInterceptor

        outer = self

        class _Interceptor(WrappingInterceptor):
            def wrap(self, method: str, handler: Any) -> Any:
                return outer._wrap(method, handler)

        return _Interceptor()

    def _finish(self, method: str, context: Any, started: float, failed: bool) -> None:
        import time

        code = context.code()
        name = code.name if code is not None else ("UNKNOWN" if failed else "OK")
        children = self._children.get((method, name))
        if children is None:   # bounded: the service's methods × gRPC's codes
            children = self._children[(method, name)] = (self.handled.labels(self.node_id, method, name),
                                                          self.seconds.labels(self.node_id, method))
        children[0].inc()
        children[1].observe(time.perf_counter() - started)

    def _wrap(self, full_method: str, handler: Any) -> Any:
        import time

        import grpc

        finish = self._finish
        method = full_method.rsplit("/", 1)[-1]
        req, res = handler.request_deserializer, handler.response_serializer
        if handler.unary_unary is not None:
            behavior = handler.unary_unary
            if self.trace_calls:
                from cluster.tracing import traced_unary

                behavior = traced_unary(full_method, behavior)

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
