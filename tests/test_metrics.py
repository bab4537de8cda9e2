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
    leaders = 0
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
    assert leaders == 1
