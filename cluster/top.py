"""`coordctl top`: a live view of the cluster (issue 7) — nodes and roles, throughput, the queue
by status, executors with load and health, recent failures. Everything comes from the public
API of any node (one round of calls per refresh), so it works against any node, as any
principal allowed to read tasks, executors and cluster status."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from cluster.client import ClientError, CoordinatorClient
from coordinator.model import TaskStatus
from proto import coordinator_pb2 as pb

FAILURES_SHOWN = 5
FAILURES_SCANNED_MAX = 1000


@dataclass
class TopState:
    """What the previous frame saw, for rates."""

    at_s: float = 0.0
    completed: int = -1
    applied: dict[str, int] = field(default_factory=dict)


def snapshot(client: CoordinatorClient) -> dict[str, Any]:
    nodes = []
    for endpoint in client.endpoints:
        try:
            nodes.append(client.status(endpoint, timeout_s=1.0))
        except Exception as exc:  # noqa: BLE001 — a node that does not answer is a row, not a failure
            nodes.append(exc)
    counts = {}
    for status in TaskStatus:
        reply = client.call("ListTasks", pb.ListTasksRequest(status=[status.value], limit=1), timeout_s=5)
        counts[status.value] = reply.total_matching
    executors = client.call("ListExecutors", pb.ListExecutorsRequest(), timeout_s=5).executors
    failed = client.call("ListTasks", pb.ListTasksRequest(status=["failed", "dead_letter"],
                                                          limit=FAILURES_SCANNED_MAX), timeout_s=5).tasks
    recent = sorted(failed, key=lambda t: t.updated_at_unix_ms, reverse=True)[:FAILURES_SHOWN]
    return {"nodes": nodes, "counts": counts, "executors": list(executors), "failures": recent}


def render(data: dict[str, Any], state: TopState, now_s: float | None = None) -> Group:
    now_s = time.monotonic() if now_s is None else now_s
    elapsed = now_s - state.at_s if state.at_s else 0.0
    nodes = Table(title="nodes", expand=True)
    for column in ("node", "address", "role", "term", "commit", "applied", "applied/s", "in flight", "health"):
        nodes.add_column(column)
    for endpoint, node in zip(data.get("endpoints", []) or [None] * len(data["nodes"]), data["nodes"], strict=False):
        if isinstance(node, Exception):
            nodes.add_row("?", endpoint or "", "[red]unreachable[/red]", "", "", "", "", "", "[red]down[/red]")
            continue
        rate = ""
        if elapsed > 0 and node.node_id in state.applied:
            rate = f"{(node.applied_index - state.applied[node.node_id]) / elapsed:.0f}"
        state.applied[node.node_id] = node.applied_index
        role = f"[bold green]{node.role}[/bold green]" if node.role == "leader" else node.role
        nodes.add_row(node.node_id, node.grpc_address, role, str(node.term), str(node.commit_index),
                      str(node.applied_index), rate, str(node.commands_in_flight),
                      "[green]ok[/green]" if node.healthy else "[red]unhealthy[/red]")
    counts = data["counts"]
    throughput = ""
    if elapsed > 0 and state.completed >= 0:
        throughput = f"   completed/s: {(counts.get('completed', 0) - state.completed) / elapsed:.1f}"
    state.completed = counts.get("completed", 0)
    state.at_s = now_s
    queue = Table(title="tasks by status" + throughput, expand=True)
    for status in counts:
        queue.add_column(status, justify="right")
    queue.add_row(*(f"{n:,}" for n in counts.values()))
    executors = Table(title="executors", expand=True)
    for column in ("id", "type", "load", "status", "heartbeat", "completed", "failed"):
        executors.add_column(column)
    for e in data["executors"]:
        heartbeat = f"{e.heartbeat_age_s:.1f} s ago" if e.heartbeat_age_s >= 0 else "—"
        executors.add_row(e.id, e.type, f"{e.load}/{e.capacity}", e.status, heartbeat, str(e.tasks_completed),
                          str(e.tasks_failed))
    failures = Table(title="recent failures", expand=True)
    for column in ("task", "type", "status", "attempt", "error"):
        failures.add_column(column)
    for t in data["failures"]:
        failures.add_row(t.id, t.type, t.status, str(t.attempt), (t.error or "")[:100])
    return Group(nodes, queue, executors, failures,
                 Text(f"refreshed {time.strftime('%H:%M:%S')}; Ctrl-C to quit", style="dim"))


def frame(client: CoordinatorClient, state: TopState) -> Group:
    try:
        data = snapshot(client)
    except ClientError as exc:
        return Group(Text(f"cannot read the cluster: {exc}", style="red"))
    data["endpoints"] = list(client.endpoints)
    return render(data, state)
