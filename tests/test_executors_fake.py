"""The scripted in-memory FakeExecutor that the runtime's unit tests use."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from executors.base import (
    ExecutorAdapter,
    ExecutorBusy,
    ExecutorTask,
    LocalContext,
    PermanentTaskError,
    RetryableTaskError,
    TaskCancelled,
    UnsupportedTaskType,
)
from executors.fake import SCRIPT_OUTCOMES_MAX, Echo, FakeExecutor, Hang, Permanent, Retryable, Succeed


def task(task_id: str = "t-1", attempt: int = 1, type_: str = "echo", input_: Any = None) -> ExecutorTask:
    return ExecutorTask(task_id=task_id, attempt=attempt, type=type_, input=input_, metadata={})


def test_fake_satisfies_the_protocol() -> None:
    assert isinstance(FakeExecutor(), ExecutorAdapter)
    caps = FakeExecutor(["echo", "work"]).get_capabilities()
    assert caps.supported_task_types == ["echo", "work"]


async def test_default_outcome_echoes_and_every_call_is_recorded() -> None:
    fake = FakeExecutor()
    assert (await fake.execute(task("a", 1, input_={"x": 1}), LocalContext())).output == {"x": 1}
    assert (await fake.execute(task("a", 2, input_=[2]), LocalContext())).output == [2]
    assert [(c.task_id, c.attempt) for c in fake.calls] == [("a", 1), ("a", 2)]
    assert fake.attempts_of("a") == [1, 2] and fake.calls_total == 2
    assert all(isinstance(c.outcome, Echo) for c in fake.calls)


async def test_type_script_plays_in_order_then_falls_back_to_default() -> None:
    fake = FakeExecutor(["work"])
    fake.script_type("work", Retryable("flaky"), Permanent("broken"), Succeed({"ok": True}, {"duration_s": 2.0}))
    with pytest.raises(RetryableTaskError, match="flaky"):
        await fake.execute(task(type_="work"), LocalContext())
    with pytest.raises(PermanentTaskError, match="broken"):
        await fake.execute(task(attempt=2, type_="work"), LocalContext())
    result = await fake.execute(task(attempt=3, type_="work"), LocalContext())
    assert result.output == {"ok": True} and result.metrics == {"duration_s": 2.0}
    assert fake.pending_outcomes(task_type="work") == 0
    assert (await fake.execute(task(attempt=4, type_="work", input_=7), LocalContext())).output == 7
    status = await fake.get_status()
    assert (status["tasks_failed_total"], status["tasks_succeeded_total"]) == (2, 2)


async def test_task_script_wins_over_type_script() -> None:
    fake = FakeExecutor().script_type("echo", Succeed("by type")).script_task("special", Succeed("by id"))
    assert (await fake.execute(task("special"), LocalContext())).output == "by id"
    assert (await fake.execute(task("other"), LocalContext())).output == "by type"
    assert fake.pending_outcomes(task_id="special") == 0


async def test_no_default_means_unscripted_calls_fail_permanently() -> None:
    fake = FakeExecutor(default=None)
    with pytest.raises(PermanentTaskError, match="no scripted outcome for task 't-1'"):
        await fake.execute(task(), LocalContext())
    assert fake.calls[0].outcome is None


async def test_hang_until_adapter_cancel() -> None:
    fake = FakeExecutor().script_task("h", Hang())
    running = asyncio.create_task(fake.execute(task("h", 3), LocalContext()))
    await fake.wait_started("h", 3, timeout_s=1)
    assert (await fake.get_status())["running"] == [{"task_id": "h", "attempt": 3}]
    asked = time.monotonic()
    await fake.cancel("h")
    with pytest.raises(TaskCancelled):
        await running
    assert time.monotonic() - asked < 0.1
    assert fake.cancel_calls == ["h"]
    assert (await fake.get_status())["running_total"] == 0


async def test_hang_until_context_cancel_or_asyncio_cancel() -> None:
    fake = FakeExecutor().script_type("echo", Hang(), Hang())
    ctx = LocalContext()
    first = asyncio.create_task(fake.execute(task("a"), ctx))
    await fake.wait_started("a")
    ctx.cancel()
    with pytest.raises(TaskCancelled):
        await first
    second = asyncio.create_task(fake.execute(task("b"), LocalContext()))
    await fake.wait_started("b")
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    status = await fake.get_status()
    assert status["tasks_cancelled_total"] == 2 and status["running_total"] == 0


async def test_delay_and_progress_are_played() -> None:
    fake = FakeExecutor().script_task("d", Succeed("late", delay_ms=50, progress=(0.25, 0.5)))
    ctx = LocalContext()
    started = time.monotonic()
    assert (await fake.execute(task("d"), ctx)).output == "late"
    assert time.monotonic() - started >= 0.05
    assert [r.fraction for r in ctx.reports] == [0.25, 0.5]


async def test_a_delay_is_cancellable() -> None:
    fake = FakeExecutor().script_task("d", Succeed("never", delay_ms=60_000))
    running = asyncio.create_task(fake.execute(task("d"), LocalContext()))
    await fake.wait_started("d")
    await fake.cancel("d")
    with pytest.raises(TaskCancelled):
        await running


async def test_bounds_and_bad_scripts_are_clear_errors() -> None:
    fake = FakeExecutor(["echo"], running_tasks_max=1)
    with pytest.raises(UnsupportedTaskType, match="type: 'work' is not one of"):
        await fake.execute(task(type_="work"), LocalContext())
    with pytest.raises(ValueError, match="script_type: 'work' is not one of task_types"):
        fake.script_type("work", Echo())
    with pytest.raises(TypeError, match="script_task: 'oops' is not an outcome"):
        fake.script_task("t", "oops")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"at most {SCRIPT_OUTCOMES_MAX} outcomes"):
        fake.script_task("t", *[Echo()] * (SCRIPT_OUTCOMES_MAX + 1))
    with pytest.raises(ValueError, match="Succeed.delay_ms: an int >= 0"):
        Succeed(delay_ms=-1)
    with pytest.raises(ValueError, match=r"Hang.progress: fractions in 0.0..1.0"):
        Hang(progress=(2.0,))
    with pytest.raises(ValueError, match="running_tasks_max: an int >= 1"):
        FakeExecutor(running_tasks_max=0)
    fake.script_task("h", Hang())
    hanging = asyncio.create_task(fake.execute(task("h"), LocalContext()))
    await fake.wait_started("h")
    with pytest.raises(ExecutorBusy, match="at most 1 at once"):
        await fake.execute(task("other"), LocalContext())
    await fake.cancel("h")
    with pytest.raises(TaskCancelled):
        await hanging


async def test_call_record_is_bounded() -> None:
    fake = FakeExecutor(calls_recorded_max=3)
    for attempt in range(1, 6):
        await fake.execute(task("a", attempt), LocalContext())
    assert fake.attempts_of("a") == [3, 4, 5] and fake.calls_total == 5


async def test_wait_started_times_out() -> None:
    with pytest.raises(TimeoutError):
        await FakeExecutor().wait_started("never", timeout_s=0.01)
