"""Raft membership (issue 6): only the configured peers take part in the Raft cluster.

A real 3-node cluster on 127.0.0.1 and hand-made rogue peers:
- ``RoguePeer`` speaks pysyncobj 0.3.17's wire format over a blocking socket (each frame: a 4-byte
  native length, then zlib(pickle(message)) encrypted with the Fernet key pysyncobj derives from
  the password; after the random-key exchange every message travels as (key, message)), so a test
  controls every message and the source IP;
- ``RogueLog`` is a real pysyncobj ``SyncObj`` with the right secret: a read-only node (what
  ``syncobj_admin`` and pysyncobj's read-only mode use) or a would-be member with its own address.
What must hold: a rogue never receives anything past the key exchange; nothing it sends takes
effect (no node applies its command, takes its term or follows it; every node keeps answering,
with one leader and all peers connected); and each node binds its Raft port on the configured
address only.

On the stock ``TCPTransport`` (the membership hook of ``cluster.raft_patches`` disabled) the tests
with the right secret fail: the read-only rogue is served the log and its commands are committed,
utility commands are answered, a peer posing as a member is accepted, and a silent connection is
kept for ever. Without the secret stock already refuses; there only the warning is new.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import pickle
import socket
import struct
import time
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.encryptor import getEncryptor

from cluster.local import LocalCluster, free_port
from cluster.raft import RaftLog
from cluster.raft_patches import (
    REFUSAL_LOG_KEYS_MAX,
    CoordinatorTransport,
    RefusalLog,
    recommended_conf_kwargs,
)

# Socket reads of a rogue; a node answers a handshake within a tick or two (50 ms each).
IO_TIMEOUT_S = 3.0
# How long a rogue waits to see whether the node closes its connection (or sends it something).
CLOSE_WAIT_S = 3.0
# A silent connection is closed after connectionTimeout (3.5 s); this bounds the wait, not the speed.
HANDSHAKE_CLOSE_WAIT_S = 15.0
# The rogues' messages carry term + ROGUE_TERM_JUMP. An ordinary election can happen while we watch
# (on a loaded 2-core machine a node's tick can stall past raftMaxTimeout, 0.4 s: seen once here,
# one node's term 4 -> 5 at load average 6), so terms may move by less than ELECTION_TERMS_TOLERATED;
# a rogue's term (or leadership, or an applied entry) may not appear at all.
ROGUE_TERM_JUMP = 100
ELECTION_TERMS_TOLERATED = 10
# After an attack, the cluster is watched this many times, this far apart (then until settled).
OBSERVE_POLLS = 10
OBSERVE_INTERVAL_S = 0.2
# A fresh cluster's first connections can wait for pysyncobj's connectionRetryTime (5 s).
FULLY_CONNECTED_WAIT_S = 20.0
# RogueLog reconnects this often, so the nodes see many attempts while we watch.
ROGUE_RETRY_S = 0.5
ROGUE_WATCH_S = 3.0
# A source IP on the loopback that is not the members' 127.0.0.1.
OTHER_LOOPBACK_IP = "127.0.0.2"

REFUSAL_LINE = "coordinator.raft Raft connection from"


def _raft_entry_command(payload: bytes) -> bytes:
    """The bytes of a pysyncobj REGULAR command calling ``RaftLog.apply_entry(payload)``: what a
    ``apply_command`` message carries. pysyncobj numbers replicated methods by sorted name;
    RaftLog has one, so its id is 0."""
    names = [m for m in dir(RaftLog)
             if getattr(getattr(RaftLog, m), "replicated", False) and m != getattr(getattr(RaftLog, m), "origName")]
    assert names == ["apply_entry_v0"], names
    return bytes([0]) + pickle.dumps((0, (payload,)))


# A log entry no node can apply (an unknown entry format): were it ever committed, every node
# would stop (RaftLog.apply_entry exits on UnknownCommand), so nodes that keep answering have not
# applied a rogue's command. (The applied index is no witness: the cluster writes all the time,
# e.g. audit records of our own status calls.)
UNAPPLIABLE_ENTRY = bytes([0xFF]) + b"rogue"


# ------------------------------------------------------------------------------------------------
# Rogues
# ------------------------------------------------------------------------------------------------


class RoguePeer:
    """One connection to a node's Raft port, speaking pysyncobj 0.3.17's framing (module docstring)."""

    def __init__(self, raft_address: str, password: str, source_ip: str = "127.0.0.1") -> None:
        host, port = raft_address.rsplit(":", 1)
        self._sock = socket.create_connection((host, int(port)), timeout=IO_TIMEOUT_S, source_address=(source_ip, 0))
        self._fernet = getEncryptor(password)
        self._own_key = os.urandom(32)
        self._node_key: bytes | None = None
        self._buffer = b""
        self.closed = False
        self.received: list[Any] = []  # every message the node sent us after the key exchange

    def close(self) -> None:
        self._sock.close()

    def send(self, message: Any) -> bool:
        if self._node_key is not None:
            message = (self._node_key, message)
        data = self._fernet.encrypt_at_time(zlib.compress(pickle.dumps(message), 3), int(time.monotonic()))
        try:
            self._sock.sendall(struct.pack("i", len(data)) + data)
            return True
        except OSError:
            self.closed = True
            return False

    def _read_frame(self, deadline: float) -> bytes | None:
        """One frame's data, or None once the connection is closed or the deadline passed."""
        while True:
            if len(self._buffer) >= 4:
                (length,) = struct.unpack("i", self._buffer[:4])
                if len(self._buffer) - 4 >= length:
                    data, self._buffer = self._buffer[4:4 + length], self._buffer[4 + length:]
                    return data
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.closed:
                return None
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                return None
            except OSError:
                chunk = b""
            if not chunk:
                self.closed = True
                return None
            self._buffer += chunk

    def _read_message(self, deadline: float) -> tuple[bool, Any]:
        data = self._read_frame(deadline)
        if data is None:
            return False, None
        key, message = pickle.loads(zlib.decompress(self._fernet.decrypt(data)))
        assert key == self._own_key, "the node answered with another connection's key"
        return True, message

    def handshake(self) -> bool:
        """pysyncobj's key exchange as the connecting side; False if the node closed instead."""
        self.send(self._own_key)
        got, node_key = self._read_message(time.monotonic() + IO_TIMEOUT_S)
        if got:
            self._node_key = node_key
        return got

    def wait_closed(self, timeout_s: float = CLOSE_WAIT_S) -> bool:
        """Read until the node closes the connection (True) or timeout_s passes (False),
        keeping whatever the node sends in ``received``."""
        deadline = time.monotonic() + timeout_s
        while not self.closed and time.monotonic() < deadline:
            got, message = self._read_message(deadline)
            if got:
                self.received.append(message)
        return self.closed


