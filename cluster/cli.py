"""coordctl — the admin CLI. Every command takes `--output json` for scripts.

Endpoints come from --endpoints, then COORDCTL_ENDPOINTS, then DATA_DIR/cluster.json written by
`coordctl cluster up` (DATA_DIR: --data-dir, COORDCTL_DATA_DIR, or ./.coord).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from datetime import datetime, timezone
from enum import Enum
from typing import Any

import grpc
import typer
import yaml
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.table import Table

from cluster.client import ClientError, CoordinatorClient, default_data_dir, resolve_endpoints
from cluster.credentials import ClientCredentials, CredentialsError, resolve_credentials
from cluster.local import ClusterError, LocalCluster, pid_alive
from proto import coordinator_pb2 as pb

app = typer.Typer(help="Admin CLI of the agent-coordinator cluster.", no_args_is_help=True, add_completion=False)
cluster_app = typer.Typer(help="Run and inspect a local cluster.", no_args_is_help=True)
node_app = typer.Typer(help="Run one coordinator node.", no_args_is_help=True)
task_app = typer.Typer(help="Submit, inspect and cancel tasks.", no_args_is_help=True)
dag_app = typer.Typer(help="Submit DAGs of tasks from YAML or JSON files.", no_args_is_help=True)
events_app = typer.Typer(help="Stream committed domain events.", no_args_is_help=True)
executor_app = typer.Typer(help="Inspect executors.", no_args_is_help=True)
checkpoint_app = typer.Typer(help="Inspect task checkpoints.", no_args_is_help=True)
certs_app = typer.Typer(help="The cluster CA and its certificates (for mTLS).", no_args_is_help=True)
token_app = typer.Typer(help="JWT identities: issue tokens, rotate the signing key.", no_args_is_help=True)
secret_app = typer.Typer(help="Envelope-encrypted secrets (API keys) in replicated state.", no_args_is_help=True)
audit_app = typer.Typer(help="The signed, hash-chained audit log: list, export, verify.", no_args_is_help=True)
trace_app = typer.Typer(help="Traces the nodes wrote (JSON-lines trace files): list them, show one as a tree.",
                        no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")
app.add_typer(node_app, name="node")
app.add_typer(task_app, name="task")
app.add_typer(dag_app, name="dag")
app.add_typer(events_app, name="events")
app.add_typer(executor_app, name="executor")
app.add_typer(checkpoint_app, name="checkpoint")
app.add_typer(certs_app, name="certs")
app.add_typer(token_app, name="token")
app.add_typer(audit_app, name="audit")
app.add_typer(secret_app, name="secret")
app.add_typer(trace_app, name="trace")

# Piped output keeps full columns instead of the 80-column fallback.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

DAG_FILE_BYTES_MAX = 32 << 20


class Output(str, Enum):
    table = "table"
    json = "json"


OutputOpt = typer.Option(Output.table, "--output", "-o", help="table or json")
EndpointsOpt = typer.Option(None, "--endpoints", help="host:port,... (default: COORDCTL_ENDPOINTS or the local cluster file)")
DataDirOpt = typer.Option(None, "--data-dir", help="local cluster directory (default: COORDCTL_DATA_DIR or ./.coord)")


def configure_logging(level: str, log_format: str = "json", node: str = "") -> None:
    """Logs to stderr as JSON lines (or text), with anything that looks like a token or key masked."""
    from cluster.logs import configure_logging as configure

    try:
        configure(level, log_format, node)
    except ValueError as exc:
        fail(str(exc))


def fail(message: str, code: int = 1) -> None:
    err_console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


class _Auth:
    """Global options: how coordctl authenticates (see `coordctl --help`)."""

    token = ""
    token_file = ""
    cert_name = "cli"
    certs_dir = ""
    insecure_dev: bool | None = None


@app.callback()
def global_options(
    ctx: typer.Context,
    token: str = typer.Option("", "--token", help="a JWT (default: COORD_TOKEN, COORD_TOKEN_FILE, or one minted "
                                                  "from the local cluster's key ring as admin)"),
    token_file: str = typer.Option("", "--token-file", help="a file holding the JWT (re-read when it changes)"),
    cert_name: str = typer.Option("cli", "--cert-name", help="which certificate in the certs dir to present"),
    certs_dir: str = typer.Option("", "--certs-dir", help="the cluster's certs dir (default: DATA_DIR/certs)"),
    insecure_dev: bool = typer.Option(False, "--insecure-dev", help="plaintext, no token: only for a cluster "
                                                                    "started with --insecure-dev"),
    trace_file: str = typer.Option("", "--trace-file",
                                   help="trace this command: its span (the root of the trace the cluster "
                                        "continues) goes to this JSON-lines file; the trace id is printed "
                                        "(long-running `node run` / `executor run` have their own --trace-file)"),
    otlp_endpoint: str = typer.Option("", "--otlp-endpoint", help="trace this command to an OTLP/gRPC collector"),
) -> None:
    _Auth.token, _Auth.token_file, _Auth.cert_name, _Auth.certs_dir = token, token_file, cert_name, certs_dir
    _Auth.insecure_dev = True if insecure_dev else None
    if trace_file or otlp_endpoint:
        if ctx.invoked_subcommand in ("node", "executor"):
            fail("--trace-file / --otlp-endpoint: traces one admin command; `node run` and `executor run` take "
                 "their own --trace-file / --otlp-endpoint / --trace-sample-ratio after the command")
        _trace_command(ctx, trace_file, otlp_endpoint)


def _trace_command(ctx: typer.Context, trace_file: str, otlp_endpoint: str) -> None:
    """The command runs inside a client span (always sampled: asking for a trace means wanting
    this one); every call it makes carries the span's traceparent."""
    from opentelemetry import context as otel_context
    from opentelemetry import trace

    from cluster import tracing

    tracing.configure(tracing.TraceSettings("coordctl", f"coordctl-{os.getpid()}", file=trace_file,
                                            otlp_endpoint=otlp_endpoint, sample_ratio=1.0))
    span = tracing.tracer().start_span(f"coordctl {ctx.invoked_subcommand or ''}".strip(),
                                       kind=trace.SpanKind.CLIENT)
    token = otel_context.attach(trace.set_span_in_context(span))
    trace_id = f"{span.get_span_context().trace_id:032x}"

    def finish() -> None:
        otel_context.detach(token)
        span.end()
        tracing.shutdown()
        err_console.print(f"trace: {trace_id}", highlight=False)

    ctx.call_on_close(finish)


def credentials_for(data_dir: str | None, *, cert_name: str = "", subject: str = "",
                    roles: tuple[str, ...] = ("admin",), refresh_endpoints: list[str] | None = None) -> ClientCredentials:
    try:
        return resolve_credentials(data_dir or default_data_dir(), cert_name=cert_name or _Auth.cert_name,
                                   subject=subject, roles=roles, token=_Auth.token, token_file=_Auth.token_file,
                                   certs_dir=_Auth.certs_dir, insecure_dev=_Auth.insecure_dev,
                                   refresh_endpoints=refresh_endpoints or ())
    except CredentialsError as exc:
        fail(str(exc))
        raise


def client_for(endpoints: str | None, data_dir: str | None) -> CoordinatorClient:
    try:
        eps = resolve_endpoints(endpoints, data_dir)
    except ClientError as exc:
        fail(exc.message)
        raise
    return CoordinatorClient(eps, credentials=credentials_for(data_dir))


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def fmt_ms(ms: int) -> str:
    if not ms:
        return ""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")


_INT64_TYPES = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
                FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}


def to_plain(message: Any) -> dict[str, Any]:
    """A message as JSON-ready data with every field present and 64-bit integers as numbers
    (protobuf's JSON mapping would print them as strings)."""
    data = MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    for field in message.DESCRIPTOR.fields:
        if field.type in _INT64_TYPES and not field.is_repeated:
            data[field.name] = int(data.get(field.name) or 0)
    return data


def task_dict(task: pb.Task) -> dict[str, Any]:
    data = to_plain(task)
    data["input"] = json.loads(task.input_json) if task.input_json else None
    del data["input_json"]
    return data


