"""An optional response cache (off by default): key = sha256 of the canonical JSON of
(model, messages, parameters); entries expire after ttl_s; at most entries_max entries and
bytes_max bytes (sizes measured as the canonical JSON of the cached value); least recently
used entries are evicted first. Use it only for deterministic requests (temperature 0): the
adapter caches what the model said once and returns it again.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from executors.llm.resilience import Clock, SystemClock


@dataclass(frozen=True)
class CacheLimits:
    ttl_s: float = 3_600.0
    entries_max: int = 1_024
    bytes_max: int = 16 * 1024 * 1024
    entry_bytes_max: int = 1024 * 1024     # a larger value is not cached

    def __post_init__(self) -> None:
        if not 0 < self.ttl_s <= 30 * 24 * 3600:
            raise ValueError(f"CacheLimits.ttl_s: in (0, 2592000] s, got {self.ttl_s!r}")
        for name in ("entries_max", "bytes_max", "entry_bytes_max"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CacheLimits.{name}: an int >= 1, got {value!r}")


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def cache_key(model: str, messages: Sequence[Mapping[str, Any]], parameters: Mapping[str, Any]) -> str:
    body = canonical_json({"model": model, "messages": list(messages), "parameters": dict(parameters)})
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


@dataclass
class _Entry:
    value: Any
    size_bytes: int
    expires_at_s: float


class ResponseCache:
    def __init__(self, limits: CacheLimits | None = None, *, clock: Clock | None = None) -> None:
        self.limits = limits or CacheLimits()
        self._clock = clock or SystemClock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.bytes_total = 0
        self.hits_total = 0
        self.misses_total = 0
        self.evictions_total = 0
        self.too_large_total = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Any | None:
        entry = self._entries.get(key)
        if entry is not None and entry.expires_at_s <= self._clock.monotonic():
            self._drop(key)
            entry = None
        if entry is None:
            self.misses_total += 1
            return None
        self._entries.move_to_end(key)
        self.hits_total += 1
        return entry.value

    def put(self, key: str, value: Any, *, size_bytes: int | None = None) -> bool:
        """Store `value` (JSON-serializable unless size_bytes is given); False when too large."""
        size = size_bytes if size_bytes is not None else len(canonical_json(value).encode("utf-8"))
        if size > self.limits.entry_bytes_max or size > self.limits.bytes_max:
            self.too_large_total += 1
            return False
        if key in self._entries:
            self._drop(key)
        self._entries[key] = _Entry(value, size, self._clock.monotonic() + self.limits.ttl_s)
        self.bytes_total += size
        while len(self._entries) > self.limits.entries_max or self.bytes_total > self.limits.bytes_max:
            oldest = next(iter(self._entries))
            self._drop(oldest)
            self.evictions_total += 1
        return True

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self.bytes_total -= entry.size_bytes

    def snapshot(self) -> dict[str, Any]:
        return {"entries": len(self._entries), "bytes_total": self.bytes_total, "hits_total": self.hits_total,
                "misses_total": self.misses_total, "evictions_total": self.evictions_total,
                "too_large_total": self.too_large_total}
