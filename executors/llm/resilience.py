"""Retries with backoff, Retry-After, a circuit breaker per endpoint, and a fail-fast health
check — the one place that decides whether and when an LLM call is repeated.

    Resilience.call(endpoint, op)
        breaker(endpoint).before_call()      open → CircuitOpen (no call, no retry)
        op()                                 a TransientLLMError →
            breaker.record_failure()             counts only failures that say "unhealthy"
            ConnectionFailed → health.ensure_up(force=True)   down → EndpointDown, stop here
            retries left → sleep(delay), call again, else raise the last error
        success → breaker.record_success()

Delay of retry n (1-based): min(backoff_max_s, backoff_base_s × backoff_multiplier^(n-1)),
times a jitter factor uniform in [1 - jitter_fraction, 1 + jitter_fraction] from an injected
`random.Random`, capped at backoff_max_s. A Retry-After header (seconds or an HTTP date) replaces
the computed delay, capped at retry_after_max_s. Time comes from an injected `Clock` (STYLE §3):
tests use `FakeClock`, whose sleep only moves time forward.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from executors.base import TaskError
from executors.llm.errors import (
    CircuitOpen,
    ConnectionFailed,
    EndpointDown,
    RateLimited,
    RequestTimeout,
    ServerError,
    TransientLLMError,
)

T = TypeVar("T")

# ------------------------------------------------------------------------------------------- clock


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (deadlines, cool-downs, TTLs)."""
        ...

    def time(self) -> float:
        """Unix time in seconds (only to read HTTP dates such as Retry-After)."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class FakeClock:
    """A clock for tests: `sleep` records the delay and moves time forward at once."""

    def __init__(self, *, start_s: float = 1_000.0, unix_start_s: float = 1_700_000_000.0) -> None:
        self._now_s = start_s
        self._unix_offset_s = unix_start_s - start_s
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self._now_s

    def time(self) -> float:
        return self._now_s + self._unix_offset_s

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"FakeClock.advance: seconds >= 0, got {seconds!r}")
        self._now_s += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)


# ----------------------------------------------------------------------------------------- retries


@dataclass(frozen=True)
class RetryPolicy:
    retries_max: int = 3                 # calls after the first one; 0 = never retry
    backoff_base_s: float = 1.0
    backoff_multiplier: float = 2.0
    backoff_max_s: float = 30.0
    jitter_fraction: float = 0.3         # ± this fraction of the delay
    retry_after_max_s: float = 60.0      # a longer Retry-After is cut to this

    def __post_init__(self) -> None:
        if not isinstance(self.retries_max, int) or isinstance(self.retries_max, bool) or not 0 <= self.retries_max <= 20:
            raise ValueError(f"RetryPolicy.retries_max: an int in 0..20, got {self.retries_max!r}")
        for name in ("backoff_base_s", "backoff_max_s", "retry_after_max_s"):
            if not 0 <= getattr(self, name) <= 3600:
                raise ValueError(f"RetryPolicy.{name}: in 0..3600 s, got {getattr(self, name)!r}")
        if not 1.0 <= self.backoff_multiplier <= 10.0:
            raise ValueError(f"RetryPolicy.backoff_multiplier: in 1..10, got {self.backoff_multiplier!r}")
        if not 0.0 <= self.jitter_fraction < 1.0:
            raise ValueError(f"RetryPolicy.jitter_fraction: in 0..1 (exclusive), got {self.jitter_fraction!r}")

    def backoff_s(self, retry: int, rng: random.Random) -> float:
        """The delay before retry number `retry` (1-based), jittered."""
        if retry < 1:
            raise ValueError(f"retry: >= 1, got {retry!r}")
        base_s = min(self.backoff_max_s, self.backoff_base_s * self.backoff_multiplier ** (retry - 1))
        jitter = 1.0 + self.jitter_fraction * (2.0 * rng.random() - 1.0)
        return min(self.backoff_max_s, base_s * jitter)

    def delay_s(self, retry: int, rng: random.Random, *, retry_after_s: float | None = None) -> float:
        """Retry-After when the server sent one (capped at retry_after_max_s), else backoff."""
        if retry_after_s is not None:
            return min(self.retry_after_max_s, max(0.0, retry_after_s))
        return self.backoff_s(retry, rng)


RETRY_AFTER_CHARS_MAX = 64


def parse_retry_after(value: str | None, now_unix_s: float) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date; None when
    absent or unreadable (then the computed backoff applies)."""
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > RETRY_AFTER_CHARS_MAX:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if seconds >= 0 and seconds == seconds and seconds != float("inf") else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now_unix_s)


