"""Capability profiling measures what the scheduler uses, from real runs of an adapter."""

from __future__ import annotations

import pytest

from executors.algorithmic import AlgorithmicAdapter
from executors.fake import FakeExecutor, Permanent, Succeed
from executors.profiling import PROFILE_FORMAT, ProfileSettings, profile_adapter


async def test_the_algorithmic_executor_profiles_every_type_it_offers_inputs_for() -> None:
    profile = await profile_adapter(AlgorithmicAdapter(), settings=ProfileSettings(repeats=2, concurrency=2))
    assert profile["format"] == PROFILE_FORMAT and profile["not_profiled"] == ["fanout"]
    assert set(profile["task_types"]) == {"echo", "sleep", "fail", "code_analysis", "steps"}
    sleep = profile["task_types"]["sleep"]
    assert sleep["success_rate"] == 1.0 and sleep["latency_s_p50"] >= 0.005   # it really slept 5 ms
    assert sleep["latency_s_p95"] >= sleep["latency_s_p50"] and sleep["throughput_per_s"] > 0
    assert profile["cost_per_task"] == 0.0 and profile["latency_s_p50"] > 0


async def test_failures_count_against_the_success_rate_and_costs_come_from_results() -> None:
    fake = FakeExecutor(task_types=["ok", "bad"])
    runs = 1 + 3 + 2                      # a warm-up, the repeats, then 2 x concurrency for throughput
    fake.script_type("ok", *[Succeed({"x": 1}, metrics={"cost_usd": 0.002})] * runs)
    fake.script_type("bad", *[Permanent("no")] * runs)
    profile = await profile_adapter(fake, settings=ProfileSettings(repeats=3, concurrency=1),
                                    inputs={"ok": [{}], "bad": [{}]})
    assert profile["task_types"]["ok"]["cost_per_task"] == pytest.approx(0.002)
    assert profile["task_types"]["bad"]["success_rate"] == 0.0 and profile["task_types"]["bad"]["errors"]
    assert profile["success_rate"] == 0.5 and profile["cost_per_task"] == pytest.approx(0.002)


async def test_inputs_for_unknown_types_are_refused() -> None:
    with pytest.raises(ValueError, match="not among the adapter's"):
        await profile_adapter(AlgorithmicAdapter(), inputs={"translate": ["hi"]})
    with pytest.raises(ValueError, match="ProfileSettings.repeats"):
        ProfileSettings(repeats=0)
