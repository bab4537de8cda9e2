"""The executor agent (cluster/agent.py) against in-process fake coordinator nodes: a small
CoordinatorServicer implementing only ExecutorStream on 127.0.0.1:0, which records every message
it receives and lets a test push assignments, cancels and acks, or kill the stream or the node.

Every wait is bounded (`eventually`), every agent is stopped and every server is stopped in
`finally`, whatever the test did.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from cluster.agent import ADAPTER_FACTORIES, AgentLimits, ExecutorAgent, build_adapter
from cluster.credentials import ClientCredentials
from executors.algorithmic import AlgorithmicAdapter
from executors.base import ExecutionContext, ExecutorResult, ExecutorTask
from proto import coordinator_pb2 as pb
from proto import coordinator_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(60)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT_S = 5.0
# The fake nodes below speak plaintext gRPC (the agent's protocol is under test, not TLS).
INSECURE = ClientCredentials.insecure()
FAST = AgentLimits(reconnect_backoff_initial_s=0.02, reconnect_backoff_max_s=0.2, welcome_timeout_s=2.0,
                   write_timeout_s=2.0, cancel_grace_s=0.5, shutdown_grace_s=1.0, shutdown_flush_s=0.5,
                   report_resend_interval_s=0.3)
_ABORT = object()
_REPORT_KINDS = ("started", "completed", "failed")


# ------------------------------------------------------------------------------------ fake server


class FakeStream:
    """The server end of one ExecutorStream: what it received, and a queue of pushes."""

    def __init__(self, hello: pb.ExecutorHello) -> None:
        self.hello = hello
        self.received: list[pb.ExecutorMessage] = []
        self.pushes: asyncio.Queue[Any] = asyncio.Queue(maxsize=1_000)
        self.ended = asyncio.Event()

    def assign(self, task_id: str, attempt: int, type_: str, task_input: Any) -> None:
        self.pushes.put_nowait(pb.DispatchMessage(assignment=pb.Assignment(
            task_id=task_id, attempt=attempt, type=type_, input_json=json.dumps(task_input))))

    def cancel(self, task_id: str, attempt: int) -> None:
        self.pushes.put_nowait(pb.DispatchMessage(cancel=pb.CancelAttempt(task_id=task_id, attempt=attempt,
                                                                          reason="test")))

    def ack(self, task_id: str, attempt: int, accepted: bool = True) -> None:
        self.pushes.put_nowait(pb.DispatchMessage(ack=pb.ReportAck(task_id=task_id, attempt=attempt,
                                                                   accepted=accepted)))

    def abort(self) -> None:
        """Kill this stream with UNAVAILABLE, as a node going away would."""
        self.pushes.put_nowait(_ABORT)


AckPolicy = Callable[[str, pb.ExecutorMessage], "bool | None"]   # (kind, message) → accepted, or None: no ack


def ack_all(kind: str, message: pb.ExecutorMessage) -> bool | None:
    return True


class FakeCoordinator(pb_grpc.CoordinatorServicer):
    def __init__(self, node_id: str, *, heartbeat_interval_s: float = 0.05, ack: AckPolicy = ack_all,
                 on_hello: Callable[[FakeStream], None] | None = None) -> None:
        self.node_id = node_id
        self.heartbeat_interval_s = heartbeat_interval_s
        self.ack_policy = ack
        self.on_hello = on_hello
        self.streams: list[FakeStream] = []
        self.registrations: list[pb.ExecutorSpec] = []
        self.server: grpc.aio.Server | None = None
        self.endpoint = ""

    async def RegisterExecutor(self, request, context):  # noqa: N802 — the gRPC name
        self.registrations.append(request.executor)
        return pb.RegisterExecutorResponse(executor_id=request.executor.id, index=len(self.registrations))

    # all streams' messages, in arrival order per stream
    @property
    def received(self) -> list[pb.ExecutorMessage]:
        return [m for s in self.streams for m in s.received]

    def reports(self, kind: str, task_id: str | None = None) -> list[Any]:
        return [getattr(m, kind) for m in self.received
                if m.WhichOneof("kind") == kind and (task_id is None or getattr(m, kind).task_id == task_id)]

    @property
    def stream(self) -> FakeStream:
        return self.streams[-1]

    async def ExecutorStream(self, request_iterator, context):  # noqa: N802 — the gRPC name
        first = await request_iterator.__anext__()
        assert first.WhichOneof("kind") == "hello", first
        stream = FakeStream(first.hello)
        self.streams.append(stream)
        await context.write(pb.DispatchMessage(welcome=pb.Welcome(
            executor_id=first.hello.executor.id, node_id=self.node_id,
            heartbeat_interval_s=self.heartbeat_interval_s, lease_ttl_s=10.0)))
        if self.on_hello is not None:
            self.on_hello(stream)

        async def read() -> None:
            async for envelope in request_iterator:
                if envelope.WhichOneof("kind") == "batch":
                    assert len(envelope.batch.messages) > 1, "a batch of one is a wasted envelope"
                    messages = list(envelope.batch.messages)
                else:
                    messages = [envelope]
                for message in messages:
                    stream.received.append(message)
                    kind = message.WhichOneof("kind")
                    if kind in _REPORT_KINDS:
                        accepted = self.ack_policy(kind, message)
                        if accepted is not None:
                            report = getattr(message, kind)
                            stream.ack(report.task_id, report.attempt, accepted)

        reader = asyncio.create_task(read())
        try:
            while True:
                getter = asyncio.create_task(stream.pushes.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    return                  # the client closed its side
                item = getter.result()
                if item is _ABORT:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "stream killed by the test")
                await context.write(item)
        finally:
            reader.cancel()
            stream.ended.set()


@contextlib.asynccontextmanager
async def fake_nodes(*nodes: FakeCoordinator) -> AsyncIterator[tuple[FakeCoordinator, ...]]:
    try:
        for node in nodes:
            node.server = grpc.aio.server()
            pb_grpc.add_CoordinatorServicer_to_server(node, node.server)
            port = node.server.add_insecure_port("127.0.0.1:0")
            node.endpoint = f"127.0.0.1:{port}"
            await node.server.start()
        yield nodes
    finally:
        for node in nodes:
            if node.server is not None:
                await node.server.stop(grace=None)


class CountingAdapter:
    """The algorithmic adapter, counting how often each attempt was executed."""

    def __init__(self) -> None:
        self.inner = AlgorithmicAdapter()
        self.executions: Counter[tuple[str, int]] = Counter()
        self.cancel_calls: list[str] = []

    async def execute(self, task: ExecutorTask, ctx: ExecutionContext) -> ExecutorResult:
        self.executions[(task.task_id, task.attempt)] += 1
        return await self.inner.execute(task, ctx)

    def get_capabilities(self):
        return self.inner.get_capabilities()

    async def get_status(self) -> dict[str, Any]:
        return await self.inner.get_status()

    async def cancel(self, task_id: str) -> None:
        self.cancel_calls.append(task_id)
        await self.inner.cancel(task_id)


@contextlib.asynccontextmanager
async def running_agent(endpoints: list[str], *, adapter: Any = None, capacity: int = 4, prefetch: int = 0,
                        limits: AgentLimits = FAST) -> AsyncIterator[ExecutorAgent]:
    agent = ExecutorAgent(adapter or CountingAdapter(), executor_id="w1", name="worker-1",
                          executor_type="algorithmic", capacity=capacity, prefetch=prefetch, endpoints=endpoints, credentials=INSECURE,
                          limits=limits)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        yield agent
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def eventually(predicate: Callable[[], Any], timeout_s: float = WAIT_S, what: str = "") -> Any:
    loop = asyncio.get_running_loop()
    until_s = loop.time() + timeout_s
    while loop.time() < until_s:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within {timeout_s} s: {what or predicate}")


def kinds(messages: list[pb.ExecutorMessage], task_id: str) -> list[str]:
    """The report kinds about task_id, in order."""
    out = []
    for m in messages:
        kind = m.WhichOneof("kind")
        if kind in _REPORT_KINDS and getattr(m, kind).task_id == task_id:
            out.append(kind)
    return out


# ------------------------------------------------------------------------------------------- tests


async def test_hello_then_echo_reports_started_and_completed() -> None:
    async with fake_nodes(FakeCoordinator("n1")) as (node,):
        async with running_agent([node.endpoint], capacity=3) as agent:
            await eventually(lambda: node.streams, what="hello")
            spec = node.stream.hello.executor
            assert (spec.id, spec.name, spec.type, spec.capacity) == ("w1", "worker-1", "algorithmic", 3)
            assert {"echo", "sleep", "fail", "code_analysis"} <= set(spec.supported_task_types)
            assert "sleep" in json.loads(spec.input_schema_json)
            assert await agent.wait_connected(WAIT_S) and agent.status()["node_id"] == "n1"

            node.stream.assign("t1", 1, "echo", {"x": [1, 2]})
            completed = (await eventually(lambda: node.reports("completed", "t1"), what="completed"))[0]
            assert (completed.attempt, json.loads(completed.output_json)) == (1, {"x": [1, 2]})
            # echo ends before its `started` goes out: the completion stands for both
            assert kinds(node.received, "t1") == ["completed"] and completed.implies_started
            await eventually(lambda: agent.status()["outbox_total"] == 0, what="all reports acked")
            assert agent.adapter.executions[("t1", 1)] == 1


async def test_a_longer_attempt_reports_started_before_it_ends() -> None:
    async with fake_nodes(FakeCoordinator("n1")) as (node,):
        async with running_agent([node.endpoint]) as agent:
            await eventually(lambda: node.streams, what="hello")
            node.stream.assign("slow", 1, "sleep", {"ms": 300})
            await eventually(lambda: node.reports("started", "slow"), what="started")
            completed = (await eventually(lambda: node.reports("completed", "slow"), what="completed"))[0]
            assert kinds(node.received, "slow") == ["started", "completed"] and not completed.implies_started
            await eventually(lambda: agent.status()["outbox_total"] == 0, what="all reports acked")


async def test_fail_task_is_reported_retryable_and_bad_input_permanent() -> None:
    async with fake_nodes(FakeCoordinator("n1")) as (node,):
        async with running_agent([node.endpoint]):
            await eventually(lambda: node.streams)
            node.stream.assign("f1", 1, "fail", {"times": 1})
            node.stream.assign("f2", 2, "fail", {"times": 1})
            node.stream.assign("bad", 1, "sleep", {"ms": -1})
            node.stream.assign("nojson", 1, "echo", None)
            node.stream.pushes.put_nowait(pb.DispatchMessage(assignment=pb.Assignment(
                task_id="broken", attempt=1, type="echo", input_json="{not json")))
            failed = (await eventually(lambda: node.reports("failed", "f1")))[0]
            assert failed.retryable and "scripted failure on attempt 1" in failed.error
            assert json.loads((await eventually(lambda: node.reports("completed", "f2")))[0].output_json) == {"attempt": 2}
            bad = (await eventually(lambda: node.reports("failed", "bad")))[0]
            assert not bad.retryable and "input.ms" in bad.error
            broken = (await eventually(lambda: node.reports("failed", "broken")))[0]
            assert not broken.retryable and "input_json" in broken.error
            assert kinds(node.received, "broken") == ["failed"]      # rejected before it started
            assert node.reports("completed", "nojson")


async def test_reconnect_to_next_node_dedups_and_resends_unacked_completion() -> None:
    # Node A never acks completions, then dies; node B re-sends every attempt still leased.
    leased: list[tuple[str, int, str, Any]] = [("t1", 1, "echo", {"v": 1}), ("t2", 1, "sleep", {"ms": 400})]

    def resend_leased(stream: FakeStream) -> None:
        for task_id, attempt, type_, task_input in leased:
            stream.assign(task_id, attempt, type_, task_input)

    node_a = FakeCoordinator("a", ack=lambda kind, m: None if kind == "completed" else True)
    node_b = FakeCoordinator("b", on_hello=resend_leased)
    async with fake_nodes(node_a, node_b):
        async with running_agent([node_a.endpoint, node_b.endpoint]) as agent:
            await eventually(lambda: node_a.streams)
            resend_leased(node_a.stream)
            await eventually(lambda: node_a.reports("completed", "t1"), what="t1 completed on A (never acked)")
            await eventually(lambda: agent.adapter.executions[("t2", 1)] == 1, what="t2 running")
            await eventually(lambda: node_a.reports("started", "t2"))

            await node_a.server.stop(grace=None)                   # node A killed mid-attempt
            node_a.server = None

            await eventually(lambda: node_b.streams, what="reconnected to B")
            assert node_b.stream.hello.executor.id == "w1"          # same id: resumes its leases
            completed_b = await eventually(lambda: node_b.reports("completed", "t1"), what="t1 re-sent to B")
            assert json.loads(completed_b[0].output_json) == {"v": 1}
            await eventually(lambda: node_b.reports("completed", "t2"), what="t2 finished after reconnect")
            # Each attempt ran once although assigned twice; only the unacked report was re-sent.
            assert agent.adapter.executions == Counter({("t1", 1): 1, ("t2", 1): 1})
            assert kinds(node_b.received, "t1") == ["completed"]
            assert kinds(node_b.received, "t2") == ["completed"]    # started was acked by A
            assert agent.status()["assignments_duplicate_total"] == 2
            await eventually(lambda: agent.status()["outbox_total"] == 0)


async def test_stream_killed_on_the_same_node_resumes_without_rerunning() -> None:
    async with fake_nodes(FakeCoordinator("n1")) as (node,):
        async with running_agent([node.endpoint]) as agent:
            await eventually(lambda: node.streams)
            node.stream.assign("s1", 1, "sleep", {"ms": 300})
            await eventually(lambda: node.reports("started", "s1"))
            node.stream.abort()
            await eventually(lambda: len(node.streams) == 2, what="a second stream")
            assert agent.running_attempts() == [("s1", 1)]           # kept running while disconnected
            node.stream.assign("s1", 1, "sleep", {"ms": 300})       # the server re-sends the lease
            await eventually(lambda: node.reports("completed", "s1"))
            assert agent.adapter.executions[("s1", 1)] == 1
            assert agent.status()["stream_failures_total"] >= 1


async def test_rejected_report_is_dropped_not_resent() -> None:
    node = FakeCoordinator("n1", ack=lambda kind, m: kind != "completed")   # completions are stale
    async with fake_nodes(node):
        async with running_agent([node.endpoint]) as agent:
            await eventually(lambda: node.streams)
            node.stream.assign("old", 3, "echo", 1)
            await eventually(lambda: node.reports("completed", "old"))
            await eventually(lambda: agent.status()["reports_rejected_total"] == 1)
            assert agent.status()["outbox_total"] == 0
            node.stream.abort()
            await eventually(lambda: len(node.streams) == 2 and node.stream.received, what="new stream in use")
            await asyncio.sleep(0.2)
            assert kinds(node.stream.received, "old") == []


async def test_report_without_ack_is_resent_on_the_same_stream() -> None:
    # The server does not ack a report whose proposal failed (outcome unknown): the agent re-sends.
    dropped: list[str] = []

    def drop_first_completion(kind: str, message: pb.ExecutorMessage) -> bool | None:
        if kind == "completed" and not dropped:
            dropped.append(message.completed.task_id)
            return None
        return True

    async with fake_nodes(FakeCoordinator("n1", ack=drop_first_completion)) as (node,):
        async with running_agent([node.endpoint]) as agent:
            await eventually(lambda: node.streams)
            node.stream.assign("r1", 1, "echo", "again")
            await eventually(lambda: len(node.reports("completed", "r1")) == 2, what="completion re-sent")
            await eventually(lambda: agent.status()["outbox_total"] == 0, what="acked after the re-send")
            assert len(node.streams) == 1 and agent.status()["reports_resent_total"] == 1
            assert kinds(node.received, "r1") == ["completed", "completed"]
            assert all(c.implies_started for c in node.reports("completed", "r1"))  # the re-send says it too
            assert agent.adapter.executions[("r1", 1)] == 1


async def test_cancel_stops_a_running_sleep_and_sends_no_result() -> None:
    async with fake_nodes(FakeCoordinator("n1")) as (node,):
        async with running_agent([node.endpoint]) as agent:
            await eventually(lambda: node.streams)
            node.stream.assign("long", 1, "sleep", {"ms": 60_000})
            await eventually(lambda: node.reports("started", "long"))
            started_s = asyncio.get_running_loop().time()
            node.stream.cancel("long", 1)
            await eventually(lambda: agent.status()["attempts_discarded_total"] == 1, timeout_s=2.0,
                             what="attempt stopped")
            assert asyncio.get_running_loop().time() - started_s < 1.0
            assert agent.running_attempts() == [] and agent.adapter.cancel_calls == ["long"]
            status = await agent.adapter.get_status()
            assert status["tasks_cancelled_total"] == 1 and status["running_total"] == 0
            await asyncio.sleep(0.2)
            assert kinds(node.received, "long") == ["started"]      # no completed, no failed
            node.stream.assign("long", 1, "sleep", {"ms": 60_000})  # a late re-send does not restart it
            await asyncio.sleep(0.1)
            assert agent.adapter.executions[("long", 1)] == 1


async def test_capacity_bound_and_heartbeat_lists_running_attempts() -> None:
    async with fake_nodes(FakeCoordinator("n1", heartbeat_interval_s=0.05)) as (node,):
        async with running_agent([node.endpoint], capacity=2) as agent:
            await eventually(lambda: node.streams)
            node.stream.assign("a", 1, "sleep", {"ms": 500})
            node.stream.assign("b", 1, "sleep", {"ms": 500})
            node.stream.assign("c", 1, "echo", "over")
            failed = (await eventually(lambda: node.reports("failed", "c")))[0]
            assert failed.retryable and "executor at capacity" in failed.error
            assert agent.adapter.executions[("c", 1)] == 0

            def heartbeat_with_both() -> bool:
                return any(sorted((r.task_id, r.attempt) for r in hb.running) == [("a", 1), ("b", 1)]
                           for hb in node.reports("heartbeat"))
            await eventually(heartbeat_with_both, what="heartbeat naming both running attempts")
            await eventually(lambda: node.reports("completed", "a") and node.reports("completed", "b"))
            heartbeats_before = len(node.reports("heartbeat"))
            await eventually(lambda: len(node.reports("heartbeat")) > heartbeats_before + 1)
            assert list(node.reports("heartbeat")[-1].running) == []


async def test_shutdown_cancels_running_attempts_and_reports_them_retryable() -> None:
    async with fake_nodes(FakeCoordinator("n1")) as (node,):
        agent = ExecutorAgent(CountingAdapter(), executor_id="w1", name="w1", executor_type="algorithmic",
                              capacity=2, endpoints=[node.endpoint], limits=FAST, credentials=INSECURE)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            await eventually(lambda: node.streams)
            node.stream.assign("long", 1, "sleep", {"ms": 60_000})
            await eventually(lambda: node.reports("started", "long"))
            stop.set()
            await asyncio.wait_for(task, 5)
            failed = node.reports("failed", "long")
            assert failed and failed[0].retryable and "shutting down" in failed[0].error
            assert agent.status()["connected"] is False and agent.running_attempts() == []
            await asyncio.wait_for(node.stream.ended.wait(), 2)   # the client closed its stream
        finally:
            stop.set()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


async def test_agent_keeps_retrying_while_no_node_is_up() -> None:
    # Nothing listens on the first endpoint; the agent moves on to the second.
    async with fake_nodes(FakeCoordinator("n2")) as (node,):
        async with running_agent(["127.0.0.1:1", node.endpoint]) as agent:
            assert await agent.wait_connected(WAIT_S)
            assert agent.status()["endpoint"] == node.endpoint


def test_build_adapter_names_the_valid_types() -> None:
    assert isinstance(build_adapter("algorithmic"), AlgorithmicAdapter)
    with pytest.raises(ValueError, match="valid types: algorithmic, cloudru, local_llm, specialized_ml"):
        build_adapter("claude_opus")
    assert sorted(ADAPTER_FACTORIES) == ["algorithmic", "cloudru", "local_llm", "specialized_ml"]
    with pytest.raises(ValueError, match="CLOUDRU_API_KEY"):                # named, never shown
        with pytest.MonkeyPatch.context() as env:
            env.delenv("CLOUDRU_API_KEY", raising=False)
            build_adapter("cloudru")
    with pytest.raises(ValueError):
        ExecutorAgent(AlgorithmicAdapter(), executor_id="w", name="w", executor_type="algorithmic", capacity=0,
                      endpoints=["127.0.0.1:1"], credentials=INSECURE)


async def _coordctl(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cluster.cli", *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "COORDCTL_ENDPOINTS": ""})


async def test_cli_unknown_type_or_missing_config_is_a_clear_error() -> None:
    proc = await _coordctl("executor", "run", "--type", "claude_opus", "--name", "x", "--endpoints", "127.0.0.1:1")
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert "'claude_opus' has no adapter; valid types: algorithmic, cloudru, local_llm" in stderr.decode()
    proc = await _coordctl("executor", "run", "--type", "local_llm", "--name", "x", "--endpoints", "127.0.0.1:1")
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1 and "LOCAL_LLM_MODEL is not set" in stderr.decode()


async def test_cli_executor_run_serves_until_sigterm() -> None:
    async with fake_nodes(FakeCoordinator("n1")) as (node,):
        proc = await _coordctl("--insecure-dev", "executor", "run", "--type", "algorithmic", "--name", "cli-worker",
                               "--capacity", "2", "--endpoints", node.endpoint, "--output", "json")
        try:
            await eventually(lambda: node.streams, timeout_s=30, what="the CLI agent's hello")
            spec = node.stream.hello.executor
            assert (spec.id, spec.name, spec.capacity) == ("cli-worker", "cli-worker", 2)
            node.stream.assign("e1", 1, "echo", "hi")
            completed = (await eventually(lambda: node.reports("completed", "e1")))[0]
            assert json.loads(completed.output_json) == "hi"
            proc.send_signal(signal.SIGTERM)
            stdout, stderr = await asyncio.wait_for(proc.communicate(), 15)
            assert proc.returncode == 0, stderr.decode()[-2000:]
            summary = json.loads(stdout)
            assert summary["executor_id"] == "cli-worker" and summary["attempts_completed_total"] == 1
            assert "connected to" in stderr.decode()                # logs go to stderr
        finally:
            if proc.returncode is None:
                proc.kill()
                await asyncio.wait_for(proc.wait(), 10)


async def test_prefetched_attempts_wait_for_a_slot_then_run_in_order() -> None:
    # capacity 1 + prefetch 2: the cluster may lease 3; the 2 extra wait here, `started` only on start.
    async with fake_nodes(FakeCoordinator("n1")) as (node,):
        async with running_agent([node.endpoint], capacity=1, prefetch=2) as agent:
            await eventually(lambda: node.streams, what="hello")
            assert node.stream.hello.executor.capacity == 3
            node.stream.assign("a", 1, "sleep", {"ms": 300})
            await eventually(lambda: node.reports("started", "a"), what="a started")
            node.stream.assign("b", 1, "echo", "b")
            node.stream.assign("c", 1, "echo", "c")
            await eventually(lambda: agent.queued_attempts() == [("b", 1), ("c", 1)], what="b and c queued")
            assert kinds(node.received, "b") == [] and agent.running_attempts() == [("a", 1)]
            node.stream.assign("d", 1, "echo", "d")          # a fourth is over capacity + prefetch
            failed = (await eventually(lambda: node.reports("failed", "d"), what="d rejected"))[0]
            assert failed.retryable and "prefetch 2" in failed.error
            node.stream.cancel("c", 1)                        # a queued attempt is dropped, never run
            await eventually(lambda: node.reports("completed", "b"), what="b ran after a")
            await asyncio.sleep(0.1)
            assert kinds(node.received, "c") == [] and ("c", 1) not in agent.adapter.executions
            done = [m.completed.task_id for m in node.received if m.WhichOneof("kind") == "completed"]
            assert done == ["a", "b"]
            assert agent.status()["assignments_over_capacity_total"] == 1


class ChattyAdapter(CountingAdapter):
    """Reports progress every 5 ms for `ms` milliseconds (input {"ms": M})."""

    async def execute(self, task: ExecutorTask, ctx: ExecutionContext) -> ExecutorResult:
        steps = task.input["ms"] // 5
        for step in range(1, steps + 1):
            await asyncio.sleep(0.005)
            await ctx.progress(step / steps, f"step {step}")
        return ExecutorResult(output={"steps": steps})


async def test_progress_is_sent_at_most_once_per_interval_latest_value_first_after_one_interval() -> None:
    limits = dataclasses.replace(FAST, progress_report_interval_s=0.2)
    async with fake_nodes(FakeCoordinator("n1")) as (node,):
        async with running_agent([node.endpoint], adapter=ChattyAdapter(), limits=limits) as agent:
            await eventually(lambda: node.streams, what="hello")
            node.stream.assign("quick", 1, "echo", {"ms": 50})          # ends within one interval
            node.stream.assign("slow", 1, "echo", {"ms": 700})          # ~140 progress calls
            await eventually(lambda: node.reports("completed", "slow"), what="slow completed")
            progress = node.reports("progress", "slow")
            # ~700 ms / 200 ms, not ~140: the latest value once per interval, none in the first one
            assert 2 <= len(progress) <= 4, [p.fraction for p in progress]
            fractions = [p.fraction for p in progress]
            assert fractions == sorted(fractions) and 0.2 <= fractions[0] and fractions[-1] < 1.0
            assert all(p.attempt == 1 and p.message.startswith("step ") for p in progress)
            assert node.reports("progress", "quick") == []
            assert agent.status()["progress_reports_sent_total"] == len(progress)


class PricedAdapter(CountingAdapter):
    """Reports a measured cost per task the way the LLM adapters' ledger does."""

    def __init__(self) -> None:
        super().__init__()
        self.cost_per_task_usd: float | None = None

    async def get_status(self) -> dict[str, Any]:
        return {**await self.inner.get_status(), "usage": {"cost_per_task_usd": self.cost_per_task_usd}}


async def test_a_changed_measured_cost_is_re_registered_for_the_scheduler() -> None:
    adapter = PricedAdapter()
    async with fake_nodes(FakeCoordinator("n1")) as (node,):
        async with running_agent([node.endpoint], adapter=adapter) as agent:
            await eventually(lambda: node.streams, what="hello")
            assert not await agent.refresh_cost() and node.registrations == []     # nothing measured yet
            adapter.cost_per_task_usd = 0.0042
            assert await agent.refresh_cost()
            assert json.loads(node.registrations[-1].performance_profile_json)["cost_per_task"] == 0.0042
            assert not await agent.refresh_cost() and len(node.registrations) == 1  # unchanged: no re-register
