"""A tiny pysyncobj node for the tests of ``cluster.raft_patches``, and the helper that launches it.

Node (a subprocess): ``python -m tests.raft_harness --self ADDR --peers ADDR,ADDR --transport stock|patched``
runs a ``SyncObj`` holding a replicated append-list (password set, journal in memory) with
``recommended_conf_kwargs()`` (``--connection-timeout-s`` overrides ``connectionTimeout``).
It writes JSON lines to stdout:

- ``{"kind": "status", ...}`` every ``--status-period-s``: term, leader, commit index, last applied,
  state hash, CRITICAL log count, and the append-entries counters below;
- ``{"kind": "became_leader", "term": T, "t_s": MONOTONIC}`` when it becomes leader
  (``time.monotonic`` is system-wide on Linux, so the tests compare it with their own clock);
- ``{"kind": "load_done", ...}`` when a load it was asked for has finished.

It reads commands from stdin: ``load TOTAL INFLIGHT_MAX`` appends TOTAL values with at most
INFLIGHT_MAX in flight. It exits when stdin closes or after ``--lifetime-s``, so no node outlives
its test.

The chosen transport class is subclassed to count what the bugs do: ``request_vote`` messages
dropped by a send on a connection that was up (Bug 1: ``request_votes_dropped``), and received
``append_entries`` entries whose index is not above the highest index already received in that
term (Bug 2: ``resent_entries``). pysyncobj's CRITICAL "truncating already-applied" records are
counted by a logging handler (``critical_count``).

Launcher (in the test process): ``Cluster`` starts N nodes on free loopback ports, keeps each
node's latest status and events, and kills every process by PID in ``stop()``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "raft-harness-secret"

# --------------------------------------------------------------------------------------------
# Node (runs in the subprocess)
# --------------------------------------------------------------------------------------------


class _TransportStats:
    """What the transport saw: re-sent entries (Bug 2's symptom), dropped request_votes (Bug 1's)."""

    def __init__(self) -> None:
        self.entries_received = 0
        self.resent_entries = 0
        self.request_votes_dropped = 0
        self._term = None
        self._max_index_received = 0

    def observe(self, message: dict) -> None:
        if message.get("term") != self._term:
            # A new leader may legitimately send entries we hold (conflict repair).
            self._term = message.get("term")
            self._max_index_received = 0
        for entry in message.get("entries") or ():
            index = entry[1]
            self.entries_received += 1
            if index <= self._max_index_received:
                self.resent_entries += 1
            else:
                self._max_index_received = index


class _CriticalCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.CRITICAL)
        self.count = 0
        self.last_message = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        self.last_message = record.getMessage()[:200]


def _counting_transport(base: type, stats: _TransportStats) -> type:
    from pysyncobj.tcp_connection import CONNECTION_STATE

    class CountingTransport(base):
        def _onMessageReceived(self, node, message):
            if isinstance(message, dict) and message.get("type") == "append_entries":
                stats.observe(message)
            super()._onMessageReceived(node, message)

        def send(self, node, message):
            # Bug 1's signature: the connection was up, and the send itself closed it (read timeout)
            # and dropped the message. A send to an already-closed connection is not counted.
            conn = self._connections.get(node)
            was_connected = conn is not None and conn.state == CONNECTION_STATE.CONNECTED
            sent = super().send(node, message)
            if was_connected and not sent and message.get("type") == "request_vote":
                stats.request_votes_dropped += 1
            return sent

    return CountingTransport


def _node_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--self", dest="self_addr", required=True)
    parser.add_argument("--peers", required=True)
    parser.add_argument("--transport", choices=("stock", "patched"), required=True)
    parser.add_argument("--connection-timeout-s", type=float, default=None)
    parser.add_argument("--status-period-s", type=float, default=0.05)
    parser.add_argument("--lifetime-s", type=float, default=120.0)
    args = parser.parse_args(argv)

    from pysyncobj import SyncObj, SyncObjConf, replicated
    from pysyncobj.transport import TCPTransport

    from cluster.raft_patches import CoordinatorTransport, recommended_conf_kwargs

    out_lock = threading.Lock()

    def emit(record: dict) -> None:
        with out_lock:
            sys.stdout.write(json.dumps(record) + "\n")
            sys.stdout.flush()

    critical_counter = _CriticalCounter()
    logging.getLogger("pysyncobj").addHandler(critical_counter)
    stats = _TransportStats()
    base_transport = CoordinatorTransport if args.transport == "patched" else TCPTransport

    class ReplicatedList(SyncObj):
        def __init__(self, *a, **kw):
            # (count, chained sha256), replaced as one tuple so the status thread reads a consistent
            # pair; set before SyncObj starts its tick thread, which may apply entries.
            self.applied = (0, hashlib.sha256().hexdigest())
            super().__init__(*a, **kw)

        @replicated
        def append(self, value):
            count, digest = self.applied
            self.applied = (count + 1, hashlib.sha256((digest + repr(value)).encode()).hexdigest())
            return count + 1

    holder: dict = {}
    leader_state = 2  # pysyncobj's _RAFT_STATE.LEADER

    def on_state_changed(old_state, new_state):
        node = holder.get("node")
        if new_state == leader_state and node is not None:
            emit({"kind": "became_leader", "term": node.raftCurrentTerm, "t_s": time.monotonic()})

    conf_kwargs = recommended_conf_kwargs()
    if args.connection_timeout_s is not None:
        conf_kwargs["connectionTimeout"] = args.connection_timeout_s
    conf = SyncObjConf(password=PASSWORD, onStateChanged=on_state_changed, **conf_kwargs)
    peers = [p for p in args.peers.split(",") if p]
    node = ReplicatedList(args.self_addr, peers, conf, transportClass=_counting_transport(base_transport, stats))
    holder["node"] = node

    load = {"acked": 0, "failed": 0}

    def run_load(total: int, inflight_max: int) -> None:
        slots = threading.BoundedSemaphore(inflight_max)
        done = threading.Event()
        remaining = [total]
        lock = threading.Lock()

        def on_result(result, err):
            with lock:
                if err == 0:  # FAIL_REASON.SUCCESS
                    load["acked"] += 1
                else:
                    load["failed"] += 1
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()
            slots.release()

        started_s = time.monotonic()
        for i in range(total):
            if not slots.acquire(timeout=10.0):
                break  # nothing comes back: give up, the test sees acked < total
            node.append(f"{args.self_addr}/{i}", callback=on_result)
        done.wait(timeout=30.0)
        emit({"kind": "load_done", "acked": load["acked"], "failed": load["failed"],
              "elapsed_s": time.monotonic() - started_s})

    def read_commands() -> None:
        for line in sys.stdin:
            parts = line.split()
            if parts[:1] == ["load"]:
                threading.Thread(target=run_load, args=(int(parts[1]), int(parts[2])), daemon=True).start()
        stop.set()  # stdin closed: the test is gone

    stop = threading.Event()
    threading.Thread(target=read_commands, daemon=True).start()
    deadline_s = time.monotonic() + args.lifetime_s
    while not stop.is_set() and time.monotonic() < deadline_s:
        leader = node._getLeader()
        applied_count, digest = node.applied
        emit({
            "kind": "status",
            "t_s": time.monotonic(),
            "term": node.raftCurrentTerm,
            "is_leader": node._isLeader(),
            "leader": None if leader is None else leader.address,
            "commit_index": node.raftCommitIndex,
            "last_applied": node.raftLastApplied,
            "connected_peers": sum(1 for peer in node.otherNodes if node.isNodeConnected(peer)),
            "applied_count": applied_count,
            "state_sha256": digest,
            "critical_count": critical_counter.count,
            "critical_last": critical_counter.last_message,
            "entries_received": stats.entries_received,
            "resent_entries": stats.resent_entries,
            "request_votes_dropped": stats.request_votes_dropped,
        })
        stop.wait(args.status_period_s)
    os._exit(0)  # skip SyncObj teardown; the OS closes the sockets


# --------------------------------------------------------------------------------------------
# Launcher (runs in the test process)
# --------------------------------------------------------------------------------------------


def free_loopback_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class NodeProcess:
    def __init__(self, addr: str, proc: subprocess.Popen) -> None:
        self.addr = addr
        self.proc = proc
        self.status: dict | None = None
        self.events: list[dict] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                if record.get("kind") == "status":
                    self.status = record
                else:
                    self.events.append(record)

    def latest(self) -> dict | None:
        with self._lock:
            return self.status

    def events_of(self, kind: str) -> list[dict]:
        with self._lock:
            return [e for e in self.events if e.get("kind") == kind]

    def command(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        """SIGKILL by PID (a crash, not a shutdown) and reap it."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        try:
            self.proc.stdin.close()
        except OSError:
            pass