_RELATIVE = re.compile(r"^\+(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_deadline(text: str | None) -> tuple[int, int]:
    """RFC 3339 (absolute) or +30s/+5m/+2h/+1d (relative): (deadline_unix_ms, deadline_in_ms)."""
    if not text:
        return 0, 0
    match = _RELATIVE.match(text.strip())
    if match:
        return 0, int(float(match.group(1)) * _UNIT_MS[match.group(2)])
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        fail(f"--deadline: RFC 3339 time (2026-12-01T10:00:00Z) or +30s/+5m/+2h/+1d, got {text!r}")
    if moment.tzinfo is None:
        fail("--deadline: give a time zone (e.g. Z or +03:00)")
    return int(moment.timestamp() * 1000), 0


def call(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except ClientError as exc:
        fail(f"{exc.code.name}: {exc.message}")


# ---------------------------------------------------------------------------------- cluster
@cluster_app.command("up")
def cluster_up(
    nodes: int = typer.Option(3, "--nodes", help="how many nodes (3 or 5 for fault tolerance)"),
    data_dir: str = DataDirOpt,
    wait_s: float = typer.Option(30.0, "--wait-s", help="how long to wait for a leader"),
    insecure_dev: bool = typer.Option(False, "--insecure-dev", help="DEVELOPMENT ONLY: plaintext gRPC, no tokens, "
                                                                    "no RBAC, no audit"),
    trace_sample_ratio: float = typer.Option(0.1, "--trace-sample-ratio", help="share of new traces the nodes "
                                             "record (0.0 = off .. 1.0), in DATA_DIR/nN/traces.jsonl"),
    output: Output = OutputOpt,
) -> None:
    """Start a local cluster in the background; returns once a leader is elected. The first run
    creates DATA_DIR/certs: the cluster CA, certificates for the nodes, the CLI, executors and the
    MCP bridge, the JWT key ring and the nodes' audit keys (mTLS + JWT + RBAC + audit are on)."""
    if not 0.0 <= trace_sample_ratio <= 1.0:
        fail(f"--trace-sample-ratio: 0.0..1.0, got {trace_sample_ratio}")
    cluster = LocalCluster(data_dir or default_data_dir(), insecure_dev=insecure_dev,
                           trace_sample_ratio=trace_sample_ratio)
    if cluster.nodes and cluster.insecure_dev != insecure_dev:
        fail(f"--insecure-dev: the cluster in {cluster.data_dir} was created "
             f"{'with' if cluster.insecure_dev else 'without'} it; use the same mode or a fresh --data-dir")
    try:
        leader = cluster.up(nodes, wait_s)
    except ClusterError as exc:
        fail(str(exc))
    data = {"data_dir": cluster.data_dir, "leader": leader, "nodes": [n.as_dict() for n in cluster.nodes]}
    if output == Output.json:
        emit_json(data)
    else:
        console.print(f"cluster of {len(cluster.nodes)} nodes up in {cluster.data_dir}; leader {leader}")
        console.print(f"endpoints: {','.join(cluster.endpoints)}")


@cluster_app.command("down")
def cluster_down(data_dir: str = DataDirOpt, output: Output = OutputOpt) -> None:
    """Stop the local cluster's nodes (SIGTERM, then SIGKILL after 10 s). Data stays."""
    cluster = LocalCluster(data_dir or default_data_dir())
    if not cluster.nodes:
        fail(f"no local cluster in {cluster.data_dir}")
    stopped = [n.id for n in cluster.nodes if pid_alive(n.pid)]
    cluster.down()
    if output == Output.json:
        emit_json({"stopped": stopped})
    else:
        console.print(f"stopped {', '.join(stopped) or 'nothing (no node was running)'}")


@cluster_app.command("status")
def cluster_status(endpoints: str = EndpointsOpt, data_dir: str = DataDirOpt, output: Output = OutputOpt) -> None:
    """Per node: id, address, role, term, commit and applied index, pid, health."""
    eps = call(resolve_endpoints, endpoints, data_dir)
    local = LocalCluster(data_dir or default_data_dir())
    known_ids = {n.grpc_address: n.id for n in local.nodes}
    client = CoordinatorClient(eps, credentials=credentials_for(data_dir))
    rows = []
    for endpoint in eps:
        try:
            node = client.status(endpoint)
            rows.append(to_plain(node))
        except grpc.RpcError as exc:  # a down node is a row, not a failure
            rows.append({"node_id": known_ids.get(endpoint, "?"), "grpc_address": endpoint, "role": "unreachable",
                         "healthy": False, "error": str(exc)[:200]})
    client.close()
    if output == Output.json:
        emit_json({"nodes": rows})
        return
    table = Table(title="cluster status")
    for column in ("node", "grpc", "raft", "role", "term", "commit", "applied", "pid", "tasks", "health"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row.get("node_id", "?"), row.get("grpc_address", ""), row.get("raft_address", ""), row.get("role", ""),
            str(row.get("term", "")), str(row.get("commit_index", "")), str(row.get("applied_index", "")),
            str(row.get("pid", "")), str(row.get("tasks", "")),
            "[green]ok[/green]" if row.get("healthy") else "[red]down[/red]",
        )
    console.print(table)


@app.command("top")
def top(
    interval_s: float = typer.Option(1.0, "--interval-s", help="refresh period (0.2..60)"),
    once: bool = typer.Option(False, "--once", help="print one frame and exit"),
    iterations: int = typer.Option(0, "--iterations", help="stop after this many frames (0 = until Ctrl-C)"),
    endpoints: str = EndpointsOpt,
    data_dir: str = DataDirOpt,
) -> None:
    """A live view of the cluster: nodes and roles, applied entries/s, tasks by status and
    completions/s, executors with load and heartbeat, recent failures. Works against any node."""
    from rich.live import Live

    from cluster.top import TopState, frame

    if not 0.2 <= interval_s <= 60:
        fail(f"--interval-s: between 0.2 and 60, got {interval_s}")
    if iterations < 0:
        fail(f"--iterations: >= 0, got {iterations}")
    state = TopState()
    with client_for(endpoints, data_dir) as client:
        if once:
            console.print(frame(client, state))
            return
        shown = 0
        try:
            with Live(frame(client, state), console=console, refresh_per_second=4, screen=False) as live:
                shown = 1
                while not iterations or shown < iterations:
                    time.sleep(interval_s)
                    live.update(frame(client, state))
                    shown += 1
        except KeyboardInterrupt:
            pass


# ---------------------------------------------------------------------------------- node
@node_app.command("run")
def node_run(
    cluster_file: str = typer.Option(..., "--cluster-file", help="JSON: {nodes: [{id, raft_address, grpc_address}]}"),
    node_id: str = typer.Option(..., "--node-id"),
    data_dir: str = typer.Option(..., "--data-dir", help="this node's WAL and snapshots"),
    secret_file: str = typer.Option(None, "--secret-file", help="cluster secret (or COORD_CLUSTER_SECRET)"),
    log_level: str = typer.Option("INFO", "--log-level"),
    log_compaction_min_entries: int = typer.Option(5000, "--log-compaction-min-entries",
                                                   help="snapshot and compact after this many log entries"),
    log_compaction_min_time_s: float = typer.Option(300.0, "--log-compaction-min-time-s",
                                                    help="or after this many seconds"),
    commands_in_flight_max: int = typer.Option(20_000, "--commands-in-flight-max",
                                               help="beyond this, writes get RESOURCE_EXHAUSTED"),
    node_certs_dir: str = typer.Option("", "--certs-dir", help="the cluster's certs dir (CA, NODE_ID.pem/.key, "
                                                               "jwt-keys.json, audit keys)"),
    policy_file: str = typer.Option("", "--policy-file", help="RBAC policy YAML (default: the shipped one)"),
    node_insecure_dev: bool = typer.Option(False, "--insecure-dev", help="DEVELOPMENT ONLY: plaintext, no "
                                                                         "authentication, RBAC or audit"),
    metrics_address: str = typer.Option("", "--metrics-address", help="serve Prometheus metrics at "
                                                                      "http://HOST:PORT/metrics (default: off)"),
    log_format: str = typer.Option("json", "--log-format", help="json (one object per line) or text"),
    trace_file: str = typer.Option("", "--trace-file", help="write sampled trace spans here as JSON lines "
                                                            "(default: DATA_DIR/traces.jsonl)"),
    otlp_endpoint: str = typer.Option("", "--otlp-endpoint", envvar="OTEL_EXPORTER_OTLP_ENDPOINT",
                                      help="send spans to this OTLP/gRPC collector instead of the file"),
    trace_sample_ratio: float = typer.Option(0.1, "--trace-sample-ratio", help="share of new traces recorded, "
                                                                               "0.0 (off) .. 1.0"),
) -> None:
    """Run one coordinator node in the foreground (for real deployments and `cluster up`)."""
    from cluster.node import NodeConfig, load_cluster_file, load_secret, run_node
    from cluster.proposer import ProposerLimits

    configure_logging(log_level, log_format, node_id)
    secret = load_secret(secret_file)
    if not node_insecure_dev and not node_certs_dir:
        fail("--certs-dir: required (created by `coordctl certs init` / `cluster up`), or --insecure-dev")
    config = NodeConfig(node_id=node_id, nodes=load_cluster_file(cluster_file), data_dir=data_dir,
                        secret=secret, log_compaction_min_entries=log_compaction_min_entries,
                        log_compaction_min_time_s=log_compaction_min_time_s,
                        proposer=ProposerLimits(commands_in_flight_max=commands_in_flight_max),
                        certs_dir=node_certs_dir, policy_file=policy_file, insecure_dev=node_insecure_dev,
                        metrics_address=metrics_address, trace_file=trace_file, otlp_endpoint=otlp_endpoint,
                        trace_sample_ratio=trace_sample_ratio)
    if not 0.0 <= trace_sample_ratio <= 1.0:
        fail(f"--trace-sample-ratio: 0.0..1.0, got {trace_sample_ratio}")
    try:
        config.me  # noqa: B018 (validates node_id early with a clear message)
    except ValueError as exc:
        fail(str(exc))
    asyncio.run(run_node(config))


# ---------------------------------------------------------------------------------- tasks
def parse_input(text: str, field: str = "--input") -> str:
    try:
        json.loads(text)
    except ValueError as exc:
        fail(f"{field}: not valid JSON ({exc})")
    return text


@task_app.command("submit")
def task_submit(
    type_: str = typer.Option(..., "--type", help="task type, e.g. echo"),
    input_: str = typer.Option("null", "--input", help="JSON input"),
    description: str = typer.Option("", "--description"),
    priority: int = typer.Option(None, "--priority", help="0..100 (default 50)"),
    deadline: str = typer.Option(None, "--deadline", help="RFC 3339 or +30s/+5m/+2h"),
    depends_on: list[str] = typer.Option([], "--depends-on", help="task id; repeatable"),
    max_attempts: int = typer.Option(0, "--max-attempts"),
    idempotency_key: str = typer.Option("", "--idempotency-key", help="a retried submit with the same key returns the first task"),
    endpoints: str = EndpointsOpt,
    data_dir: str = DataDirOpt,
    output: Output = OutputOpt,
) -> None:
    """Submit one task."""
    deadline_unix_ms, deadline_in_ms = parse_deadline(deadline)
    spec = pb.TaskSpec(type=type_, input_json=parse_input(input_), description=description,
                       priority=priority or 0, has_priority=priority is not None, deadline_unix_ms=deadline_unix_ms,
                       deadline_in_ms=deadline_in_ms, depends_on=depends_on, max_attempts=max_attempts)
    with client_for(endpoints, data_dir) as client:
        response = call(client.submit_task, spec, idempotency_key)
    if output == Output.json:
        emit_json({"task_id": response.task_id, "duplicate": response.duplicate, "index": response.index})
    else:
        console.print(f"{response.task_id}{' (duplicate: the first submit with this key)' if response.duplicate else ''}")


@task_app.command("list")
def task_list(
    status: list[str] = typer.Option([], "--status", help="repeatable"),
    type_: str = typer.Option("", "--type"),
    limit: int = typer.Option(100, "--limit", help="1..1000"),
    after_id: str = typer.Option("", "--after-id", help="page cursor"),
    linearizable: bool = typer.Option(False, "--linearizable", help="read after a commit barrier"),
    endpoints: str = EndpointsOpt,
    data_dir: str = DataDirOpt,
    output: Output = OutputOpt,
) -> None:
    """List tasks in creation order."""
    consistency = pb.CONSISTENCY_LINEARIZABLE if linearizable else pb.CONSISTENCY_LOCAL
    with client_for(endpoints, data_dir) as client:
        response = call(client.list_tasks, status=status, type=type_, limit=limit, after_id=after_id,
                        consistency=consistency)
    if output == Output.json:
        emit_json({"tasks": [task_dict(t) for t in response.tasks], "next_after_id": response.next_after_id,
                   "total_matching": response.total_matching})
        return
    table = Table(title=f"tasks ({len(response.tasks)} of {response.total_matching})")
    for column in ("id", "name", "type", "status", "priority", "deadline", "deps", "created"):
        table.add_column(column)
    for t in response.tasks:
        table.add_row(t.id, t.name, t.type, t.status, str(t.priority), fmt_ms(t.deadline_unix_ms),
                      str(len(t.dependencies)), fmt_ms(t.created_at_unix_ms))
    console.print(table)
    if response.next_after_id:
        console.print(f"more: --after-id {response.next_after_id}")


@task_app.command("show")
def task_show(
    task_id: str,
    linearizable: bool = typer.Option(False, "--linearizable"),
    endpoints: str = EndpointsOpt,
    data_dir: str = DataDirOpt,
    output: Output = OutputOpt,
) -> None:
    """Show one task."""
    with client_for(endpoints, data_dir) as client:
        task = call(client.get_task, task_id, linearizable)
    data = task_dict(task)
    if output == Output.json:
        emit_json(data)
        return
    table = Table(show_header=False, title=task.id)
    for key in sorted(data):
        value = data[key]
        if key.endswith("_unix_ms"):
            value = fmt_ms(value)
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    console.print(table)


@task_app.command("cancel")
def task_cancel(
    task_id: str,
    reason: str = typer.Option("", "--reason"),
    endpoints: str = EndpointsOpt,
    data_dir: str = DataDirOpt,
    output: Output = OutputOpt,
) -> None:
    """Cancel a task that has not finished."""
    with client_for(endpoints, data_dir) as client:
        response = call(client.cancel_task, task_id, reason)
    if output == Output.json:
        emit_json(task_dict(response.task))
    else:
        console.print(f"{task_id}: {response.task.status}")


@task_app.command("requeue")
def task_requeue(
    task_id: str,
    extra_attempts: int = typer.Option(3, "--extra-attempts", help="attempts it gets from now on"),
    endpoints: str = EndpointsOpt,
    data_dir: str = DataDirOpt,
    output: Output = OutputOpt,
) -> None:
    """Re-queue a dead-lettered (or failed) task, e.g. after fixing what made it fail."""
    with client_for(endpoints, data_dir) as client:
        response = call(client.call, "RequeueTask",
                        pb.RequeueTaskRequest(task_id=task_id, extra_attempts=extra_attempts), retry=False)
    if output == Output.json:
        emit_json(task_dict(response.task))
    else:
        console.print(f"{task_id}: {response.task.status}")


@task_app.command("wait")
def task_wait(
    task_ids: list[str],
    timeout: float = typer.Option(30.0, "--timeout", help="seconds, at most 300"),
    endpoints: str = EndpointsOpt,
    data_dir: str = DataDirOpt,
    output: Output = OutputOpt,
) -> None:
    """Wait until the tasks reach a final state (completed, failed or cancelled). Exit 3 on timeout."""
    with client_for(endpoints, data_dir) as client:
        response = call(client.wait_tasks, task_ids, timeout)
    if output == Output.json:
        emit_json({"all_final": response.all_final, "tasks": [task_dict(t) for t in response.tasks]})
    else:
        for t in response.tasks:
            console.print(f"{t.id}: {t.status}")
    if not response.all_final:
        raise typer.Exit(3)


# ---------------------------------------------------------------------------------- dags
def load_dag_file(path: str) -> list[pb.TaskSpec]:
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        fail(f"FILE: {exc}")
    if size > DAG_FILE_BYTES_MAX:
        fail(f"FILE: at most {DAG_FILE_BYTES_MAX} bytes, got {size}")
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        fail(f"FILE: not valid {'JSON' if path.endswith('.json') else 'YAML'} ({str(exc)[:300]})")
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), list):
        fail('FILE: expected {"tasks": [{"name", "type", "input", "priority", "deadline", "depends_on", "max_attempts"}]}')
    specs = []
    known = {"name", "type", "input", "priority", "deadline", "depends_on", "max_attempts", "description", "metadata"}
    for i, task in enumerate(data["tasks"]):
        if not isinstance(task, dict):
            fail(f"tasks[{i}]: expected a mapping")
        unknown = set(task) - known
        if unknown:
            fail(f"tasks[{i}]: unknown fields {sorted(unknown)}; known: {sorted(known)}")
        priority = task.get("priority")
        if priority is not None and not isinstance(priority, int):
            fail(f"tasks[{i}].priority: an integer 0..100")
        deps = task.get("depends_on") or []
        if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
            fail(f"tasks[{i}].depends_on: a list of task names")
        deadline = task.get("deadline")
        deadline_unix_ms, deadline_in_ms = parse_deadline(str(deadline) if deadline is not None else None)
        specs.append(pb.TaskSpec(
            name=str(task.get("name") or ""), type=str(task.get("type") or ""),
            description=str(task.get("description") or ""),
            input_json=json.dumps(task.get("input"), separators=(",", ":")),
            priority=priority or 0, has_priority=priority is not None, deadline_unix_ms=deadline_unix_ms,
            deadline_in_ms=deadline_in_ms, depends_on=deps, max_attempts=int(task.get("max_attempts") or 0),
            metadata={str(k): str(v) for k, v in (task.get("metadata") or {}).items()},
        ))
    return specs


