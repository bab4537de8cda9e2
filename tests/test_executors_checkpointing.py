"""The executor side of checkpoints: `Checkpointer` over an in-memory sink, and the `steps`
task type resuming after its first attempt dies."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.checkpoints import CheckpointLimits, canonical_bytes, restore
from executors.algorithmic import AlgorithmicAdapter, AlgorithmicLimits
from executors.base import ExecutorTask, InvalidTaskInput, LocalContext
from executors.checkpointing import (
    CheckpointRejected,
    Checkpointer,
    CheckpointSettings,
    MemoryCheckpoints,
    ModelVersionMismatch,
)

WAIT_S = 5.0
PADDING = "x" * 500  # makes a small change's delta smaller than the whole document


def context(sink: MemoryCheckpoints, **settings) -> LocalContext:
    return LocalContext(checkpointer=Checkpointer(sink, task_id=sink.task_id, settings=CheckpointSettings(**settings)))


def steps_task(attempt: int, steps: int, step_ms: int = 0) -> ExecutorTask:
    return ExecutorTask(task_id="t1", attempt=attempt, type="steps", input={"steps": steps, "step_ms": step_ms},
                        metadata={})


async def until(predicate, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"not within {WAIT_S} s: {what}")
        await asyncio.sleep(0.005)


async def test_steps_resumes_after_the_last_checkpoint_and_skips_done_steps() -> None:
    sink = MemoryCheckpoints("t1")
    adapter = AlgorithmicAdapter()
    first = asyncio.create_task(adapter.execute(steps_task(1, 10, step_ms=20), context(sink)))
    await until(lambda: sink.last_sequence >= 4, "four steps checkpointed")
    first.cancel()                          # the executor dies mid-step: no goodbye
    await asyncio.gather(first, return_exceptions=True)
    saved = sink.last_sequence

    result = await adapter.execute(steps_task(2, 10), context(sink))
    output = result.output
    assert [s["step"] for s in output["steps"]] == list(range(1, 11))
    assert [s["attempt"] for s in output["steps"]] == [1] * saved + [2] * (10 - saved)
    assert output["resumed_from_sequence"] == saved and output["attempt"] == 2
    assert sink.last_sequence == 10         # one checkpoint per step, none repeated
    # a delta once the growing list of actions makes it smaller than the whole document
    assert sink.records[0].kind == "full" and "delta" in [r.kind for r in sink.records]


async def test_a_fresh_task_starts_at_step_one() -> None:
    result = await AlgorithmicAdapter().execute(steps_task(1, 3), context(MemoryCheckpoints("t1")))
    assert result.output == {"steps": [{"step": s, "attempt": 1} for s in (1, 2, 3)], "attempt": 1,
                             "resumed_from_sequence": 0}


def test_the_longest_steps_task_fits_one_checkpoint() -> None:
    steps, attempt = AlgorithmicLimits().steps_max, 100  # 100 = the coordinator's max_attempts_max
    document = {"state_snapshot": {"steps_done": steps, "steps": steps},
                "executed_actions": [{"id": f"step-{i}", "attempt": attempt} for i in range(1, steps + 1)],
                "remaining_plan": [{"from_step": steps, "to_step": steps}]}
    assert len(canonical_bytes(document)) < CheckpointLimits().checkpoint_bytes_max


async def test_steps_rejects_bad_input_naming_the_field() -> None:
    with pytest.raises(InvalidTaskInput, match=r"input.steps: must be in 1..5000 \(steps_max\)"):
        await AlgorithmicAdapter().execute(
            ExecutorTask(task_id="t", attempt=1, type="steps", input={"steps": 0}, metadata={}), LocalContext())


async def test_full_every_bounds_the_delta_chain() -> None:
    sink = MemoryCheckpoints("t1")
    ctx = context(sink, full_every=3)
    for i in range(10):
        await ctx.checkpoint({"i": i, "notes": PADDING}, action={"id": f"a{i}"})
    assert [r.kind for r in sink.records] == ["full", "delta", "delta", "delta"] * 2 + ["full", "delta"]


async def test_a_rejected_save_keeps_the_previous_checkpoint_and_the_next_save_carries_the_change() -> None:
    class Refusing(MemoryCheckpoints):
        refuse = False

        async def save(self, record):
            if self.refuse:
                raise CheckpointRejected("checkpoint.payload: at most checkpoint_bytes_max=262144 bytes, got 300000")
            await super().save(record)

    sink = Refusing("t1")
    ctx = context(sink)
    await ctx.checkpoint({"n": 1}, action="a1")
    sink.refuse = True
    with pytest.raises(CheckpointRejected, match="checkpoint_bytes_max"):
        await ctx.checkpoint({"n": 2}, action="a2")
    assert (await sink.load()).state == {"n": 1}
    sink.refuse = False
    assert await ctx.save_checkpoint() == 2
    restored = await sink.load()
    assert restored.state == {"n": 2} and [a["id"] for a in restored.executed_actions] == ["a1", "a2"]


async def test_after_a_fallback_restore_the_next_save_is_full() -> None:
    sink = MemoryCheckpoints("t1")
    ctx = context(sink)
    for i in range(4):
        await ctx.checkpoint({"i": i, "notes": PADDING}, action=f"a{i}")
    assert [r.kind for r in sink.records] == ["full", "delta", "delta", "delta"]
    # Corrupt delta 3: the restore stops at 2 and says why.
    sink.records[2] = dataclasses.replace(sink.records[2], checksum="0" * 64)
    again = context(sink)
    restored = await again.restore()
    assert (restored.sequence_number, restored.last_sequence) == (2, 4) and "checksum" in restored.problem
    assert again.executed("a1") and not again.executed("a2")
    await again.checkpoint({"i": 2, "notes": PADDING}, action="a2")
    assert (sink.records[-1].sequence_number, sink.records[-1].kind) == (5, "full")
    assert restore(sink.records).document["state_snapshot"] == {"i": 2, "notes": PADDING}


async def test_a_resume_on_other_model_versions_is_refused() -> None:
    sink = MemoryCheckpoints("t1")
    ctx = context(sink)
    await ctx.checkpoint({}, action="a1", model_versions={"llm": "glm-4.7@2026-10"})
    other = LocalContext(checkpointer=Checkpointer(sink, task_id="t1", model_versions={"llm": "glm-4.7@2026-11"}))
    with pytest.raises(ModelVersionMismatch, match="checkpointed on 'glm-4.7@2026-10'"):
        await other.restore()
    same = LocalContext(checkpointer=Checkpointer(sink, task_id="t1", model_versions={"llm": "glm-4.7@2026-10"}))
    assert (await same.restore()).model_versions == {"llm": "glm-4.7@2026-10"}


async def test_the_time_trigger_saves_unsaved_changes() -> None:
    sink = MemoryCheckpoints("t1")
    ctx = context(sink, on_action=False, interval_s=0.02)
    try:
        assert await ctx.checkpoint({"n": 1}, action="a1") is None   # not saved at once
        await until(lambda: sink.last_sequence == 1, "the timer saved it")
        await ctx.checkpoint({"n": 2})
        await until(lambda: sink.last_sequence == 2, "the timer saved the change")
    finally:
        await ctx.close()


async def test_an_action_recorded_twice_is_refused() -> None:
    ctx = context(MemoryCheckpoints("t1"))
    await ctx.checkpoint({}, action="a1")
    with pytest.raises(ValueError, match="already recorded"):
        await ctx.checkpoint({}, action={"id": "a1"})


_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=4),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                       max_leaves=8)


@settings(max_examples=60, deadline=None)
@given(states=st.lists(st.dictionaries(st.text(max_size=3), _values, max_size=4), min_size=1, max_size=25),
       full_every=st.integers(1, 6), restart_at=st.integers(0, 25))
def test_restore_equals_the_last_saved_state_across_restarts(states, full_every, restart_at) -> None:
    async def run() -> None:
        sink = MemoryCheckpoints("t1")
        ctx = context(sink, full_every=full_every)
        for i, state in enumerate(states):
            if i == restart_at:             # a new attempt continues the same chain
                ctx = context(sink, full_every=full_every)
                await ctx.restore()
            await ctx.checkpoint(state, action=f"a{i}", remaining_plan=[{"left": len(states) - i - 1}])
        restored = await sink.load()
        assert restored.state == states[-1] and restored.sequence_number == len(states)
        assert [a["id"] for a in restored.executed_actions] == [f"a{i}" for i in range(len(states))]
        assert restored.problem is None

    asyncio.run(run())


async def test_an_executor_that_cannot_resume_starts_over_but_keeps_the_numbering() -> None:
    sink = MemoryCheckpoints("t1")
    first = context(sink)
    for i in range(3):
        await first.checkpoint({"i": i}, action=f"a{i}")
    fresh = LocalContext(checkpointer=Checkpointer(sink, task_id="t1", resume=False))
    assert await fresh.restore() is None and not fresh.executed("a0")
    await fresh.checkpoint({"i": 0}, action="a0")                    # redone from scratch
    assert (sink.records[-1].sequence_number, sink.records[-1].kind) == (4, "full")
    assert [a["id"] for a in (await sink.load()).executed_actions] == ["a0"]
