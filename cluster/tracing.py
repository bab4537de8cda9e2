"""Traces (issue 7): OpenTelemetry spans whose W3C context travels in gRPC metadata
(`traceparent`) between the CLI, nodes and executor agents, and is stored with each task, so one
trace shows

    submit (client) ─► SubmitDag (node) ─► raft.propose ─► schedule (leader, ready → assigned)
        ─► execute (agent) ─► adapter ─► report.completed (node)

even when the leader changes mid-run: the context lives in replicated state, so the new leader's
`schedule` spans join the same trace.

Sampling is decided once, at the root (`ParentBased(TraceIdRatioBased(ratio))`); a task stores
its submitter's context only when that was sampled, so an unsampled task costs no span anywhere
downstream. Streams (ExecutorStream, Watch) get no span of their own: they live for hours; the
work they carry is traced per task instead.

Exporters: OTLP/gRPC when an endpoint is configured (`--otlp-endpoint` or
OTEL_EXPORTER_OTLP_ENDPOINT), a JSON-lines file otherwise (one span per line, the SDK's own JSON
form; the file rotates to `<file>.1` at `file_bytes_max`). Spans leave through a bounded
BatchSpanProcessor queue (full: spans are dropped and counted by the SDK, the request path never
waits).

A process that did not call `configure` traces nothing (a no-op tracer): embedding code and tests
pay only a global lookup.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

TRACEPARENT = "traceparent"
SAMPLE_RATIO_DEFAULT = 0.1
FILE_BYTES_MAX_DEFAULT = 64 << 20
QUEUE_SPANS_MAX = 8192          # BatchSpanProcessor queue: beyond it spans are dropped, never waited for
EXPORT_BATCH_SPANS_MAX = 512
EXPORT_DELAY_MS = 500           # how long a finished span may sit before it is written

log = logging.getLogger("coordinator.tracing")

_NOOP = trace.NoOpTracer()


class TracingConfigError(ValueError):
    pass


@dataclass(frozen=True)
class TraceSettings:
    service_name: str                  # coordinator-node | executor-agent | coordctl
    instance: str = ""                 # node id, executor id, ...
    file: str = ""                     # JSON lines ("" and no OTLP endpoint: tracing off)
    otlp_endpoint: str = ""            # host:port or http(s)://host:port of an OTLP/gRPC collector
    sample_ratio: float = SAMPLE_RATIO_DEFAULT
    file_bytes_max: int = FILE_BYTES_MAX_DEFAULT

    def validated(self) -> TraceSettings:
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise TracingConfigError(f"trace sample ratio: 0.0..1.0, got {self.sample_ratio}")
        if self.file_bytes_max < 4096:
            raise TracingConfigError(f"trace file bytes max: at least 4096, got {self.file_bytes_max}")
        return self

    @property
    def enabled(self) -> bool:
        return self.sample_ratio > 0.0 and bool(self.file or self.otlp_endpoint)


class JsonLinesSpanExporter:
    """One span per line (`ReadableSpan.to_json` on one line), appended to a file that rotates to
    `<path>.1` when it would pass `bytes_max` (so a node keeps at most 2 × bytes_max of traces)."""

    def __init__(self, path: str, bytes_max: int = FILE_BYTES_MAX_DEFAULT) -> None:
        from opentelemetry.sdk.trace.export import SpanExportResult

        self._result = SpanExportResult
        self.path = path
        self.bytes_max = bytes_max
        self._lock = threading.Lock()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 — closed in shutdown()
        self._bytes = self._file.tell()

    def export(self, spans: Sequence[Any]) -> Any:
        lines = "".join(span.to_json(indent=None) + "\n" for span in spans)
        size = len(lines.encode())
        with self._lock:
            if self._file.closed:
                return self._result.FAILURE
            if self._bytes and self._bytes + size > self.bytes_max:
                self._file.close()
                os.replace(self.path, self.path + ".1")
                self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
                self._bytes = 0
            self._file.write(lines)
            self._file.flush()
            self._bytes += size
        return self._result.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class Tracing:
    """The tracer provider of this process, held by `configure` rather than set as OTel's global
    provider (which can be set only once per process; tests configure several in turn, each with
    its own resource and file)."""

    def __init__(self, settings: TraceSettings) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        self.settings = settings.validated()
        resource = Resource.create({
            "service.name": settings.service_name,
            "service.instance.id": settings.instance or f"{settings.service_name}-{os.getpid()}",
            "process.pid": os.getpid(),
        })
        self.provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)))
        if settings.otlp_endpoint:
            exporter = _otlp_exporter(settings.otlp_endpoint)
        else:
            exporter = JsonLinesSpanExporter(settings.file, settings.file_bytes_max)
        self.provider.add_span_processor(BatchSpanProcessor(
            exporter, max_queue_size=QUEUE_SPANS_MAX, max_export_batch_size=EXPORT_BATCH_SPANS_MAX,
            schedule_delay_millis=EXPORT_DELAY_MS))
        self.tracer = self.provider.get_tracer("agent-coordinator")

    def shutdown(self) -> None:
        self.provider.shutdown()


def _otlp_exporter(endpoint: str) -> Any:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    insecure = endpoint.startswith("http://") or "://" not in endpoint
    return OTLPSpanExporter(endpoint=endpoint, insecure=insecure)


_active: Tracing | None = None


def configure(settings: TraceSettings) -> Tracing | None:
    """Start tracing for this process (replacing an earlier configuration); None when the settings
    turn it off (ratio 0, or neither a file nor an OTLP endpoint)."""
    global _active
    shutdown()
    if not settings.enabled:
        return None
    _active = Tracing(settings)
    return _active


def shutdown() -> None:
    global _active
    active, _active = _active, None
    if active is not None:
        active.shutdown()


def tracer() -> trace.Tracer:
    active = _active
    return active.tracer if active is not None else _NOOP


def enabled() -> bool:
    return _active is not None


# ------------------------------------------------------------------------------ W3C context
def context_from_traceparent(traceparent: str) -> otel_context.Context | None:
    """A context whose current span is the remote parent the traceparent names; None if it is
    empty or malformed (a malformed value starts no trace: it is only a hint)."""
    if not traceparent:
        return None
    parts = traceparent.split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3][:2], 16)
    except ValueError:
        return None
    if trace_id == 0 or span_id == 0:
        return None
    span_context = SpanContext(trace_id=trace_id, span_id=span_id, is_remote=True, trace_flags=TraceFlags(flags & 0x01))
    return trace.set_span_in_context(NonRecordingSpan(span_context))


def traceparent_of(span: trace.Span | None = None) -> str:
    """The W3C traceparent of `span` (default: the current one) if it is sampled, else "" (an
    unsampled context is not worth storing: nothing downstream of it records)."""
    context = (span or trace.get_current_span()).get_span_context()
    if not context.is_valid or not context.trace_flags.sampled:
        return ""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-01"


def context_from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> otel_context.Context | None:
    for key, value in metadata or ():
        if key == TRACEPARENT:
            return context_from_traceparent(value if isinstance(value, str) else value.decode("ascii", "replace"))
    return None


def inject_metadata(metadata: list[tuple[str, str]] | None = None) -> list[tuple[str, str]] | None:
    """`metadata` plus the current span's traceparent (when sampled); unchanged otherwise."""
    traceparent = traceparent_of()
    if not traceparent:
        return metadata
    return [*(metadata or ()), (TRACEPARENT, traceparent)]


