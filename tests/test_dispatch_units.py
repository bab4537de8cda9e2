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
