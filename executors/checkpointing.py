"""Checkpoints as an executor sees them: record what was done, resume where it stopped.

An adapter written against `ExecutionContext` does

    restored = await ctx.restore()             # None on a fresh start
    for step in plan:
        if ctx.executed(step.id):
            continue                           # done by an earlier attempt: skip it
        ...do the step...
        await ctx.checkpoint(state, action={"id": step.id, ...}, remaining_plan=[...])

`Checkpointer` (one per attempt) keeps the document the chain stores
({"state_snapshot", "executed_actions", "remaining_plan"}), turns each save into a full or
delta record with `coordinator.checkpoints.make_checkpoint`, and hands it to a
`CheckpointSink`: the cluster (the agent's gRPC sink; a save returns once a majority made it
durable) or memory (`MemoryCheckpoints`, for tests and local runs).

Triggers (`CheckpointSettings`): by event (`on_action`: a save after every recorded action),
by time (`interval_s`: unsaved changes are saved every N seconds of execution), by size (a
full snapshot once the delta chain reaches `full_every` deltas or `delta_chain_bytes_max`
bytes), and explicitly (`ctx.save_checkpoint()`).

A rejected save (too big, out of sequence) raises `CheckpointRejected`; what was saved before
stays the restore point, and the document keeps the change, so the next save carries it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from coordinator.checkpoints import (
    CheckpointLimits,
    CheckpointRecord,
    canonical_json,
    chain_position,
    make_checkpoint,
    restore,
)
from coordinator.errors import CoordinatorError
from executors.base import PermanentTaskError, RetryableTaskError

_DEFAULT_LIMITS = CheckpointLimits()
ACTION_ID_CHARS_MAX = 256


class CheckpointRejected(PermanentTaskError):
    """The cluster refused a checkpoint (a bound, or the chain's order). The previous one stays."""

    code = "CHECKPOINT_REJECTED"


class ModelVersionMismatch(RetryableTaskError):
    """The task was checkpointed on other model versions than this executor runs; another
    executor (or this one after a redeploy) may still resume it on the pinned versions."""

    code = "MODEL_VERSION_MISMATCH"


@dataclass(frozen=True)
class CheckpointSettings:
    on_action: bool = True              # event trigger: save after every recorded action
    interval_s: float = 0.0             # time trigger: save unsaved changes this often (0 = off)
    full_every: int = _DEFAULT_LIMITS.full_every              # size trigger: deltas per full ...
    delta_chain_bytes_max: int = _DEFAULT_LIMITS.delta_chain_bytes_max  # ... and their bytes

    def __post_init__(self) -> None:
        if not isinstance(self.interval_s, (int, float)) or isinstance(self.interval_s, bool) or self.interval_s < 0:
            raise ValueError(f"CheckpointSettings.interval_s: a number >= 0 (0 = off), got {self.interval_s!r}")
        for name in ("full_every", "delta_chain_bytes_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CheckpointSettings.{name}: an int >= 1, got {value!r}")
        if self.full_every > _DEFAULT_LIMITS.full_every:
            raise ValueError(f"CheckpointSettings.full_every: at most the cluster's full_every={_DEFAULT_LIMITS.full_every}")
        if self.delta_chain_bytes_max > _DEFAULT_LIMITS.delta_chain_bytes_max:
            raise ValueError("CheckpointSettings.delta_chain_bytes_max: at most the cluster's "
                             f"delta_chain_bytes_max={_DEFAULT_LIMITS.delta_chain_bytes_max}")


@dataclass(frozen=True)
class Restored:
    """What an attempt gets back of its task's checkpoints."""

    state: dict[str, Any]
    executed_actions: list[Any]
    remaining_plan: list[Any]
    model_versions: dict[str, str]
    sequence_number: int                 # the restored (last verified) checkpoint; 0 = none verifies
    last_sequence: int                   # the newest one saved; the next save is last_sequence + 1
    chain_deltas: int = 0                # deltas after the newest full (to keep the chain's bound)
    chain_bytes: int = 0
    problem: str | None = None           # why the restore stopped short of last_sequence, if it did

    @property
    def document(self) -> dict[str, Any]:
        return {"state_snapshot": self.state, "executed_actions": self.executed_actions,
                "remaining_plan": self.remaining_plan}


class CheckpointSink(Protocol):
    async def save(self, record: CheckpointRecord) -> None:
        """Return once the record is durable; raise CheckpointRejected when refused, or a
        RetryableTaskError when the outcome is unknown."""
        ...

    async def load(self) -> Restored | None:
        """The task's newest verified checkpoint; None when it has none."""
        ...


@dataclass
class MemoryCheckpoints:
    """A CheckpointSink in memory, shared by the attempts of one task (the fake of the cluster).
    It checks the sequence the way the cluster does; nothing else."""

    task_id: str
    records: list[CheckpointRecord] = field(default_factory=list)
    last_sequence: int = 0

    async def save(self, record: CheckpointRecord) -> None:
        if record.sequence_number != self.last_sequence + 1:
            raise CheckpointRejected(f"checkpoint.sequence_number: task {self.task_id} expects "
                                     f"{self.last_sequence + 1}, got {record.sequence_number}")
        self.records.append(record)
        self.last_sequence = record.sequence_number

    async def load(self) -> Restored | None:
        return restored_from_records(self.records, self.last_sequence)


def restored_from_records(records: list[CheckpointRecord], last_sequence: int) -> Restored | None:
    if not records and not last_sequence:
        return None
    result = restore(records)
    if result.document is None:             # nothing verifies: start over, but keep the numbering
        return Restored(state={}, executed_actions=[], remaining_plan=[], model_versions={}, sequence_number=0,
                        last_sequence=last_sequence, problem=result.problem or "no checkpoint held")
    versions = next(r.model_versions for r in records if r.sequence_number == result.sequence_number)
    position = chain_position(r for r in records if r.sequence_number <= result.sequence_number)
    return Restored(state=result.document["state_snapshot"], executed_actions=result.document["executed_actions"],
                    remaining_plan=result.document["remaining_plan"], model_versions=dict(versions),
                    sequence_number=result.sequence_number, last_sequence=last_sequence,
                    chain_deltas=position.deltas, chain_bytes=position.delta_bytes, problem=result.problem)


def _action_id(action: Any) -> str:
    action_id = action.get("id") if isinstance(action, Mapping) else action
    if not isinstance(action_id, str) or not action_id or len(action_id) > ACTION_ID_CHARS_MAX:
        raise ValueError(f"checkpoint.action.id: a non-empty str of at most {ACTION_ID_CHARS_MAX} chars, got {action_id!r}")
    return action_id


class Checkpointer:
    """The checkpoints of one attempt (see the module docstring). Saves run one at a time."""

    def __init__(self, sink: CheckpointSink, *, task_id: str, settings: CheckpointSettings | None = None,
                 model_versions: Mapping[str, str] | None = None, resume: bool = True,
                 clock_ms: Callable[[], int] = lambda: int(time.time() * 1000)) -> None:
        """resume=False: an executor that cannot resume; `restore()` gives None and the chain
        goes on from a new full snapshot (the cluster records the restart from scratch)."""
        self.sink = sink
        self.resume = resume
        self.task_id = task_id
        self.settings = settings or CheckpointSettings()
        self.model_versions = dict(model_versions or {})   # what this executor runs now
        self._clock_ms = clock_ms
        self._document: dict[str, Any] = {"state_snapshot": {}, "executed_actions": [], "remaining_plan": []}
        self._executed: set[str] = set()
        self._saved_document: dict[str, Any] | None = None  # the newest document the chain holds
        self._last_sequence = 0
        self._chain_deltas = 0
        self._chain_bytes = 0
        self._dirty = False
        self._restored: Restored | None = None
        self._loaded = False
        self._lock = asyncio.Lock()
        self._timer: asyncio.Task[None] | None = None
        self.saves_total = 0
        self.full_saves_total = 0

    # ------------------------------------------------------------------------------ reading

    async def restore(self) -> Restored | None:
        """The task's newest verified checkpoint (asked once per attempt), or None."""
        async with self._lock:
            if not self._loaded:
                restored = await self.sink.load()
                self._loaded = True
                if restored is not None:
                    # The sequence goes on even when nothing is resumed: the chain is the task's.
                    self._last_sequence = restored.last_sequence
                if restored is not None and restored.sequence_number > 0 and self.resume:
                    self._adopt(restored)
                    self._restored = restored
            return self._restored

    def _adopt(self, restored: Restored) -> None:
        pinned = restored.model_versions
        for name, version in self.model_versions.items():
            if name in pinned and pinned[name] != version:
                raise ModelVersionMismatch(f"model {name!r}: the task was checkpointed on {pinned[name]!r}, "
                                           f"this executor runs {version!r}")
        self.model_versions = {**pinned, **self.model_versions}
        self._document = restored.document
        self._executed = {_action_id(a) for a in restored.executed_actions}
        if restored.sequence_number == restored.last_sequence:
            self._saved_document = restored.document
            self._chain_deltas, self._chain_bytes = restored.chain_deltas, restored.chain_bytes
        # else the restore fell back: the next save must be a full (no delta over an unknown base)

    def executed(self, action_id: str) -> bool:
        return action_id in self._executed

    @property
    def last_sequence(self) -> int:
        return self._last_sequence

    # ------------------------------------------------------------------------------ writing

    async def checkpoint(self, state: Mapping[str, Any], *, action: Any = None, remaining_plan: list[Any] | None = None,
                         model_versions: Mapping[str, str] | None = None) -> int | None:
        """Record the attempt's state (and the action just done, {"id": ...} or an id). Saved at
        once when `on_action` is set and an action was given; otherwise by the timer or the next
        explicit save. Returns the saved sequence number, or None when not saved yet."""
        if not self._loaded:
            await self.restore()            # never overwrite a chain this attempt has not read
        if not isinstance(state, Mapping):
            raise ValueError(f"checkpoint.state: a mapping, got {type(state).__name__}")
        document = {"state_snapshot": dict(state), "executed_actions": list(self._document["executed_actions"]),
                    "remaining_plan": list(remaining_plan) if remaining_plan is not None
                    else self._document["remaining_plan"]}
        if action is not None:
            action_id = _action_id(action)
            if action_id in self._executed:
                raise ValueError(f"checkpoint.action.id: {action_id!r} was already recorded as executed")
            document["executed_actions"].append(dict(action) if isinstance(action, Mapping) else {"id": action_id})
        canonical_json(document)            # not JSON → a clear error now, not at save time
        if model_versions:
            self.model_versions.update(model_versions)
        self._document = document
        if action is not None:
            self._executed.add(action_id)
        self._dirty = True
        self._ensure_timer()
        if action is not None and self.settings.on_action:
            return await self.save()
        return None

    async def save(self) -> int:
        """Save the current document now; return its sequence number."""
        async with self._lock:
            if not self._dirty and self._last_sequence and self._saved_document is not None:
                return self._last_sequence
            document = self._document
            record = make_checkpoint(
                self._saved_document, self._last_sequence, document, task_id=self.task_id,
                timestamp_ms=self._clock_ms(), full_every=self.settings.full_every,
                delta_chain_bytes_max=self.settings.delta_chain_bytes_max,
                chain_deltas_so_far=self._chain_deltas, chain_bytes_so_far=self._chain_bytes,
                model_versions=self.model_versions)
            try:
                await self.sink.save(record)
            except CoordinatorError as exc:  # a sink that passes the cluster's own errors through
                raise CheckpointRejected(exc.message) from None
            self._saved_document = document
            self._last_sequence = record.sequence_number
            if record.kind == "full":
                self._chain_deltas, self._chain_bytes = 0, 0
                self.full_saves_total += 1
            else:
                self._chain_deltas += 1
                self._chain_bytes += record.payload_bytes
            self.saves_total += 1
            self._dirty = self._document is not document
            return record.sequence_number

    # ------------------------------------------------------------------------------ the timer

    def _ensure_timer(self) -> None:
        if self.settings.interval_s > 0 and self._timer is None:
            self._timer = asyncio.create_task(self._save_periodically(), name=f"checkpoint-timer-{self.task_id}")

    async def _save_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.settings.interval_s)
            if self._dirty:
                try:
                    await self.save()
                except (CheckpointRejected, RetryableTaskError):
                    pass  # the next tick or an explicit save tries again; the last save stays valid

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            await asyncio.gather(self._timer, return_exceptions=True)
            self._timer = None