def ms_to_ns(ms: int) -> int:
    return int(ms) * 1_000_000


def record_error(span: trace.Span, message: str) -> None:
    if span.is_recording():
        span.set_status(Status(StatusCode.ERROR, message[:256]))


def child_span(name: str, traceparent: str, *, kind: SpanKind = SpanKind.INTERNAL,
               attributes: dict[str, Any] | None = None, start_time_ns: int | None = None) -> trace.Span | None:
    """A span under a stored traceparent ("" or malformed: None, nothing recorded)."""
    parent = context_from_traceparent(traceparent)
    if parent is None or _active is None:
        return None
    return _active.tracer.start_span(name, context=parent, kind=kind, attributes=attributes,
                                     start_time=start_time_ns)


def propose_span(command: dict[str, Any]) -> trace.Span | None:
    """`raft.propose` under the current span, when that one records: from proposing a command
    to its apply here (commit + apply, as the caller waits for it)."""
    active = _active
    if active is None or not trace.get_current_span().is_recording():
        return None
    from coordinator.commands import CommandType

    try:
        name = CommandType(command.get("t")).name
    except ValueError:
        name = str(command.get("t"))
    return active.tracer.start_span("raft.propose", attributes={"raft.command": name})


def end_propose_span(span: trace.Span | None, result: Any, error: str) -> None:
    if span is None:
        return
    value = getattr(result, "value", None)
    if isinstance(value, dict) and isinstance(value.get("index"), int):
        span.set_attribute("raft.index", value["index"])
    if error:
        record_error(span, error)
    span.end()


# ------------------------------------------------------------------------------ gRPC server spans
# Calls that start work worth a trace of its own when the caller sent no context. Reads and polls
# (status, lists, health, token refreshes, heartbeat relays) only join a trace the caller carries:
# a monitoring loop would otherwise fill the sampled share with one-span traces.
ROOT_TRACE_METHODS = frozenset({
    "SubmitTask", "SubmitDag", "CancelTask", "CancelDag", "RequeueTask", "Delegate",
    "RegisterExecutor", "UnregisterExecutor", "PutSecret", "DeleteSecret", "RewrapSecrets",
})