# ----------------------------------------------------------------------------------------- breaker


@dataclass(frozen=True)
class BreakerPolicy:
    failures_to_open: int = 5            # consecutive unhealthy failures that open the circuit
    open_cooldown_s: float = 30.0        # open this long, then one half-open probe is let through

    def __post_init__(self) -> None:
        if not isinstance(self.failures_to_open, int) or not 1 <= self.failures_to_open <= 1000:
            raise ValueError(f"BreakerPolicy.failures_to_open: an int in 1..1000, got {self.failures_to_open!r}")
        if not 0 < self.open_cooldown_s <= 3600:
            raise ValueError(f"BreakerPolicy.open_cooldown_s: in (0, 3600] s, got {self.open_cooldown_s!r}")


class CircuitBreaker:
    """closed → (failures_to_open consecutive failures) → open → (open_cooldown_s) → half_open:
    one probe call goes through; its success closes the circuit, its failure opens it again.
    A call that the endpoint answered (even with 4xx or 429) counts as a success here: the
    breaker protects against dead endpoints, not against refusals."""

    def __init__(self, endpoint: str, policy: BreakerPolicy, clock: Clock) -> None:
        self.endpoint = endpoint
        self.policy = policy
        self._clock = clock
        self.state = "closed"
        self.failures_consecutive = 0
        self.opened_at_s: float | None = None
        self._probe_in_flight = False
        self.opens_total = 0

    def before_call(self) -> None:
        if self.state == "closed":
            return
        if self.state == "open":
            waited_s = self._clock.monotonic() - (self.opened_at_s or 0.0)
            if waited_s < self.policy.open_cooldown_s:
                raise CircuitOpen(f"{self.endpoint}: circuit open after {self.failures_consecutive} consecutive "
                                  f"failures; next probe in {self.policy.open_cooldown_s - waited_s:.1f} s "
                                  f"(open_cooldown_s={self.policy.open_cooldown_s})")
            self.state = "half_open"
        if self._probe_in_flight:
            raise CircuitOpen(f"{self.endpoint}: circuit half-open; a probe call is in flight")
        self._probe_in_flight = True

    def record_success(self) -> None:
        self.state = "closed"
        self.failures_consecutive = 0
        self.opened_at_s = None
        self._probe_in_flight = False

    def record_failure(self, exc: BaseException) -> None:
        if not getattr(exc, "counts_against_endpoint", False):
            self.record_success()       # the endpoint answered; it is alive
            return
        self.failures_consecutive += 1
        self._probe_in_flight = False
        if self.state == "half_open" or self.failures_consecutive >= self.policy.failures_to_open:
            if self.state != "open":
                self.opens_total += 1
            self.state = "open"
            self.opened_at_s = self._clock.monotonic()

    def release(self) -> None:
        """The call ended without telling anything about the endpoint (cancelled, a bug)."""
        self._probe_in_flight = False
        if self.state == "half_open":
            self.state = "open"          # keep the cool-down; the next caller probes again

    def snapshot(self) -> dict[str, Any]:
        return {"state": self.state, "failures_consecutive": self.failures_consecutive, "opens_total": self.opens_total}


# ------------------------------------------------------------------------------------------ health