@dag_app.command("submit")
def dag_submit(
    file: str,
    idempotency_key: str = typer.Option("", "--idempotency-key"),
    endpoints: str = EndpointsOpt,
    data_dir: str = DataDirOpt,
    output: Output = OutputOpt,
) -> None:
    """Submit a DAG atomically: all tasks or none. Names are local to the file."""
    specs = load_dag_file(file)
    with client_for(endpoints, data_dir) as client:
        response = call(client.submit_dag, specs, idempotency_key)
    mapping = {spec.name or str(i): task_id for i, (spec, task_id) in enumerate(zip(specs, response.ordered_ids))}
    if output == Output.json:
        emit_json({"dag_id": response.dag_id, "task_ids": mapping, "duplicate": response.duplicate,
                   "index": response.index})
        return
    table = Table(title=f"DAG {response.dag_id} submitted ({len(mapping)} tasks)"
                        f"{' — duplicate' if response.duplicate else ''}")
    table.add_column("name")
    table.add_column("task id")
    for name, task_id in mapping.items():
        table.add_row(name, task_id)
    console.print(table)


@dag_app.command("show")
def dag_show(
    dag_id: str,
    endpoints: str = EndpointsOpt,
    data_dir: str = DataDirOpt,
    output: Output = OutputOpt,
) -> None:
    """The tasks of one DAG submission and how many are in each status."""
    tasks: list[pb.Task] = []
    with client_for(endpoints, data_dir) as client:
        after = ""
        for _ in range(100):  # a DAG has at most 10,000 tasks: 10 pages of 1,000
            page = call(client.list_tasks, dag_id=dag_id, limit=1000, after_id=after)
            tasks.extend(page.tasks)
            after = page.next_after_id
            if not after:
                break
    counts: dict[str, int] = {}
    for t in tasks:
        counts[t.status] = counts.get(t.status, 0) + 1
    if output == Output.json:
        emit_json({"dag_id": dag_id, "statuses": counts, "tasks": [task_dict(t) for t in tasks]})
        return
    console.print(f"DAG {dag_id}: {len(tasks)} tasks — " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    table = Table()
    for column in ("id", "name", "type", "status", "attempt", "error"):
        table.add_column(column)
    for t in tasks[:200]:
        table.add_row(t.id, t.name, t.type, t.status, str(t.attempt), t.error[:60])
    console.print(table)
    if len(tasks) > 200:
        console.print(f"(first 200 of {len(tasks)}; --output json for all)")


@dag_app.command("cancel")
def dag_cancel(
    dag_id: str,
    reason: str = typer.Option("", "--reason"),
    endpoints: str = EndpointsOpt,
    data_dir: str = DataDirOpt,
    output: Output = OutputOpt,
) -> None:
    """Cancel every task of a DAG that has not finished; running ones are stopped on their executors."""
    with client_for(endpoints, data_dir) as client:
        response = call(client.call, "CancelDag", pb.CancelDagRequest(dag_id=dag_id, reason=reason), retry=False)
    if output == Output.json:
        emit_json({"dag_id": dag_id, "cancelled": list(response.cancelled_task_ids)})
    else:
        console.print(f"DAG {dag_id}: cancelled {len(response.cancelled_task_ids)} tasks that had not finished")


# ---------------------------------------------------------------------------------- events
@events_app.command("watch")
def events_watch(
    from_index: int = typer.Option(0, "--from-index", help="0 = only new events"),
    kind: list[str] = typer.Option([], "--kind", help="repeatable, e.g. TaskCreated"),
    count: int = typer.Option(0, "--count", help="stop after this many events (0 = no limit)"),
    timeout: float = typer.Option(0.0, "--timeout", help="stop after this many seconds (0 = no limit)"),
    endpoints: str = EndpointsOpt,
    data_dir: str = DataDirOpt,
    output: Output = OutputOpt,
) -> None:
    """Stream committed domain events from any node."""
    client = client_for(endpoints, data_dir)
    seen = 0
    try:
        for event in client.watch(from_index, kind, timeout_s=timeout or None):
            data = to_plain(event)
            if output == Output.json:
                sys.stdout.write(json.dumps(data, sort_keys=True) + "\n")
                sys.stdout.flush()
            else:
                console.print(f"{event.index}.{event.seq} {fmt_ms(event.time_unix_ms)} {event.kind} "
                              f"{event.task_id or event.executor_id} {event.data_json}", highlight=False)
            seen += 1
            if count and seen >= count:
                break
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            fail(f"{exc.code().name}: {exc.details()}")
    except KeyboardInterrupt:
        pass
    finally:
        client.close()


# ---------------------------------------------------------------------------------- executors
@executor_app.command("list")
def executor_list(endpoints: str = EndpointsOpt, data_dir: str = DataDirOpt, output: Output = OutputOpt) -> None:
    """List registered executors."""
    with client_for(endpoints, data_dir) as client:
        response = call(client.call, "ListExecutors", pb.ListExecutorsRequest())
    rows = [to_plain(e) for e in response.executors]
    if output == Output.json:
        emit_json({"executors": rows})
        return
    table = Table(title="executors")
    for column in ("id", "type", "task types", "load", "status", "last heartbeat", "completed", "failed", "success",
                   "registered"):
        table.add_column(column)
    for e in response.executors:
        finished = e.tasks_completed + e.tasks_failed
        success = f"{100 * e.tasks_completed / finished:.0f} %" if finished else "—"
        heartbeat = f"{e.heartbeat_age_s:.1f} s ago" if e.heartbeat_age_s >= 0 else "unknown here"
        table.add_row(e.id, e.type, ",".join(e.supported_task_types), f"{e.load}/{e.capacity}", e.status, heartbeat,
                      str(e.tasks_completed), str(e.tasks_failed), success, fmt_ms(e.registered_at_unix_ms))
    console.print(table)


# ---------------------------------------------------------------------------------- certs
def _certs_dir(data_dir: str | None) -> str:
    return os.path.join(data_dir or default_data_dir(), "certs")


def _issued_rows(issued: list) -> list[dict[str, Any]]:
    return [{"name": c.name, "role": c.role, "cert": str(c.cert_path), "key": str(c.key_path),
             "not_after": c.not_after.isoformat(timespec="seconds")} for c in issued]


@certs_app.command("init")
def certs_init(
    nodes: str = typer.Option("n1,n2,n3", "--nodes", help="comma-separated node ids"),
    host: list[str] = typer.Option([], "--host", help="extra host name or IP in the nodes' certificates (repeatable)"),
    data_dir: str = DataDirOpt,
    output: Output = OutputOpt,
) -> None:
    """Create the cluster CA in DATA_DIR/certs and certificates for each node, the CLI and the MCP
    bridge (ECDSA P-256; SANs localhost, 127.0.0.1 and --host; keys 0600). The API does not use
    them yet: mTLS wiring is the rest of the security issue."""
    from security.certs import CertError, init_cluster

    node_ids = [n.strip() for n in nodes.split(",") if n.strip()]
    try:
        issued = init_cluster(_certs_dir(data_dir), node_ids, hosts=list(host))
    except CertError as exc:
        fail(str(exc))
    rows = _issued_rows(issued)
    if output == Output.json:
        emit_json({"certs_dir": _certs_dir(data_dir), "issued": rows})
        return
    for row in rows:
        console.print(f"{row['role']:8} {row['name']:10} {row['cert']} (until {row['not_after']})")


@certs_app.command("issue")
def certs_issue(
    name: str = typer.Option(..., "--name", help="the identity: a node id, an executor id, cli or bridge"),
    role: str = typer.Option(..., "--role", help="node | executor | cli | bridge"),
    host: list[str] = typer.Option([], "--host", help="extra host name or IP (repeatable)"),
    days: int = typer.Option(90, "--days", help="lifetime in days (1..3650)"),
    data_dir: str = DataDirOpt,
    output: Output = OutputOpt,
) -> None:
    """A new key and certificate signed by the cluster CA; over an existing name it rotates it."""
    from security.certs import CertError, CertSettings, issue

    try:
        issued = issue(_certs_dir(data_dir), name, role, hosts=list(host), settings=CertSettings(leaf_lifetime_days=days))
    except CertError as exc:
        fail(str(exc).replace("CertSettings.leaf_lifetime_days", "--days"))
    row = _issued_rows([issued])[0]
    if output == Output.json:
        emit_json(row)
    else:
        console.print(f"{row['role']} {row['name']}: {row['cert']} (until {row['not_after']})")


# ---------------------------------------------------------------------------------- tokens
def _keys_path(data_dir: str | None) -> str:
    return os.path.join(_Auth.certs_dir or _certs_dir(data_dir), "jwt-keys.json")


@token_app.command("issue")
def token_issue(
    subject: str = typer.Option(..., "--subject", help="who the token speaks for (e.g. alice, executor:w1)"),
    role: list[str] = typer.Option(..., "--role", help="a role from the RBAC policy (repeatable), e.g. admin, "
                                                       "operator:level1, agent:executor, user"),
    ttl_s: int = typer.Option(900, "--ttl", help="lifetime in seconds (1..86400); refresh before it ends"),
    data_dir: str = DataDirOpt,
    output: Output = OutputOpt,
) -> None:
    """Sign a token with the cluster's active key (DATA_DIR/certs/jwt-keys.json). Prints it."""
    from security.tokens import KeyRing, KeyRingError, TokenIssuer

    try:
        issuer = TokenIssuer(KeyRing.load(_keys_path(data_dir)))
        token = issuer.issue(subject, role, ttl_s)
    except KeyRingError as exc:
        fail(str(exc))
    except ValueError as exc:
        fail(str(exc).replace("ttl_s", "--ttl").replace("subject:", "--subject:").replace("roles", "--role"))
    if output == Output.json:
        emit_json({"token": token, "subject": subject, "roles": role, "ttl_s": ttl_s})
    else:
        sys.stdout.write(token + "\n")


@token_app.command("rotate-key")
def token_rotate_key(data_dir: str = DataDirOpt, output: Output = OutputOpt) -> None:
    """Add a new signing key and make it active. Tokens signed by older keys keep verifying
    until `token retire-key`; nodes pick the new key ring up without a restart."""
    from security.tokens import KeyRing, KeyRingError

    path = _keys_path(data_dir)
    try:
        kid = KeyRing.load(path).rotate(path)
    except KeyRingError as exc:
        fail(str(exc))
    if output == Output.json:
        emit_json({"active_kid": kid})
    else:
        console.print(f"new active key {kid}")


@token_app.command("retire-key")
def token_retire_key(kid: str = typer.Argument(..., help="a key id that is not the active one"),
                     data_dir: str = DataDirOpt) -> None:
    """Remove an old signing key: tokens it signed stop verifying."""
    from security.tokens import KeyRing, KeyRingError

    path = _keys_path(data_dir)
    try:
        KeyRing.load(path).retire(path, kid)
    except (KeyRingError, ValueError) as exc:
        fail(str(exc))
    console.print(f"retired {kid}")


# ---------------------------------------------------------------------------------- secrets
@secret_app.command("put")
def secret_put(
    name: str = typer.Argument(..., help="1..128 chars of [A-Za-z0-9_.-], e.g. cloudru_api_key"),
    from_file: str = typer.Option("", "--from-file", help="read the value from this file (else from stdin)"),
    endpoints: str = EndpointsOpt,
    data_dir: str = DataDirOpt,
) -> None:
    """Store a secret. The value is read from a file or stdin (never an argument, so it stays out
    of shell history and process lists); the node seals it, only the envelope is replicated."""
    from security.secrets import SECRET_BYTES_MAX

    try:
        if from_file:
            with open(from_file, "rb") as f:
                raw = f.read(SECRET_BYTES_MAX + 2)
        else:
            raw = sys.stdin.buffer.read(SECRET_BYTES_MAX + 2)
    except OSError as exc:
        fail(f"--from-file: {exc.strerror}")
    value = raw.decode(errors="strict").rstrip("\n") if raw else ""
    client = client_for(endpoints, data_dir)
    reply = call(client.call, "PutSecret", pb.PutSecretRequest(name=name, value=value), retry=False)
    console.print(f"secret {name} stored (index {reply.index})")


@secret_app.command("list")
def secret_list(endpoints: str = EndpointsOpt, data_dir: str = DataDirOpt, output: Output = OutputOpt) -> None:
    """Names, the KEK wrapping each, and when each changed (never values)."""
    client = client_for(endpoints, data_dir)
    reply = call(client.call, "ListSecrets", pb.ListSecretsRequest())
    rows = [{"name": s.name, "kek_id": s.kek_id, "updated": fmt_ms(s.updated_unix_ms)} for s in reply.secrets]
    if output == Output.json:
        emit_json({"secrets": rows})
        return
    table = Table(title="secrets")
    for column in ("name", "kek_id", "updated"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], row["kek_id"], row["updated"])
    console.print(table)


