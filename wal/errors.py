"""Errors raised by the write-ahead log.

    WalError                      anything the WAL cannot do
    ├── WalCorruption(index, reason)   journal on disk fails a check (crc, gap, bad metadata)
    ├── WalFull(map_size_bytes_max)    journal would outgrow its configured bound
    └── SnapshotCorrupt(path, reason)  snapshot file truncated, mangled or of the wrong format

Programmer errors (a caller breaking the Journal contract) are `InvariantViolation`, which is
deliberately *not* a WalError: nothing should catch it and carry on.
"""

from __future__ import annotations


class WalError(Exception):
    """Base class of every error the WAL raises on purpose."""


class WalCorruption(WalError):
    """The journal on disk is not what was written. `index` is the raft index, or None for metadata."""

    def __init__(self, index: int | None, reason: str) -> None:
        self.index = index
        self.reason = reason
        where = "metadata" if index is None else f"raft index {index}"
        super().__init__(f"WAL corrupt at {where}: {reason}")


class WalFull(WalError):
    """Growing the LMDB map would exceed `map_size_bytes_max`."""

    def __init__(self, map_size_bytes_max: int) -> None:
        self.map_size_bytes_max = map_size_bytes_max
        super().__init__(f"WAL needs more than map_size_bytes_max={map_size_bytes_max}; "
                         "compact the log (snapshot) or raise the bound")


class SnapshotCorrupt(WalError):
    """A snapshot file failed verification; nothing from it was returned."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"snapshot {path!r} is corrupt: {reason}")


class InvariantViolation(AssertionError):
    """Internal consistency broken: a bug, not an operating condition."""


def invariant(cond: object, msg: str) -> None:
    """`assert` that survives `python -O`."""
    if not cond:
        raise InvariantViolation(msg)
