"""LMDB-backed Raft log with group commit, duck-typing pysyncobj 0.3.17's `Journal`.

pysyncobj calls add/delete*/clear once per entry from its tick thread and slices the journal on
every tick, so the entries live in an in-memory list of `(command, idx, term)` tuples and every
mutation is only *queued*. `flush()` writes the queue in one LMDB write txn whose commit fsyncs;
the transport calls it before sending any message that acknowledges or propagates entries, so one
fsync covers a whole tick's worth of entries. `setCurrentTerm` commits at once: a vote must be on
disk before it is sent. The commit index is only a hint and rides along with the next commit.

On disk (an LMDB environment directory: data.mdb, lock.mdb), two named databases:
    log   key  >Q raft index (big-endian, so key order == index order)
          value >Q term | >I crc32(>QQ idx, term | command) | command bytes
    meta  key b"meta"  value >I crc32(json) | json {"format", "current_term",
          "voted_for_node_id", "raft_commit_index"}
Opening verifies every entry's crc and that indexes are contiguous (else WalCorruption).

Not thread-safe: every call must come from one thread (pysyncobj's tick thread).

Fault injection (read once per journal, at construction; for crash tests only):
    COORD_WAL_FAULT=kill_before_flush:N   SIGKILL this process at the Nth commit, before writing
    COORD_WAL_FAULT=kill_after_flush:N    SIGKILL this process right after the Nth commit's fsync
    COORD_WAL_CRASH_IMAGE_DIR=DIR         after every commit, atomically replace DIR/data.mdb with
                                          a consistent copy: what a power loss would leave on disk
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import tempfile
import time
import zlib
from typing import Callable

import lmdb

from wal.errors import WalCorruption, WalError, WalFull, invariant

FORMAT_VERSION = 1
MAP_SIZE_BYTES_DEFAULT = 256 << 20
MAP_SIZE_BYTES_MAX_DEFAULT = 16 << 30

_KEY = struct.Struct(">Q")
_VALUE_HEAD = struct.Struct(">QI")  # term, crc32
_CRC_HEAD = struct.Struct(">QQ")  # idx, term: covered by the crc so a value moved to another key fails
_META_HEAD = struct.Struct(">I")
_META_KEY = b"meta"

Entry = tuple[bytes, int, int]  # (command, raft index, term), the shape pysyncobj expects


def _entry_crc(idx: int, term: int, command: bytes) -> int:
    return zlib.crc32(command, zlib.crc32(_CRC_HEAD.pack(idx, term)))


def _parse_fault(spec: str | None) -> tuple[str, int] | None:
    if not spec:
        return None
    kind, _, count = spec.partition(":")
    if kind not in ("kill_before_flush", "kill_after_flush") or not count.isdigit() or int(count) < 1:
        raise WalError(f"bad COORD_WAL_FAULT={spec!r}; want kill_before_flush:N or kill_after_flush:N")
    return kind, int(count)


class LmdbJournal:
    """Durable Raft log. Positions given to delete* are list positions, not raft indexes."""

    def __init__(
        self,
        path: str,
        *,
        map_size_bytes: int = MAP_SIZE_BYTES_DEFAULT,
        map_size_bytes_max: int = MAP_SIZE_BYTES_MAX_DEFAULT,
        before_prefix_delete: Callable[[], None] | None = None,
        on_fsync_seconds: Callable[[float], None] | None = None,
    ) -> None:
        invariant(0 < map_size_bytes <= map_size_bytes_max, "need 0 < map_size_bytes <= map_size_bytes_max")
        self.path = path
        self._map_size_bytes_max = map_size_bytes_max
        self._before_prefix_delete = before_prefix_delete
        self._on_fsync_seconds = on_fsync_seconds  # metrics: told each commit's duration (None = nothing)
        self._fault = _parse_fault(os.environ.get("COORD_WAL_FAULT"))
        self._crash_image_dir = os.environ.get("COORD_WAL_CRASH_IMAGE_DIR") or None

        self.flushes_total = 0
        self.fsync_seconds_total = 0.0
        self.last_fsync_seconds = 0.0
        self.bytes_total = 0  # command bytes currently in the log

        self._entries: list[Entry] = []
        self._ops: list[tuple] = []  # queued until flush(); see _apply for the shapes
        self._current_term = 0
        self._voted_for_node_id: str | None = None
        self._raft_commit_index = 1
        self._meta_dirty = False

        os.makedirs(path, exist_ok=True)
        # sync+metasync: LMDB fsyncs data pages, then the meta page, so a commit is all-or-nothing
        # even across power loss. (sync=False + env.sync() would leave a window where it is not.)
        self._env = lmdb.open(path, map_size=map_size_bytes, max_dbs=2, subdir=True,
                              sync=True, metasync=True, lock=True)
        try:
            self._log_db = self._env.open_db(b"log")
            self._meta_db = self._env.open_db(b"meta")
            self._load()
        except BaseException:
            self._env.close()
            raise

    # --- open -------------------------------------------------------------------------------------
    def _load(self) -> None:
        with self._env.begin() as txn:
            for key, value in txn.cursor(db=self._log_db):
                if len(key) != _KEY.size:
                    raise WalCorruption(None, f"log key of {len(key)} bytes")
                idx = _KEY.unpack(key)[0]
                if self._entries and idx != self._entries[-1][1] + 1:
                    raise WalCorruption(self._entries[-1][1] + 1, f"missing; next stored index is {idx}")
                if len(value) < _VALUE_HEAD.size:
                    raise WalCorruption(idx, "value shorter than its header")
                term, crc = _VALUE_HEAD.unpack_from(value)
                command = bytes(value[_VALUE_HEAD.size:])
                if _entry_crc(idx, term, command) != crc:
                    raise WalCorruption(idx, "crc32 mismatch")
                self._entries.append((command, idx, term))
                self.bytes_total += len(command)
            raw = txn.get(_META_KEY, db=self._meta_db)
        if raw is not None:
            self._load_meta(bytes(raw))

    def _load_meta(self, raw: bytes) -> None:
        if len(raw) < _META_HEAD.size or _META_HEAD.unpack_from(raw)[0] != zlib.crc32(raw[_META_HEAD.size:]):
            raise WalCorruption(None, "metadata crc32 mismatch")
        meta = json.loads(raw[_META_HEAD.size:])
        if meta.get("format") != FORMAT_VERSION:
            raise WalCorruption(None, f"unknown format {meta.get('format')!r}")
        self._current_term = meta["current_term"]
        self._voted_for_node_id = meta["voted_for_node_id"]
        self._raft_commit_index = meta["raft_commit_index"]

    def _encode_meta(self) -> bytes:
        body = json.dumps({
            "format": FORMAT_VERSION,
            "current_term": self._current_term,
            "voted_for_node_id": self._voted_for_node_id,
            "raft_commit_index": self._raft_commit_index,
        }, sort_keys=True).encode()
        return _META_HEAD.pack(zlib.crc32(body)) + body

    # --- commit -----------------------------------------------------------------------------------
    def flush(self) -> None:
        """Make every queued op durable: one write txn, one commit (fsync). No-op if nothing queued."""
        if self._ops:
            self._commit()

    def _commit(self) -> None:
        if self._fault == ("kill_before_flush", self.flushes_total + 1):
            os.kill(os.getpid(), signal.SIGKILL)
        # Dropping a prefix (compaction, or clear before installing a leader's snapshot) loses
        # committed entries unless the snapshot that replaces them is durable first.
        if self._before_prefix_delete is not None and any(op[0] in ("del_to", "clear") for op in self._ops):
            self._before_prefix_delete()
        meta = self._encode_meta()
        while True:
            txn = self._env.begin(write=True)
            try:
                for op in self._ops:
                    self._apply(txn, op)
                txn.put(_META_KEY, meta, db=self._meta_db)
                started = time.perf_counter()
                txn.commit()
                elapsed = time.perf_counter() - started
                break
            except lmdb.MapFullError:
                txn.abort()
                self._grow_map()
            except BaseException:
                txn.abort()
                raise
        self._ops = []
        self._meta_dirty = False
        self.flushes_total += 1
        self.last_fsync_seconds = elapsed
        self.fsync_seconds_total += elapsed
        if self._on_fsync_seconds is not None:
            self._on_fsync_seconds(elapsed)
        if self._crash_image_dir is not None:
            self._write_crash_image(self._crash_image_dir)
        if self._fault == ("kill_after_flush", self.flushes_total):
            os.kill(os.getpid(), signal.SIGKILL)

    def _apply(self, txn: lmdb.Transaction, op: tuple) -> None:
        kind = op[0]
        if kind == "put":
            _, idx, term, command = op
            value = _VALUE_HEAD.pack(term, _entry_crc(idx, term, command)) + command
            txn.put(_KEY.pack(idx), value, db=self._log_db)
        elif kind == "del_from":  # every index >= op[1]
            cursor = txn.cursor(db=self._log_db)
            start = _KEY.pack(op[1])
            while cursor.set_range(start):
                cursor.delete()
        elif kind == "del_to":  # every index <= op[1]
            cursor = txn.cursor(db=self._log_db)
            end = _KEY.pack(op[1])
            while cursor.first() and cursor.key() <= end:
                cursor.delete()
        else:
            invariant(kind == "clear", f"unknown op {kind!r}")
            txn.drop(self._log_db, delete=False)

    def _grow_map(self) -> None:
        current = self._env.info()["map_size"]
        if current >= self._map_size_bytes_max:
            raise WalFull(self._map_size_bytes_max)
        self._env.set_mapsize(min(current * 2, self._map_size_bytes_max))

    def _write_crash_image(self, image_dir: str) -> None:
        # env.copy reads one consistent snapshot; a file rename is atomic, a directory one is not.
        os.makedirs(image_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".image-", dir=image_dir)
        try:
            self._env.copy(tmp)
            os.replace(os.path.join(tmp, "data.mdb"), os.path.join(image_dir, "data.mdb"))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @property
    def map_size_bytes(self) -> int:
        return self._env.info()["map_size"]

    def close(self, *, flush: bool = True) -> None:
        """Close the environment. flush=False drops queued ops, as a process crash would."""
        if flush and (self._ops or self._meta_dirty):
            self._commit()
        self._env.close()

    # --- pysyncobj Journal: the log ---------------------------------------------------------------
    def add(self, command: bytes, idx: int, term: int) -> None:
        invariant(isinstance(command, (bytes, bytearray, memoryview)), "command must be bytes-like")
        if self._entries:
            _, last_idx, last_term = self._entries[-1]
            invariant(idx == last_idx + 1, f"add idx {idx} after {last_idx}: log must stay contiguous")
            invariant(term >= last_term, f"add term {term} after {last_term}: terms never decrease")
        command = bytes(command)
        self._entries.append((command, idx, term))
        self.bytes_total += len(command)
        self._ops.append(("put", idx, term, command))

    def clear(self) -> None:
        self._entries = []
        self.bytes_total = 0
        self._ops = [("clear",)]  # supersedes everything queued before it

    def deleteEntriesFrom(self, entryFrom: int) -> None:  # noqa: N802 (pysyncobj's name)
        invariant(entryFrom >= 0, f"deleteEntriesFrom({entryFrom}): negative position")
        if entryFrom >= len(self._entries):
            return
        first_idx = self._entries[entryFrom][1]
        self.bytes_total -= sum(len(e[0]) for e in self._entries[entryFrom:])
        del self._entries[entryFrom:]
        self._ops.append(("del_from", first_idx))

    def deleteEntriesTo(self, entryTo: int) -> None:  # noqa: N802
        """Drop positions [0, entryTo): log compaction after a snapshot."""
        invariant(entryTo >= 0, f"deleteEntriesTo({entryTo}): negative position")
        entryTo = min(entryTo, len(self._entries))
        if entryTo == 0:
            return
        last_idx = self._entries[entryTo - 1][1]
        self.bytes_total -= sum(len(e[0]) for e in self._entries[:entryTo])
        del self._entries[:entryTo]
        self._ops.append(("del_to", last_idx))

    def __getitem__(self, item: int | slice) -> Entry | list[Entry]:
        return self._entries[item]

    def __len__(self) -> int:
        return len(self._entries)

    def _destroy(self) -> None:
        self.close(flush=True)

    # --- pysyncobj Journal: persistent raft state -------------------------------------------------
    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:  # noqa: N802
        if raftCommitIndex != self._raft_commit_index:
            self._raft_commit_index = raftCommitIndex
            self._meta_dirty = True

    def getRaftCommitIndex(self) -> int:  # noqa: N802
        return self._raft_commit_index

    def setCurrentTerm(self, term: int, votedForNodeId: str | None) -> None:  # noqa: N802
        invariant(votedForNodeId is None or isinstance(votedForNodeId, str), "node ids are strings")
        self._current_term = term
        self._voted_for_node_id = votedForNodeId
        self._commit()

    def getCurrentTerm(self) -> int:  # noqa: N802
        return self._current_term

    def getVotedForNodeId(self) -> str | None:  # noqa: N802
        return self._voted_for_node_id

    def onOneSecondTimer(self) -> None:  # noqa: N802
        if self._ops or self._meta_dirty:
            self._commit()
