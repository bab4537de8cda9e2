"""The one place that wraps pysyncobj (pinned to 0.3.17).

    RaftLog(SyncObj)
      ├── one replicated method, apply_entry(payload: bytes): a group-committed batch of our
      │   commands (our JSON codec; pysyncobj only pickles the bytes object around it)
      ├── journal: wal.LmdbJournal, put in by replacing pysyncobj's module-level
      │   `createJournal` during construction (it has no configuration hook)
      ├── transport: cluster.raft_patches.CoordinatorTransport (flush-before-send, bug fixes)
      ├── snapshots: SnapshotSerializer replaces pysyncobj's Serializer object; it encodes the
      │   FSM off the tick thread from a frozen view and writes checksummed files with fsync
      └── our own tick thread (autoTick=False), so nothing runs before the serializer is in place

pysyncobj applies the replicated method on its tick thread; the Raft index of the entry being
applied is `raftLastApplied + 1` at that moment (it increments after the call returns).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pysyncobj.syncobj as _syncobj_module
from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.config import FAIL_REASON, SERIALIZER_STATE

from coordinator.errors import InvariantViolation, UnknownCommand
from coordinator.fsm import ApplyResult, CoordinatorFSM
from wal.journal import LmdbJournal
from wal.snapshot import fsync_dir, read_snapshot, write_snapshot

log = logging.getLogger("coordinator.raft")

_construct_lock = threading.Lock()

EXIT_CANNOT_APPLY = 70  # EX_SOFTWARE

ROLE_NAMES = {0: "follower", 1: "candidate", 2: "leader"}

# Failures after which the command was definitely not applied (safe to propose again).
NOT_APPLIED = frozenset({FAIL_REASON.QUEUE_FULL, FAIL_REASON.MISSING_LEADER, FAIL_REASON.DISCARDED,
                         FAIL_REASON.NOT_LEADER, FAIL_REASON.REQUEST_DENIED})
FAIL_NAMES = {v: k for k, v in vars(FAIL_REASON).items() if not k.startswith("_")}


SNAPSHOT_RETRY_AFTER_FAILURE_S = 5.0


class SnapshotSerializer:
    """Implements the interface SyncObj expects of its `Serializer` (pysyncobj 0.3.17):
    checkSerializing, serialize, deserialize, getTransmissionData, setTransmissionData,
    cancelTransmisstion. Differences from the stock one: no pickle of our state, a sha256
    checksum verified on load, fsync of file and directory, and encoding on a background thread
    from a frozen FSM view so a big snapshot never stalls heartbeats.
    """

    def __init__(self, path: str, fsm: CoordinatorFSM, fsm_lock: threading.RLock, transmission_bytes: int,
                 on_written_seconds: Callable[[float], None] | None = None) -> None:
        self._path = path
        self._on_written_seconds = on_written_seconds  # metrics: each written snapshot's duration
        self._fsm = fsm
        self._fsm_lock = fsm_lock
        self._transmission_bytes = transmission_bytes
        self._thread: threading.Thread | None = None
        self._outcome: int | None = None  # SUCCESS / FAILED once the thread is done
        self._current_id: int | None = None
        self._retry_not_before = 0.0
        self._preloaded: tuple[dict, list[bytes]] | None = None
        self._transmissions: dict[Any, dict[str, Any]] = {}
        self._incoming: Any = None
        self.snapshots_written = 0
        self.last_snapshot_seconds = 0.0
        self.last_snapshot_bytes = 0

    # -- writing ------------------------------------------------------------------------
    def checkSerializing(self) -> tuple[int, int | None]:  # noqa: N802 (pysyncobj's name)
        if self._thread is None:
            return SERIALIZER_STATE.NOT_SERIALIZING, None
        if self._thread.is_alive():
            return SERIALIZER_STATE.SERIALIZING, self._current_id
        self._thread = None
        self._transmissions.clear()
        outcome, self._outcome = self._outcome, None
        return (outcome if outcome is not None else SERIALIZER_STATE.FAILED), self._current_id

    def serialize(self, data: tuple, id: int) -> None:  # noqa: A002
        # pysyncobj asks again on every tick after a failure; a failing disk gets a pause.
        if self._thread is not None or time.monotonic() < self._retry_not_before:
            return
        _, last_entry, prev_entry, cluster = data
        with self._fsm_lock:
            view = self._fsm.snapshot_view()
        # The two log entries pysyncobj keeps with a snapshot can be megabytes (a DAG): they go
        # into records of their own, the header keeps only their index and term.
        header = {
            "last_entry": [last_entry[1], last_entry[2]],
            "prev_entry": [prev_entry[1], prev_entry[2]],
            "cluster": sorted(getattr(node, "id", str(node)) for node in cluster),
            "last_applied_index": view.header["last_applied_index"],
        }
        entries = (bytes(prev_entry[0]), bytes(last_entry[0]))
        self._current_id = id
        self._thread = threading.Thread(target=self._write, args=(header, entries, view), name="snapshot-writer",
                                        daemon=True)
        self._thread.start()

    def _write(self, header: dict[str, Any], entries: tuple[bytes, bytes], view: Any) -> None:
        started = time.monotonic()

        def records():
            yield from entries
            yield from CoordinatorFSM.snapshot_chunks(view)

        written = False
        try:
            size = write_snapshot(self._path, header, records())
            self.last_snapshot_bytes = size
            self.snapshots_written += 1
            written = True
            self._outcome = SERIALIZER_STATE.SUCCESS
        except Exception:
            log.exception("snapshot write failed; next attempt in %.0f s", SNAPSHOT_RETRY_AFTER_FAILURE_S)
            self._retry_not_before = time.monotonic() + SNAPSHOT_RETRY_AFTER_FAILURE_S
            self._outcome = SERIALIZER_STATE.FAILED
        self.last_snapshot_seconds = time.monotonic() - started
        if written and self._on_written_seconds is not None:
            self._on_written_seconds(self.last_snapshot_seconds)

    # -- loading ------------------------------------------------------------------------
    def preload(self) -> None:
        """Read and verify the snapshot before Raft starts, so a corrupt one stops the node with a
        clear error (pysyncobj would log and carry on without it); the first load reuses it."""
        if os.path.exists(self._path):
            self._preloaded = read_snapshot(self._path)

    def deserialize(self) -> tuple:
        if self._preloaded is not None:
            (header, records), self._preloaded = self._preloaded, None
        else:
            header, records = read_snapshot(self._path)  # raises SnapshotCorrupt: never load bad state
        prev_command, last_command = records[0], records[1]
        try:
            with self._fsm_lock:
                self._fsm.restore_chunks(records[2:])
        except Exception:  # noqa: BLE001 — pysyncobj would log it and go on without the state
            # A snapshot that passes its checksum but whose state does not restore (e.g. an audit
            # chain whose hashes do not reproduce: edited on disk) must stop the node, not leave
            # it running on an empty state.
            log.critical("snapshot %s does not restore; stopping this node", self._path, exc_info=True)
            logging.shutdown()
            os._exit(EXIT_CANNOT_APPLY)
        last_index, last_term = header["last_entry"]
        prev_index, prev_term = header["prev_entry"]
        return (None, (last_command, last_index, last_term), (prev_command, prev_index, prev_term), header["cluster"])

    # -- shipping to lagging followers (same protocol as pysyncobj's file case) ----------
    def getTransmissionData(self, transmission_id: Any) -> Any:  # noqa: N802
        if self._thread is not None:
            return None
        transmission = self._transmissions.get(transmission_id)
        if transmission is None:
            try:
                transmission = {"file": open(self._path, "rb"), "transmitted": 0}  # noqa: SIM115
            except OSError:
                log.exception("cannot open snapshot for transmission")
                return None
            self._transmissions[transmission_id] = transmission
        is_first = transmission["transmitted"] == 0
        try:
            data = transmission["file"].read(self._transmission_bytes)
        except OSError:
            log.exception("cannot read snapshot for transmission")
            self._close_transmission(transmission_id)
            return False
        transmission["transmitted"] += len(data)
        is_last = not data
        if is_last:
            self._close_transmission(transmission_id)
        return data, is_first, is_last

    def _close_transmission(self, transmission_id: Any) -> None:
        transmission = self._transmissions.pop(transmission_id, None)
        if transmission is not None:
            transmission["file"].close()

    def cancelTransmisstion(self, transmission_id: Any) -> None:  # noqa: N802 (sic, pysyncobj's spelling)
        self._close_transmission(transmission_id)

    def setTransmissionData(self, data: Any) -> bool:  # noqa: N802
        if data is None:
            return False
        chunk, is_first, is_last = data
        tmp = self._path + ".incoming"
        if is_first:
            if self._incoming is not None:
                self._incoming.close()
            self._incoming = open(tmp, "wb")  # noqa: SIM115
        elif self._incoming is None:
            return False
        self._incoming.write(chunk)
        if not is_last:
            return False
        self._incoming.flush()
        os.fsync(self._incoming.fileno())
        self._incoming.close()
        self._incoming = None
        read_snapshot(tmp)  # verify before it replaces anything
        os.replace(tmp, self._path)
        fsync_dir(os.path.dirname(self._path) or ".")
        return True


class RaftLog(SyncObj):
    """pysyncobj with our journal, transport, serializer and tick thread."""

    def __init__(
        self,
        self_address: str,
        peer_addresses: list[str],
        *,
        fsm: CoordinatorFSM,
        fsm_lock: threading.RLock,
        journal: LmdbJournal,
        snapshot_path: str,
        transport_class: type,
        conf_kwargs: dict[str, Any],
        on_applied: Callable[[int], None] | None = None,
        on_snapshot_seconds: Callable[[float], None] | None = None,
    ) -> None:
        self._fsm = fsm
        self._fsm_lock = fsm_lock
        self._journal = journal
        self._on_applied = on_applied
        conf = SyncObjConf(autoTick=False, fullDumpFile=snapshot_path, **conf_kwargs)
        with _construct_lock:
            original = _syncobj_module.createJournal
            _syncobj_module.createJournal = lambda _path: journal
            try:
                super().__init__(self_address, peer_addresses, conf=conf, transportClass=transport_class)
            finally:
                _syncobj_module.createJournal = original
        # The two reaches into pysyncobj's private state (pinned to 0.3.17): our tick loop drives
        # the transport's outbox, and our serializer replaces its Serializer object.
        self._transport = self._SyncObj__transport
        self.serializer = SnapshotSerializer(snapshot_path, fsm, fsm_lock, conf.logCompactionBatchSize,
                                             on_written_seconds=on_snapshot_seconds)
        self.serializer.preload()
        self._SyncObj__serializer = self.serializer
        self._stopping = threading.Event()
        self._tick_thread = threading.Thread(target=self._tick_loop, name="raft-tick", daemon=True)
        self.status_cache: dict[str, Any] = {}
        self._journal_bytes_compact = 0
        self._tick_s = 0.05

    @replicated
    def apply_entry(self, payload: bytes) -> list[ApplyResult]:
        index = self.raftLastApplied + 1
        try:
            with self._fsm_lock:
                results = self._fsm.apply_entry(index, payload)
        except (UnknownCommand, InvariantViolation):
            # A node that cannot apply the committed log must stop rather than diverge or retry
            # the same entry forever; its journal is durable, so a fixed build resumes from here.
            log.critical("cannot apply log entry %d; stopping this node", index, exc_info=True)
            logging.shutdown()
            os._exit(EXIT_CANNOT_APPLY)
        if self._on_applied is not None:
            self._on_applied(index)
        return results

    # -- lifecycle -----------------------------------------------------------------------
    def start(self, journal_bytes_compact: int, tick_s: float = 0.05) -> None:
        self._journal_bytes_compact = journal_bytes_compact
        self._tick_s = tick_s
        self._tick_thread.start()

    def _tick_loop(self) -> None:
        last_status = 0.0
        while not self._stopping.is_set():
            try:
                self.doTick(self._tick_s)
                # One fsync for everything this tick wrote, then the acknowledgements that waited
                # for it. The leader counts itself in every majority at the start of the next
                # tick, so its own entries are durable by then too.
                self._transport.flush_and_drain()
                if self._journal.bytes_total > self._journal_bytes_compact:
                    self.forceLogCompaction()
                now = time.monotonic()
                if now - last_status > 0.1:
                    self.status_cache = self.getStatus()
                    last_status = now
            except Exception:
                log.exception("raft tick failed")
                time.sleep(self._tick_s)
        self._doDestroy()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        if self._tick_thread.is_alive():
            self._tick_thread.join(timeout_s)

    # -- status --------------------------------------------------------------------------
    def role(self) -> str:
        return ROLE_NAMES.get(self.status_cache.get("state", 0), "unknown")