@secret_app.command("delete")
def secret_delete(name: str = typer.Argument(...), endpoints: str = EndpointsOpt, data_dir: str = DataDirOpt) -> None:
    client = client_for(endpoints, data_dir)
    call(client.call, "DeleteSecret", pb.DeleteSecretRequest(name=name), retry=False)
    console.print(f"secret {name} deleted")


@secret_app.command("rotate-kek")
def secret_rotate_kek(endpoints: str = EndpointsOpt, data_dir: str = DataDirOpt, output: Output = OutputOpt) -> None:
    """Rotate the key-encryption key of a local cluster: a new KEK goes first in
    DATA_DIR/certs/secrets.kek (the nodes re-read it), every data key is re-wrapped under it
    through the cluster, then the old KEK is dropped from the file."""
    from cluster.credentials import KEK_FILE
    from security.secrets import Kek, KekRing, SecretError, write_kek_file

    path = os.path.join(_Auth.certs_dir or _certs_dir(data_dir), KEK_FILE)
    try:
        old = KekRing(path).active
    except SecretError as exc:
        fail(str(exc))
    new = Kek.generate()
    write_kek_file(path, [new, old])
    client = client_for(endpoints, data_dir)
    reply = call(client.call, "RewrapSecrets", pb.RewrapSecretsRequest(), retry=False)
    write_kek_file(path, [new])
    if output == Output.json:
        emit_json({"kek_id": reply.kek_id, "rewrapped": reply.rewrapped, "old_kek_id": old.kek_id})
    else:
        console.print(f"KEK {old.kek_id} -> {reply.kek_id}: {reply.rewrapped} secrets re-wrapped")


