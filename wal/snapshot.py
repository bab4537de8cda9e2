"""Checksummed snapshot files, written atomically and durably.

Layout (all integers big-endian):
    b"COORDSNAP1\\n"                       magic line
    <json header>\\n                       one line, at most header_bytes_max bytes
    b"R" >I length <length bytes>        one record per chunk, at most snapshot_record_bytes_max
    b"E" >Q record_count <sha256>        sha256 over every byte before it (magic .. record_count)
    b"\\nCOORDSNAP1-END\\n"                end magic

`write_snapshot` streams to PATH.tmp, fsyncs it, renames it over PATH and fsyncs the directory, so
PATH is either the old snapshot or the complete new one, also after power loss. `read_snapshot`
checks structure, bounds and the sha256 before returning anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import BinaryIO, Iterable

from wal.errors import SnapshotCorrupt, WalError, invariant

MAGIC = b"COORDSNAP1\n"
END_MAGIC = b"\nCOORDSNAP1-END\n"
SNAPSHOT_RECORD_BYTES_MAX = 64 << 20
HEADER_BYTES_MAX = 64 << 10

_RECORD_TAG = b"R"
_TRAILER_TAG = b"E"
_LEN = struct.Struct(">I")
_COUNT = struct.Struct(">Q")
_DIGEST_BYTES = hashlib.sha256().digest_size


def fsync_dir(path: str) -> None:
    """fsync a directory, making renames and creations inside it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_snapshot(
    path: str,
    header: dict,
    chunks: Iterable[bytes],
    *,
    snapshot_record_bytes_max: int = SNAPSHOT_RECORD_BYTES_MAX,
    header_bytes_max: int = HEADER_BYTES_MAX,
) -> int:
    """Write header + chunks to `path` atomically and durably; return the file size in bytes."""
    invariant(isinstance(header, dict), "header must be a dict")
    header_line = json.dumps(header, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    if len(header_line) > header_bytes_max:
        raise WalError(f"snapshot header of {len(header_line)} bytes exceeds header_bytes_max={header_bytes_max}")
    tmp = path + ".tmp"
    digest = hashlib.sha256()
    size_bytes = 0
    count = 0

    def put(f: BinaryIO, data: bytes, hashed: bool = True) -> None:
        nonlocal size_bytes
        f.write(data)
        if hashed:
            digest.update(data)
        size_bytes += len(data)

    try:
        with open(tmp, "wb") as f:
            put(f, MAGIC)
            put(f, header_line)
            for chunk in chunks:
                invariant(isinstance(chunk, (bytes, bytearray, memoryview)), "chunks must be bytes-like")
                if len(chunk) > snapshot_record_bytes_max:
                    raise WalError(f"snapshot record of {len(chunk)} bytes exceeds "
                                   f"snapshot_record_bytes_max={snapshot_record_bytes_max}")
                put(f, _RECORD_TAG + _LEN.pack(len(chunk)))
                put(f, bytes(chunk))
                count += 1
            put(f, _TRAILER_TAG + _COUNT.pack(count))
            put(f, digest.digest() + END_MAGIC, hashed=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return size_bytes


def read_snapshot(
    path: str,
    *,
    snapshot_record_bytes_max: int = SNAPSHOT_RECORD_BYTES_MAX,
    header_bytes_max: int = HEADER_BYTES_MAX,
) -> tuple[dict, list[bytes]]:
    """Return (header, records) of a verified snapshot; raise SnapshotCorrupt otherwise."""
    digest = hashlib.sha256()

    def corrupt(reason: str) -> SnapshotCorrupt:
        return SnapshotCorrupt(path, reason)

    with open(path, "rb") as f:

        def take(n: int, what: str, hashed: bool = True) -> bytes:
            data = f.read(n)
            if len(data) != n:
                raise corrupt(f"truncated in {what}")
            if hashed:
                digest.update(data)
            return data

        if take(len(MAGIC), "magic") != MAGIC:
            raise corrupt("bad magic")
        header_line = f.readline(header_bytes_max + 1)
        if not header_line.endswith(b"\n"):
            raise corrupt(f"header line truncated or over header_bytes_max={header_bytes_max}")
        digest.update(header_line)
        try:
            header = json.loads(header_line)
        except ValueError as exc:
            raise corrupt(f"header is not JSON: {exc}") from exc
        if not isinstance(header, dict):
            raise corrupt("header is not a JSON object")

        records: list[bytes] = []
        while True:
            tag = take(1, "record tag")
            if tag == _TRAILER_TAG:
                break
            if tag != _RECORD_TAG:
                raise corrupt(f"unknown record tag {tag!r} after {len(records)} records")
            (length,) = _LEN.unpack(take(_LEN.size, "record length"))
            if length > snapshot_record_bytes_max:
                raise corrupt(f"record of {length} bytes exceeds snapshot_record_bytes_max={snapshot_record_bytes_max}")
            records.append(take(length, f"record {len(records)}"))

        (count,) = _COUNT.unpack(take(_COUNT.size, "record count"))
        expected = digest.digest()
        if take(_DIGEST_BYTES, "sha256", hashed=False) != expected:
            raise corrupt("sha256 mismatch")
        if take(len(END_MAGIC), "end magic", hashed=False) != END_MAGIC:
            raise corrupt("bad end magic")
        if f.read(1):
            raise corrupt("trailing bytes after end magic")
    if count != len(records):  # covered by the sha256, so only a writer bug gets here
        raise corrupt(f"trailer says {count} records, found {len(records)}")
    return header, records
