"""Snapshot files: round trip, every truncation and every flipped byte rejected, fsync of file and dir."""

from __future__ import annotations

import os
import stat

import pytest

from wal import SnapshotCorrupt, WalError, read_snapshot, write_snapshot

HEADER = {"last_index": 42, "last_term": 3, "codec": "msgpack"}
CHUNKS = [b"alpha", b"", b"\x00\xff" * 20, b"omega\n"]


def test_round_trip(tmp_path):
    path = str(tmp_path / "snap")
    size_bytes = write_snapshot(path, HEADER, iter(CHUNKS))
    assert size_bytes == os.path.getsize(path)
    assert read_snapshot(path) == (HEADER, CHUNKS)
    assert not os.path.exists(path + ".tmp")


def test_round_trip_no_chunks_and_overwrite(tmp_path):
    path = str(tmp_path / "snap")
    write_snapshot(path, HEADER, CHUNKS)
    write_snapshot(path, {}, [])
    assert read_snapshot(path) == ({}, [])


def test_every_truncation_is_rejected(tmp_path):
    path = str(tmp_path / "snap")
    write_snapshot(path, HEADER, CHUNKS)
    data = open(path, "rb").read()
    cut = str(tmp_path / "cut")
    for length in range(len(data)):
        with open(cut, "wb") as f:
            f.write(data[:length])
        with pytest.raises(SnapshotCorrupt) as err:
            read_snapshot(cut)
        assert err.value.path == cut and err.value.reason


def test_every_flipped_byte_is_rejected(tmp_path):
    path = str(tmp_path / "snap")
    write_snapshot(path, HEADER, CHUNKS)
    data = open(path, "rb").read()
    bad = str(tmp_path / "bad")
    for pos in range(len(data)):
        for mask in (0x01, 0x80):
            mangled = bytearray(data)
            mangled[pos] ^= mask
            with open(bad, "wb") as f:
                f.write(mangled)
            with pytest.raises(SnapshotCorrupt):
                read_snapshot(bad)


def test_trailing_garbage_is_rejected(tmp_path):
    path = str(tmp_path / "snap")
    write_snapshot(path, HEADER, CHUNKS)
    with open(path, "ab") as f:
        f.write(b"x")
    with pytest.raises(SnapshotCorrupt, match="trailing"):
        read_snapshot(path)


def test_bounds(tmp_path):
    path = str(tmp_path / "snap")
    with pytest.raises(WalError, match="snapshot_record_bytes_max"):
        write_snapshot(path, HEADER, [b"ok", b"x" * 100], snapshot_record_bytes_max=99)
    assert not os.path.exists(path) and not os.path.exists(path + ".tmp")
    with pytest.raises(WalError, match="header_bytes_max"):
        write_snapshot(path, {"pad": "x" * 100}, [], header_bytes_max=64)

    write_snapshot(path, HEADER, [b"x" * 100])
    with pytest.raises(SnapshotCorrupt, match="snapshot_record_bytes_max"):
        read_snapshot(path, snapshot_record_bytes_max=99)
    with pytest.raises(SnapshotCorrupt, match="header_bytes_max"):
        read_snapshot(path, header_bytes_max=8)


def test_file_then_directory_are_fsynced(tmp_path, monkeypatch):
    path = str(tmp_path / "snap")
    synced: list[tuple[str, bool]] = []  # (kind, did path exist yet)
    real_fsync = os.fsync

    def spy(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        synced.append((kind, os.path.exists(path)))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    write_snapshot(path, HEADER, CHUNKS)
    # the data reaches disk before the rename makes it visible; the rename before we return
    assert synced == [("file", False), ("dir", True)]