# ---------------------------------------------------------------------------------- audit
def _fetch_audit(client: CoordinatorClient, page_max: int = 5000) -> tuple[list, list, Any]:
    """Every retained record of one node's chain, page by page (bounded by the chain's size)."""
    from coordinator.audit import AuditHead, AuditRecord

    records: list[AuditRecord] = []
    seq = 0
    reply = None
    for _ in range(10_000):
        reply = client.call("ListAudit", pb.ListAuditRequest(from_seq=seq, limit=page_max))
        records.extend(AuditRecord(r.seq, r.index, r.time_unix_ms, r.node, r.who, tuple(r.roles), r.action, r.resource,
                                   r.outcome, r.digest, r.sig, r.prev, r.hash) for r in reply.records)
        if not reply.records or records[-1].seq >= reply.last_seq:
            break
        seq = records[-1].seq + 1
    assert reply is not None
    heads = [AuditHead(h.seq, h.hash, h.node, h.time_unix_ms, h.sig) for h in reply.heads]
    anchor = reply.anchor if reply.has_anchor else None
    return records, heads, AuditHead(anchor.seq, anchor.hash, anchor.node, anchor.time_unix_ms, anchor.sig) if anchor else None


def _audit_source(endpoints: str | None, data_dir: str | None, file: str, node_data_dir: str) -> tuple[list, list, Any, str]:
    from cluster.audit_files import read_node_audit
    from security.audit import AuditError, load_export

    try:
        if file:
            return (*load_export(file), file)
        if node_data_dir:
            return (*read_node_audit(node_data_dir), f"{node_data_dir} (its snapshot)")
    except AuditError as exc:
        fail(str(exc))
    client = client_for(endpoints, data_dir)
    try:
        return (*call(_fetch_audit, client), client.endpoints[client._preferred])
    finally:
        client.close()


