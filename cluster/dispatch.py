"""Dispatch: executor streams on every node, the leader's scheduler, and executor liveness.

    executor agent ══ExecutorStream══► any node: Dispatcher
        hello ─────────────► propose REGISTER_EXECUTOR, then re-send every attempt still leased to it
        started/completed/failed ─► propose START/COMPLETE/FAIL (fenced in apply) ─► ack
        heartbeat ─────────► liveness: local, relayed to the leader every heartbeat interval
    applied events (every node) ──► push Assignment / CancelAttempt to executors connected here
                                └─► scheduler mirror: TaskReady adds, Assigned/Cancelled/Failed remove
    leader only, each round (woken by applied entries, at most every round_interval_s):
        policy.select(view) ─► propose ASSIGN_TASKS ─► apply re-validates every item
        executors silent for lease_ttl_s ─► propose EXECUTOR_LOST (their tasks go back)

Heartbeats never go through Raft: liveness is the leader's soft state, and only transitions are
committed. A new leader gives every executor one lease TTL of grace before declaring it lost, so a
leader change alone never expires a lease.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from cluster import tracing
from cluster.credentials import ClientCredentials
from cluster.proposer import ProposeError, Proposer
from cluster.service import executor_input_from_pb
from coordinator import commands as cmd
from coordinator.errors import Compacted, CoordinatorError
from coordinator.fsm import LEASED_STATUSES, CoordinatorFSM
from coordinator.limits import Limits
from coordinator.validation import build_executor_spec
from proto import coordinator_pb2 as pb
from scheduler.policies import get_policy
from scheduler.queue import ReadyQueue
from scheduler.view import ExecutorView, SchedulerView, TaskView

log = logging.getLogger("coordinator.dispatch")


@dataclass(frozen=True)
class DispatchSettings:
    lease_ttl_s: float = 5.0  # well above the 0.2-0.4 s election timeout
    heartbeat_interval_s: float = 1.0
    round_interval_s: float = 0.2
    assign_batch_max: int = 512
    policy: str = "deadline_aware"
    retry_backoff_base_s: float = 1.0
    retry_backoff_max_s: float = 60.0
    retry_jitter_fraction: float = 0.2
    result_bytes_max: int = 1 << 20
    error_chars_max: int = 2000
    outgoing_queue_max: int = 10_000  # per executor stream; a stream that falls this far behind is closed
    reports_in_flight_max: int = 256  # per executor stream
    events_batch_max: int = 1000
    batch_messages_max: int = 256  # stream messages per gRPC message, either direction
    progress_message_chars_max: int = 1024


def now_ms() -> int:
    return int(time.time() * 1000)


class _Connection:
    def __init__(self, executor_id: str, queue_max: int, spec: dict[str, Any]) -> None:
        self.executor_id = executor_id
        self.spec = spec  # to re-register it if the leader declared it lost while it lives
        self.reregistering = False
        self.queue: asyncio.Queue[pb.DispatchMessage | None] = asyncio.Queue(queue_max)
        # task -> attempt pushed on this stream; an entry leaves when the task leaves the
        # executor, so this is bounded by what it holds, not by everything it ever ran
        self.pushed: dict[str, int] = {}
        self.closed = False

    def push(self, message: pb.DispatchMessage) -> None:
        if self.closed:
            return
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            # The executor cannot keep up; closing makes it reconnect, and a reconnect re-sends
            # every attempt still leased to it, so nothing is lost.
            log.warning("executor %s: outgoing queue full; closing its stream", self.executor_id)
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.queue.put_nowait(None)
            except asyncio.QueueFull:
                pass


class Dispatcher:
    def __init__(
        self,
        *,
        node_id: str,
        fsm: CoordinatorFSM,
        fsm_lock: Any,
        proposer: Proposer,
        waiters: Any,
        is_leader: Callable[[], bool],
        leader_grpc_address: Callable[[], str | None],
        limits: Limits,
        settings: DispatchSettings | None = None,
        relay_credentials: ClientCredentials | None = None,
    ) -> None:
        self.node_id = node_id
        self._relay_credentials = relay_credentials or ClientCredentials.insecure()
        self._fsm = fsm
        self._lock = fsm_lock
        self._proposer = proposer
        self._waiters = waiters
        self._is_leader = is_leader
        self._leader_grpc_address = leader_grpc_address
        self._limits = limits
        self.settings = settings or DispatchSettings()
        self._policy = get_policy(self.settings.policy)
        self.connections: dict[str, _Connection] = {}
        self._local_seen: dict[str, float] = {}  # executor -> monotonic time of its last message here
        self._leader_seen: dict[str, float] = {}  # leader only: executor -> last sign of life anywhere
        self._queue = ReadyQueue()
        self._ready_seq = itertools.count()
        self._delayed: list[tuple[int, str]] = []  # (not_before_ms, task_id): retry backoff
        # Leader, traced tasks only: when each became assignable (the start of its `schedule`
        # span). At most one entry per ready task; dropped when it is assigned or ends.
        self._ready_ms: dict[str, int] = {}
        self._was_leader = False
        # Set by the event pump after each batch: the scheduler must run after the pump has
        # mirrored new ready tasks, not merely after an entry was applied (it raced the pump
        # and then slept a whole round: dispatch p50 was 211 ms).
        self._mirror_changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._stopping = asyncio.Event()
        self._relay_channel: tuple[str, grpc.aio.Channel] | None = None
        self.assignments_proposed = 0
        self._profiles: dict[str, dict[str, float]] = {}  # performance_profile_json -> scheduler figures

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        cursor = self._fsm.last_applied_index + 1  # the mirror is built when this node becomes leader
        self._tasks = [
            asyncio.create_task(self._event_pump(cursor), name="dispatch-events"),
            asyncio.create_task(self._scheduler_loop(), name="dispatch-scheduler"),
            asyncio.create_task(self._relay_loop(), name="dispatch-relay"),
        ]

    async def stop(self) -> None:
        self._stopping.set()
        for connection in list(self.connections.values()):
            connection.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._relay_channel is not None:
            await self._relay_channel[1].close()

    # ------------------------------------------------------------------ executor streams
    async def executor_stream(self, requests: AsyncIterator[pb.ExecutorMessage], context: grpc.aio.ServicerContext
                              ) -> AsyncIterator[pb.DispatchMessage]:
        requests = aiter(requests)  # one iterator for the hello and the reports that follow it
        try:
            first = await asyncio.wait_for(anext(requests), self.settings.lease_ttl_s)
        except (StopAsyncIteration, TimeoutError):
            return
        if first.WhichOneof("kind") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be hello")
        spec = first.hello.executor
        if not spec.id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "hello.executor.id: required (a stable id)")
        try:
            payload = build_executor_spec(executor_input_from_pb(spec), new_id=lambda: spec.id, limits=self._limits)
            result = await self._proposer.propose(cmd.register_executor(now_ms(), payload))
        except CoordinatorError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        except ProposeError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        if not result.ok:
            code = grpc.StatusCode.PERMISSION_DENIED if result.code == "PERMISSION_DENIED" else grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(code, result.message)
        executor_id = spec.id
        old = self.connections.get(executor_id)
        if old is not None:
            old.close()
        connection = _Connection(executor_id, self.settings.outgoing_queue_max, payload)
        self.connections[executor_id] = connection
        self._seen(executor_id)
        log.info("executor %s connected", executor_id)
        yield pb.DispatchMessage(welcome=pb.Welcome(
            executor_id=executor_id, node_id=self.node_id, heartbeat_interval_s=self.settings.heartbeat_interval_s,
            lease_ttl_s=self.settings.lease_ttl_s))
        self._push_leased(connection)
        reader = asyncio.create_task(self._read_reports(requests, connection))
        try:
            batch_max = self.settings.batch_messages_max
            while True:
                message = await connection.queue.get()
                if message is None:
                    break
                if connection.queue.empty():
                    yield message
                    continue
                # Whatever queued up meanwhile goes out as one gRPC message.
                messages = [message]
                closed = False
                while len(messages) < batch_max and not connection.queue.empty():
                    queued = connection.queue.get_nowait()
                    if queued is None:
                        closed = True
                        break
                    messages.append(queued)
                yield pb.DispatchMessage(batch=pb.DispatchBatch(messages=messages))
                if closed:
                    break
        finally:
            reader.cancel()
            connection.close()
            if self.connections.get(executor_id) is connection:
                del self.connections[executor_id]
            log.info("executor %s disconnected", executor_id)

    def _push_leased(self, connection: _Connection) -> None:
        """After a (re)connect: every attempt still leased to this executor, so none is lost."""
        with self._lock:
            task_ids = list(self._fsm.executor_tasks.get(connection.executor_id, ()))
            records = [self._fsm.tasks[t] for t in task_ids]
        for record in records:
            self._push_assignment(connection, record)

    def _push_assignment(self, connection: _Connection, record: Any) -> None:
        if record.status not in LEASED_STATUSES or record.assigned_executor != connection.executor_id:
            return
        if connection.pushed.get(record.id) == record.attempt:
            return
        connection.pushed[record.id] = record.attempt
        connection.push(pb.DispatchMessage(assignment=pb.Assignment(
            task_id=record.id, attempt=record.attempt, type=record.type, input_json=record.input_json,
            metadata=record.metadata or {}, deadline_unix_ms=record.deadline_ms,
            lease_expires_unix_ms=record.lease_expires_ms, trace_parent=record.trace_parent)))

    async def _read_reports(self, requests: AsyncIterator[pb.ExecutorMessage], connection: _Connection) -> None:
        in_flight = asyncio.Semaphore(self.settings.reports_in_flight_max)
        pending: set[asyncio.Task] = set()
        try:
            async for message in requests:
                self._seen(connection.executor_id)
                record = self._fsm.executors.get(connection.executor_id)
                if (record is None or record.status != "online") and not connection.reregistering:
                    # Declared lost (e.g. it was paused past its lease) but talking again: bring
                    # it back. Its old attempts stay fenced out; it gets new work.
                    connection.reregistering = True
                    task = asyncio.create_task(self._reregister(connection))
                    pending.add(task)  # asyncio keeps only weak references to tasks
                    task.add_done_callback(pending.discard)
                kind = message.WhichOneof("kind")
                if kind == "batch":
                    parts = message.batch.messages[:self.settings.batch_messages_max]
                else:
                    parts = (message,)
                for part in parts:
                    kind = part.WhichOneof("kind")
                    if kind not in ("started", "completed", "failed", "progress"):
                        continue  # heartbeats count as life above; a nested batch or hello is ignored
                    await in_flight.acquire()
                    task = asyncio.create_task(self._handle_report(connection, kind, getattr(part, kind)))
                    pending.add(task)
                    task.add_done_callback(lambda t: (pending.discard(t), in_flight.release()))
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("executor %s: reading its stream failed", connection.executor_id)
        finally:
            connection.close()

    async def _reregister(self, connection: _Connection) -> None:
        try:
            await self._proposer.propose(cmd.register_executor(now_ms(), connection.spec))
            log.info("executor %s is back: re-registered", connection.executor_id)
        except ProposeError as exc:
            log.info("executor %s: re-registration not committed: %s", connection.executor_id, exc)
        finally:
            connection.reregistering = False

    async def _handle_progress(self, connection: _Connection, report: pb.AttemptProgress) -> None:
        """Replicated (so `task show` on any node has it) and fenced; never acked: the next
        report supersedes a lost one, and the agent sends at most one per attempt per interval."""
        fraction, message = report.fraction, report.message
        if not 0.0 <= fraction <= 1.0 or len(message) > self.settings.progress_message_chars_max:
            log.warning("executor %s: progress of %s/%s dropped: fraction must be in 0.0..1.0 and message at most "
                        "progress_message_chars_max=%d chars", connection.executor_id, report.task_id, report.attempt,
                        self.settings.progress_message_chars_max)
            return
        try:
            await self._proposer.propose(cmd.report_progress(now_ms(), report.task_id, report.attempt,
                                                             connection.executor_id, fraction, message))
        except ProposeError as exc:
            log.debug("progress of %s/%s not committed: %s", report.task_id, report.attempt, exc)

    async def _handle_report(self, connection: _Connection, kind: str, report: Any) -> None:
        if kind == "progress":
            await self._handle_progress(connection, report)
            return
        executor_id = connection.executor_id
        stamp = now_ms()
        if kind == "started":
            command = cmd.start_task(stamp, report.task_id, report.attempt, executor_id)
        elif kind == "completed":
            started = report.implies_started
            output = report.output_json or "null"
            if len(output.encode()) > self.settings.result_bytes_max:
                command = cmd.fail_task(stamp, report.task_id, report.attempt, executor_id,
                                        f"result: at most {self.settings.result_bytes_max} bytes", False, 0, started)
            else:
                try:
                    json.loads(output)
                    command = cmd.complete_task(stamp, report.task_id, report.attempt, executor_id, output, started)
                except ValueError:
                    command = cmd.fail_task(stamp, report.task_id, report.attempt, executor_id,
                                            "result: not valid JSON", False, 0, started)
        else:
            command = cmd.fail_task(stamp, report.task_id, report.attempt, executor_id,
                                    report.error[: self.settings.error_chars_max], report.retryable,
                                    self._backoff_ms(report.attempt), report.implies_started)
        record = self._fsm.tasks.get(report.task_id)
        span = tracing.child_span(f"report.{kind}", record.trace_parent if record is not None else "",
                                  attributes={"task.id": report.task_id, "task.attempt": report.attempt,
                                              "executor.id": executor_id, "node.id": self.node_id})
        try:
            result = await self._proposer.propose(command)
            accepted, error = result.ok, result.message
        except ProposeError as exc:
            # Outcome unknown: no ack, so the agent re-sends the report (idempotent under fencing).
            log.info("report %s %s/%s not committed: %s", kind, report.task_id, report.attempt, exc)
            tracing.end_propose_span(span, None, str(exc))
            return
        tracing.end_propose_span(span, result, "" if accepted else f"not accepted: {error}")
        connection.push(pb.DispatchMessage(ack=pb.ReportAck(task_id=report.task_id, attempt=report.attempt,
                                                            accepted=accepted, error=error)))

    def _backoff_ms(self, attempt: int) -> int:
        """Exponential backoff with jitter, stamped by the proposer (apply never draws randomness)."""
        s = self.settings
        # The exponent is capped: an attempt number comes from the executor (2 ** 2**31 would
        # stall the loop; a float of 2 ** 1100 overflows), and the cap is reached long before.
        base = min(s.retry_backoff_max_s, s.retry_backoff_base_s * 2 ** min(max(0, attempt - 1), 62))
        jitter = 1 + random.uniform(-s.retry_jitter_fraction, s.retry_jitter_fraction)
        return int(base * jitter * 1000)

    # ------------------------------------------------------------------ liveness
    def _seen(self, executor_id: str) -> None:
        now = time.monotonic()
        self._local_seen[executor_id] = now
        if self._is_leader():
            self._leader_seen[executor_id] = now

    def heartbeat_age_s(self, executor_id: str) -> float:
        """Seconds since the executor's last sign of life as this node knows it (its own stream,
        or on the leader the relayed heartbeats); -1 when this node cannot tell."""
        seen = [t for t in (self._local_seen.get(executor_id), self._leader_seen.get(executor_id)) if t is not None]
        if executor_id not in self.connections and not self._is_leader():
            return -1.0
        return time.monotonic() - max(seen) if seen else -1.0

    def relay(self, executor_ids: list[str]) -> None:
        """Heartbeats relayed by a follower for the executors connected to it."""
        if not self._is_leader():
            return
        now = time.monotonic()
        for executor_id in executor_ids[:self._limits.executors_max]:
            self._leader_seen[executor_id] = now

    async def _relay_loop(self) -> None:
        from proto import coordinator_pb2_grpc as pb_grpc

        while not self._stopping.is_set():
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            if self._is_leader():
                continue
            horizon = time.monotonic() - self.settings.heartbeat_interval_s * 2
            alive = [e for e, t in self._local_seen.items() if t >= horizon and e in self.connections]
            address = self._leader_grpc_address()
            if not alive or not address:
                continue
            try:
                if self._relay_channel is None or self._relay_channel[0] != address:
                    if self._relay_channel is not None:
                        await self._relay_channel[1].close()
                    self._relay_channel = (address, self._relay_credentials.aio_channel(address))
                stub = pb_grpc.CoordinatorStub(self._relay_channel[1])
                await stub.RelayHeartbeats(pb.RelayHeartbeatsRequest(executor_ids=alive, from_node_id=self.node_id),
                                           timeout=self.settings.heartbeat_interval_s)
            except grpc.aio.AioRpcError as exc:
                log.debug("heartbeat relay to %s failed: %s", address, exc.code())

    # ------------------------------------------------------------------ applied events
    async def _event_pump(self, cursor_index: int) -> None:
        cursor_seq = -1
        while not self._stopping.is_set():
            try:
                with self._lock:
                    events = self._fsm.events_from(cursor_index, self.settings.events_batch_max, cursor_seq)
                # Handled without the lock, which would stall the apply thread (and with it Raft's
                # tick) for the whole batch. `_on_event` only does single reads of the FSM's dicts
                # (atomic under the GIL) and its records are immutable tuples; state newer than the
                # event is fine: a task no longer ready is skipped, a later event says what changed.
                for event in events:
                    try:
                        self._on_event(event)
                    except Exception:  # one bad event must not stop dispatch for everyone
                        log.exception("dispatching event %s failed", event[:5])
            except Compacted:
                # Fell behind the event ring: resynchronize from current state.
                with self._lock:
                    self._rebuild_mirror()
                    cursor_index, cursor_seq = self._fsm.last_applied_index + 1, -1
                for connection in list(self.connections.values()):
                    self._push_leased(connection)
                continue
            if events:
                cursor_index, cursor_seq = events[-1][0], events[-1][1]
                self._mirror_changed.set()
            else:
                await self._waiters.wait(0.5)

    def _on_event(self, event: tuple) -> None:
        kind, task_id, executor_id = event[2], event[3], event[4]
        # Only the leader schedules, and a new leader rebuilds its mirror from state, so
        # followers skip mirroring (it was their main cost under DAG load).
        mirror = self._was_leader
        if kind == "TaskReady":
            if mirror:
                self._mirror_add(task_id)
                self._note_ready(task_id, event[5])
        elif kind == "TaskAssigned":
            if mirror:
                self._queue.discard(task_id)
                self._trace_assigned(task_id, executor_id, event)
            connection = self.connections.get(executor_id)
            if connection is not None:
                self._push_assignment(connection, self._fsm.tasks[task_id])
        elif kind == "TaskCancelled":
            if mirror:
                self._queue.discard(task_id)
            connection = self.connections.get(executor_id) if executor_id else None
            if connection is not None:
                attempt = json.loads(event[6]).get("attempt", 0)
                connection.push(pb.DispatchMessage(cancel=pb.CancelAttempt(task_id=task_id, attempt=attempt,
                                                                          reason="cancelled")))
        elif kind == "TaskFailed":
            if mirror:
                self._queue.discard(task_id)
        elif kind in ("ExecutorLost", "ExecutorUnregistered"):
            self._leader_seen.pop(executor_id, None)
        if kind in ("TaskCancelled", "TaskFailed"):
            self._ready_ms.pop(task_id, None)   # a retry's TaskReady (after its TaskFailed) notes it again
        if kind in ("TaskCompleted", "TaskFailed", "TaskCancelled", "TaskRequeued") and executor_id:
            connection = self.connections.get(executor_id)
            if connection is not None:
                connection.pushed.pop(task_id, None)

    # ------------------------------------------------------------------ traces (leader)
    def _note_ready(self, task_id: str, time_ms: int) -> None:
        if not tracing.enabled():
            return
        record = self._fsm.tasks.get(task_id)
        if record is not None and record.trace_parent:
            # A retry becomes assignable when its backoff ends, not when it was re-queued.
            self._ready_ms[task_id] = max(time_ms, record.not_before_ms)

    def _trace_assigned(self, task_id: str, executor_id: str, event: tuple) -> None:
        """`schedule`: from assignable to assigned, as the leader saw it — the span that shows a
        task waiting for an executor. A new leader that did not see the task become ready starts
        it at creation."""
        ready_ms = self._ready_ms.pop(task_id, None)
        record = self._fsm.tasks.get(task_id)
        if record is None or not record.trace_parent:
            return
        start_ms = ready_ms if ready_ms is not None else record.created_at_ms
        span = tracing.child_span("schedule", record.trace_parent, start_time_ns=tracing.ms_to_ns(start_ms),
                                  attributes={"task.id": task_id, "task.type": record.type,
                                              "task.attempt": record.attempt, "executor.id": executor_id,
                                              "node.id": self.node_id, "raft.index": event[0]})
        if span is not None:
            span.end()

    # ------------------------------------------------------------------ scheduler (leader)
    def _rebuild_mirror(self) -> None:
        self._queue = ReadyQueue()
        self._delayed = []
        self._ready_ms = {}
        for task_id in self._fsm.ready:
            self._mirror_add(task_id)

    def _mirror_add(self, task_id: str) -> None:
        record = self._fsm.tasks.get(task_id)
        if record is None or task_id not in self._fsm.ready:
            return
        if record.not_before_ms:
            heapq.heappush(self._delayed, (record.not_before_ms, task_id))
            return
        self._queue.discard(task_id)
        self._queue.add(self._task_view(record))

    def _task_view(self, record: Any) -> TaskView:
        # created_seq orders equal priorities first come, first served; a whole DAG shares one
        # Raft index, so the mirror numbers tasks in the order they became ready.
        return TaskView(id=record.id, type=record.type, priority=record.priority, deadline_ms=record.deadline_ms,
                        created_seq=next(self._ready_seq))

    async def _scheduler_loop(self) -> None:
        while not self._stopping.is_set():
            # Cleared before the round: whatever the pump mirrors during it wakes the next one.
            self._mirror_changed.clear()
            try:
                if self._is_leader():
                    if not self._was_leader:
                        self._become_leader()
                    await self._expire_silent_executors()
                    planned = await self._schedule_round()
                    if planned:
                        continue  # more may be ready right away
                else:
                    self._was_leader = False
                try:
                    await asyncio.wait_for(self._mirror_changed.wait(), self.settings.round_interval_s)
                except TimeoutError:
                    pass
            except asyncio.CancelledError:
                raise
            except ProposeError as exc:
                log.info("scheduling round not committed: %s", exc)
                await asyncio.sleep(self.settings.round_interval_s)
            except Exception:
                log.exception("scheduling round failed")
                await asyncio.sleep(self.settings.round_interval_s)

    def _become_leader(self) -> None:
        self._was_leader = True
        now = time.monotonic()
        with self._lock:
            # One lease TTL of grace for every executor: a leader change alone expires nothing.
            self._leader_seen = {e: now for e, r in self._fsm.executors.items() if r.status == "online"}
            self._rebuild_mirror()
        log.info("node %s leads: scheduling %d ready tasks", self.node_id, len(self._queue))

    async def _expire_silent_executors(self) -> None:
        horizon = time.monotonic() - self.settings.lease_ttl_s
        with self._lock:  # the apply thread may register an executor meanwhile
            silent = [e for e, r in self._fsm.executors.items()
                      if r.status == "online" and self._leader_seen.setdefault(e, time.monotonic()) < horizon]
        for executor_id in silent:
            self._leader_seen.pop(executor_id, None)
            log.info("executor %s silent for %.1f s: declaring it lost", executor_id, self.settings.lease_ttl_s)
            await self._proposer.propose(cmd.executor_lost(now_ms(), executor_id,
                                                           f"no heartbeat for {self.settings.lease_ttl_s:.1f} s"))

    async def _report_unschedulable(self, unschedulable: tuple, stamp: int) -> None:
        items = []
        for entry in unschedulable:
            record = self._fsm.tasks.get(entry.task_id)
            if record is not None and record.error != f"unschedulable: {entry.reason}":
                items.append([entry.task_id, entry.reason])
        if items:
            await self._proposer.propose(cmd.mark_unschedulable(stamp, items))

    def _profile_figures(self, profile_json: str) -> dict[str, float]:
        """cost_per_task and latency_s_p50 from an executor's performance profile (what
        `coordctl executor profile` measured, or what its adapter declared); parsed once per
        distinct text, bounded by the number of registered executors."""
        figures = self._profiles.get(profile_json)
        if figures is None:
            figures = {}
            try:
                profile = json.loads(profile_json) if profile_json else {}
            except ValueError:
                profile = {}
            for name in ("cost_per_task", "latency_s_p50"):
                value = profile.get(name) if isinstance(profile, dict) else None
                if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf"):
                    figures[name] = float(value)
            if len(self._profiles) >= self._limits.executors_max:
                self._profiles.clear()
            self._profiles[profile_json] = figures
        return figures

    async def _schedule_round(self) -> int:
        stamp = now_ms()
        while self._delayed and self._delayed[0][0] <= stamp:
            _, task_id = heapq.heappop(self._delayed)
            record = self._fsm.tasks.get(task_id)
            if record is not None and task_id in self._fsm.ready:
                self._queue.discard(task_id)
                self._queue.add(self._task_view(record))
        if not len(self._queue):
            return 0
        with self._lock:
            executors = tuple(
                ExecutorView(id=r.id, type=r.type, task_types=frozenset(r.task_types), capacity=r.capacity,
                             load=len(self._fsm.executor_tasks.get(r.id, ())),
                             success_rate=(r.tasks_completed + 1) / (r.tasks_completed + r.tasks_failed + 1),
                             **self._profile_figures(r.performance_profile_json))
                for r in self._fsm.executors.values() if r.status == "online"
            )
        if not executors:
            return 0
        plan = self._policy.select(SchedulerView(self._queue, executors), stamp, self.settings.assign_batch_max)
        await self._report_unschedulable(plan.unschedulable, stamp)
        items = []
        for assignment in plan.assignments:
            record = self._fsm.tasks.get(assignment.task_id)
            self._queue.discard(assignment.task_id)
            if record is not None and assignment.task_id in self._fsm.ready:
                items.append([assignment.task_id, assignment.executor_id, record.attempt + 1])
        if not items:
            return 0
        lease_ms = int(self.settings.lease_ttl_s * 1000)
        result = await self._proposer.propose(cmd.assign_tasks(stamp, lease_ms, items))
        self.assignments_proposed += len(items)
        if result.ok:
            for task_id, _reason in result.value["rejected"]:
                self._mirror_add(task_id)  # still ready? then it is planned again next round
            return len(result.value["assigned"])
        return 0
