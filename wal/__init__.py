"""Durable write-ahead log: an LMDB Raft journal with group commit, and checksummed snapshots.

Does not import pysyncobj: `LmdbJournal` duck-types its `Journal` interface.
"""

from wal.errors import InvariantViolation, SnapshotCorrupt, WalCorruption, WalError, WalFull, invariant
from wal.journal import LmdbJournal
from wal.snapshot import fsync_dir, read_snapshot, write_snapshot

__all__ = [
    "InvariantViolation", "LmdbJournal", "SnapshotCorrupt", "WalCorruption", "WalError", "WalFull",
    "fsync_dir", "invariant", "read_snapshot", "write_snapshot",
]