def _audit_row(r: Any) -> dict[str, Any]:
    return {"seq": r.seq, "index": r.index, "time": fmt_ms(r.time_ms) if isinstance(r.time_ms, int) else r.time_ms,
            "node": r.node, "who": r.who, "roles": list(r.roles or ()), "action": r.action, "resource": r.resource,
            "outcome": r.outcome}


@audit_app.command("list")
def audit_list(
    last: int = typer.Option(50, "--last", help="show the newest N records (1..100000)"),
    who: str = typer.Option("", "--who", help="only records of this principal"),
    outcome: str = typer.Option("", "--outcome", help="only records whose outcome starts with this (e.g. denied)"),
    file: str = typer.Option("", "--file", help="read an export instead of asking a node"),
    endpoints: str = EndpointsOpt,
    data_dir: str = DataDirOpt,
    output: Output = OutputOpt,
) -> None:
    """The audit records a node holds (newest last): who did what to which resource, the
    outcome, the time and the Raft index."""
    if not 1 <= last <= 100_000:
        fail(f"--last: between 1 and 100000, got {last}")
    records, _heads, _anchor, _source = _audit_source(endpoints, data_dir, file, "")
    rows = [_audit_row(r) for r in records if (not who or r.who == who)
            and (not outcome or str(r.outcome).startswith(outcome))][-last:]
    if output == Output.json:
        emit_json({"records": rows})
        return
    table = Table(title=f"audit ({len(rows)} records)")
    for column in ("seq", "index", "time", "node", "who", "action", "resource", "outcome"):
        table.add_column(column)
    for row in rows:
        table.add_row(str(row["seq"]), str(row["index"]), row["time"], row["node"], row["who"], row["action"],
                      row["resource"], row["outcome"])
    console.print(table)


def _trace_files(data_dir: str | None, files: list[str]) -> list[str]:
    """The given files plus, for a local cluster, every node's DATA_DIR/nN/traces.jsonl."""
    from cluster.local import LocalCluster

    paths = list(files)
    directory = data_dir or os.environ.get("COORDCTL_DATA_DIR") or default_data_dir()
    if os.path.exists(os.path.join(directory, "cluster.json")):
        paths += [os.path.join(node.data_dir, "traces.jsonl") for node in LocalCluster(directory).nodes]
    if not paths:
        fail(f"--file: no trace files given and no local cluster in {directory}")
    return paths


@trace_app.command("list")
def trace_list(
    file: list[str] = typer.Option([], "--file", help="a JSON-lines trace file (repeatable; executors', coordctl's)"),
    last: int = typer.Option(20, "--last", help="the newest N traces (1-10000)"),
    data_dir: str = DataDirOpt,
    output: Output = OutputOpt,
) -> None:
    """Traces in the local cluster's trace files (and --file ones), newest last."""
    from cluster.tracing import read_spans, trace_ids

    if not 1 <= last <= 10_000:
        fail(f"--last: between 1 and 10000, got {last}")
    traces = trace_ids(read_spans(_trace_files(data_dir, file)))
    rows = sorted(({"trace_id": k, "root": v["root"] or "(root not in these files)", "spans": v["spans"],
                    "services": sorted(v["services"]), "start": v["start"]} for k, v in traces.items()),
                  key=lambda r: r["start"])[-last:]
    if output == Output.json:
        emit_json({"traces": rows})
        return
    table = Table(title=f"traces ({len(rows)} of {len(traces)})")
    for column in ("trace id", "start", "root", "spans", "services"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["trace_id"], row["start"], row["root"], str(row["spans"]), ",".join(row["services"]))
    console.print(table)


@trace_app.command("show")
def trace_show(
    trace_id: str = typer.Argument(..., help="32 hex digits (printed by `coordctl --trace-file ...`)"),
    file: list[str] = typer.Option([], "--file", help="a JSON-lines trace file (repeatable; executors', coordctl's)"),
    data_dir: str = DataDirOpt,
    output: Output = OutputOpt,
) -> None:
    """One trace as a tree: which process did what, when, for how long — submit, commit,
    schedule, execute and report, across nodes and executors."""
    from dataclasses import asdict

    from cluster.tracing import read_spans, trace_rows

    trace_id = trace_id.lower().removeprefix("0x")
    if not re.fullmatch(r"[0-9a-f]{32}", trace_id):
        fail(f"trace_id: 32 hex digits, got {trace_id!r}")
    rows, missing = trace_rows(read_spans(_trace_files(data_dir, file)), trace_id)
    if not rows:
        fail(f"trace {trace_id}: no spans in the trace files")
    if output == Output.json:
        emit_json({"trace_id": trace_id, "spans": [asdict(r) for r in rows], "missing_parents": missing})
        return
    t0 = min(r.start_s for r in rows)
    table = Table(title=f"trace {trace_id} ({len(rows)} spans)")
    for column in ("span", "where", "start ms", "duration ms", "status", "task"):
        table.add_column(column)
    for row in rows:
        table.add_row("  " * row.depth + row.name, row.service, f"{(row.start_s - t0) * 1000:.1f}",
                      f"{row.duration_ms:.1f}", row.status, str(row.attributes.get("task.id", "")))
    console.print(table)
    if missing:
        console.print(f"parents not in these files (another process's file?): {', '.join(missing)}")


