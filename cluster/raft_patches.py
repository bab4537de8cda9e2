"""Our fixes for two measured bugs of pysyncobj 0.3.17, and the durability hook, in one transport.

Pinned to ``pysyncobj==0.3.17``: this module reaches into two name-mangled attributes of
``SyncObj`` (``__raftNextIndex``, ``__raftLog``) and relies on how 0.3.17's ``TcpConnection``
times out, so importing it with any other version raises ``UnsupportedPysyncobjVersion``.
Re-read both bugs in the new source before moving the pin. Nothing here copies pysyncobj code;
we only subclass ``TCPTransport`` and wrap the callback ``SyncObj`` installs on it.

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

Regression tests: ``tests/test_raft_patches.py`` (3-process clusters, stock vs this transport).
Measured there: after a steady state longer than ``connectionTimeout``, stock drops the first
``request_vote`` in every trial and needs 2+ rounds (~2.8 s with a 1 s timeout, because the reconnect
waits for ``connectionRetryTime``); patched drops none and elects in one round in 0.20-0.35 s. Under
3000 writes with 16 in flight, stock followers receive ~35-55% of entries twice and log CRITICAL
truncations in most runs; patched: zero of both, identical state on all nodes.
"""

from __future__ import annotations

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
    }


class CoordinatorTransport(TCPTransport):
    """``TCPTransport`` with the Bug 1 and Bug 2 fixes and the journal flush hook (module docstring)."""

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
        self.flush_and_drain()

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