class Cluster:
    """N harness nodes on 127.0.0.1; always use as a context manager so every PID is killed."""

    def __init__(self, transport: str, node_count: int = 3, connection_timeout_s: float | None = None,
                 log_dir: Path | None = None) -> None:
        self.transport = transport
        self.addrs = [f"127.0.0.1:{port}" for port in free_loopback_ports(node_count)]
        self.connection_timeout_s = connection_timeout_s
        self.log_dir = log_dir
        self.nodes: list[NodeProcess] = []

    def __enter__(self) -> "Cluster":
        try:
            for addr in self.addrs:
                self.nodes.append(self._spawn(addr))
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, addr: str) -> NodeProcess:
        cmd = [sys.executable, "-m", "tests.raft_harness", "--self", addr,
               "--peers", ",".join(a for a in self.addrs if a != addr), "--transport", self.transport]
        if self.connection_timeout_s is not None:
            cmd += ["--connection-timeout-s", str(self.connection_timeout_s)]
        stderr = subprocess.DEVNULL
        if self.log_dir is not None:
            stderr = open(self.log_dir / f"{self.transport}-{addr.replace(':', '_')}.stderr", "w")
        try:
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=stderr, text=True, bufsize=1)
        finally:
            if stderr is not subprocess.DEVNULL:
                stderr.close()
        return NodeProcess(addr, proc)

    def stop(self) -> None:
        for node in self.nodes:
            try:
                node.kill()
            except Exception:
                pass  # keep killing the others

    def alive(self) -> list[NodeProcess]:
        return [n for n in self.nodes if n.proc.poll() is None]

    def node(self, addr: str) -> NodeProcess:
        return next(n for n in self.nodes if n.addr == addr)

    def wait_for(self, predicate: Callable[[], object], timeout_s: float, poll_s: float = 0.01):
        """Poll ``predicate`` until truthy (returned) or ``timeout_s`` passes (returns None)."""
        deadline_s = time.monotonic() + timeout_s
        while time.monotonic() < deadline_s:
            result = predicate()
            if result:
                return result
            time.sleep(poll_s)
        return None

    def fully_connected_leader(self) -> tuple[str, int] | None:
        """(leader address, term) when all nodes agree on both and each has finished its handshake
        with every other node, else None.

        A first connect attempt can fail while a peer is still starting, and pysyncobj retries only
        after ``connectionRetryTime`` (5 s); a failover test must not start before that is over.
        """
        statuses = [n.latest() for n in self.nodes]
        if any(s is None or s["connected_peers"] != len(self.nodes) - 1 for s in statuses):
            return None
        return self._agreed_leader(statuses)

    @staticmethod
    def _agreed_leader(statuses: list[dict]) -> tuple[str, int] | None:
        views = {(s["leader"], s["term"]) for s in statuses}
        if len(views) != 1:
            return None
        leader, term = views.pop()
        return (leader, term) if leader is not None else None


if __name__ == "__main__":
    sys.exit(_node_main(sys.argv[1:]))