def traced_unary(method: str, behavior: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Awaitable[Any]]:
    """`behavior` (a unary handler of the gRPC method `method`, "/pkg.Service/Name") run inside a
    server span: a child of the caller's `traceparent`, or a new root (sampled at the configured
    ratio) for the calls in ROOT_TRACE_METHODS. Current while the handler runs, so what the
    handler starts or stores (raft.propose spans, the task's trace_parent) joins it."""
    name = method.lstrip("/").rsplit(".", 1)[-1]   # "Coordinator/SubmitDag"
    rpc_method = name.rsplit("/", 1)[-1]
    starts_traces = rpc_method in ROOT_TRACE_METHODS

    async def unary_unary(request, context):
        active = _active
        if active is None:
            return await behavior(request, context)
        parent = context_from_metadata(context.invocation_metadata())
        if parent is None and not starts_traces:
            return await behavior(request, context)
        span = active.tracer.start_span(name, context=parent, kind=SpanKind.SERVER,
                                        attributes={"rpc.system": "grpc", "rpc.method": rpc_method})
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            return await behavior(request, context)
        except BaseException as exc:
            if span.is_recording():
                code = context.code()
                span.set_attribute("rpc.grpc.status_code", code.name if code is not None else "UNKNOWN")
                span.set_status(Status(StatusCode.ERROR, (context.details() or str(exc) or type(exc).__name__)[:256]))
            raise
        finally:
            otel_context.detach(token)
            span.end()

    return unary_unary


def server_interceptor() -> Any:
    """A server span per unary call (`traced_unary`), for a server without call metrics; with
    them, GrpcMetricsInterceptor applies `traced_unary` inside its own wrapper (one interceptor
    hop per call instead of two)."""
    import grpc

    from cluster.interceptors import WrappingInterceptor

    class _Interceptor(WrappingInterceptor):
        def wraps(self, handler: grpc.RpcMethodHandler) -> bool:
            return handler.unary_unary is not None

        def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(traced_unary(method, handler.unary_unary),
                                                       handler.request_deserializer, handler.response_serializer)

    return _Interceptor()


# ------------------------------------------------------------------------------ reading files back
def read_spans(paths: Iterable[str]) -> list[dict[str, Any]]:
    """Spans from JSON-lines trace files (and their rotated `.1`), for `coordctl trace` and tests."""
    spans: list[dict[str, Any]] = []
    for path in paths:
        for candidate in (path + ".1", path):
            if not os.path.exists(candidate):
                continue
            with open(candidate, encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if line:
                        try:
                            spans.append(json.loads(line))
                        except ValueError:
                            continue  # a line cut short by kill -9
    return spans


def _id(value: Any) -> str:
    return value[2:] if isinstance(value, str) and value.startswith("0x") else (value or "")


def _time_s(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else 0.0


@dataclass(frozen=True)
class SpanRow:
    depth: int
    name: str
    service: str          # service.instance.id: node id, executor id, coordctl-<pid>
    start_s: float
    duration_ms: float
    status: str           # UNSET | OK | ERROR
    span_id: str
    parent_id: str
    attributes: dict[str, Any]


def trace_rows(spans: Iterable[dict[str, Any]], trace_id: str) -> tuple[list[SpanRow], list[str]]:
    """One trace as a tree in start order (children under their parent), and the ids of parents
    its spans name that are not among them (empty when the trace is connected)."""
    trace_id = _id(trace_id)
    mine = [s for s in spans if _id(s.get("context", {}).get("trace_id")) == trace_id]
    by_id = {_id(s["context"]["span_id"]): s for s in mine}
    children: dict[str, list[dict[str, Any]]] = {}
    roots, missing = [], []
    for span in mine:
        parent = _id(span.get("parent_id"))
        if parent and parent in by_id:
            children.setdefault(parent, []).append(span)
        else:
            roots.append(span)
            if parent:
                missing.append(parent)
    rows: list[SpanRow] = []
    stack = [(0, s) for s in sorted(roots, key=lambda s: s.get("start_time", ""), reverse=True)]
    while stack:  # iterative: a trace of a 10,000-task DAG is wide, never deeper than a few levels
        depth, span = stack.pop()
        start, end = _time_s(span.get("start_time", "")), _time_s(span.get("end_time", ""))
        resource = span.get("resource", {}).get("attributes", {})
        span_id = _id(span["context"]["span_id"])
        rows.append(SpanRow(depth, span.get("name", ""), str(resource.get("service.instance.id", "")), start,
                            round((end - start) * 1000, 3), span.get("status", {}).get("status_code", "UNSET"),
                            span_id, _id(span.get("parent_id")), dict(span.get("attributes") or {})))
        for child in sorted(children.get(span_id, ()), key=lambda s: s.get("start_time", ""), reverse=True):
            stack.append((depth + 1, child))
    return rows, sorted(set(missing))


def trace_ids(spans: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every trace in `spans`: its root span's name, span count, services, first start."""
    traces: dict[str, dict[str, Any]] = {}
    for span in spans:
        trace_id = _id(span.get("context", {}).get("trace_id"))
        entry = traces.setdefault(trace_id, {"root": "", "spans": 0, "services": set(), "start": ""})
        entry["spans"] += 1
        entry["services"].add(span.get("resource", {}).get("attributes", {}).get("service.instance.id", ""))
        if not span.get("parent_id"):
            entry["root"] = span.get("name", "")
        start = span.get("start_time", "")
        if start and (not entry["start"] or start < entry["start"]):
            entry["start"] = start
    return traces