class RogueLog(SyncObj):
    """A real pysyncobj node with the right secret but not in the cluster's configuration:
    read-only (``self_address=None``) or a would-be member. It has the cluster's replicated
    method, so it would apply the cluster's entries if it were ever sent any."""

    def __init__(self, self_address: str | None, members: list[str], password: str) -> None:
        self.applied: list[bytes] = []
        conf = SyncObjConf(password=password, connectionRetryTime=ROGUE_RETRY_S, **recommended_conf_kwargs())
        super().__init__(self_address, members, conf)

    @replicated
    def apply_entry(self, payload: bytes) -> None:
        self.applied.append(payload)


# ------------------------------------------------------------------------------------------------
# The cluster and what "undisturbed" means
# ------------------------------------------------------------------------------------------------


def _wait_for(predicate: Callable[[], Any], timeout_s: float, interval_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval_s)


class NodeView(NamedTuple):
    role: str
    term: int
    leader: str
    commit_index: int
    applied_index: int
    state_hash: str
    healthy: bool
    peers_connected: tuple


def raft_view(cluster: LocalCluster) -> dict[str, NodeView] | None:
    """Each node's Raft-visible state, or None if a node did not answer."""
    view = {}
    for node_id, status in cluster.statuses(timeout_s=2.0, state_hash=True).items():
        if status is None:
            return None
        view[node_id] = NodeView(status.role, status.term, status.leader_raft_address, status.commit_index,
                                 status.applied_index, status.state_hash, status.healthy,
                                 tuple(sorted(status.peers_connected.items())))
    return view


def settled_view(cluster: LocalCluster) -> dict[str, NodeView]:
    """The view once every node answers, is healthy, is connected to every peer, and one node
    leads with every node agreeing which."""
    def settled():
        view = raft_view(cluster)
        if not view:
            return None
        leaders = [v for v in view.values() if v.role == "leader"]
        if (len(leaders) == 1 and len({v.leader for v in view.values()}) == 1
                and all(v.healthy and all(up for _, up in v.peers_connected) for v in view.values())):
            return view
        return None

    view = _wait_for(settled, FULLY_CONNECTED_WAIT_S)
    assert view, f"cluster not settled within {FULLY_CONNECTED_WAIT_S} s: {raft_view(cluster)}"
    return view