@audit_app.command("export")
def audit_export(
    out: str = typer.Option(..., "--out", help="the JSON-lines file to write (0600)"),
    endpoints: str = EndpointsOpt,
    data_dir: str = DataDirOpt,
    output: Output = OutputOpt,
) -> None:
    """Write a node's retained chain (anchor, signed heads, records) as JSON lines, for review
    and for `audit verify --file` later."""
    from security.audit import export_jsonl

    records, heads, anchor, source = _audit_source(endpoints, data_dir, "", "")
    export_jsonl(out, records, heads, anchor)
    if output == Output.json:
        emit_json({"file": out, "records": len(records), "heads": len(heads), "source": source})
    else:
        console.print(f"{len(records)} records, {len(heads)} signed heads from {source} -> {out}")


@audit_app.command("verify")
def audit_verify(
    file: str = typer.Option("", "--file", help="verify an export instead of asking a node"),
    node_data_dir: str = typer.Option("", "--node-data-dir", help="verify the chain in a (stopped) node's "
                                                                  "snapshot, offline"),
    keys: str = typer.Option("", "--keys", help="the nodes' public audit keys (default: DATA_DIR/certs/"
                                                "audit-keys.json)"),
    endpoints: str = EndpointsOpt,
    data_dir: str = DataDirOpt,
    output: Output = OutputOpt,
) -> None:
    """Check the hash chain, every record's signature and every signed head against the
    cluster's known node keys; report the first bad record. Exit 0 if it verifies, 2 if not."""
    from cluster.audit_files import verify_with_decisions
    from security.audit import AuditError, load_known_keys

    keys = keys or os.path.join(_Auth.certs_dir or _certs_dir(data_dir), "audit-keys.json")
    try:
        known = load_known_keys(keys)
    except AuditError as exc:
        fail(f"--keys: {exc}")
    records, heads, anchor, source = _audit_source(endpoints, data_dir, file, node_data_dir)
    report = verify_with_decisions(records, heads, anchor, known)
    data = {"ok": report.ok, "source": source, "records_checked": report.records_checked,
            "heads_checked": report.heads_checked, "first_bad_seq": report.first_bad_seq,
            "first_bad_position": report.first_bad_position, "problem": report.problem,
            "unsigned_tail_from_seq": report.unsigned_tail_from_seq}
    if output == Output.json:
        emit_json(data)
    elif report.ok:
        tail = (f"; records from seq {report.unsigned_tail_from_seq} on are after the newest signed head "
                "(hash chain and record signatures only)") if report.unsigned_tail_from_seq else ""
        console.print(f"[green]verified[/green] {report.records_checked} records and {report.heads_checked} signed "
                      f"heads from {source}{tail}")
    else:
        err_console.print(f"[red]audit chain does not verify[/red] ({source}): {report.problem}", highlight=False)
    if not report.ok:
        raise typer.Exit(2)


# ---------------------------------------------------------------------------------- checkpoints
def checkpoint_dict(info: pb.CheckpointInfo) -> dict[str, Any]:
    return {"id": info.id, "task_id": info.task_id, "sequence_number": info.sequence_number, "kind": info.kind,
            "base_sequence": info.base_sequence or None, "timestamp_unix_ms": info.timestamp_unix_ms,
            "payload_bytes": info.payload_bytes, "checksum": info.checksum, "model_versions": dict(info.model_versions)}


@checkpoint_app.command("list")
def checkpoint_list(
    task_id: str,
    linearizable: bool = typer.Option(False, "--linearizable"),
    endpoints: str = EndpointsOpt,
    data_dir: str = DataDirOpt,
    output: Output = OutputOpt,
) -> None:
    """The checkpoints a task holds now (retention drops older ones), oldest first."""
    with client_for(endpoints, data_dir) as client:
        response = call(client.list_checkpoints, task_id, linearizable)
    items = [checkpoint_dict(c) for c in response.checkpoints]
    if output == Output.json:
        emit_json({"task_id": task_id, "last_sequence": response.last_sequence,
                   "payload_bytes_total": response.payload_bytes_total, "checkpoints": items})
        return
    table = Table(title=f"{task_id}: {len(items)} held, last saved {response.last_sequence}, "
                        f"{response.payload_bytes_total} bytes")
    for column in ("seq", "kind", "base", "bytes", "saved at", "model versions"):
        table.add_column(column)
    for item in items:
        table.add_row(str(item["sequence_number"]), item["kind"], str(item["base_sequence"] or ""),
                      str(item["payload_bytes"]), fmt_ms(item["timestamp_unix_ms"]),
                      ", ".join(f"{k}={v}" for k, v in sorted(item["model_versions"].items())))
    console.print(table)


@checkpoint_app.command("show")
def checkpoint_show(
    task_id: str,
    seq: int = typer.Option(0, "--seq", help="sequence number (default: the newest held)"),
    linearizable: bool = typer.Option(False, "--linearizable"),
    endpoints: str = EndpointsOpt,
    data_dir: str = DataDirOpt,
    output: Output = OutputOpt,
) -> None:
    """One checkpoint: its record, its payload, and the document restored up to it."""
    if seq < 0:
        fail(f"--seq: >= 0 (0 = the newest), got {seq}")
    with client_for(endpoints, data_dir) as client:
        response = call(client.get_checkpoint, task_id, seq, linearizable)
    data = {**checkpoint_dict(response.checkpoint), "restored_sequence": response.restored_sequence,
            "problem": response.problem or None,
            "payload": json.loads(response.payload_json) if response.payload_json else None,
            "document": json.loads(response.document_json) if response.document_json else None}
    if output == Output.json:
        emit_json(data)
        return
    table = Table(show_header=False, title=data["id"])
    for key in ("sequence_number", "kind", "base_sequence", "payload_bytes", "checksum", "timestamp_unix_ms",
                "model_versions", "restored_sequence", "problem"):
        value = data[key]
        table.add_row(key, fmt_ms(value) if key.endswith("_unix_ms") else
                      json.dumps(value) if isinstance(value, dict) else str(value if value is not None else ""))
    console.print(table)
    console.print_json(json.dumps(data["document"]))


@executor_app.command("profile")
def executor_profile(
    type_: str = typer.Option(..., "--type", help="executor type whose adapter to profile"),
    repeats: int = typer.Option(5, "--repeats", help="runs of each benchmark input, one at a time (1-1000)"),
    concurrency: int = typer.Option(4, "--concurrency", help="runs at once for the throughput figure (1-256)"),
    write: str = typer.Option("", "--write", help="also write the profile to this file, for executor run --profile-file"),
    output: Output = OutputOpt,
) -> None:
    """Run the adapter of --type on its small benchmark set per task type, here, without a cluster:
    latency p50/p95, throughput, cost per task and success rate. `executor run --profile-file`
    registers it as the executor's performance profile, which the scheduler's matching uses.
    An LLM adapter pointed at a paid endpoint spends real tokens here (its inputs are tiny)."""
    from cluster.agent import build_adapter
    from executors.profiling import ProfileSettings, profile_adapter

    try:
        settings = ProfileSettings(repeats=repeats, concurrency=concurrency)
        adapter = build_adapter(type_)
    except ValueError as exc:
        fail(str(exc))

    async def run() -> dict[str, Any]:
        try:
            return await profile_adapter(adapter, settings=settings)
        finally:
            aclose = getattr(adapter, "aclose", None)
            if aclose is not None:
                await aclose()

    profile = asyncio.run(run())
    if write:
        with open(write, "w") as f:
            json.dump(profile, f, indent=2, sort_keys=True)
    if output == Output.json:
        emit_json(profile)
        return
    table = Table(title=f"{type_}: latency p50 {profile['latency_s_p50'] * 1000:.2f} ms, "
                        f"cost per task {profile['cost_per_task']:.6f} USD")
    for column in ("task type", "runs", "success", "p50 ms", "p95 ms", f"tasks/s at {concurrency}", "cost USD"):
        table.add_column(column)
    for task_type, row in profile["task_types"].items():
        table.add_row(task_type, str(row["runs"]), f"{row['success_rate']:.0%}",
                      f"{row['latency_s_p50'] * 1000:.2f}" if row["latency_s_p50"] is not None else "-",
                      f"{row['latency_s_p95'] * 1000:.2f}" if row["latency_s_p95"] is not None else "-",
                      str(row["throughput_per_s"]), f"{row['cost_per_task'] or 0:.6f}")
    console.print(table)
    if profile["not_profiled"]:
        console.print(f"not profiled (no benchmark inputs): {', '.join(profile['not_profiled'])}")


