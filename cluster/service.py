"""The gRPC API of a node (grpc.aio). Handlers stay about the domain: validate, stamp, propose,
convert. Time and ids are stamped here, by the proposer, before anything reaches the log."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from cluster import tracing
from cluster.auth import DecisionLog, current_access
from cluster.proposer import ProposeError, Proposer
from coordinator import commands as cmd
from coordinator.audit import AuditHead
from coordinator.checkpoints import CheckpointRecord, canonical_json, checkpoint_id, restore
from coordinator.errors import CoordinatorError, InvalidArgument
from coordinator.fsm import ENVELOPE_FIELDS, FINAL_STATUSES, CoordinatorFSM, ExecutorRecord, TaskRecord
from coordinator.limits import Limits
from coordinator.model import TaskStatus
from coordinator.validation import ExecutorInput, TaskInput, build_executor_spec, build_task_specs, check_idempotency_key
from proto import coordinator_pb2 as pb
from proto import coordinator_pb2_grpc as pb_grpc
from security.secrets import Kek, KekRing, SecretError, rewrap, seal, unseal
from security.tokens import TOKEN_TTL_S_DEFAULT, TOKEN_TTL_S_MAX
from wal.checkpoint_store import CheckpointStore

STATUS_CODES = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "OUT_OF_RANGE": grpc.StatusCode.OUT_OF_RANGE,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "DEADLINE_EXCEEDED": grpc.StatusCode.DEADLINE_EXCEEDED,
    "INTERNAL": grpc.StatusCode.INTERNAL,
    "PERMISSION_DENIED": grpc.StatusCode.PERMISSION_DENIED,
    "UNAUTHENTICATED": grpc.StatusCode.UNAUTHENTICATED,
}

LIST_LIMIT_DEFAULT = 100
LIST_LIMIT_MAX = 1000
WAIT_TIMEOUT_S_DEFAULT = 30.0
WAIT_TIMEOUT_S_MAX = 300.0
WAIT_TASKS_MAX = 1000
WATCH_BATCH_EVENTS_MAX = 1000
WATCH_IDLE_RECHECK_S = 1.0
AUDIT_LIST_LIMIT_DEFAULT = 1000
AUDIT_LIST_LIMIT_MAX = 5000


def now_ms() -> int:
    return int(time.time() * 1000)


class TaskIds:
    """Task ids: a random 64-bit prefix drawn once per process plus a counter — unique across
    nodes and restarts without a uuid4 per task (apply still rejects a duplicate id)."""

    def __init__(self) -> None:
        self._prefix = "t-" + os.urandom(8).hex()
        self._next = itertools.count(1).__next__

    def __call__(self) -> str:
        return f"{self._prefix}{self._next():06x}"


new_task_id = TaskIds()


def new_executor_id() -> str:
    return "x-" + uuid.uuid4().hex[:16]


def task_to_pb(record: TaskRecord) -> pb.Task:
    return pb.Task(
        id=record.id, name=record.name, type=record.type, description=record.description,
        input_json=record.input_json, priority=record.priority, deadline_unix_ms=record.deadline_ms,
        dependencies=list(record.dependencies), assigned_executor=record.assigned_executor or "",
        status=record.status, created_at_unix_ms=record.created_at_ms, updated_at_unix_ms=record.updated_at_ms,
        max_attempts=record.max_attempts, metadata=record.metadata or {}, created_index=record.created_index,
        cancel_reason=record.cancel_reason, attempt=record.attempt, result_json=record.result_json,
        error=record.error, not_before_unix_ms=record.not_before_ms, dag_id=record.dag_id,
        checkpoint_sequence=record.checkpoint_sequence, progress=record.progress,
        progress_message=record.progress_message, progress_unix_ms=record.progress_ms,
        trace_parent=record.trace_parent,
        attempts=[pb.AttemptRecord(attempt=h[0], executor_id=h[1], outcome=h[2], error=h[3], ended_unix_ms=h[5])
                  for h in record.history],
    )


def executor_to_pb(record: ExecutorRecord, load: int = 0, connected_here: bool = False,
                   heartbeat_age_s: float = -1.0) -> pb.Executor:
    return pb.Executor(
        load=load, tasks_completed=record.tasks_completed, tasks_failed=record.tasks_failed,
        connected_here=connected_here, heartbeat_age_s=heartbeat_age_s,
        id=record.id, name=record.name, type=record.type, supported_task_types=list(record.task_types),
        capacity=record.capacity, status=record.status, registered_at_unix_ms=record.registered_at_ms,
        input_schema_json=record.input_schema_json, output_schema_json=record.output_schema_json,
        performance_profile_json=record.performance_profile_json, context_window_size=record.context_window_size,
        metadata=record.metadata or {}, resumable=record.resumable,
    )


def audit_head_to_pb(head: AuditHead) -> pb.AuditHead:
    return pb.AuditHead(seq=head.seq, hash=head.hash, node=head.node, time_unix_ms=head.time_ms, sig=head.sig)


def checkpoint_to_pb(record: CheckpointRecord) -> pb.CheckpointInfo:
    return pb.CheckpointInfo(
        id=checkpoint_id(record.task_id, record.sequence_number), task_id=record.task_id,
        sequence_number=record.sequence_number, kind=record.kind, base_sequence=record.base_sequence or 0,
        timestamp_unix_ms=record.timestamp_ms, payload_bytes=record.payload_bytes, checksum=record.checksum,
        model_versions=record.model_versions)


def task_input_from_pb(spec: pb.TaskSpec) -> TaskInput:
    return TaskInput(
        type=spec.type, name=spec.name, description=spec.description, input_json=spec.input_json,
        priority=spec.priority if spec.has_priority else None, deadline_unix_ms=spec.deadline_unix_ms,
        deadline_in_ms=spec.deadline_in_ms, depends_on=list(spec.depends_on), max_attempts=spec.max_attempts,
        metadata=dict(spec.metadata),
    )


def executor_input_from_pb(spec: pb.ExecutorSpec) -> ExecutorInput:
    return ExecutorInput(
        name=spec.name or spec.id, type=spec.type, id=spec.id, supported_task_types=list(spec.supported_task_types),
        input_schema_json=spec.input_schema_json, output_schema_json=spec.output_schema_json,
        performance_profile_json=spec.performance_profile_json, context_window_size=spec.context_window_size,
        capacity=spec.capacity or 1, metadata=dict(spec.metadata), resumable=spec.resumable,
    )


class AppliedWaiters:
    """Lets coroutines wait for the next applied entry without polling. The raft tick thread calls
    `notify` (through call_soon_threadsafe); it is cheap when nobody waits."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._event = asyncio.Event()
        self._scheduled = False

    def notify_threadsafe(self, _index: int) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        self._scheduled = False
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout_s: float) -> None:
        event = self._event
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except TimeoutError:
            pass


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(
        self,
        *,
        fsm: CoordinatorFSM,
        fsm_lock: Any,
        proposer: Proposer,
        waiters: AppliedWaiters,
        limits: Limits,
        node_status: Callable[[bool], pb.NodeStatus],
        dispatcher: Any = None,
        checkpoints: CheckpointStore | None = None,
        decisions: DecisionLog | None = None,
        token_issuer: Any = None,
        keks: KekRing | None = None,
    ) -> None:
        self._keks = keks
        self._decisions = decisions
        self._token_issuer = token_issuer
        self._dispatcher = dispatcher
        self._checkpoints = checkpoints
        self._fsm = fsm
        self._lock = fsm_lock
        self._proposer = proposer
        self._waiters = waiters
        self._limits = limits
        self._node_status = node_status

    # -- helpers -------------------------------------------------------------------------
    async def _abort(self, context: grpc.aio.ServicerContext, code: str, message: str) -> None:
        await context.abort(STATUS_CODES.get(code, grpc.StatusCode.INTERNAL), message)

    async def _propose(self, command: dict[str, Any], context: grpc.aio.ServicerContext) -> Any:
        remaining = context.time_remaining()
        span = tracing.propose_span(command)
        try:
            result = await self._proposer.propose(command, remaining)
        except ProposeError as exc:
            tracing.end_propose_span(span, None, str(exc))
            await self._abort(context, exc.code, str(exc))
        tracing.end_propose_span(span, result, "" if result.ok else result.message)
        if not result.ok:
            await self._abort(context, result.code, result.message)
        return result.value

    async def _ids(self, context: grpc.aio.ServicerContext, **fields: str) -> None:
        """Ids a request names are bounded before anything uses them (they reach Raft commands,
        error messages and the audit log)."""
        limit = self._limits.id_chars_max
        for name, value in fields.items():
            if len(value) > limit:
                await self._abort(context, "INVALID_ARGUMENT", f"{name}: at most {limit} chars (id_chars_max), "
                                                               f"got {len(value)}")

    async def _barrier(self, consistency: int, context: grpc.aio.ServicerContext) -> None:
        if consistency not in (pb.CONSISTENCY_LOCAL, pb.CONSISTENCY_LINEARIZABLE):
            await self._abort(context, "INVALID_ARGUMENT", f"consistency: LOCAL (0) or LINEARIZABLE (1), got {consistency}")
        if consistency == pb.CONSISTENCY_LINEARIZABLE:
            await self._propose(cmd.noop(), context)

    def _task_exists(self, task_id: str) -> bool:
        return task_id in self._fsm.tasks

    def _owned(self, record: TaskRecord) -> bool:
        """Whether the caller may see this task: always, unless its permission covers only its
        own tasks (agents) — then the task must be leased (now or last) to one of its executors."""
        access = current_access.get()
        if access is None or not access.own_only:
            return True
        executor = self._fsm.executors.get(record.assigned_executor or "")
        return executor is not None and executor.owner == access.subject

    async def _deny_unless_owned(self, record: TaskRecord, context) -> None:
        if self._owned(record):
            return
        access = current_access.get()
        if self._decisions is not None and access is not None:
            self._decisions.record(access.subject, access.principal.roles, f"access:{access.method}",
                                   f"task:{record.id}", "denied:PERMISSION_DENIED")
        await self._abort(context, "PERMISSION_DENIED",
                          f"task {record.id!r}: {access.subject!r} may read only tasks leased to its own executors")

    # -- tasks ---------------------------------------------------------------------------
    async def SubmitTask(self, request: pb.SubmitTaskRequest, context) -> pb.SubmitTaskResponse:  # noqa: N802
        value = await self._submit([request.task], request.idempotency_key, context, single=True)
        return pb.SubmitTaskResponse(task_id=value["ids"][0], duplicate=value["duplicate"], index=value["index"])

    async def SubmitDag(self, request: pb.SubmitDagRequest, context) -> pb.SubmitDagResponse:  # noqa: N802
        value = await self._submit(list(request.tasks), request.idempotency_key, context, single=False)
        ids = value["ids"]
        names = {spec.name: task_id for spec, task_id in zip(request.tasks, ids, strict=False) if spec.name}
        return pb.SubmitDagResponse(task_ids=names, ordered_ids=ids, duplicate=value["duplicate"], index=value["index"],
                                    dag_id=value.get("dag_id", ""))

    async def _submit(self, specs: list[pb.TaskSpec], key: str, context, *, single: bool) -> dict[str, Any]:
        try:
            idempotency_key = check_idempotency_key(key, self._limits)
            if idempotency_key is not None:
                # Fast path; `apply` is the authority (two racing retries both reach it).
                seen = self._fsm.idempotent_result(idempotency_key)
                if seen is not None:
                    return {"ids": list(seen[1]), "duplicate": True, "index": seen[0]}
            stamp = now_ms()
            rows, _ = build_task_specs(
                [task_input_from_pb(spec) for spec in specs], now_ms=stamp, new_id=new_task_id,
                task_exists=self._task_exists, limits=self._limits, field_prefix="task" if single else "tasks",
                single=single,
            )
        except CoordinatorError as exc:
            await self._abort(context, exc.code, exc.message)
        dag_id = "" if single else "d-" + os.urandom(8).hex()
        return await self._propose(cmd.submit_tasks(stamp, rows, idempotency_key, dag_id,
                                                     trace_parent=tracing.traceparent_of()), context)

    async def GetTask(self, request: pb.GetTaskRequest, context) -> pb.Task:  # noqa: N802
        await self._ids(context, task_id=request.task_id)
        await self._barrier(request.consistency, context)
        record = self._fsm.tasks.get(request.task_id)
        if record is None:
            await self._abort(context, "NOT_FOUND", f"task_id: no task {request.task_id[:80]!r}")
        await self._deny_unless_owned(record, context)
        return task_to_pb(record)

    async def ListTasks(self, request: pb.ListTasksRequest, context) -> pb.ListTasksResponse:  # noqa: N802
        await self._ids(context, dag_id=request.dag_id, after_id=request.after_id, type=request.type)
        limit = request.limit or LIST_LIMIT_DEFAULT
        if not 1 <= limit <= LIST_LIMIT_MAX:
            await self._abort(context, "INVALID_ARGUMENT", f"limit: must be between 1 and {LIST_LIMIT_MAX}, got {limit}")
        valid = {s.value for s in TaskStatus}
        statuses = set(request.status)
        unknown = statuses - valid
        if unknown:
            await self._abort(context, "INVALID_ARGUMENT", f"status: unknown {sorted(unknown)}; one of {sorted(valid)}")
        await self._barrier(request.consistency, context)
        with self._lock:
            if request.dag_id:
                ids = self._fsm.dag_tasks.get(request.dag_id)
                if ids is None:
                    records = None
                else:
                    records = [self._fsm.tasks[t] for t in ids]
            else:
                records = list(self._fsm.tasks.values())
        if records is None:
            await self._abort(context, "NOT_FOUND", f"dag_id: no DAG {request.dag_id[:80]!r}")
        access = current_access.get()
        if access is not None and access.own_only:
            records = [r for r in records if self._owned(r)]
        started = not request.after_id
        out: list[pb.Task] = []
        total = 0
        next_after = ""
        for record in records:
            if not started:
                started = record.id == request.after_id
                continue
            if statuses and record.status not in statuses:
                continue
            if request.type and record.type != request.type:
                continue
            total += 1
            if len(out) < limit:
                out.append(task_to_pb(record))
            elif not next_after:
                next_after = out[-1].id
        return pb.ListTasksResponse(tasks=out, next_after_id=next_after, total_matching=total)

    async def CancelTask(self, request: pb.CancelTaskRequest, context) -> pb.CancelTaskResponse:  # noqa: N802
        await self._ids(context, task_id=request.task_id)
        if len(request.reason.encode()) > self._limits.cancel_reason_bytes_max:
            await self._abort(context, "INVALID_ARGUMENT", f"reason: at most {self._limits.cancel_reason_bytes_max} bytes")
        if request.task_id not in self._fsm.tasks:
            await self._abort(context, "NOT_FOUND", f"task_id: no task {request.task_id[:80]!r}")
        await self._propose(cmd.cancel_task(now_ms(), request.task_id, request.reason), context)
        return pb.CancelTaskResponse(task=task_to_pb(self._fsm.tasks[request.task_id]))

    async def CancelDag(self, request: pb.CancelDagRequest, context) -> pb.CancelDagResponse:  # noqa: N802
        await self._ids(context, dag_id=request.dag_id)
        if len(request.reason.encode()) > self._limits.cancel_reason_bytes_max:
            await self._abort(context, "INVALID_ARGUMENT", f"reason: at most {self._limits.cancel_reason_bytes_max} bytes")
        value = await self._propose(cmd.cancel_dag(now_ms(), request.dag_id, request.reason), context)
        return pb.CancelDagResponse(cancelled_task_ids=value["cancelled"])

    async def WaitTasks(self, request: pb.WaitTasksRequest, context) -> pb.WaitTasksResponse:  # noqa: N802
        ids = list(dict.fromkeys(request.task_ids))
        if not ids or len(ids) > WAIT_TASKS_MAX:
            await self._abort(context, "INVALID_ARGUMENT", f"task_ids: 1..{WAIT_TASKS_MAX} ids, got {len(ids)}")
        await self._ids(context, **{"task_ids[]": max(ids, key=len)})
        missing = [task_id for task_id in ids if task_id not in self._fsm.tasks]
        if missing:
            await self._abort(context, "NOT_FOUND", f"task_ids: no task {missing[0][:80]!r}")
        for task_id in ids:
            await self._deny_unless_owned(self._fsm.tasks[task_id], context)
        timeout_s = request.timeout_s or WAIT_TIMEOUT_S_DEFAULT
        if not 0 < timeout_s <= WAIT_TIMEOUT_S_MAX:
            await self._abort(context, "INVALID_ARGUMENT", f"timeout_s: must be in (0, {WAIT_TIMEOUT_S_MAX}], got {timeout_s}")
        deadline = time.monotonic() + timeout_s
        while True:
            records = [self._fsm.tasks[task_id] for task_id in ids]
            all_final = all(record.status in FINAL_STATUSES for record in records)
            remaining = deadline - time.monotonic()
            if all_final or remaining <= 0:
                return pb.WaitTasksResponse(tasks=[task_to_pb(r) for r in records], all_final=all_final)
            await self._waiters.wait(min(remaining, WATCH_IDLE_RECHECK_S))

    # -- executors -----------------------------------------------------------------------
    async def RegisterExecutor(self, request: pb.RegisterExecutorRequest, context) -> pb.RegisterExecutorResponse:  # noqa: N802
        spec = request.executor
        try:
            if len(self._fsm.executors) >= self._limits.executors_max and spec.id not in self._fsm.executors:
                raise InvalidArgument(f"executor: at most {self._limits.executors_max} executors are registered")
            payload = build_executor_spec(executor_input_from_pb(spec), new_id=new_executor_id, limits=self._limits)
        except CoordinatorError as exc:
            await self._abort(context, exc.code, exc.message)
        value = await self._propose(cmd.register_executor(now_ms(), payload), context)
        return pb.RegisterExecutorResponse(executor_id=value["id"], index=value["index"])

    async def UnregisterExecutor(self, request, context) -> pb.UnregisterExecutorResponse:  # noqa: N802
        await self._ids(context, executor_id=request.executor_id)
        value = await self._propose(cmd.unregister_executor(now_ms(), request.executor_id), context)
        return pb.UnregisterExecutorResponse(index=value["index"])

    async def ListExecutors(self, request: pb.ListExecutorsRequest, context) -> pb.ListExecutorsResponse:  # noqa: N802
        await self._barrier(request.consistency, context)
        with self._lock:
            rows = [(r, len(self._fsm.executor_tasks.get(r.id, ()))) for r in self._fsm.executors.values()]
        dispatcher = self._dispatcher
        connected = dispatcher.connections if dispatcher is not None else {}
        return pb.ListExecutorsResponse(executors=[
            executor_to_pb(r, load, r.id in connected, dispatcher.heartbeat_age_s(r.id) if dispatcher else -1.0)
            for r, load in rows])

    async def RequeueTask(self, request: pb.RequeueTaskRequest, context) -> pb.RequeueTaskResponse:  # noqa: N802
        await self._ids(context, task_id=request.task_id)
        extra = request.extra_attempts or self._limits.max_attempts_default
        if not 1 <= extra <= self._limits.max_attempts_max:
            await self._abort(context, "INVALID_ARGUMENT",
                              f"extra_attempts: must be between 1 and {self._limits.max_attempts_max}, got {extra}")
        await self._propose(cmd.requeue_task(now_ms(), request.task_id, extra), context)
        return pb.RequeueTaskResponse(task=task_to_pb(self._fsm.tasks[request.task_id]))

    # -- cluster -------------------------------------------------------------------------
    async def ClusterStatus(self, request, context) -> pb.ClusterStatusResponse:  # noqa: N802
        return pb.ClusterStatusResponse(node=self._node_status(request.include_state_hash))

    async def ExecutorStream(self, request_iterator, context) -> AsyncIterator[pb.DispatchMessage]:  # noqa: N802
        async for message in self._dispatcher.executor_stream(request_iterator, context):
            yield message

    async def Delegate(self, request: pb.DelegateRequest, context) -> pb.DelegateResponse:  # noqa: N802
        await self._ids(context, parent_task_id=request.parent_task_id, executor_id=request.executor_id)
        request_id = request.request_id
        if not request_id or len(request_id) > self._limits.idempotency_key_chars_max or not request_id.isprintable():
            await self._abort(context, "INVALID_ARGUMENT",
                              f"request_id: 1..{self._limits.idempotency_key_chars_max} printable chars")
        key = f"delegate:{request.parent_task_id}:{request_id}"
        seen = self._fsm.idempotent_result(key)
        if seen is not None:
            return pb.DelegateResponse(task_ids=list(seen[1]), duplicate=True)
        try:
            stamp = now_ms()
            rows, _ = build_task_specs(
                [task_input_from_pb(spec) for spec in request.tasks], now_ms=stamp, new_id=new_task_id,
                task_exists=self._task_exists, limits=self._limits,
            )
        except CoordinatorError as exc:
            await self._abort(context, exc.code, exc.message)
        parent = (request.parent_task_id, request.parent_attempt, request.executor_id)
        value = await self._propose(cmd.submit_tasks(stamp, rows, key, "", parent,
                                                     trace_parent=tracing.traceparent_of()), context)
        return pb.DelegateResponse(task_ids=value["ids"], duplicate=value["duplicate"])

    # -- checkpoints -----------------------------------------------------------------------
    async def SaveCheckpoint(self, request: pb.SaveCheckpointRequest, context) -> pb.SaveCheckpointResponse:  # noqa: N802
        await self._ids(context, task_id=request.task_id, executor_id=request.executor_id)
        data: dict[str, Any] = {
            "task_id": request.task_id, "attempt": request.attempt, "executor_id": request.executor_id,
            "sequence_number": request.sequence_number, "kind": request.kind, "checksum": request.checksum,
            "payload_json": request.payload_json, "model_versions": dict(request.model_versions),
        }
        if request.base_sequence:
            data["base_sequence"] = request.base_sequence
        if request.payload_bytes:
            data["payload_bytes"] = request.payload_bytes
        try:
            saved = await self._checkpoints.create_checkpoint(data, timeout_s=context.time_remaining())
        except CoordinatorError as exc:
            await self._abort(context, exc.code, exc.message)
        except ProposeError as exc:
            await self._abort(context, exc.code, str(exc))
        return pb.SaveCheckpointResponse(id=saved.id, sequence_number=saved.sequence_number, index=saved.index,
                                         duplicate=saved.duplicate)

    async def RestoreCheckpoint(self, request: pb.RestoreCheckpointRequest, context) -> pb.RestoreCheckpointResponse:  # noqa: N802
        """For the attempt holding the lease. A node that already applied that lease has applied
        every checkpoint of the earlier attempts (each was fenced to its own lease, so it is
        earlier in the log): the lease check doubles as the freshness check. A node that lags
        behind the lease catches up through a barrier first."""
        await self._ids(context, task_id=request.task_id, executor_id=request.executor_id)
        record = self._fsm.tasks.get(request.task_id)
        if record is not None and record.attempt < request.attempt:
            await self._propose(cmd.noop(), context)
            record = self._fsm.tasks.get(request.task_id)
        if record is None:
            await self._abort(context, "NOT_FOUND", f"task_id: no task {request.task_id[:80]!r}")
        await self._deny_unless_owned(record, context)
        if (record.status not in ("assigned", "executing") or record.attempt != request.attempt
                or record.assigned_executor != request.executor_id):
            await self._abort(context, "FAILED_PRECONDITION",
                              f"StaleFencingToken: task {request.task_id!r} attempt {request.attempt} on "
                              f"{request.executor_id!r} is not the current lease (status {record.status}, "
                              f"attempt {record.attempt})")
        recovery = await self._checkpoints.restore_from_checkpoint(request.task_id)
        document = recovery.restored.document
        return pb.RestoreCheckpointResponse(
            found=document is not None, sequence_number=recovery.sequence_number,
            last_sequence=recovery.last_sequence, document_json=canonical_json(document) if document is not None else "",
            model_versions=recovery.model_versions, chain_deltas=recovery.chain.deltas,
            chain_bytes=recovery.chain.delta_bytes, problem=recovery.problem or "")

    async def ListCheckpoints(self, request: pb.ListCheckpointsRequest, context) -> pb.ListCheckpointsResponse:  # noqa: N802
        await self._ids(context, task_id=request.task_id)
        await self._barrier(request.consistency, context)
        record = await self._task_or_abort(request.task_id, context)
        records = self._fsm.checkpoints_of(request.task_id)
        return pb.ListCheckpointsResponse(checkpoints=[checkpoint_to_pb(r) for r in records],
                                          last_sequence=record.checkpoint_sequence,
                                          payload_bytes_total=sum(r.payload_bytes for r in records))

    async def GetCheckpoint(self, request: pb.GetCheckpointRequest, context) -> pb.GetCheckpointResponse:  # noqa: N802
        await self._ids(context, task_id=request.task_id)
        await self._barrier(request.consistency, context)
        await self._task_or_abort(request.task_id, context)
        records = self._fsm.checkpoints_of(request.task_id)
        wanted = request.sequence_number or (records[-1].sequence_number if records else 0)
        chosen = next((r for r in records if r.sequence_number == wanted), None)
        if chosen is None:
            held = f"{records[0].sequence_number}..{records[-1].sequence_number}" if records else "none"
            await self._abort(context, "NOT_FOUND", f"sequence_number: task {request.task_id!r} holds no checkpoint "
                                                    f"{wanted} (held: {held})")
        restored = restore([r for r in records if r.sequence_number <= wanted])
        return pb.GetCheckpointResponse(
            checkpoint=checkpoint_to_pb(chosen), payload_json=canonical_json(chosen.payload),
            document_json=canonical_json(restored.document) if restored.document is not None else "",
            restored_sequence=restored.sequence_number, problem=restored.problem or "")

    async def _task_or_abort(self, task_id: str, context) -> TaskRecord:
        record = self._fsm.tasks.get(task_id)
        if record is None:
            await self._abort(context, "NOT_FOUND", f"task_id: no task {task_id[:80]!r}")
        await self._deny_unless_owned(record, context)
        return record

    # -- security ------------------------------------------------------------------------
    async def RefreshToken(self, request: pb.RefreshTokenRequest, context) -> pb.RefreshTokenResponse:  # noqa: N802
        """The caller's own identity with a new expiry (it must still hold a valid token: an
        expired one never reaches here). Tokens carry only subject and roles, so a refresh can
        never widen them."""
        access = current_access.get()
        if self._token_issuer is None or access is None or access.principal.kind != "token":
            await self._abort(context, "FAILED_PRECONDITION", "RefreshToken: only for callers with a token, on a "
                                                              "node with security on")
        ttl_s = request.ttl_s or TOKEN_TTL_S_DEFAULT
        if not 1 <= ttl_s <= TOKEN_TTL_S_MAX:
            await self._abort(context, "INVALID_ARGUMENT", f"ttl_s: between 1 and {TOKEN_TTL_S_MAX}, got {ttl_s}")
        token = self._token_issuer().refresh(access.principal, ttl_s)
        return pb.RefreshTokenResponse(token=token, expires_unix_s=int(time.time()) + ttl_s)

    async def ListAudit(self, request: pb.ListAuditRequest, context) -> pb.ListAuditResponse:  # noqa: N802
        limit = request.limit or AUDIT_LIST_LIMIT_DEFAULT
        if not 1 <= limit <= AUDIT_LIST_LIMIT_MAX:
            await self._abort(context, "INVALID_ARGUMENT", f"limit: between 1 and {AUDIT_LIST_LIMIT_MAX}, got {limit}")
        if request.from_seq < 0:
            await self._abort(context, "INVALID_ARGUMENT", "from_seq: must be >= 0")
        await self._barrier(request.consistency, context)
        with self._lock:
            chain = self._fsm.audit
            records = chain.records_from(request.from_seq, limit)
            heads, anchor, last_seq = chain.heads, chain.anchor, chain.last_seq
        return pb.ListAuditResponse(
            records=[pb.AuditRecord(seq=r.seq, index=r.index, time_unix_ms=r.time_ms, node=r.node, who=r.who,
                                    roles=list(r.roles), action=r.action, resource=r.resource, outcome=r.outcome,
                                    digest=r.digest, sig=r.sig, prev=r.prev, hash=r.hash) for r in records],
            heads=[audit_head_to_pb(h) for h in heads], anchor=audit_head_to_pb(anchor) if anchor else None,
            has_anchor=anchor is not None, last_seq=last_seq)

    # -- secrets ---------------------------------------------------------------------------
    async def _kek(self, context, kek_id: str = "") -> Kek:
        try:
            if self._keks is None:
                raise SecretError("no KEK on this node (started with --insecure-dev?)")
            return self._keks.by_id(kek_id) if kek_id else self._keks.active
        except SecretError as exc:
            await self._abort(context, "FAILED_PRECONDITION", f"secrets: {exc}")

    async def PutSecret(self, request: pb.PutSecretRequest, context) -> pb.PutSecretResponse:  # noqa: N802
        kek = await self._kek(context)
        try:
            envelope = seal(request.name, request.value, kek)
        except SecretError as exc:
            await self._abort(context, "INVALID_ARGUMENT", str(exc))
        value = await self._propose(cmd.put_secret(now_ms(), request.name, envelope), context)
        return pb.PutSecretResponse(index=value["index"])

    async def GetSecret(self, request: pb.GetSecretRequest, context) -> pb.GetSecretResponse:  # noqa: N802
        await self._ids(context, name=request.name)
        envelope = self._fsm.secrets.get(request.name)
        if envelope is None:
            await self._abort(context, "NOT_FOUND", f"name: no secret {request.name[:128]!r}")
        kek = await self._kek(context, envelope["kek_id"])
        try:
            value = unseal(request.name, envelope, kek)
        except SecretError as exc:
            await self._abort(context, "FAILED_PRECONDITION", str(exc))
        access = current_access.get()
        if self._decisions is not None and access is not None:   # who read which secret
            self._decisions.record(access.subject, access.principal.roles, "access:GetSecret",
                                   f"secret:{request.name}", "allowed")
        return pb.GetSecretResponse(value=value)

    async def ListSecrets(self, request: pb.ListSecretsRequest, context) -> pb.ListSecretsResponse:  # noqa: N802
        return pb.ListSecretsResponse(secrets=[
            pb.SecretInfo(name=name, kek_id=e["kek_id"], updated_unix_ms=e["updated_ms"])
            for name, e in sorted(self._fsm.secrets.items())])

    async def DeleteSecret(self, request: pb.DeleteSecretRequest, context) -> pb.DeleteSecretResponse:  # noqa: N802
        await self._ids(context, name=request.name)
        value = await self._propose(cmd.delete_secret(now_ms(), request.name), context)
        return pb.DeleteSecretResponse(index=value["index"])

    async def RewrapSecrets(self, request: pb.RewrapSecretsRequest, context) -> pb.RewrapSecretsResponse:  # noqa: N802
        """After `coordctl secret rotate-kek` put a new KEK first in the KEK file: re-wrap the
        data keys still wrapped by an older one, one KEK at a time, all or nothing each."""
        active = await self._kek(context)
        await self._barrier(pb.CONSISTENCY_LINEARIZABLE, context)
        total = 0
        old_ids = sorted({e["kek_id"] for e in self._fsm.secrets.values() if e["kek_id"] != active.kek_id})
        for old_id in old_ids:
            old = await self._kek(context, old_id)
            items = {}
            try:
                for name, envelope in self._fsm.secrets.items():
                    if envelope["kek_id"] == old_id:
                        held = {k: envelope[k] for k in ENVELOPE_FIELDS}
                        items[name] = rewrap(name, held, old, active)
            except SecretError as exc:
                await self._abort(context, "FAILED_PRECONDITION", str(exc))
            value = await self._propose(cmd.rewrap_secrets(now_ms(), old_id, items), context)
            total += value["rewrapped"]
        return pb.RewrapSecretsResponse(rewrapped=total, kek_id=active.kek_id)

    async def RelayHeartbeats(self, request: pb.RelayHeartbeatsRequest, context) -> pb.RelayHeartbeatsResponse:  # noqa: N802
        self._dispatcher.relay(list(request.executor_ids))
        return pb.RelayHeartbeatsResponse()

    async def Watch(self, request: pb.WatchRequest, context) -> AsyncIterator[pb.Event]:  # noqa: N802
        kinds = set(request.kinds)
        if request.from_index < 0:
            await self._abort(context, "INVALID_ARGUMENT", "from_index: must be >= 0")
        cursor_index = request.from_index or self._fsm.last_applied_index + 1
        cursor_seq = -1  # resume inside an index: a DAG submission emits thousands of events at one index
        while True:
            try:
                with self._lock:
                    events = self._fsm.events_from(cursor_index, WATCH_BATCH_EVENTS_MAX, cursor_seq)
            except CoordinatorError as exc:
                await self._abort(context, exc.code, exc.message)
            if not events:
                await self._waiters.wait(WATCH_IDLE_RECHECK_S)
                continue
            for event in events:
                if kinds and event[2] not in kinds:
                    continue
                yield pb.Event(index=event[0], seq=event[1], kind=event[2], task_id=event[3], executor_id=event[4],
                               time_unix_ms=event[5], data_json=event[6])
            cursor_index, cursor_seq = events[-1][0], events[-1][1]