def _assert_not_rogue_made(cluster: LocalCluster, before: dict[str, NodeView], now: dict[str, NodeView] | None,
                           when: str) -> None:
    members = {n.raft_address for n in cluster.nodes}
    term_max = max(v.term for v in before.values()) + ELECTION_TERMS_TOLERATED
    assert now is not None, f"{when}: a node did not answer"
    for node_id, v in now.items():
        b = before[node_id]
        problem = None
        if v.term >= term_max:
            problem = f"term jumped from {b.term} to {v.term}"
        elif v.leader not in members | {""}:
            problem = f"follows {v.leader!r}, not a member"
        assert problem is None, f"{when}: {node_id} {problem}\nbefore: {before}\nnow:    {now}"


def assert_undisturbed(cluster: LocalCluster, before: dict[str, NodeView]) -> None:
    """Nothing a rogue can cause happens while we watch, and the cluster is settled afterwards."""
    for poll in range(OBSERVE_POLLS):
        time.sleep(OBSERVE_INTERVAL_S)
        _assert_not_rogue_made(cluster, before, raft_view(cluster), f"poll {poll}")
    _assert_not_rogue_made(cluster, before, settled_view(cluster), "settled")


def leader_and_term(view: dict[str, NodeView]) -> tuple[str, int]:
    leaders = [node_id for node_id, v in view.items() if v.role == "leader"]
    assert len(leaders) == 1, view
    return leaders[0], view[leaders[0]].term


def attack_messages(term: int) -> list[dict[str, Any]]:
    """What a peer that got in could do: have a command committed, then take over the term."""
    higher = term + ROGUE_TERM_JUMP
    return [
        {"type": "apply_command", "command": _raft_entry_command(UNAPPLIABLE_ENTRY)},
        {"type": "apply_command", "command": _raft_entry_command(UNAPPLIABLE_ENTRY), "request_id": 1},
        {"type": "request_vote", "term": higher, "last_log_term": higher, "last_log_index": 10 ** 9},
        {"type": "append_entries", "term": higher, "commit_index": 0},
    ]


def refusal_lines(cluster: LocalCluster) -> dict[str, list[str]]:
    out = {}
    for node in cluster.nodes:
        with open(os.path.join(node.data_dir, "node.log"), errors="replace") as f:
            out[node.id] = [line.rstrip() for line in f if REFUSAL_LINE in line]
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = LocalCluster(str(tmp_path_factory.mktemp("membership")))
    try:
        cluster.up(3, wait_leader_s=30)
        yield cluster
    finally:
        cluster.down()


@pytest.fixture(scope="module")
def secret(cluster) -> str:
    with open(cluster.secret_file) as f:
        return f.read().strip()


# ------------------------------------------------------------------------------------------------
# (iii) the Raft port listens on the configured address only
# ------------------------------------------------------------------------------------------------