@executor_app.command("run")
def executor_run(
    type_: str = typer.Option(..., "--type", help="executor type: algorithmic, specialized_ml, local_llm (LOCAL_LLM_ENDPOINTS, LOCAL_LLM_MODEL) or cloudru (CLOUDRU_API_KEY)"),
    name: str = typer.Option(..., "--name", help="executor name"),
    executor_id: str = typer.Option(None, "--id", help="stable executor id (default: the name); the same id "
                                                       "after a restart resumes its leases"),
    capacity: int = typer.Option(1, "--capacity", help="attempts run at once, >= 1"),
    profile_file: str = typer.Option("", "--profile-file", help="a profile from `executor profile --write`: "
                                                                "registered as this executor's performance profile"),
    checkpoint_on_action: bool = typer.Option(True, "--checkpoint-on-action/--no-checkpoint-on-action",
                                              help="save a checkpoint after every action an adapter records"),
    checkpoint_interval_s: float = typer.Option(0.0, "--checkpoint-interval-s",
                                                help="also save unsaved checkpoint changes this often (0 = off)"),
    prefetch: int = typer.Option(0, "--prefetch", help="attempts leased beyond --capacity and queued here, so a "
                                                       "slot that frees starts the next one at once (0-10000)"),
    heartbeat_interval_s: float = typer.Option(1.0, "--heartbeat-interval-s",
                                               help="used until the node's welcome names its own"),
    log_format: str = typer.Option("json", "--log-format", help="json (one object per line) or text"),
    secret_env: list[str] = typer.Option([], "--secret-env", help="VAR=SECRET: the adapter sees the cluster "
                                                                  "secret SECRET as VAR (e.g. CLOUDRU_API_KEY="
                                                                  "cloudru_api_key); repeatable"),
    log_level: str = typer.Option("INFO", "--log-level"),
    metrics_address: str = typer.Option("", "--metrics-address", help="serve Prometheus metrics at "
                                                                      "http://HOST:PORT/metrics, with /healthz and "
                                                                      "/readyz (default: off)"),
    agent_trace_file: str = typer.Option("", "--trace-file", help="write the spans of traced tasks' attempts "
                                                                  "to this JSON-lines file"),
    agent_otlp_endpoint: str = typer.Option("", "--otlp-endpoint", envvar="OTEL_EXPORTER_OTLP_ENDPOINT",
                                            help="send them to this OTLP/gRPC collector instead "
                                                 "(default: OTEL_EXPORTER_OTLP_ENDPOINT)"),
    trace_sample_ratio: float = typer.Option(None, "--trace-sample-ratio",
                                             help="0.0..1.0 (default: tracing.SAMPLE_RATIO_DEFAULT); attempts "
                                                  "follow the sampling decision stored with their task"),
    endpoints: str = EndpointsOpt,
    data_dir: str = DataDirOpt,
    output: Output = OutputOpt,
) -> None:
    """Run an executor agent in the foreground until SIGTERM/SIGINT: connects to any node, runs
    assigned tasks through the adapter of --type, reconnects to the next node on failure. Logs go
    to stderr; on exit a summary goes to stdout."""
    import signal

    from cluster.agent import PREFETCH_MAX, ExecutorAgent, build_adapter
    from executors.checkpointing import CheckpointSettings

    if capacity < 1:
        fail(f"--capacity: >= 1, got {capacity}")
    if not 0 <= prefetch <= PREFETCH_MAX:
        fail(f"--prefetch: between 0 and {PREFETCH_MAX}, got {prefetch}")
    from cluster import tracing
    from cluster.agent_metrics import AgentMetrics, serve_http
    from cluster.metrics import parse_address

    if metrics_address:
        try:
            parse_address(metrics_address)
        except ValueError as exc:
            fail(f"--metrics-address: {exc}")
    if trace_sample_ratio is None:
        trace_sample_ratio = tracing.SAMPLE_RATIO_DEFAULT
    if not 0.0 <= trace_sample_ratio <= 1.0:
        fail(f"--trace-sample-ratio: between 0.0 and 1.0, got {trace_sample_ratio}")
    from cluster.agent import ADAPTER_FACTORIES

    if type_ not in ADAPTER_FACTORIES:
        fail(f"--type: {type_!r} has no adapter; valid types: {', '.join(sorted(ADAPTER_FACTORIES))}")
    adapter = None
    if not secret_env:  # configuration errors before anything touches the network
        try:
            adapter = build_adapter(type_)
        except ValueError as exc:
            fail(str(exc))
    eps = call(resolve_endpoints, endpoints, data_dir)
    configure_logging(log_level, log_format)
    credentials = credentials_for(data_dir, cert_name=_Auth.cert_name if _Auth.cert_name != "cli" else "executor",
                                  subject=f"executor:{executor_id or name}", roles=("agent:executor",),
                                  refresh_endpoints=eps)
    env = dict(os.environ)
    if secret_env:
        # Fetched once at start over mTLS; held in this process only (never os.environ or a file).
        with CoordinatorClient(eps, credentials=credentials) as secrets_client:
            for item in secret_env:
                variable, _, secret_name = item.partition("=")
                if not variable or not secret_name:
                    fail(f"--secret-env: VAR=SECRET, got {item!r}")
                env[variable] = call(secrets_client.call, "GetSecret", pb.GetSecretRequest(name=secret_name)).value
    if adapter is None:
        try:
            adapter = build_adapter(type_, env)
        except ValueError as exc:
            fail(str(exc))
    try:
        checkpoint_settings = CheckpointSettings(on_action=checkpoint_on_action, interval_s=checkpoint_interval_s)
    except ValueError as exc:
        fail(f"--checkpoint-interval-s: {exc}")
    performance_profile = None
    if profile_file:
        try:
            with open(profile_file) as f:
                performance_profile = json.load(f)
        except (OSError, ValueError) as exc:
            fail(f"--profile-file: cannot read a JSON profile from {profile_file!r} ({exc})")
        if not isinstance(performance_profile, dict):
            fail(f"--profile-file: {profile_file!r} holds no JSON object")
    metrics = AgentMetrics(executor_id or name, type_) if metrics_address else None
    agent = ExecutorAgent(adapter, executor_id=executor_id or name, name=name, executor_type=type_,
                          capacity=capacity, prefetch=prefetch, endpoints=eps,
                          heartbeat_interval_s=heartbeat_interval_s, checkpoint_settings=checkpoint_settings,
                          performance_profile=performance_profile, credentials=credentials, metrics=metrics)
    metrics_server = None
    if metrics is not None:
        try:
            metrics_server = serve_http(metrics_address, metrics.registry, agent.metrics_snapshot)
        except (OSError, ValueError) as exc:
            fail(f"--metrics-address: cannot serve on {metrics_address!r} ({exc})")
    try:
        tracing.configure(tracing.TraceSettings("executor-agent", agent.executor_id, file=agent_trace_file,
                                                otlp_endpoint=agent_otlp_endpoint,
                                                sample_ratio=trace_sample_ratio))
    except OSError as exc:
        fail(f"--trace-file: cannot write {agent_trace_file!r} ({exc})")
    except tracing.TracingConfigError as exc:
        fail(f"--trace-sample-ratio: {exc}")
    except ValueError as exc:
        fail(f"--otlp-endpoint: {agent_otlp_endpoint!r}: {exc}")

    async def main_async() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await agent.run(stop)

    try:
        asyncio.run(main_async())
    finally:
        tracing.shutdown()                  # flushes the spans still queued
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
    summary = agent.status()
    if output == Output.json:
        emit_json(summary)
    else:
        console.print(f"executor {agent.executor_id} stopped: {summary['attempts_completed_total']} completed, "
                      f"{summary['attempts_failed_total']} failed, {summary['outbox_total']} reports unacked")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
