"""Prometheus metrics of a node (issue 7, first part): read from the node's state when scraped,
so serving them costs nothing on the request path.

    GET http://<metrics address>/metrics      coordctl node run --metrics-address 127.0.0.1:9464

What is exported now (names follow Prometheus conventions: base units, `_total` for counters, no
task ids as labels):

    raft_is_leader, raft_term, raft_commit_index, raft_applied_index, raft_apply_lag_entries
    task_queue_depth{status}, executors{status}, audit_records, secrets
    proposer_commands_in_flight, grpc_access_denied_total

Not built yet (issue 7 continues): histograms of task, dispatch and executor latency, gRPC
request counts and latencies by method and code, WAL fsync and snapshot durations, LLM tokens
and cost, traces, structured logs, /healthz and /readyz, alert rules, dashboards, `coordctl top`.
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
