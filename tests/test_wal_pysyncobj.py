"""Three pysyncobj 0.3.17 nodes on LmdbJournal: 200 increments survive stopping every node at once.

Each node's journal drops its queued ops on destroy (as a crash would), so the counter comes back
only if the transport made entries durable before acknowledging or propagating them.
"""

from __future__ import annotations

import socket
import threading
import time

import pysyncobj.syncobj
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated
from pysyncobj.transport import TCPTransport

from wal import LmdbJournal

INCREMENTS = 200
WAIT_SECONDS_MAX = 20.0
POLL_SECONDS = 0.02

# Messages that acknowledge or propagate entries or votes: what they claim must be on disk first.
DURABLE_BEFORE_SEND = frozenset({"append_entries", "next_node_idx", "request_vote", "response_vote"})


class FlushBeforeSendTransport(TCPTransport):
    def send(self, node, message):
        if isinstance(message, dict) and message.get("type") in DURABLE_BEFORE_SEND:
            # pysyncobj 0.3.17 keeps the journal private; this is the one place we reach in.
            self._syncObj._SyncObj__raftLog.flush()
        return super().send(node, message)


class CrashOnDestroyJournal(LmdbJournal):
    def _destroy(self) -> None:
        self.close(flush=False)


class Counter(SyncObj):
    def __init__(self, self_addr: str, partners: list[str], conf: SyncObjConf) -> None:
        super().__init__(self_addr, partners, conf, transportClass=FlushBeforeSendTransport)
        self.value = 0

    @replicated
    def incr(self) -> int:
        self.value += 1
        return self.value


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_until(cond, what: str, state=lambda: "") -> None:
    deadline = time.monotonic() + WAIT_SECONDS_MAX
    for _ in range(int(WAIT_SECONDS_MAX / POLL_SECONDS) + 1):
        if cond():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(POLL_SECONDS)
    raise AssertionError(f"timed out after {WAIT_SECONDS_MAX}s waiting for {what} {state()}")


def start_cluster(addrs: list[str], dirs: list[str]) -> list[Counter]:
    nodes = []
    for addr, journal_dir in zip(addrs, dirs):
        conf = SyncObjConf(
            appendEntriesUseBatch=False, raftMinTimeout=0.2, raftMaxTimeout=0.4, appendEntriesPeriod=0.05,
            password="wal-test-secret", journalFile=journal_dir, dynamicMembershipChange=False,
            # no fullDumpFile here, so compaction would lose the prefix: keep it from happening
            logCompactionMinEntries=10**9, logCompactionMinTime=10**9,
        )
        nodes.append(Counter(addr, [a for a in addrs if a != addr], conf))
    return nodes


def test_counter_survives_full_cluster_restart(tmp_path, monkeypatch):
    journals: list[LmdbJournal] = []

    def create_journal(path):
        journal = CrashOnDestroyJournal(path, map_size_bytes=16 << 20)
        journals.append(journal)
        return journal

    monkeypatch.setattr(pysyncobj.syncobj, "createJournal", create_journal)
    addrs = [f"127.0.0.1:{port}" for port in free_ports(3)]
    dirs = [str(tmp_path / f"node{i}") for i in range(3)]
    nodes: list[Counter] = []
    try:
        nodes = start_cluster(addrs, dirs)
        wait_until(lambda: all(n._getLeader() is not None for n in nodes)
                   and len({n._getLeader() for n in nodes}) == 1, "one leader")

        done = threading.Semaphore(0)
        errors: list[int] = []

        def on_done(result, err):
            if err != FAIL_REASON.SUCCESS:
                errors.append(err)
            done.release()

        for i in range(INCREMENTS):  # round robin: followers forward to the leader
            nodes[i % 3].incr(callback=on_done)
        deadline = time.monotonic() + WAIT_SECONDS_MAX
        for _ in range(INCREMENTS):
            assert done.acquire(timeout=max(0.0, deadline - time.monotonic())), "increments timed out"
        assert errors == []
        wait_until(lambda: all(n.value == INCREMENTS for n in nodes), "every node to apply all increments")
        assert all(j.flushes_total > 0 for j in journals)

        for n in nodes:
            n.destroy_synchronous()
        nodes = []
        journals.clear()

        nodes = start_cluster(addrs, dirs)  # state is rebuilt by re-applying the journals
        wait_until(lambda: all(n.value == INCREMENTS for n in nodes), "the counter to be recovered",
                   lambda: f"values={[n.value for n in nodes]}")
        assert all(len(j) > INCREMENTS for j in journals)  # the no-op at index 1, plus leader no-ops
    finally:
        for n in nodes:
            n.destroy_synchronous()
