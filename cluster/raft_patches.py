"""Our fixes for two measured bugs of pysyncobj 0.3.17, the durability hook and the membership
check, in one transport.

Pinned to ``pysyncobj==0.3.17``: this module reaches into two name-mangled attributes of
``SyncObj`` (``__raftNextIndex``, ``__raftLog``), relies on how 0.3.17's ``TcpConnection``
times out, and overrides ``TCPTransport``'s internal handlers of incoming connections
(``_onNewIncomingConnection``, ``_onIncomingMessageReceived``, ``_onDisconnected``), so importing
it with any other version raises ``UnsupportedPysyncobjVersion``. Re-read both bugs and the
incoming-connection handshake in the new source before moving the pin. Nothing here copies
pysyncobj code; we only subclass ``TCPTransport`` and wrap the callback ``SyncObj`` installs on it.

Use::

    conf = SyncObjConf(**recommended_conf_kwargs(), password=secret, ...)
    SyncObj(self_addr, peer_addrs, conf, transportClass=CoordinatorTransport)

Every node of a cluster must run ``CoordinatorTransport`` (see Bug 1 for why).

Bug 1 -- the first election after a leader crash is lost
    Followers send each other nothing in steady state, so their connection idles.
    ``TcpConnection`` only checks ``connectionTimeout`` (time since the last *read*) when it
    sends or gets a poll event, so the idle connection looks CONNECTED until the next send:
    the first ``request_vote`` after the leader dies. That send finds the timeout passed,
    closes the connection and drops the message, so failover needs a second election round
    (plus a reconnect, which ``connectionRetryTime`` can delay by up to 5 s).
    Fix: keep every peer connection busy. Each tick, to every peer whose handshake is done and
    to which we have sent nothing for ``connectionTimeout / 4``, we send a tiny
    ``{'type': 'coordinator_keepalive'}`` message; the receiving transport swallows it before
    it reaches ``SyncObj``. Since every node does this, each side of each connection reads at
    least every ~``connectionTimeout / 4``, so a live peer's connection never times out and
    the first ``request_vote`` is delivered. The idle condition is removed, not postponed.
    Why not the alternatives: a huge ``connectionTimeout`` leaves the bug in place (it returns
    after that much steady state), and pysyncobj sets TCP keepalive only on *outgoing*
    connections (``TcpServer`` gets ``keepalive=None``) and kernel keepalive does not probe
    while unacknowledged data is queued, so it cannot replace the read timeout as dead-peer
    detection. Reconnecting before a send cannot deliver the message either: connecting and
    the key exchange are asynchronous, and only the node with the larger address may connect.
    Why it is safe: the keepalive carries no Raft state; the read timeout keeps its meaning
    (a peer silent for ``connectionTimeout`` is dead or hung and is disconnected); a stock
    0.3.17 node that receives one ignores it, because ``SyncObj`` dispatches on exact
    ``type`` values -- but a stock node sends no keepalives, so its peers' connections can
    still hit Bug 1, hence "every node".

Bug 2 -- the leader moves ``nextIndex`` backwards on success and re-sends in-flight entries
    On a successful ``next_node_idx`` ack for index i, 0.3.17 sets the follower's ``nextIndex``
    to i + 1 even when it has already sent entries beyond i (the success branch in
    ``SyncObj.__onMessageReceived``). With ``appendEntriesUseBatch=False`` and several writes
    in flight, the leader re-sends those entries; the follower truncates its log back to them
    and appends them again, which logs CRITICAL "truncating already-applied log entries" when
    they were already applied (and once let a follower ack while 154 entries behind).
    Fix: we wrap the handler ``SyncObj`` installs with ``setOnMessageReceivedCallback``. For a
    ``next_node_idx`` with ``success=True`` (and ``reset=False``) we remember the follower's
    ``nextIndex`` before the handler and store ``max(before, after)`` after it.
    Why it is safe: this is the standard Raft rule -- a success ack proves the follower holds
    the entries up to i, it says nothing against entries already in flight after i.
    ``matchIndex`` (which drives commit) is untouched. A failure or ``reset`` response is
    passed through unchanged and still moves ``nextIndex`` back, so a follower that lost
    in-flight entries (reconnect, restart) rejects the next append and gets them re-sent.
    TCP keeps one connection's messages in order, so a stale success cannot undo a reset.

Bug 3 -- an entry larger than ``appendEntriesBatchSizeBytes`` that is not plain ASCII never arrives
    The leader pickles such an entry, sends it in chunks of that size and marks the chunk with
    ``pos + size >= len(raw entry)`` as the last one; the pickled entry is longer than the raw
    one (protocol 2 stores each byte >= 0x80 as two), so the follower is told to finish early
    and fails to unpickle ("pickle data was truncated"; found by tests/test_rpc_fuzz.py with a
    50 KB Cyrillic task input). Fix: ``appendEntriesBatchSizeBytes`` above any entry we can
    produce (``APPEND_ENTRIES_BATCH_BYTES``, 64 MiB; a request is at most 32 MiB), so the
    chunked path never runs; entries go whole, several per message when a follower lags.

Durability hook: acknowledgements wait for one group fsync
    ``SyncObj`` writes the journal (``_SyncObj__raftLog``) on its tick thread. Our journal
    queues writes and makes them durable in one ``flush()`` (group commit). A message that
    acknowledges entries or a vote -- ``next_node_idx``, ``request_vote``, ``response_vote`` --
    must not leave before what it claims is on disk. Instead of flushing before each one (one
    fsync per message: measured 1.00 fsync per commit under load), such messages go to an
    outbox; ``flush_and_drain()`` -- run once per tick, from an on-tick callback and from our
    tick loop after each tick -- flushes the journal once and then sends the outbox in order.
    While the outbox holds anything every later message queues behind it, so each peer still
    sees our messages in the order we sent them.
    ``append_entries`` is sent at once, before the leader's own copy is durable: the leader
    may write its log in parallel with replicating it (Raft thesis §10.2.1), because it counts
    itself towards a commit only at the start of a later tick, and a flush always runs between
    the tick that appended an entry and the next one. A journal without ``flush`` (the stock
    ``MemoryJournal``) sends everything at once. An exception from ``flush()`` propagates and
    the outbox is kept, not sent.

Membership -- a node accepts Raft connections only from the peers in its configuration
    What stock 0.3.17 does with an incoming connection (``TCPTransport._onIncomingMessageReceived``):
    with a password every frame is Fernet-encrypted with a key derived from it, and a frame that
    does not decrypt closes the connection silently, so a process without the cluster secret never
    gets past the first frame (it is never unpickled). But a process *with* the secret is trusted
    completely. After the random-key exchange its first message is either a node address, a list
    (a "utility" command of the ``syncobj_admin`` tool: ``status``, ``add``, ``remove``,
    ``set_version``, ``transfer``; answered on the spot), or the string ``'readonly'``. An address
    not in the configuration is dropped, but ``'readonly'`` is accepted as a read-only node: the
    leader replicates its whole log to it, and every message it sends goes to ``SyncObj``'s handler
    unchecked -- ``apply_command`` (the leader appends and commits it), ``append_entries`` and
    ``request_vote`` with any term (a node adopts the term, steps down, and even follows it as
    leader and truncates its log). A configured address is accepted from any remote IP, so such a
    process can also pose as a member. Nothing checks the remote IP at all.
    Fix (``_onNewIncomingConnection`` / ``_onIncomingMessageReceived``, before pysyncobj's own
    handling): the connection is closed, with one rate-limited warning, when
    - every configured peer's host is an IP literal and the remote IP is none of them (checked at
      accept, before any frame is decrypted);
    - the first message after the key exchange is not the address of a configured peer: this
      refuses ``'readonly'``, unknown addresses and every utility command (we use neither
      ``syncobj_admin`` nor dynamic membership);
    - that peer's host is an IP literal and the connection does not come from that IP;
    - the peer is one we connect to ourselves (pysyncobj connects only from the larger address to
      the smaller, so a member never announces a smaller address than ours);
    - the handshake is not done within ``connectionTimeout`` (stock never times out an incoming
      connection that sends nothing, so unauthenticated connections could pile up).
    A connection pysyncobj closes because a frame did not decrypt (the wrong secret) gets the same
    warning; stock logs nothing. (To know, the connection's Fernet is wrapped until its handshake
    is done.) Warnings: one per (remote IP, reason) per ``REFUSAL_LOG_INTERVAL_S``, for at most
    ``REFUSAL_LOG_KEYS_MAX`` keys at a time, then one summary per interval -- keyed by IP, not by
    the announced address, which the peer chooses; ``refusals.refused_total`` counts them all.
    Why it is safe: a configured peer running this or the stock transport passes every check --
    it connects from its own address to a smaller one and announces the configured address. The
    IP check assumes a node's outgoing connections leave from the IP of its configured Raft
    address, which holds unless the host routes to some peers through another interface; such a
    host must use hostnames in the cluster file (the IP checks are then skipped, the address
    check is not) -- the warning names the IP it saw. The bind address is unchanged: ``node.py``
    passes ``bindAddress=raft_address``, so the listener binds that address only (pysyncobj binds
    ``0.0.0.0`` only when no ``bindAddress`` is given).

Regression tests: ``tests/test_raft_patches.py`` (3-process clusters, stock vs this transport).
Measured there: after a steady state longer than ``connectionTimeout``, stock drops the first
``request_vote`` in every trial and needs 2+ rounds (~2.8 s with a 1 s timeout, because the reconnect
waits for ``connectionRetryTime``); patched drops none and elects in one round in 0.20-0.35 s. Under
3000 writes with 16 in flight, stock followers receive ~35-55% of entries twice and log CRITICAL
truncations in most runs; patched: zero of both, identical state on all nodes.
Membership: ``tests/test_raft_membership.py`` (a real 3-node cluster and hand-made rogue peers).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from typing import Any, Callable

import pysyncobj.version
from pysyncobj.node import Node
from pysyncobj.transport import TCPTransport

PYSYNCOBJ_VERSION_PINNED = "0.3.17"


class UnsupportedPysyncobjVersion(RuntimeError):
    """The installed pysyncobj is not the version these patches were measured against."""


if pysyncobj.version.VERSION != PYSYNCOBJ_VERSION_PINNED:
    raise UnsupportedPysyncobjVersion(
        f"cluster.raft_patches is written against pysyncobj=={PYSYNCOBJ_VERSION_PINNED}, "
        f"found {pysyncobj.version.VERSION}: re-check both bugs in its source before moving the pin"
    )

# Messages a crash must not be able to contradict: they acknowledge entries or carry a vote.
DURABLE_BEFORE_SEND_TYPES = frozenset({"next_node_idx", "request_vote", "response_vote"})

KEEPALIVE_MESSAGE_TYPE = "coordinator_keepalive"
_KEEPALIVE_MESSAGE = {"type": KEEPALIVE_MESSAGE_TYPE}

# A peer must read something well within connectionTimeout even if a tick or two is late.
KEEPALIVE_INTERVALS_PER_CONNECTION_TIMEOUT = 4

MessageHandler = Callable[[Node, Any], None]

log = logging.getLogger("coordinator.raft")

# Refused connections: one warning per (remote IP, reason) per interval, for at most this many
# distinct keys at a time; beyond that, one summary warning per interval.
REFUSAL_LOG_INTERVAL_S = 60.0
REFUSAL_LOG_KEYS_MAX = 64
# How much of a refused peer's (attacker-chosen) announcement goes into a log line.
REFUSAL_LOG_ANNOUNCED_CHARS_MAX = 80


APPEND_ENTRIES_BATCH_BYTES = 64 << 20


def recommended_conf_kwargs() -> dict:
    """``SyncObjConf`` settings DESIGN.md recommends for the coordinator; callers add ``password`` etc.

    - ``appendEntriesUseBatch=False``: with batching every write waits for a 0.1 s batch tick;
      we batch client commands into log entries ourselves.
    - ``raftMinTimeout``/``raftMaxTimeout`` 0.2/0.4 s with ``appendEntriesPeriod`` 0.05 s: measured
      failover 0.26/0.38/0.41 s (min/median/max) against ~0.9 s with the defaults.
    - ``leaderFallbackTimeout`` 1.0 s: a leader cut off from the majority steps down after 1 s, not 30 s.
    - ``connectionTimeout`` 3.5 s (pysyncobj's default, stated so nobody "fixes" Bug 1 by raising it):
      with ``CoordinatorTransport``'s keepalives it is purely dead-peer detection, with keepalives
      every 0.875 s, so it tolerates ~2.5 s of tick-thread stalls on a loaded 2-core machine before
      declaring a live peer dead.
    """
    return {
        "appendEntriesUseBatch": False,
        "raftMinTimeout": 0.2,
        "raftMaxTimeout": 0.4,
        "appendEntriesPeriod": 0.05,
        "leaderFallbackTimeout": 1.0,
        "connectionTimeout": 3.5,
        # Bug 3 (see the module docstring): pysyncobj 0.3.17 splits one entry larger than this
        # into chunks and marks the last one by the entry's raw size instead of its pickled size,
        # which is larger for bytes >= 0x80 (protocol-2 pickles them as two UTF-8 bytes): a
        # non-ASCII entry over 64 KiB, or one a few dozen bytes under a multiple of it, never
        # arrives whole and followers fail to unpickle it. Above every entry we can produce (a
        # request is at most 32 MiB, GRPC_MESSAGE_BYTES_MAX), the chunked path never runs.
        "appendEntriesBatchSizeBytes": APPEND_ENTRIES_BATCH_BYTES,
    }


def ip_literal(host: str) -> str | None:
    """The normalized IP if ``host`` (``[v6]`` brackets allowed) is an IP literal, else None."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped if mapped is not None else ip)


class RefusalLog:
    """Rate-limited warnings about refused connections, in bounded memory (``REFUSAL_LOG_*``)."""

    def __init__(self, interval_s: float = REFUSAL_LOG_INTERVAL_S, keys_max: int = REFUSAL_LOG_KEYS_MAX,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._keys_max = keys_max
        self._last_logged_s: dict[tuple[str, str], float] = {}
        self._suppressed = 0
        self._last_summary_s = float("-inf")
        self.refused_total = 0

    @property
    def keys_tracked(self) -> int:
        return len(self._last_logged_s)

    def refused(self, remote_ip: str, reason: str, detail: str) -> None:
        self.refused_total += 1
        now_s = self._clock()
        key = (remote_ip, reason)
        last_s = self._last_logged_s.get(key)
        if last_s is not None and now_s - last_s < self._interval_s:
            return
        if last_s is None and len(self._last_logged_s) >= self._keys_max:
            for old_key, old_s in list(self._last_logged_s.items()):
                if now_s - old_s >= self._interval_s:
                    del self._last_logged_s[old_key]
        if last_s is None and len(self._last_logged_s) >= self._keys_max:
            self._suppressed += 1
            if now_s - self._last_summary_s >= self._interval_s:
                self._last_summary_s = now_s
                log.warning("%d more Raft connections refused for new peers/reasons, not logged one by one "
                            "(%d refused in total)", self._suppressed, self.refused_total)
                self._suppressed = 0
            return
        self._last_logged_s[key] = now_s
        log.warning("Raft connection from %s refused: %s (the same again is not logged for %.0f s)",
                    remote_ip, detail, self._interval_s)


class _DecryptFailureWatch:
    """Stands in for the cluster's Fernet on an incoming connection until its handshake is done,
    to remember that a frame failed to decrypt (pysyncobj then closes the connection silently)."""

    def __init__(self, encryptor) -> None:
        self.encryptor = encryptor
        self.failed = False

    def encrypt_at_time(self, data, current_time):
        return self.encryptor.encrypt_at_time(data, current_time)

    def extract_timestamp(self, token):
        try:
            return self.encryptor.extract_timestamp(token)
        except Exception:
            self.failed = True
            raise

    def decrypt(self, token, *args):
        try:
            return self.encryptor.decrypt(token, *args)
        except Exception:
            self.failed = True
            raise


def _remote_ip(conn) -> str | None:
    """The remote IP of an accepted ``TcpConnection``, via its public ``fileno()``."""
    fileno = conn.fileno()
    if fileno is None:
        return None
    sock = socket.socket(fileno=fileno)  # borrows the descriptor; detach() gives it back unclosed
    try:
        return ip_literal(sock.getpeername()[0])
    except OSError:
        return None
    finally:
        sock.detach()


class CoordinatorTransport(TCPTransport):
    """``TCPTransport`` with the Bug 1 and Bug 2 fixes, the journal flush hook and the membership
    check (module docstring)."""

    def __init__(self, syncObj, selfNode, otherNodes):
        # SyncObj.__init__ builds the journal and the nextIndex dict before the transport and never
        # rebinds either, so we can hold them; a missing attribute fails here, loudly.
        self._next_index_by_node: dict = syncObj._SyncObj__raftNextIndex
        self._journal_flush: Callable[[], None] | None = getattr(syncObj._SyncObj__raftLog, "flush", None)
        self._raft_handler: MessageHandler | None = None
        self._handshaken_nodes: set = set()
        self._last_send_by_node_s: dict = {}
        self._keepalive_interval_s = syncObj.conf.connectionTimeout / KEEPALIVE_INTERVALS_PER_CONNECTION_TIMEOUT
        self._outbox: list[tuple[Node, Any]] = []
        # Membership: the IP each peer's configured host names, if it is an IP literal.
        self._peer_ip_by_address: dict[str, str | None] = {n.address: ip_literal(n.host) for n in otherNodes}
        peer_ips = set(self._peer_ip_by_address.values())
        self._member_ips: frozenset | None = None if None in peer_ips else frozenset(peer_ips)
        self._handshake_timeout_s: float = syncObj.conf.connectionTimeout
        self._pending_incoming: dict[Any, tuple[str | None, float]] = {}  # conn -> (remote IP, accepted at)
        self.refusals = RefusalLog()
        super().__init__(syncObj, selfNode, otherNodes)
        syncObj.addOnTickCallback(self._on_tick)

    # --- Bug 2: nextIndex never moves backwards on a successful ack ---------------------------

    def setOnMessageReceivedCallback(self, callback):
        self._raft_handler = callback
        super().setOnMessageReceivedCallback(None if callback is None else self._on_raft_message)

    def _on_raft_message(self, node: Node, message: Any) -> None:
        message_type = message.get("type") if isinstance(message, dict) else None
        if message_type == KEEPALIVE_MESSAGE_TYPE:
            return  # It has done its job (a read on this connection); SyncObj has no use for it.
        handler = self._raft_handler
        if handler is None:
            return
        if message_type == "next_node_idx" and message.get("success") and not message.get("reset"):
            next_index_before = self._next_index_by_node.get(node)
            handler(node, message)
            next_index_after = self._next_index_by_node.get(node)
            if next_index_before is not None and next_index_after is not None and next_index_after < next_index_before:
                self._next_index_by_node[node] = next_index_before
            return
        handler(node, message)

    # --- Durability hook, and the send time the keepalive needs --------------------------------

    def send(self, node, message):
        if self._journal_flush is not None and (
            self._outbox or (isinstance(message, dict) and message.get("type") in DURABLE_BEFORE_SEND_TYPES)
        ):
            self._outbox.append((node, message))
            return True
        return self._send_now(node, message)

    def _send_now(self, node, message) -> bool:
        sent = super().send(node, message)
        if sent:
            self._last_send_by_node_s[node] = time.monotonic()
        return sent

    def flush_and_drain(self) -> None:
        """Make the journal durable with one flush, then send every queued message in order."""
        if self._journal_flush is None:
            return
        self._journal_flush()
        if self._outbox:
            outbox, self._outbox = self._outbox, []
            for node, message in outbox:
                self._send_now(node, message)

    def _on_tick(self) -> None:
        self._send_keepalives()
        self._expire_pending_incoming()
        self.flush_and_drain()

    # --- Membership: only configured peers may connect ------------------------------------------

    def _onNewIncomingConnection(self, conn):
        super()._onNewIncomingConnection(conn)
        if conn.encryptor is not None:
            conn.encryptor = _DecryptFailureWatch(conn.encryptor)
        remote_ip = _remote_ip(conn)
        self._pending_incoming[conn] = (remote_ip, time.monotonic())
        if self._member_ips is not None and remote_ip not in self._member_ips:
            self._refuse(conn, "ip_not_member", "its IP is none of the configured peers' IPs")

    def _onIncomingMessageReceived(self, conn, message):
        if self._syncObj.encryptor and not conn.sendRandKey:
            # The key exchange: a message that reached us decrypted with the cluster secret.
            super()._onIncomingMessageReceived(conn, message)
            return
        refusal = self._refusal(conn, message)
        if refusal is not None:
            self._refuse(conn, *refusal)
            return
        self._pending_incoming.pop(conn, None)
        if isinstance(conn.encryptor, _DecryptFailureWatch):
            conn.encryptor = conn.encryptor.encryptor
        super()._onIncomingMessageReceived(conn, message)

    def _refusal(self, conn, message) -> tuple[str, str] | None:
        """(reason, detail) if the peer's first message after the key exchange must be refused."""
        if isinstance(message, list):
            command = str(message[0])[:REFUSAL_LOG_ANNOUNCED_CHARS_MAX] if message else ""
            return "utility", f"sent the utility command {command!r} (pysyncobj's admin interface is not served)"
        announced = message if isinstance(message, str) else None
        if announced is not None:
            shown = repr(announced[:REFUSAL_LOG_ANNOUNCED_CHARS_MAX])
        else:
            shown = f"a {type(message).__name__[:REFUSAL_LOG_ANNOUNCED_CHARS_MAX]}"
        if announced is None or announced not in self._nodeAddrToNode:
            return "not_a_peer", f"announced {shown}, which is not a configured peer"
        if self._selfNode is not None and not announced > self._selfNode.address:
            return "wrong_direction", f"announced {shown}, a peer this node connects to itself"
        expected_ip = self._peer_ip_by_address.get(announced)
        remote_ip = self._pending_incoming.get(conn, (None, 0.0))[0]
        if expected_ip is not None and remote_ip != expected_ip:
            return "wrong_ip", f"announced {shown}, whose configured IP is {expected_ip}"
        return None

    def _refuse(self, conn, reason: str, detail: str) -> None:
        remote_ip = self._pending_incoming.get(conn, (None, 0.0))[0]
        self.refusals.refused(remote_ip or "unknown IP", reason, detail)
        self._pending_incoming.pop(conn, None)
        self._unknownConnections.discard(conn)
        conn.disconnect()

    def _expire_pending_incoming(self) -> None:
        now_s = time.monotonic()
        for conn, (_, accepted_s) in list(self._pending_incoming.items()):
            if now_s - accepted_s > self._handshake_timeout_s:
                self._refuse(conn, "handshake_timeout", f"no handshake within {self._handshake_timeout_s:.1f} s")

    def _onDisconnected(self, conn):
        pending = self._pending_incoming.pop(conn, None)
        if pending is not None and getattr(conn.encryptor, "failed", False):
            # pysyncobj closes a connection whose frame does not decrypt without a word; this is
            # the only place a peer with the wrong cluster secret becomes visible. (A peer that
            # just goes away before its handshake -- e.g. one that gave up on us while we were
            # starting -- is not worth a warning.)
            self.refusals.refused(pending[0] or "unknown IP", "wrong_secret",
                                  "a frame did not decrypt with the cluster secret")
        super()._onDisconnected(conn)

    def destroy(self):
        self._pending_incoming.clear()  # closing them now is our doing, not a refusal
        super().destroy()

    # --- Bug 1: no peer connection is ever idle for connectionTimeout ---------------------------

    def _onNodeConnected(self, node):
        # Called once the key exchange and address handshake are done: only from then on may we
        # send ordinary messages on this connection.
        self._handshaken_nodes.add(node)
        super()._onNodeConnected(node)

    def _onNodeDisconnected(self, node):
        self._handshaken_nodes.discard(node)
        self._last_send_by_node_s.pop(node, None)
        super()._onNodeDisconnected(node)

    def dropNode(self, node):
        self._handshaken_nodes.discard(node)
        self._last_send_by_node_s.pop(node, None)
        super().dropNode(node)

    def _send_keepalives(self) -> None:
        now_s = time.monotonic()
        for node in list(self._handshaken_nodes):
            if now_s - self._last_send_by_node_s.get(node, 0.0) >= self._keepalive_interval_s:
                self.send(node, _KEEPALIVE_MESSAGE)
