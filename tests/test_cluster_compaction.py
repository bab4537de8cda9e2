"""Disk use stays bounded under steady load: snapshots compact the journal, and the LMDB file
reuses its freed pages instead of growing."""

from __future__ import annotations

import os

import pytest


from proto import coordinator_pb2 as pb

pytestmark = pytest.mark.cluster

COMPACT_AFTER_ENTRIES = 50


def wal_bytes(data_dir: str) -> int:
    return os.path.getsize(os.path.join(data_dir, "wal", "data.mdb"))


def test_journal_stays_bounded_under_steady_load(make_cluster) -> None:
    cluster = make_cluster(3, extra_args=["--log-compaction-min-entries", str(COMPACT_AFTER_ENTRIES)])
    payload = '{"blob": "' + "x" * 2000 + '"}'
    sizes = []
    with cluster.client(cluster.endpoints) as client:
        for round_ in range(4):
            for n in range(300):  # one entry each: sequential submits do not batch
                client.submit_task(pb.TaskSpec(type="echo", input_json=payload), f"r{round_}-{n}")
            cluster.wait_converged()
            sizes.append({node.id: wal_bytes(node.data_dir) for node in cluster.nodes})
            for node_id, status in cluster.statuses().items():
                assert status is not None
                # pysyncobj compacts once the log holds more than the threshold; allow one
                # snapshot in flight
                assert status.log_entries <= 3 * COMPACT_AFTER_ENTRIES, (node_id, status.log_entries)
    # 1,200 entries of ~2 KiB went through (~2.4 MB per node); after the first round the
    # journal file stops growing, because compaction frees pages that LMDB reuses.
    for node in cluster.nodes:
        first, last = sizes[1][node.id], sizes[-1][node.id]
        assert last <= first * 1.5 + (256 << 10), (node.id, [s[node.id] for s in sizes])
        assert os.path.exists(os.path.join(node.data_dir, "snapshot.bin"))


def test_snapshots_work_when_the_last_entries_are_big_dags(make_cluster) -> None:
    """The two log entries kept beside a snapshot can be large (a 1,000-task DAG is ~80 KB):
    compaction must still happen, and a follower restarted afterwards catches up from it."""
    cluster = make_cluster(3, extra_args=["--log-compaction-min-entries", "10"])
    leader = cluster.wait_leader()
    follower = next(n.id for n in cluster.nodes if n.id != leader)
    with cluster.client(cluster.endpoints) as client:
        for round_ in range(30):
            dag = [pb.TaskSpec(name=f"t{i}", type="echo", input_json='{"pad": "%s"}' % ("y" * 40),
                               depends_on=[f"t{i - 1}"] if i % 10 else []) for i in range(1000)]
            client.submit_dag(dag, f"dag-{round_}")
            if round_ == 20:
                cluster.stop_node(follower)
    cluster.start_node(follower)
    cluster.wait_converged(timeout_s=60)
    for node_id, status in cluster.statuses().items():
        assert status is not None and status.tasks == 30_000
        assert status.log_entries <= 30, (node_id, status.log_entries)
    for node in cluster.nodes:
        with open(os.path.join(node.data_dir, "node.log")) as f:
            assert "snapshot write failed" not in f.read()
