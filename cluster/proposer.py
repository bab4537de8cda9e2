"""Group commit: many client commands per Raft log entry, bounded in every direction.

    gRPC handlers ──propose(cmd)──► pending (bounded: commands_in_flight_max, bytes_in_flight_max)
                                        │  while fewer than entries_in_flight_max entries are
                                        ▼  in flight, take up to batch_commands_max/batch_bytes_max
                                  RaftLog.apply_entry(batch) ──► callback on the tick thread
                                        │
                                        ▼  call_soon_threadsafe → resolve each command's future

With a single client each command gets its own entry (lowest latency); under load commands pile
up while entries are in flight and the next entry carries all of them (highest throughput). A
command that pysyncobj reports as definitely not applied (no leader yet, discarded by a new
leader) is proposed again until its deadline; one whose outcome is unknown is reported as such,
and the client retries with its idempotency key.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from coordinator.commands import encode_command, join_entry
from coordinator.fsm import ApplyResult
from cluster.raft import FAIL_NAMES, NOT_APPLIED, RaftLog


class ProposeError(Exception):
    code = "UNAVAILABLE"


class Overloaded(ProposeError):
    code = "RESOURCE_EXHAUSTED"


class OutcomeUnknown(ProposeError):
    code = "UNAVAILABLE"


class ProposeTimeout(ProposeError):
    code = "DEADLINE_EXCEEDED"


@dataclass(frozen=True)
class ProposerLimits:
    batch_commands_max: int = 4096
    batch_bytes_max: int = 4 << 20
    entries_in_flight_max: int = 2
    commands_in_flight_max: int = 20_000
    bytes_in_flight_max: int = 128 << 20
    propose_timeout_s: float = 10.0
    entry_timeout_s: float = 15.0  # an entry whose callback never came frees its slot after this
    retry_backoff_s: float = 0.05


class _Pending:
    __slots__ = ("encoded", "size", "future", "deadline")

    def __init__(self, encoded: bytes, future: asyncio.Future, deadline: float) -> None:
        self.encoded = encoded
        self.size = len(encoded)
        self.future = future
        self.deadline = deadline


class Proposer:
    def __init__(self, raft: RaftLog, loop: asyncio.AbstractEventLoop, limits: ProposerLimits | None = None,
                 encode: Callable[[dict[str, Any]], bytes] = encode_command,
                 on_batch_commands: Callable[[int], None] | None = None) -> None:
        # `encode` turns a command into its bytes; with security on it is the AuditStamper, which
        # stamps who is calling and signs the command's audit record first (cluster/auth.py).
        # `on_batch_commands` (metrics) is told how many commands each proposed entry carries.
        self._encode = encode
        self._on_batch_commands = on_batch_commands
        self._raft = raft
        self._loop = loop
        self.limits = limits or ProposerLimits()
        self._pending: deque[_Pending] = deque()
        self._pending_bytes = 0
        self._in_flight: dict[int, tuple[list[_Pending], float]] = {}
        self._next_entry_id = 0
        self.commands_in_flight = 0
        self.bytes_in_flight = 0
        self.entries_proposed = 0
        self.commands_proposed = 0
        self._retry_handle: asyncio.TimerHandle | None = None

    async def propose(self, command: dict[str, Any], timeout_s: float | None = None) -> ApplyResult:
        limits = self.limits
        # The command count is checked before encoding: with security on, encoding signs the
        # command's audit record, work a refused command should not cost a busy node.
        encoded = b"" if self.commands_in_flight >= limits.commands_in_flight_max else self._encode(command)
        size = len(encoded)
        if self.commands_in_flight >= limits.commands_in_flight_max or self.bytes_in_flight + size > limits.bytes_in_flight_max:
            raise Overloaded(
                f"node busy: {self.commands_in_flight} commands / {self.bytes_in_flight} bytes in flight "
                f"(commands_in_flight_max={limits.commands_in_flight_max}, bytes_in_flight_max={limits.bytes_in_flight_max}); "
                "retry with backoff"
            )
        timeout = min(timeout_s or limits.propose_timeout_s, limits.propose_timeout_s)
        future = self._loop.create_future()
        item = _Pending(encoded, future, time.monotonic() + timeout)
        self.commands_in_flight += 1
        self.bytes_in_flight += size
        self._pending.append(item)
        self._pending_bytes += size
        # A timer rather than asyncio.wait_for: no extra task per command on the hot path.
        timer = self._loop.call_later(timeout, self._expire, future, timeout)
        self._pump()
        try:
            return await future
        finally:
            timer.cancel()
            if not future.done():
                future.cancel()
            self.commands_in_flight -= 1
            self.bytes_in_flight -= size

    @staticmethod
    def _expire(future: asyncio.Future, timeout: float) -> None:
        if not future.done():
            future.set_exception(ProposeTimeout(
                f"not committed within {timeout:.1f} s; the outcome is unknown — retry with the same idempotency key"
            ))

    # -- batching ------------------------------------------------------------------------
    def _pump(self) -> None:
        limits = self.limits
        now = time.monotonic()
        self._expire_stuck_entries(now)
        while self._pending and len(self._in_flight) < limits.entries_in_flight_max:
            batch: list[_Pending] = []
            batch_bytes = 0
            while self._pending and len(batch) < limits.batch_commands_max:
                item = self._pending[0]
                if batch and batch_bytes + item.size > limits.batch_bytes_max:
                    break
                self._pending.popleft()
                self._pending_bytes -= item.size
                if item.future.done():  # timed out or cancelled while waiting
                    continue
                batch.append(item)
                batch_bytes += item.size
            if not batch:
                continue
            entry_id = self._next_entry_id
            self._next_entry_id += 1
            self._in_flight[entry_id] = (batch, now)
            payload = join_entry([item.encoded for item in batch])
            self.entries_proposed += 1
            self.commands_proposed += len(batch)
            if self._on_batch_commands is not None:
                self._on_batch_commands(len(batch))
            self._raft.apply_entry(payload, callback=self._callback_for(entry_id))

    def _callback_for(self, entry_id: int):
        loop = self._loop

        def on_result(results: Any, err: int) -> None:  # runs on the raft tick thread: hand off, never block
            loop.call_soon_threadsafe(self._on_entry_done, entry_id, results, err)

        return on_result

    def _on_entry_done(self, entry_id: int, results: Any, err: int) -> None:
        entry = self._in_flight.pop(entry_id, None)
        if entry is None:
            return  # already expired
        batch, _ = entry
        if err == 0:
            for item, result in zip(batch, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)
        elif err in NOT_APPLIED:
            # Definitely not applied: propose again (keeps the same stamped ids) after a short
            # backoff, unless the command's own deadline passed.
            now = time.monotonic()
            retry = [item for item in batch if not item.future.done() and item.deadline > now]
            self._pending.extendleft(reversed(retry))
            self._pending_bytes += sum(item.size for item in retry)
            if self._retry_handle is None:
                self._retry_handle = self._loop.call_later(self.limits.retry_backoff_s, self._retry)
            return
        else:
            error = OutcomeUnknown(
                f"raft reported {FAIL_NAMES.get(err, err)}: the outcome is unknown — retry with the same idempotency key"
            )
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
        self._pump()

    def _retry(self) -> None:
        self._retry_handle = None
        self._pump()

    def _expire_stuck_entries(self, now: float) -> None:
        for entry_id, (batch, started) in list(self._in_flight.items()):
            if now - started > self.limits.entry_timeout_s:
                self._in_flight.pop(entry_id)
                error = OutcomeUnknown("raft gave no answer for this entry; retry with the same idempotency key")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)

    def stats(self) -> dict[str, int]:
        return {
            "commands_in_flight": self.commands_in_flight,
            "entries_in_flight": len(self._in_flight),
            "pending_commands": len(self._pending),
            "entries_proposed": self.entries_proposed,
            "commands_proposed": self.commands_proposed,
        }