class HealthCheck:
    """Asks the endpoint whether it is up (`probe`: an awaitable that raises a mapped TaskError
    when it is not) and remembers the answer for health_up_ttl_s / health_down_ttl_s, so a dead
    endpoint costs one short probe, not a retry loop per task. Timeouts, connection errors and
    502/503/504 mean down; any other answer (even 401 or 404) means the endpoint is up."""

    def __init__(self, endpoint: str, probe: Callable[[], Awaitable[None]], clock: Clock, *,
                 timeout_s: float = 5.0, up_ttl_s: float = 30.0, down_ttl_s: float = 5.0) -> None:
        self.endpoint = endpoint
        self._probe = probe
        self._clock = clock
        self.timeout_s = timeout_s
        self.up_ttl_s = up_ttl_s
        self.down_ttl_s = down_ttl_s
        self._checked_at_s: float | None = None
        self._down_reason: str | None = None
        self._lock = asyncio.Lock()
        self.probes_total = 0

    async def ensure_up(self, *, force: bool = False) -> None:
        """Return when the endpoint is up; raise EndpointDown (plain message) when it is not."""
        async with self._lock:
            now_s = self._clock.monotonic()
            fresh = (self._checked_at_s is not None and
                     now_s - self._checked_at_s < (self.down_ttl_s if self._down_reason else self.up_ttl_s))
            if force or not fresh:
                self._down_reason = await self._check()
                self._checked_at_s = self._clock.monotonic()
            if self._down_reason is not None:
                raise EndpointDown(self._down_reason)

    async def _check(self) -> str | None:
        self.probes_total += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._probe()
        except TimeoutError:
            return f"{self.endpoint} is down: no answer to the health check within {self.timeout_s} s"
        except (ConnectionFailed, RequestTimeout) as exc:
            return f"{self.endpoint} is down: {exc.message}"
        except ServerError as exc:
            if exc.status in (502, 503, 504):
                return f"{self.endpoint} is down: {exc.message}"
        except TaskError:
            pass                          # it answered: up
        return None

    def snapshot(self) -> dict[str, Any]:
        return {"down": self._down_reason is not None, "reason": self._down_reason, "probes_total": self.probes_total}


# --------------------------------------------------------------------------------------- the loop


OnFailure = Callable[[int, TransientLLMError, "float | None"], None]


class Resilience:
    """Shared by every call of one adapter: a breaker per endpoint, one retry policy."""

    ENDPOINTS_MAX = 1_024               # breakers kept; the adapter's endpoints are few

    def __init__(self, *, retry: RetryPolicy | None = None, breaker: BreakerPolicy | None = None,
                 clock: Clock | None = None, rng: random.Random | None = None) -> None:
        self.retry = retry or RetryPolicy()
        self.breaker_policy = breaker or BreakerPolicy()
        self.clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self._breakers: dict[str, CircuitBreaker] = {}
        self.retries_total = 0

    def breaker(self, endpoint: str) -> CircuitBreaker:
        found = self._breakers.get(endpoint)
        if found is None:
            if len(self._breakers) >= self.ENDPOINTS_MAX:
                raise ValueError(f"Resilience: at most {self.ENDPOINTS_MAX} endpoints (ENDPOINTS_MAX)")
            found = self._breakers[endpoint] = CircuitBreaker(endpoint, self.breaker_policy, self.clock)
        return found

    async def call(self, endpoint: str, op: Callable[[], Awaitable[T]], *,
                   health: HealthCheck | None = None, on_failure: OnFailure | None = None) -> T:
        """Run `op` with retries. `on_failure(attempt, error, delay_s or None)` hears of each
        failed attempt (delay None: no retry follows)."""
        breaker = self.breaker(endpoint)
        attempt = 0
        while True:
            attempt += 1
            breaker.before_call()
            try:
                result = await op()
            except TransientLLMError as exc:
                breaker.record_failure(exc)
                if isinstance(exc, ConnectionFailed) and health is not None:
                    try:
                        await health.ensure_up(force=True)
                    except EndpointDown:
                        if on_failure:
                            on_failure(attempt, exc, None)
                        raise
                if attempt > self.retry.retries_max:
                    if on_failure:
                        on_failure(attempt, exc, None)
                    raise
                retry_after_s = exc.retry_after_s if isinstance(exc, (RateLimited, ServerError)) else None
                delay_s = self.retry.delay_s(attempt, self.rng, retry_after_s=retry_after_s)
                if on_failure:
                    on_failure(attempt, exc, delay_s)
                self.retries_total += 1
                await self.clock.sleep(delay_s)
                continue
            except TaskError as exc:
                breaker.record_failure(exc)   # permanent: the endpoint answered
                raise
            except BaseException:
                breaker.release()
                raise
            breaker.record_success()
            return result

    def snapshot(self) -> dict[str, Any]:
        return {"retries_total": self.retries_total,
                "breakers": {name: b.snapshot() for name, b in sorted(self._breakers.items())}}
