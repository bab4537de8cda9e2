"""Pure parts of cluster/dispatch.py: the stamped retry backoff."""

from __future__ import annotations

import random

from cluster.dispatch import Dispatcher, DispatchSettings


class _Stub:
    """Only what _backoff_ms reads."""

    def __init__(self, settings: DispatchSettings) -> None:
        self.settings = settings


def test_backoff_is_exponential_with_bounded_jitter_and_capped() -> None:
    random.seed(7)
    stub = _Stub(DispatchSettings(retry_backoff_base_s=1.0, retry_backoff_max_s=60.0, retry_jitter_fraction=0.2))
    for attempt, base_s in ((1, 1), (2, 2), (3, 4), (4, 8), (7, 60), (30, 60)):
        samples = [Dispatcher._backoff_ms(stub, attempt) for _ in range(200)]
        assert min(samples) >= base_s * 1000 * 0.8 - 1 and max(samples) <= base_s * 1000 * 1.2 + 1, (attempt, samples[:5])
        assert len(set(samples)) > 50  # jittered, so retries of many tasks do not stampede together


class _ProfileStub:
    """Only what _profile_figures reads."""

    def __init__(self, executors_max: int) -> None:
        from coordinator.limits import Limits

        self._limits = Limits(executors_max=executors_max)
        self._profiles: dict = {}


def test_the_scheduler_reads_cost_and_latency_from_a_performance_profile() -> None:
    stub = _ProfileStub(executors_max=2)
    measured = '{"cost_per_task": 0.0021, "latency_s_p50": 0.35, "task_types": {}}'
    assert Dispatcher._profile_figures(stub, measured) == {"cost_per_task": 0.0021, "latency_s_p50": 0.35}
    for bad in ("", "not json", "[1]", '{"cost_per_task": -1, "latency_s_p50": "fast"}', '{"cost_per_task": true}'):
        assert Dispatcher._profile_figures(stub, bad) == {}, bad          # declared nothing usable
    assert len(stub._profiles) <= 2                                      # bounded by executors_max
