"""Per-principal token buckets: a burst, then refusal with the exact retry-after (nothing taken);
refill at the rate up to the burst; the LRU bound on keys. A fake clock throughout."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from security.rbac import RateLimit
from security.ratelimit import RateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_refusal_with_the_right_retry_after() -> None:
    clock = FakeClock()
    limiter, limit = RateLimiter(clock=clock), RateLimit(requests_per_s=10, burst=5)
    assert [limiter.acquire("alice", limit) for _ in range(5)] == [0.0] * 5
    assert limiter.acquire("alice", limit) == pytest.approx(0.1)
    assert limiter.acquire("alice", limit) == pytest.approx(0.1)          # a refusal takes nothing
    assert limiter.acquire("alice", limit, cost=3) == pytest.approx(0.3)
    assert limiter.acquire("bob", limit) == 0.0                           # buckets are per key
    clock.now += 0.05
    assert limiter.acquire("alice", limit) == pytest.approx(0.05)
    clock.now += 0.05
    assert limiter.acquire("alice", limit) == 0.0                         # waiting the retry-after is enough
    assert limiter.acquire("alice", limit) == pytest.approx(0.1)


def test_refill_is_at_the_rate_and_capped_at_the_burst() -> None:
    clock = FakeClock()
    limiter, limit = RateLimiter(clock=clock), RateLimit(requests_per_s=2, burst=4)
    for _ in range(4):
        limiter.acquire("k", limit)
    clock.now += 1.0                                                      # 2 tokens back
    assert [limiter.acquire("k", limit) for _ in range(3)] == [0.0, 0.0, pytest.approx(0.5)]
    clock.now += 3600
    assert [limiter.acquire("k", limit) for _ in range(4)] == [0.0] * 4   # full, not 7200 tokens
    assert limiter.acquire("k", limit) == pytest.approx(0.5)


def test_a_clock_going_backwards_refills_nothing() -> None:
    clock = FakeClock()
    limiter, limit = RateLimiter(clock=clock), RateLimit(requests_per_s=1, burst=1)
    assert limiter.acquire("k", limit) == 0.0
    clock.now -= 100
    assert limiter.acquire("k", limit) == pytest.approx(1.0)
    clock.now += 100.5
    assert limiter.acquire("k", limit) == pytest.approx(0.5)
    clock.now += 0.5
    assert limiter.acquire("k", limit) == 0.0


def test_a_smaller_limit_applies_at_once() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock=clock)
    assert limiter.acquire("k", RateLimit(100, 1000)) == 0.0              # 999 left
    small = RateLimit(1, 2)
    assert [limiter.acquire("k", small) for _ in range(3)] == [0.0, 0.0, pytest.approx(1.0)]


def test_cost_and_keys_max_are_checked() -> None:
    limiter, limit = RateLimiter(clock=FakeClock()), RateLimit(1, 5)
    for cost in (0, -1, 6, float("nan")):
        with pytest.raises(ValueError, match=r"cost: a number in \(0, burst=5\]"):
            limiter.acquire("k", limit, cost=cost)
    assert limiter.acquire("k", limit, cost=5) == 0.0
    for keys_max in (0, -1, True, 1.5, 10**8):
        with pytest.raises(ValueError, match="keys_max"):
            RateLimiter(keys_max=keys_max)


def test_the_number_of_buckets_is_bounded_least_recently_used_first() -> None:
    clock = FakeClock()
    limiter, limit = RateLimiter(keys_max=100, clock=clock), RateLimit(1, 3)
    for _ in range(3):
        limiter.acquire("hot", limit)                                      # drained
    for i in range(10_000):
        limiter.acquire(f"k{i}", limit)
        if i % 50 == 0:
            limiter.acquire("hot", limit)                                  # stays recently used
        assert len(limiter) <= 100
    assert len(limiter) == 100 and limiter.evictions == 10_000 + 1 - 100
    assert "hot" in limiter and "k9999" in limiter and "k0" not in limiter
    assert limiter.acquire("hot", limit) > 0                               # kept: still drained
    for _ in range(3):
        assert limiter.acquire("k0", limit) == 0.0                         # evicted: starts full again
    assert limiter.acquire("k0", limit) > 0


@settings(max_examples=200)
@given(rate=st.floats(0.1, 1000), burst=st.integers(1, 50),
       steps=st.lists(st.tuples(st.floats(0, 2), st.floats(0.1, 5)), max_size=60))
def test_never_more_than_burst_plus_rate_times_elapsed(rate, burst, steps) -> None:
    """Against the bucket's definition: what was granted over any run never exceeds
    burst + rate * elapsed, and a refusal's retry-after is exactly enough."""
    clock = FakeClock()
    limit = RateLimit(rate, burst)
    limiter, start, granted = RateLimiter(clock=clock), clock.now, 0.0
    for wait_s, cost in steps:
        cost = min(cost, burst)
        clock.now += wait_s
        retry_after = limiter.acquire("k", limit, cost)
        if retry_after == 0.0:
            granted += cost
        else:
            assert retry_after > 0
            clock.now += retry_after
            assert limiter.acquire("k", limit, cost) == 0.0
            granted += cost
        assert granted <= burst + rate * (clock.now - start) + 1e-6
