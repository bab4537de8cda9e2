"""Regression tests for ``cluster.raft_patches`` (pysyncobj 0.3.17 Bug 1, Bug 2, journal flush hook).

The process tests start 3-node clusters of ``tests/raft_harness.py`` on 127.0.0.1 and run the same
scenario on the stock ``TCPTransport`` and on ``CoordinatorTransport`` (same configuration otherwise),
asserting that stock shows the bug and the patched transport does not. The measured numbers are
printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

import pytest
import pysyncobj.syncobj
from pysyncobj import SyncObj, SyncObjConf
from pysyncobj.journal import MemoryJournal
from pysyncobj.transport import TCPTransport

from cluster.raft_patches import (
    DURABLE_BEFORE_SEND_TYPES,
    KEEPALIVE_MESSAGE_TYPE,
    CoordinatorTransport,
    recommended_conf_kwargs,
)
from tests.raft_harness import REPO_ROOT, Cluster, free_loopback_ports

# Bug 1 needs a connection idle for longer than connectionTimeout. A short timeout keeps the test
# fast; it is valid because pysyncobj only requires connectionTimeout >= raftMaxTimeout (0.4 s).
CONNECTION_TIMEOUT_S = 1.0
STEADY_STATE_S = 2 * CONNECTION_TIMEOUT_S
STEADY_STATE_ATTEMPTS_MAX = 3
STATUS_SETTLE_S = 0.2
# A failed first connect to a peer still starting is retried after connectionRetryTime (5 s).
CONNECTED_WAIT_S = 12.0
# Stock may wait for a reconnect, which connectionRetryTime (5 s) can delay.
NEW_LEADER_WAIT_S = 12.0

LOAD_ENTRIES_TOTAL = 3000
# 16 in flight is where DESIGN.md measured the CRITICAL truncations; re-sends show at any depth.
LOAD_INFLIGHT_MAX = 16
LOAD_WAIT_S = 45.0
CONVERGE_WAIT_S = 20.0


# ------------------------------------------------------------------------------------------------
# Bug 1: the first election after a leader crash is lost
# ------------------------------------------------------------------------------------------------


def _failover_trial(transport: str, tmp_path) -> tuple[int, float, int, int]:
    """One fresh cluster: steady state > connectionTimeout, SIGKILL the leader.

    Returns (new leader's term - old term, seconds from the kill to the new leader, request_votes
    the survivors dropped on a connection that was up, steady-state restarts).
    """
    with Cluster(transport, connection_timeout_s=CONNECTION_TIMEOUT_S, log_dir=tmp_path) as cluster:
        # A steady state is: fully connected, and no election for STEADY_STATE_S (an election would
        # use the follower-follower connection and hide the bug). A rare spurious election (a
        # follower stalled past raftMinTimeout on this 2-core box) restarts it, a bounded number of times.
        for restarts in range(STEADY_STATE_ATTEMPTS_MAX):
            first = cluster.wait_for(cluster.fully_connected_leader, CONNECTED_WAIT_S)
            assert first is not None, "no leader, or peers not all connected"
            time.sleep(STEADY_STATE_S)
            steady = cluster.fully_connected_leader()
            if steady == first:
                break
        else:
            pytest.fail(f"{transport}: no steady state in {STEADY_STATE_ATTEMPTS_MAX} attempts")
        leader_addr, old_term = steady

        cluster.node(leader_addr).kill()
        killed_at_s = time.monotonic()

        def new_leader_event():
            for node in cluster.alive():
                for event in node.events_of("became_leader"):
                    if event["term"] > old_term:
                        return event
            return None

        event = cluster.wait_for(new_leader_event, NEW_LEADER_WAIT_S)
        assert event is not None, f"{transport}: no new leader within {NEW_LEADER_WAIT_S} s"
        time.sleep(STATUS_SETTLE_S)  # let the survivors report their counters past the election
        dropped = sum(n.latest()["request_votes_dropped"] for n in cluster.alive())
        return event["term"] - old_term, event["t_s"] - killed_at_s, dropped, restarts


def _failover_trials(transport: str, trials: int, tmp_path) -> list[tuple[int, float, int, int]]:
    results = [_failover_trial(transport, tmp_path) for _ in range(trials)]
    times_s = [r[1] for r in results]
    print(f"\n[bug1 {transport}] term deltas {[r[0] for r in results]}, "
          f"request_votes dropped {[r[2] for r in results]}, time to new leader s min/median/max "
          f"{min(times_s):.3f}/{statistics.median(times_s):.3f}/{max(times_s):.3f}, "
          f"steady-state restarts {sum(r[3] for r in results)}")
    return results


# The statistics. Bug 1's mechanism is measured directly: a request_vote dropped by a send on a
# connection that was up. That count must be zero in every patched trial and non-zero in every stock
# trial. Rounds are the visible cost: a failover takes one round when the new leader's term is the
# old term + 1. Stock cannot win the first round (its first request_vote is dropped), so every stock
# trial must take >= 2. Patched can still lose a round to an ordinary split vote: measured 2 of 20
# trials here, because both followers' 50 ms ticks are phase-locked to the dead leader's heartbeats
# and fire in the same instant when their election deadlines fall in the same tick. So patched must
# take one round in a majority of trials (a spurious failure needs >= 3 splits of 5: ~1% at a 10%
# split rate) and its median time to a new leader must be below one second.
PATCHED_TRIALS = 5
PATCHED_ONE_ROUND_TRIALS_MIN = 3
STOCK_TRIALS = 3


@pytest.mark.cluster
@pytest.mark.chaos
@pytest.mark.timeout(120)
def test_bug1_patched_transport_elects_new_leader_in_one_round(tmp_path):
    results = _failover_trials("patched", PATCHED_TRIALS, tmp_path)
    assert all(dropped == 0 for _, _, dropped, _ in results), results
    one_round = sum(1 for delta, _, _, _ in results if delta == 1)
    assert one_round >= PATCHED_ONE_ROUND_TRIALS_MIN, results
    # One round takes at most raftMaxTimeout (0.4 s) plus tick and message latency.
    assert statistics.median(t for _, t, _, _ in results) < 1.0, results


@pytest.mark.cluster
@pytest.mark.chaos
@pytest.mark.timeout(120)
def test_bug1_stock_transport_drops_first_request_vote_and_needs_two_rounds(tmp_path):
    results = _failover_trials("stock", STOCK_TRIALS, tmp_path)
    assert all(dropped >= 1 for _, _, dropped, _ in results), results
    assert all(delta >= 2 for delta, _, _, _ in results), results


# ------------------------------------------------------------------------------------------------
# Bug 2: the leader re-sends in-flight entries and followers truncate applied ones
# ------------------------------------------------------------------------------------------------


def _load_run(transport: str, tmp_path) -> dict:
    """Sustained writes on the leader; returns per-follower counters once all nodes converged."""
    with Cluster(transport, log_dir=tmp_path) as cluster:
        # Fully connected first: a node whose first connect failed keeps starting elections until
        # its retry, and a leader change would blur what this test counts.
        start = cluster.wait_for(cluster.fully_connected_leader, CONNECTED_WAIT_S)
        assert start is not None, "no leader, or peers not all connected"
        leader_addr, start_term = start
        leader = cluster.node(leader_addr)
        leader.command(f"load {LOAD_ENTRIES_TOTAL} {LOAD_INFLIGHT_MAX}")
        done = cluster.wait_for(lambda: leader.events_of("load_done"), LOAD_WAIT_S)
        assert done, f"{transport}: load did not finish within {LOAD_WAIT_S} s"

        def converged():
            statuses = [n.latest() for n in cluster.nodes]
            same = len({(s["applied_count"], s["state_sha256"]) for s in statuses}) == 1
            return statuses if same and statuses[0]["applied_count"] == done[0]["acked"] else None

        statuses = cluster.wait_for(converged, CONVERGE_WAIT_S)
        last = [n.latest() for n in cluster.nodes]
        assert statuses is not None, f"{transport}: nodes did not converge: {last}"
        followers = [s for s in statuses if not s["is_leader"]]
        result = {
            "acked": done[0]["acked"],
            "load_s": done[0]["elapsed_s"],
            "terms": sorted({s["term"] for s in statuses}),
            "start_term": start_term,
            "resent_entries": [s["resent_entries"] for s in followers],
            "entries_received": [s["entries_received"] for s in followers],
            "critical_count": [s["critical_count"] for s in statuses],
            "state_sha256": {s["state_sha256"] for s in statuses},
        }
        print(f"\n[bug2 {transport}] {result}")
        return result


@pytest.mark.cluster
@pytest.mark.timeout(90)
def test_bug2_stock_transport_resends_inflight_entries(tmp_path):
    result = _load_run("stock", tmp_path)
    assert result["acked"] == LOAD_ENTRIES_TOTAL, result
    # Re-sends happen on every run (30-50% of entries here); the CRITICAL truncation of applied
    # entries only when a re-send lands below the follower's last applied index (most runs, not all),
    # so it is reported but not asserted.
    assert sum(result["resent_entries"]) > 0, result


@pytest.mark.cluster
@pytest.mark.timeout(90)
def test_bug2_patched_transport_sends_each_entry_once_and_states_agree(tmp_path):
    result = _load_run("patched", tmp_path)
    assert result["acked"] == LOAD_ENTRIES_TOTAL, result
    # A leader change would legitimately re-send entries (conflict repair), so check it did not happen.
    assert result["terms"] == [result["start_term"]], result
    assert result["resent_entries"] == [0, 0], result
    assert result["entries_received"] == [LOAD_ENTRIES_TOTAL + 1] * 2, result  # + the leader's no-op
    assert result["critical_count"] == [0, 0, 0], result
    assert len(result["state_sha256"]) == 1, result


# ------------------------------------------------------------------------------------------------
# In-process unit tests: durability hook, the nextIndex rule, keepalive, version pin
# ------------------------------------------------------------------------------------------------


class FlushRecordingJournal(MemoryJournal):
    def __init__(self, events: list):
        super().__init__()
        self.events = events

    def flush(self):
        self.events.append("flush")


@pytest.fixture
def transport_and_events(monkeypatch):
    """A CoordinatorTransport inside a real (not ticking) SyncObj, whose journal records flush()
    and whose underlying TCP send records the message type instead of sending."""
    events: list = []
    monkeypatch.setattr(pysyncobj.syncobj, "createJournal", lambda journal_file=None: FlushRecordingJournal(events))

    def recording_send(self, node, message):
        events.append(("send", message.get("type")))
        return True

    monkeypatch.setattr(TCPTransport, "send", recording_send)
    self_port, peer_port = free_loopback_ports(2)
    conf = SyncObjConf(autoTick=False, **recommended_conf_kwargs())
    sync_obj = SyncObj(f"127.0.0.1:{self_port}", [f"127.0.0.1:{peer_port}"], conf,
                       transportClass=CoordinatorTransport)
    try:
        transport = sync_obj._SyncObj__transport
        assert isinstance(transport, CoordinatorTransport)
        peer = next(iter(sync_obj.otherNodes))
        events.clear()
        yield sync_obj, transport, peer, events
    finally:
        sync_obj.destroy()


def test_flush_precedes_every_durable_message_and_only_those(transport_and_events):
    _, transport, peer, events = transport_and_events
    assert DURABLE_BEFORE_SEND_TYPES == {"next_node_idx", "request_vote", "response_vote"}
    for message_type in sorted(DURABLE_BEFORE_SEND_TYPES):
        events.clear()
        assert transport.send(peer, {"type": message_type})
        assert events == [], message_type  # held back until the next flush
        transport.flush_and_drain()
        assert events == ["flush", ("send", message_type)], message_type
    for message_type in ("append_entries", "apply_command", "apply_command_response", "timeout_now",
                         KEEPALIVE_MESSAGE_TYPE):
        events.clear()
        assert transport.send(peer, {"type": message_type})
        assert events == [("send", message_type)], message_type


def test_acks_are_group_committed_and_keep_their_order(transport_and_events):
    _, transport, peer, events = transport_and_events
    transport.send(peer, {"type": "next_node_idx", "n": 1})
    transport.send(peer, {"type": "apply_command"})  # queues behind the ack: per-peer order holds
    transport.send(peer, {"type": "next_node_idx", "n": 2})
    assert events == []
    transport.flush_and_drain()
    assert events == ["flush", ("send", "next_node_idx"), ("send", "apply_command"), ("send", "next_node_idx")]
    events.clear()
    transport.flush_and_drain()  # nothing queued: the flush still runs (the leader's own entries)
    assert events == ["flush"]


def test_journal_without_flush_is_fine(monkeypatch):
    monkeypatch.setattr(TCPTransport, "send", lambda self, node, message: True)
    self_port, peer_port = free_loopback_ports(2)
    sync_obj = SyncObj(f"127.0.0.1:{self_port}", [f"127.0.0.1:{peer_port}"],
                       SyncObjConf(autoTick=False), transportClass=CoordinatorTransport)
    try:
        transport = sync_obj._SyncObj__transport
        assert transport._journal_flush is None  # the stock MemoryJournal has no flush()
        assert transport.send(next(iter(sync_obj.otherNodes)), {"type": "append_entries"})
    finally:
        sync_obj.destroy()


def test_next_index_never_moves_backwards_on_success_but_does_on_reset_or_failure(transport_and_events):
    _, transport, peer, _ = transport_and_events
    next_index_by_node = transport._next_index_by_node
    seen = []

    def stock_like_handler(node, message):
        # What 0.3.17 does with an ack: nextIndex := acked + 1, whatever was already sent.
        seen.append(message["type"])
        if message["type"] == "next_node_idx":
            next_index_by_node[node] = message["next_node_idx"]

    transport.setOnMessageReceivedCallback(stock_like_handler)
    next_index_by_node[peer] = 20  # entries up to 19 already sent

    def receive(message):
        transport._onMessageReceived(peer, message)
        return next_index_by_node[peer]

    assert receive({"type": "next_node_idx", "next_node_idx": 12, "success": True, "reset": False}) == 20
    assert receive({"type": "next_node_idx", "next_node_idx": 25, "success": True, "reset": False}) == 25
    assert receive({"type": "next_node_idx", "next_node_idx": 10, "success": False, "reset": True}) == 10
    next_index_by_node[peer] = 20
    assert receive({"type": "next_node_idx", "next_node_idx": 15, "success": False, "reset": False}) == 15
    receive({"type": KEEPALIVE_MESSAGE_TYPE})
    assert seen == ["next_node_idx"] * 4  # the keepalive never reaches SyncObj


def test_keepalive_goes_only_to_handshaken_idle_peers(transport_and_events):
    _, transport, peer, events = transport_and_events
    transport._send_keepalives()
    assert events == []  # no handshake yet: a message now would break the key exchange
    transport._handshaken_nodes.add(peer)
    transport._send_keepalives()
    assert events == [("send", KEEPALIVE_MESSAGE_TYPE)]
    transport._send_keepalives()
    assert events == [("send", KEEPALIVE_MESSAGE_TYPE)]  # just sent something: not idle
    transport._onNodeDisconnected(peer)
    events.clear()
    transport._send_keepalives()
    assert events == []


def test_import_fails_loudly_on_another_pysyncobj_version():
    code = "import pysyncobj.version as v; v.VERSION = '0.3.18'; import cluster.raft_patches"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "UnsupportedPysyncobjVersion" in proc.stderr and "0.3.18" in proc.stderr
