"""Replays recorded command logs through today's FSM (Temporal's Replayer): a change that breaks
determinism or the ability to apply old logs fails here before a rolling upgrade would."""

from __future__ import annotations

import json
import pathlib

import pytest

from coordinator.fsm import FSM_STATE_VERSION, CoordinatorFSM

RECORDINGS = sorted(pathlib.Path(__file__).with_name("replay").glob("*.jsonl"))


@pytest.mark.parametrize("path", RECORDINGS, ids=[p.name for p in RECORDINGS])
def test_recorded_log_reaches_recorded_state(path: pathlib.Path) -> None:
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    fsm = CoordinatorFSM()
    for line in lines[1:]:
        item = json.loads(line)
        fsm.apply_entry(item["index"], item["entry"].encode())
    assert len(fsm.tasks) == header["tasks"]
    assert fsm.semantic_digest() == header["semantic_digest"]
    if header["fsm_state_version"] == FSM_STATE_VERSION:
        # same encoding version: byte-for-byte the same state
        assert fsm.state_hash() == header["state_hash"]


def test_there_is_a_recording() -> None:
    assert RECORDINGS
