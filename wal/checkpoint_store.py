"""CheckpointStore: task checkpoints backed by the replicated log (issue 4, DESIGN.md §7).

    create_checkpoint(request) ─► build_checkpoint_command (validate, stamp now)
                               ─► CommandLog.propose(SAVE_CHECKPOINT)  ── committed by a
                                  majority, durable, applied (fenced + re-validated in apply)
                               ─► SavedCheckpoint, or the typed error of the ApplyResult
    restore_from_checkpoint(task_id) ─► [NOOP barrier if linearizable] ─► recover_task on the
                                        applied state ─► Recovery

The store holds no state of its own: the Raft log is the write-ahead log, and a checkpoint is
acknowledged only when its SAVE_CHECKPOINT entry is. It takes its collaborators as ports
(coordinator.ports.CommandLog, CheckpointState) and a clock in milliseconds, so the node wires
in cluster.proposer.Proposer and the FSM, and tests wire in `InMemoryCommandLog`.

Errors (coordinator.errors): InvalidArgument for a bad request (before anything is proposed);
after apply, the ApplyResult's code mapped by `error_from_result` — StaleFencingToken (not the
lease holder), FailedPrecondition (out of sequence, a delta where a full is due), InvalidArgument,
ResourceExhausted (checkpoint_store_bytes_max), NotFound (no such task). The log's own errors
(overload, unknown outcome, timeout) pass through unchanged; a retry of the same record after an
unknown outcome is answered as a duplicate, not an error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from coordinator import commands as cmd
from coordinator.checkpoints import CheckpointLimits, Recovery
from coordinator.commands import decode_entry, encode_entry
from coordinator.errors import error_from_result
from coordinator.fsm import ApplyResult, CoordinatorFSM
from coordinator.ports import CheckpointState, CommandLog
from coordinator.validation import build_checkpoint_command


class SavedCheckpoint(NamedTuple):
    id: str  # f"{task_id}:{sequence_number}"
    task_id: str
    sequence_number: int
    index: int  # the log index that applied it (this request's, or the current one for a duplicate)
    duplicate: bool  # the same record was already saved (a retry)


class CheckpointStore:
    def __init__(self, log: CommandLog, state: CheckpointState, now_ms: Callable[[], int],
                 limits: CheckpointLimits | None = None) -> None:
        """limits must be the FSM's (StateLimits.checkpoints): the store checks early what
        apply will check again."""
        self._log = log
        self._state = state
        self._now_ms = now_ms
        self.limits = limits or CheckpointLimits()

    async def create_checkpoint(self, request: Mapping[str, Any], *, timeout_s: float | None = None) -> SavedCheckpoint:
        """Saves one checkpoint record (see validation.build_checkpoint_command for the keys);
        returns after it is committed and applied, or raises a CoordinatorError."""
        command = build_checkpoint_command(request, now_ms=self._now_ms(), limits=self.limits)
        value = self._value(await self._log.propose(command, timeout_s))
        return SavedCheckpoint(value["id"], command["id"], value["sequence_number"], value["index"], value["duplicate"])

    async def restore_from_checkpoint(self, task_id: str, *, linearizable: bool = False,
                                      timeout_s: float | None = None) -> Recovery:
        """What the next attempt of `task_id` resumes from. From this node's applied state by
        default; `linearizable` first commits a barrier, so a checkpoint acknowledged by any
        node is seen (use it when an attempt moves to another node's executor)."""
        if linearizable:
            self._value(await self._log.propose(cmd.noop(), timeout_s))
        return self._state.recover_task(task_id)

    @staticmethod
    def _value(result: ApplyResult) -> Any:
        if not result.ok:
            raise error_from_result(result.code, result.message)
        return result.value


class InMemoryCommandLog:
    """A one-node CommandLog for tests and embedded use: each command is its own entry, encoded
    and decoded like the real log's, applied at once to `fsm` (committed = applied here)."""

    def __init__(self, fsm: CoordinatorFSM | None = None) -> None:
        self.fsm = fsm or CoordinatorFSM()
        self.index = fsm.last_applied_index if fsm is not None else 0
        self.entries: list[tuple[int, bytes]] = []

    async def propose(self, command: dict[str, Any], timeout_s: float | None = None) -> ApplyResult:
        self.index += 1
        payload = encode_entry([command])
        decode_entry(payload)  # fail here, not on a replica, when a command does not encode
        self.entries.append((self.index, payload))
        return self.fsm.apply_entry(self.index, payload)[0]
