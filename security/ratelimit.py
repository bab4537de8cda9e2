"""Per-principal rate limits (issue 6): one token bucket per key (the interceptor uses the
principal's subject), refilled at `limit.requests_per_s` up to `limit.burst` tokens.

    limiter = RateLimiter()
    wait_s = limiter.acquire(principal.subject, policy.rate_limit_for(principal.roles))
    if wait_s: abort RESOURCE_EXHAUSTED, "retry after {wait_s:.3f} s"

`acquire` takes `cost` tokens and returns 0.0, or takes nothing and returns the seconds until
`cost` tokens will be there (the retry-after). The limit is passed on every call rather than
stored, so a policy reload takes effect at the next call (a bucket fuller than a new, smaller
burst is cut down to it).

Bounded: at most keys_max buckets; a new key beyond that evicts the least recently used one. An
evicted key that comes back starts with a full bucket, as a new key does. That is acceptable: a
bucket left alone for burst/requests_per_s seconds (2 s at the default 200/s, burst 400) is full
anyway, so eviction changes anything only when more than keys_max distinct keys were active
within that time — and then the most it gives the evicted key is one burst. Keys are
authenticated subjects, so a caller cannot mint fresh keys to reset its own bucket; it can only
be evicted by keys_max other active principals.

Not thread-safe, and needs no lock: `acquire` never awaits, so on one asyncio event loop (the
gRPC server's) each call runs to completion before another starts. Share it between threads only
behind a lock.

Errors: a cost outside (0, limit.burst] or a keys_max out of bounds is a ValueError (a
programmer's error); a refusal is a return value, not an exception.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from security.rbac import RateLimit

KEYS_MAX_MAX = 10_000_000           # the most keys_max may be
SLACK_S = 1e-6                      # a grant may come this early: waiting exactly the retry-after
                                    # is then enough despite float rounding of clock differences


class RateLimiter:
    def __init__(self, *, keys_max: int = 10000, clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(keys_max, bool) or not isinstance(keys_max, int) or not 1 <= keys_max <= KEYS_MAX_MAX:
            raise ValueError(f"keys_max: an int in 1..{KEYS_MAX_MAX} (KEYS_MAX_MAX), got {keys_max!r}")
        self._keys_max = keys_max
        self._clock = clock
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()     # key -> [tokens, last refill time]
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets

    def acquire(self, key: str, limit: RateLimit, cost: float = 1.0) -> float:
        """0.0 if `cost` tokens were taken from `key`'s bucket, else the seconds until they will be there."""
        if not 0 < cost <= limit.burst:
            raise ValueError(f"cost: a number in (0, burst={limit.burst}], got {cost!r}")
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._keys_max:
                self._buckets.popitem(last=False)
                self.evictions += 1
            bucket = self._buckets[key] = [float(limit.burst), now]
        else:
            self._buckets.move_to_end(key)
            elapsed = now - bucket[1]
            if elapsed > 0:                     # a clock that went backwards refills nothing
                bucket[0] = min(float(limit.burst), bucket[0] + elapsed * limit.requests_per_s)
                bucket[1] = now
            elif bucket[0] > limit.burst:       # the limit shrank
                bucket[0] = float(limit.burst)
        if bucket[0] + limit.requests_per_s * SLACK_S >= cost:
            bucket[0] = max(0.0, bucket[0] - cost)
            return 0.0
        return (cost - bucket[0]) / limit.requests_per_s
