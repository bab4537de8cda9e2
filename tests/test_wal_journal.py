"""LmdbJournal: model-based crash/reopen, checksums, commit ordering, map growth, fault injection."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap

import lmdb
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from wal import InvariantViolation, LmdbJournal, WalCorruption, WalError, WalFull

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_MAP_SIZE_BYTES = 1 << 20  # keeps hypothesis' hundreds of environments small


def fill(journal: LmdbJournal, first_idx: int, count: int, term: int = 1) -> None:
    for idx in range(first_idx, first_idx + count):
        journal.add(b"cmd-%d" % idx, idx, term)


# --- model-based test ----------------------------------------------------------------------------
class JournalMachine(RuleBasedStateMachine):
    """The journal must equal a plain list; after a crash, the list as of the last commit."""

    @initialize()
    def open_journal(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="wal-model-")
        self.journal = LmdbJournal(self.dir, map_size_bytes=SMALL_MAP_SIZE_BYTES)
        self.model: list[tuple[bytes, int, int]] = []
        self.durable: list[tuple[bytes, int, int]] = []
        self.pending = False  # ops queued since the last commit
        self.term, self.voted = 0, None
        self.commit_index = self.durable_commit_index = 1
        self.flushes_total = 0

    def teardown(self) -> None:
        if hasattr(self, "journal"):
            self.journal.close(flush=False)
            shutil.rmtree(self.dir, ignore_errors=True)

    def _committed(self) -> None:
        self.durable = list(self.model)
        self.durable_commit_index = self.commit_index
        self.pending = False
        self.flushes_total += 1

    @rule(commands=st.lists(st.binary(max_size=40), min_size=1, max_size=5),
          start_idx=st.integers(1, 1000), term_bump=st.integers(0, 1))
    def add(self, commands, start_idx, term_bump):
        idx, term = (self.model[-1][1] + 1, self.model[-1][2] + term_bump) if self.model else (start_idx, 1)
        for command in commands:
            self.journal.add(command, idx, term)
            self.model.append((command, idx, term))
            idx += 1
        self.pending = True

    @rule(data=st.data())
    def delete_entries_from(self, data):
        pos = data.draw(st.integers(0, len(self.model) + 2))
        self.journal.deleteEntriesFrom(pos)
        if pos < len(self.model):
            del self.model[pos:]
            self.pending = True

    @rule(data=st.data())
    def delete_entries_to(self, data):
        pos = data.draw(st.integers(0, len(self.model) + 2))
        self.journal.deleteEntriesTo(pos)
        if pos > 0 and self.model:
            del self.model[:pos]
            self.pending = True

    @rule()
    def clear(self):
        self.journal.clear()
        self.model = []
        self.pending = True

    @rule(commit_index=st.integers(1, 10_000))
    def set_commit_index(self, commit_index):
        self.journal.setRaftCommitIndex(commit_index)
        self.commit_index = commit_index

    @rule(term=st.integers(0, 100), voted=st.sampled_from([None, "127.0.0.1:4321", "node-b:7"]))
    def set_current_term(self, term, voted):
        self.journal.setCurrentTerm(term, voted)  # durable at once, taking queued ops along
        self.term, self.voted = term, voted
        self._committed()

    @rule()
    def flush(self):
        self.journal.flush()
        if self.pending:
            self._committed()

    @rule()
    def one_second_timer(self):
        self.journal.onOneSecondTimer()
        if self.pending or self.commit_index != self.durable_commit_index:
            self._committed()

    @rule()
    def crash_and_reopen(self):
        self.journal.close(flush=False)
        self.journal = LmdbJournal(self.dir, map_size_bytes=SMALL_MAP_SIZE_BYTES)
        self.model = list(self.durable)
        self.commit_index = self.durable_commit_index
        self.pending = False
        self.flushes_total = 0

    @rule()
    def close_and_reopen(self):
        self.journal.close()
        if self.pending or self.commit_index != self.durable_commit_index:
            self._committed()
        self.crash_and_reopen()

    @invariant()
    def matches_model(self):
        j = self.journal
        assert len(j) == len(self.model)
        assert j[:] == self.model
        if self.model:
            assert j[0] == self.model[0] and j[-1] == self.model[-1]
            assert j[1:3] == self.model[1:3] and j[-2:] == self.model[-2:]
        assert j.bytes_total == sum(len(c) for c, _, _ in self.model)
        assert (j.getCurrentTerm(), j.getVotedForNodeId()) == (self.term, self.voted)
        assert j.getRaftCommitIndex() == self.commit_index
        assert j.flushes_total == self.flushes_total


TestJournalModel = JournalMachine.TestCase
TestJournalModel.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)


# --- checksums and contiguity on open ------------------------------------------------------------
def _raw_log(path: str):
    env = lmdb.open(path, max_dbs=2, subdir=True)
    return env, env.open_db(b"log")


def _written(tmp_path, count: int = 5) -> str:
    path = str(tmp_path / "j")
    j = LmdbJournal(path, map_size_bytes=SMALL_MAP_SIZE_BYTES)
    fill(j, 1, count)
    j.setCurrentTerm(3, "n1")
    j.close()
    return path


@pytest.mark.parametrize("offset", [0, 7, 8, 11, 12, -1], ids=["term-hi", "term-lo", "crc-hi", "crc-lo",
                                                                "cmd-first", "cmd-last"])
def test_flipped_byte_names_the_index(tmp_path, offset):
    path = _written(tmp_path)
    env, log = _raw_log(path)
    with env.begin(write=True) as txn:
        key = (3).to_bytes(8, "big")
        value = bytearray(txn.get(key, db=log))
        value[offset] ^= 0x40
        txn.put(key, bytes(value), db=log)
    env.close()
    with pytest.raises(WalCorruption) as err:
        LmdbJournal(path)
    assert err.value.index == 3 and "crc" in err.value.reason


def test_value_moved_to_another_key_is_caught(tmp_path):
    path = _written(tmp_path)
    env, log = _raw_log(path)
    with env.begin(write=True) as txn:
        txn.put((4).to_bytes(8, "big"), txn.get((2).to_bytes(8, "big"), db=log), db=log)
    env.close()
    with pytest.raises(WalCorruption) as err:
        LmdbJournal(path)
    assert err.value.index == 4


def test_missing_index_in_the_middle(tmp_path):
    path = _written(tmp_path)
    env, log = _raw_log(path)
    with env.begin(write=True) as txn:
        txn.delete((3).to_bytes(8, "big"), db=log)
    env.close()
    with pytest.raises(WalCorruption) as err:
        LmdbJournal(path)
    assert err.value.index == 3 and "missing" in err.value.reason


def test_corrupt_metadata(tmp_path):
    path = _written(tmp_path)
    env = lmdb.open(path, max_dbs=2, subdir=True)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.put(b"meta", txn.get(b"meta", db=meta).replace(b'"n1"', b'"n2"'), db=meta)
    env.close()
    with pytest.raises(WalCorruption) as err:
        LmdbJournal(path)
    assert err.value.index is None


def test_contract_violations_are_invariants(tmp_path):
    j = LmdbJournal(str(tmp_path / "j"), map_size_bytes=SMALL_MAP_SIZE_BYTES)
    try:
        fill(j, 1, 2, term=2)
        with pytest.raises(InvariantViolation):
            j.add(b"gap", 4, 2)
        with pytest.raises(InvariantViolation):
            j.add(b"older term", 3, 1)
        with pytest.raises(InvariantViolation):
            j.deleteEntriesFrom(-1)
    finally:
        j.close(flush=False)


# --- commit ordering ------------------------------------------------------------------------------
class SpyEnv:
    """Wraps an lmdb.Environment, recording write txns begun and committed."""

    def __init__(self, env, events):
        self._env, self._events = env, events

    def __getattr__(self, name):
        return getattr(self._env, name)

    def begin(self, write=False, **kw):
        txn = self._env.begin(write=write, **kw)
        if not write:
            return txn
        self._events.append("begin")
        events = self._events

        class SpyTxn:
            def __getattr__(self, name):
                return getattr(txn, name)

            def commit(self):
                txn.commit()
                events.append("commit")

        return SpyTxn()


def test_prefix_delete_hook_runs_before_the_commit(tmp_path, monkeypatch):
    events: list[str] = []
    disk_at_hook: list[int] = []
    j = LmdbJournal(str(tmp_path / "j"), map_size_bytes=SMALL_MAP_SIZE_BYTES,
                    before_prefix_delete=lambda: (events.append("hook"), disk_at_hook.append(first_on_disk())))

    def first_on_disk() -> int | None:
        with j._env.begin() as txn:
            cursor = txn.cursor(db=j._log_db)
            return int.from_bytes(cursor.key(), "big") if cursor.first() else None

    monkeypatch.setattr(j, "_env", SpyEnv(j._env, events))
    fill(j, 1, 10)
    j.flush()
    assert events == ["begin", "commit"]  # adds alone never call the hook

    events.clear()
    j.deleteEntriesTo(4)
    j.add(b"x", 11, 1)
    j.flush()
    assert events == ["hook", "begin", "commit"]
    assert disk_at_hook == [1]  # the prefix was still on disk when the hook ran
    assert first_on_disk() == 5

    events.clear()
    j.clear()  # installing a leader's snapshot drops the prefix too
    fill(j, 50, 2)
    j.flush()
    assert events == ["hook", "begin", "commit"]
    j.close()


def test_failing_hook_leaves_disk_untouched_and_ops_queued(tmp_path):
    calls = []

    def hook():
        calls.append(1)
        if len(calls) == 1:
            raise OSError("snapshot fsync failed")

    path = str(tmp_path / "j")
    j = LmdbJournal(path, map_size_bytes=SMALL_MAP_SIZE_BYTES, before_prefix_delete=hook)
    fill(j, 1, 5)
    j.flush()
    j.deleteEntriesTo(3)
    with pytest.raises(OSError):
        j.flush()
    assert j.flushes_total == 1
    j.flush()  # retried: the hook runs again, then the delete commits
    assert len(calls) == 2 and j.flushes_total == 2
    j.close(flush=False)
    assert [e[1] for e in LmdbJournal(path)[:]] == [4, 5]


def test_empty_flush_does_no_txn(tmp_path, monkeypatch):
    events: list[str] = []
    j = LmdbJournal(str(tmp_path / "j"), map_size_bytes=SMALL_MAP_SIZE_BYTES)
    monkeypatch.setattr(j, "_env", SpyEnv(j._env, events))
    j.flush()
    j.deleteEntriesFrom(0)  # nothing to delete: nothing queued
    j.deleteEntriesTo(0)
    j.setRaftCommitIndex(7)  # only a hint: waits for the next real commit or the timer
    j.flush()
    assert events == [] and j.flushes_total == 0
    j.onOneSecondTimer()
    assert events == ["begin", "commit"] and j.flushes_total == 1
    j.onOneSecondTimer()
    assert events == ["begin", "commit"]
    j.close()


def test_counters(tmp_path):
    j = LmdbJournal(str(tmp_path / "j"), map_size_bytes=SMALL_MAP_SIZE_BYTES)
    j.add(b"abc", 1, 1)
    j.add(b"defgh", 2, 1)
    assert j.bytes_total == 8
    j.flush()
    assert j.flushes_total == 1 and j.last_fsync_seconds > 0
    assert j.fsync_seconds_total == j.last_fsync_seconds
    j.deleteEntriesTo(1)
    assert j.bytes_total == 5
    j.close()


# --- map size -------------------------------------------------------------------------------------
def test_map_grows_and_is_bounded(tmp_path):
    path = str(tmp_path / "j")
    j = LmdbJournal(path, map_size_bytes=64 << 10, map_size_bytes_max=8 << 20)
    fill_bytes = b"x" * 1000
    for idx in range(1, 1001):
        j.add(fill_bytes, idx, 1)
    j.flush()
    assert j.map_size_bytes > 64 << 10
    j.close()
    j = LmdbJournal(path, map_size_bytes=64 << 10, map_size_bytes_max=8 << 20)
    assert len(j) == 1000
    for idx in range(1001, 20001):
        j.add(fill_bytes, idx, 1)
    with pytest.raises(WalFull):
        j.flush()
    j.close(flush=False)
    assert len(LmdbJournal(path, map_size_bytes=64 << 10)) == 1000


# --- fault injection in a child process -----------------------------------------------------------
CHILD = textwrap.dedent("""
    import sys
    from wal import LmdbJournal
    j = LmdbJournal(sys.argv[1], map_size_bytes=1 << 20)
    for flush in range(5):
        for k in range(2):
            idx = flush * 2 + k + 1
            j.add(b"cmd-%d" % idx, idx, 1)
        j.flush()
    j.close()
""")


def run_child(path: str, fault: str, image_dir: str | None = None) -> int:
    env = dict(os.environ, COORD_WAL_FAULT=fault, PYTHONPATH=REPO_ROOT)
    if image_dir:
        env["COORD_WAL_CRASH_IMAGE_DIR"] = image_dir
    return subprocess.run([sys.executable, "-c", CHILD, path], env=env, timeout=30).returncode


@pytest.mark.parametrize("fault, indexes_durable", [("kill_before_flush:3", 4), ("kill_after_flush:3", 6)])
def test_kill_at_flush(tmp_path, fault, indexes_durable):
    path, image_dir = str(tmp_path / "j"), str(tmp_path / "image")
    assert run_child(path, fault, image_dir) == -signal.SIGKILL
    expected = [(b"cmd-%d" % i, i, 1) for i in range(1, indexes_durable + 1)]
    j = LmdbJournal(path)
    assert j[:] == expected
    j.close()
    image = LmdbJournal(image_dir)  # what a power loss at the kill would have left
    assert image[:] == expected
    image.close()


def test_bad_fault_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("COORD_WAL_FAULT", "kill_sometime:x")
    with pytest.raises(WalError):
        LmdbJournal(str(tmp_path / "j"))