def _proc_listeners(pid: int) -> list[tuple[str, int, int]]:
    """(local IP, port, socket inode) of every listening TCP socket in pid's network namespace."""
    out = []
    # Not socket.inet_ntop: importing pysyncobj replaces it with a Windows-only function.
    for name, address_class in (("tcp", ipaddress.IPv4Address), ("tcp6", ipaddress.IPv6Address)):
        with open(f"/proc/{pid}/net/{name}") as f:
            next(f)
            for line in f:
                fields = line.split()
                local, state, inode = fields[1], fields[3], int(fields[9])
                if state != "0A":  # TCP_LISTEN
                    continue
                ip_hex, port_hex = local.split(":")
                words = [int(ip_hex[i:i + 8], 16) for i in range(0, len(ip_hex), 8)]
                ip = str(address_class(struct.pack(f"={len(words)}I", *words)))
                out.append((ip, int(port_hex, 16), inode))
    return out


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:["):-1]))
    return inodes


@pytest.mark.cluster
def test_raft_port_listens_on_the_configured_address_only(cluster):
    for node in cluster.nodes:
        host, port = node.raft_address.rsplit(":", 1)
        on_port = [(ip, inode) for ip, p, inode in _proc_listeners(node.pid) if p == int(port)]
        assert [ip for ip, _ in on_port] == [host], f"{node.id}: listeners on the Raft port {port}: {on_port}"
        assert on_port[0][1] in _socket_inodes(node.pid), f"{node.id}: the listener on {port} is not the node's"


# ------------------------------------------------------------------------------------------------
# (i) without the secret
# ------------------------------------------------------------------------------------------------


@pytest.mark.cluster
def test_peer_without_the_secret_learns_nothing_and_changes_nothing(cluster):
    before = settled_view(cluster)
    leader, term = leader_and_term(before)
    for node in cluster.nodes:
        rogue = RoguePeer(node.raft_address, "not-the-cluster-secret-0123456789")
        try:
            assert not rogue.handshake(), f"{node.id} answered a key exchange made with the wrong secret"
            for message in ["readonly", *attack_messages(term)]:
                rogue.send(message)
            assert rogue.wait_closed(), f"{node.id} kept a connection that does not know the secret"
            assert rogue.received == []
        finally:
            rogue.close()
    assert_undisturbed(cluster, before)
    lines = refusal_lines(cluster)
    assert all(any("did not decrypt with the cluster secret" in line for line in lines[n.id]) for n in cluster.nodes), lines


@pytest.mark.cluster
def test_a_connection_that_never_handshakes_is_closed(cluster):
    """Stock pysyncobj keeps an incoming connection that sends nothing for ever."""
    node = cluster.nodes[0]
    rogue = RoguePeer(node.raft_address, "unused")
    try:
        assert rogue.wait_closed(HANDSHAKE_CLOSE_WAIT_S), f"{node.id} kept a silent connection"
        assert rogue.received == []
    finally:
        rogue.close()


# ------------------------------------------------------------------------------------------------
# (ii) with the secret, but not a member
# ------------------------------------------------------------------------------------------------


@pytest.mark.cluster
def test_a_non_member_process_cannot_join_the_raft_cluster(cluster, secret):
    """Real pysyncobj nodes with the secret: a read-only one and a would-be member."""
    before = settled_view(cluster)
    lines_before = refusal_lines(cluster)
    members = [n.raft_address for n in cluster.nodes]
    # pysyncobj connects only from the larger address to the smaller: "127.0.0.2:..." is above every
    # member's "127.0.0.1:...", so the would-be member connects to all three.
    would_be = f"{OTHER_LOOPBACK_IP}:{free_port()}"
    assert would_be > max(members)
    rogues = [RogueLog(None, members, secret), RogueLog(would_be, members, secret)]
    results: list[tuple[Any, Any]] = []
    try:
        time.sleep(ROGUE_WATCH_S)  # several connection attempts to every node
        for rogue in rogues:
            rogue.apply_entry(UNAPPLIABLE_ENTRY, callback=lambda result, error: results.append((result, error)))
        assert_undisturbed(cluster, before)
        for rogue in rogues:
            status = rogue.getStatus()
            assert status["leader"] is None, f"{rogue.selfNode}: learned the leader {status['leader']}"
            assert status["commit_idx"] <= 1 and rogue.applied == [], (rogue.selfNode, status, rogue.applied)
            assert status.get("readonly_nodes_count", 0) == 0
        assert all(error != 0 for _, error in results), results  # FAIL_REASON.SUCCESS is 0
    finally:
        for rogue in rogues:
            rogue.destroy()
    # Many refusals, one warning per node and (IP, reason) per minute.
    lines_after = refusal_lines(cluster)
    for node in cluster.nodes:
        new = lines_after[node.id][len(lines_before[node.id]):]
        not_a_peer = [line for line in lines_after[node.id] if "which is not a configured peer" in line]
        assert 1 <= len(not_a_peer) <= 2 and len(new) <= 2, (node.id, lines_after[node.id])


@pytest.mark.cluster
def test_a_read_only_peer_with_the_secret_is_cut_off_before_raft(cluster, secret):
    before = settled_view(cluster)
    leader, term = leader_and_term(before)
    for node in cluster.nodes:
        rogue = RoguePeer(node.raft_address, secret)
        try:
            assert rogue.handshake(), f"{node.id}: the key exchange with the right secret failed"
            rogue.send("readonly")
            for message in attack_messages(term):
                rogue.send(message)
            assert rogue.wait_closed(), f"{node.id} kept a read-only peer"
            assert rogue.received == [], f"{node.id} sent a read-only peer {rogue.received[:3]}"
        finally:
            rogue.close()
    assert_undisturbed(cluster, before)


@pytest.mark.cluster
@pytest.mark.parametrize("first_message", [["status"], ["transfer", None], ["set_version", 7], "127.0.0.1:1"],
                         ids=["utility-status", "utility-transfer", "utility-set_version", "unknown-address"])
def test_utility_commands_and_unknown_addresses_are_refused(cluster, secret, first_message):
    before = settled_view(cluster)
    leader, _ = leader_and_term(before)
    rogue = RoguePeer(cluster.node(leader).raft_address, secret)
    try:
        assert rogue.handshake()
        rogue.send(first_message)
        assert rogue.wait_closed(), f"the leader kept a connection that sent {first_message!r}"
        assert rogue.received == [], f"the leader answered {first_message!r}: {rogue.received[:3]}"
    finally:
        rogue.close()
    assert_undisturbed(cluster, before)


@pytest.mark.cluster
def test_a_peer_posing_as_a_member_is_refused(cluster, secret):
    """With the secret and a member's address: from another IP, or announcing a member this node
    connects to itself."""
    before = settled_view(cluster)
    _, term = leader_and_term(before)
    by_address = sorted(cluster.nodes, key=lambda n: n.raft_address)
    lowest, highest = by_address[0], by_address[-1]
    attempts = [
        (lowest, highest.raft_address, OTHER_LOOPBACK_IP),  # the right member, the wrong IP
        (highest, lowest.raft_address, "127.0.0.1"),  # lowest never connects to highest: highest connects
    ]
    for target, posing_as, source_ip in attempts:
        rogue = RoguePeer(target.raft_address, secret, source_ip=source_ip)
        try:
            if rogue.handshake():
                rogue.send(posing_as)
                for message in attack_messages(term):
                    rogue.send(message)
            assert rogue.wait_closed(), f"{target.id} accepted {posing_as} from {source_ip}"
            assert rogue.received == [], f"{target.id} sent {posing_as}@{source_ip}: {rogue.received[:3]}"
        finally:
            rogue.close()
    assert_undisturbed(cluster, before)


# ------------------------------------------------------------------------------------------------
# The decisions and the log bound, without a cluster
# ------------------------------------------------------------------------------------------------


class _FakeConn:
    encryptor = None


@pytest.fixture
def transport():
    """A CoordinatorTransport in a real, not ticking SyncObj: self between a lower and a higher peer."""
    ports = sorted((free_port() for _ in range(3)), key=str)
    lower, me, higher = (f"127.0.0.1:{p}" for p in ports)
    sync_obj = SyncObj(me, [lower, higher], SyncObjConf(autoTick=False), transportClass=CoordinatorTransport)
    try:
        yield sync_obj._SyncObj__transport, lower, higher
    finally:
        sync_obj.destroy()


def test_membership_decisions(transport):
    transport, lower, higher = transport
    conn = _FakeConn()
    transport._pending_incoming[conn] = ("127.0.0.1", time.monotonic())
    assert transport._refusal(conn, higher) is None
    assert transport._refusal(conn, "readonly")[0] == "not_a_peer"
    assert transport._refusal(conn, "127.0.0.1:1")[0] == "not_a_peer"
    assert transport._refusal(conn, {"type": "append_entries"})[0] == "not_a_peer"
    assert transport._refusal(conn, ["status"])[0] == "utility"
    assert transport._refusal(conn, lower)[0] == "wrong_direction"
    transport._pending_incoming[conn] = (OTHER_LOOPBACK_IP, time.monotonic())
    assert transport._refusal(conn, higher)[0] == "wrong_ip"
    assert transport._member_ips == frozenset({"127.0.0.1"})


def test_peers_named_by_hostname_skip_only_the_ip_checks():
    me, peer = (f"localhost:{free_port()}" for _ in range(2))
    sync_obj = SyncObj(me, [peer], SyncObjConf(autoTick=False), transportClass=CoordinatorTransport)
    try:
        transport = sync_obj._SyncObj__transport
        assert transport._member_ips is None
        conn = _FakeConn()
        transport._pending_incoming[conn] = ("192.0.2.1", time.monotonic())
        expected = None if peer > me else "wrong_direction"
        assert (transport._refusal(conn, peer) or (None,))[0] == expected
        assert transport._refusal(conn, "readonly")[0] == "not_a_peer"
    finally:
        sync_obj.destroy()


def test_refusal_log_is_rate_limited_and_bounded(caplog):
    now = [0.0]
    refusals = RefusalLog(interval_s=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="coordinator.raft"):
        for _ in range(100):
            refusals.refused("10.0.0.1", "not_a_peer", "announced 'readonly'")
        assert len(caplog.records) == 1
        for i in range(1000):
            refusals.refused(f"10.1.{i // 256}.{i % 256}", "not_a_peer", "x")
        assert refusals.keys_tracked <= REFUSAL_LOG_KEYS_MAX
        # one per key until the table is full, then one summary per interval
        assert len(caplog.records) == REFUSAL_LOG_KEYS_MAX + 1
        now[0] += 61.0
        refusals.refused("10.0.0.1", "not_a_peer", "again")
        assert len(caplog.records) == REFUSAL_LOG_KEYS_MAX + 2
        assert refusals.keys_tracked <= REFUSAL_LOG_KEYS_MAX
    assert refusals.refused_total == 1101
