"""Metrics, /healthz, /readyz and trace spans of the executor agent (cluster/agent_metrics.py,
cluster/agent.py), against the in-process fake nodes of tests/test_agent.py.

Every wait is bounded (`eventually`); tracing is process-wide, so every test that configures it
shuts it down in `finally`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cluster import tracing
from cluster.agent import ExecutorAgent
from cluster.agent_metrics import (
    LATENCY_BUCKETS_S,
    MODELS_LABELLED_MAX,
    OTHER_MODEL,
    AgentMetrics,
    LLMUsage,
    llm_usage,
    serve_http,
)
from executors.base import ExecutionContext, ExecutorResult, ExecutorTask
from executors.cloudru import CloudRuAdapter, CloudRuConfig
from executors.fake import FakeExecutor, Hang, Permanent, Succeed
from executors.llm.fake import FakeChatAPI, Reply
from executors.llm.resilience import FakeClock
from proto import coordinator_pb2 as pb
from tests.test_agent import FAST, INSECURE, ROOT, WAIT_S, FakeCoordinator, eventually, fake_nodes

pytestmark = pytest.mark.timeout(90)

EXECUTOR, EXECUTOR_TYPE = "w-metrics", "fake-type"
TRACE_ID, PARENT_SPAN_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
TRACE_PARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"


# ------------------------------------------------------------------------------------------ helpers


def samples_of(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float | None:
    """The sample `name` with the agent's labels plus `labels`."""
    return samples.get((name, frozenset({"executor": EXECUTOR, "executor_type": EXECUTOR_TYPE, **labels}.items())))


def scrape(metrics: AgentMetrics) -> dict[tuple[str, frozenset], float]:
    return samples_of(generate_latest(metrics.registry).decode())


def assign(node: FakeCoordinator, task_id: str, type_: str, task_input: Any, trace_parent: str = "",
           attempt: int = 1) -> None:
    node.stream.pushes.put_nowait(pb.DispatchMessage(assignment=pb.Assignment(
        task_id=task_id, attempt=attempt, type=type_, input_json=json.dumps(task_input), trace_parent=trace_parent)))


@contextlib.asynccontextmanager
async def agent_on(node: FakeCoordinator, adapter: Any, *, metrics: AgentMetrics | None = None,
                   executor_id: str = EXECUTOR, executor_type: str = EXECUTOR_TYPE, capacity: int = 4,
                   prefetch: int = 0) -> AsyncIterator[ExecutorAgent]:
    agent = ExecutorAgent(adapter, executor_id=executor_id, name=executor_id, executor_type=executor_type,
                          capacity=capacity, prefetch=prefetch, endpoints=[node.endpoint], credentials=INSECURE,
                          limits=FAST, metrics=metrics)
    streams_before = len(node.streams)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await eventually(lambda: len(node.streams) > streams_before, what="hello")
        yield agent
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


@contextlib.contextmanager
def traced_to(path: str):
    """Tracing on for this process, writing to `path`; shut down (flushed) on the way out."""
    tracing.configure(tracing.TraceSettings("executor-agent", EXECUTOR, file=path, sample_ratio=1.0))
    try:
        yield
    finally:
        tracing.shutdown()


def spans_in(path: str) -> list[dict[str, Any]]:
    return tracing.read_spans([path])


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# ------------------------------------------------------------------------------- attempt metrics


async def test_latency_and_attempt_counters_after_fake_attempts() -> None:
    fake = FakeExecutor(task_types=["work"])
    fake.script_task("ok", Succeed({"done": True}, delay_ms=30))
    fake.script_task("bad", Permanent("no good"))
    fake.script_task("hang", Hang())
    metrics = AgentMetrics(EXECUTOR, EXECUTOR_TYPE)
    async with fake_nodes(FakeCoordinator("n1")) as (node,):
        async with agent_on(node, fake, metrics=metrics, capacity=2):
            before = scrape(metrics)
            for outcome in ("completed", "failed", "cancelled"):        # there from the start: rate() works
                assert value(before, "executor_attempts_total", outcome=outcome) == 0
            assert value(before, "executor_latency_seconds_count") == 0
            assign(node, "ok", "work", None)
            assign(node, "bad", "work", None)
            await eventually(lambda: node.reports("completed", "ok") and node.reports("failed", "bad"))
            assign(node, "hang", "work", None)
            await fake.wait_started("hang", timeout_s=WAIT_S)
            node.stream.cancel("hang", 1)
            node.stream.pushes.put_nowait(pb.DispatchMessage(assignment=pb.Assignment(
                task_id="nojson", attempt=1, type="work", input_json="{not json")))   # refused, never run
            await eventually(lambda: node.reports("failed", "nojson"), what="nojson refused")
            await eventually(lambda: value(scrape(metrics), "executor_attempts_total", outcome="cancelled") == 1,
                             what="hang cancelled")
            s = scrape(metrics)
            assert value(s, "executor_attempts_total", outcome="completed") == 1
            assert value(s, "executor_attempts_total", outcome="failed") == 2          # bad, and nojson refused
            # One observation per attempt the adapter ran (ok, bad, hang); the refused one never ran.
            assert value(s, "executor_latency_seconds_count") == 3
            # `ok` waited 30 ms in the adapter: it is above the 10 ms bucket (a lower bound, not a timing).
            assert value(s, "executor_latency_seconds_bucket", le="0.01") <= 2
            assert value(s, "executor_latency_seconds_sum") >= 0.03
            assert value(s, "executor_latency_seconds_bucket", le="+Inf") == 3
            assert value(s, "executor_latency_seconds_bucket", le="1800.0") == 3
            assert LATENCY_BUCKETS_S[0] == 0.005 and LATENCY_BUCKETS_S[-1] == 1800.0
            assert value(s, "executor_connected") == 1
            assert not any(name.startswith("llm_") for name, _ in s)                    # no LLM results yet


async def test_load_running_and_queued_are_read_at_scrape_time() -> None:
    fake = FakeExecutor(task_types=["work"], default=Hang())
    metrics = AgentMetrics(EXECUTOR, EXECUTOR_TYPE)
    async with fake_nodes(FakeCoordinator("n1")) as (node,):
        async with agent_on(node, fake, metrics=metrics, capacity=2, prefetch=1) as agent:
            s = scrape(metrics)
            assert (value(s, "executor_load"), value(s, "executor_running_attempts"),
                    value(s, "executor_queued_attempts")) == (0, 0, 0)
            assign(node, "a", "work", None)
            await fake.wait_started("a", timeout_s=WAIT_S)
            assert value(scrape(metrics), "executor_load") == 0.5
            assign(node, "b", "work", None)
            assign(node, "c", "work", None)                     # no slot: waits in the agent
            await eventually(lambda: agent.queued_attempts() == [("c", 1)], what="c queued")
            s = scrape(metrics)
            assert (value(s, "executor_load"), value(s, "executor_running_attempts"),
                    value(s, "executor_queued_attempts")) == (1.0, 2, 1)
            node.stream.cancel("a", 1)
            await fake.wait_started("c", timeout_s=WAIT_S)      # a's slot went to c
            s = scrape(metrics)
            assert (value(s, "executor_running_attempts"), value(s, "executor_queued_attempts")) == (2, 0)


def test_metrics_of_another_executor_are_refused() -> None:
    with pytest.raises(ValueError, match="metrics: labelled for executor 'other'"):
        ExecutorAgent(FakeExecutor(), executor_id=EXECUTOR, name="x", executor_type=EXECUTOR_TYPE, capacity=1,
                      endpoints=["127.0.0.1:1"], credentials=INSECURE, metrics=AgentMetrics("other", EXECUTOR_TYPE))


# ------------------------------------------------------------------------------------ LLM usage


def cloudru(api: FakeChatAPI) -> CloudRuAdapter:
    return CloudRuAdapter(CloudRuConfig(preset="glm47"), api=api, api_key="sk-test", env={}, clock=FakeClock())


async def test_llm_tokens_and_cost_come_from_a_real_llm_adapters_result() -> None:
    api = FakeChatAPI("https://fm.example/v1")
    adapter = cloudru(api)
    big = adapter.tiers["big"]
    api.script(big, Reply("hello", prompt_tokens=120, completion_tokens=30, model=f"{big}-2025"),
               Reply("again", prompt_tokens=7, completion_tokens=3),
               *[Reply("not json", prompt_tokens=50, completion_tokens=5)] * 3)   # a structured task's 3 tries
    metrics = AgentMetrics("llm-1", "cloudru")
    async with fake_nodes(FakeCoordinator("n1")) as (node,):
        async with agent_on(node, adapter, metrics=metrics, executor_id="llm-1", executor_type="cloudru"):
            assign(node, "c1", "chat", {"prompt": "hi"})
            assign(node, "c2", "chat", {"prompt": "hi again"})
            completed = await eventually(lambda: len(node.reports("completed")) == 2 and node.reports("completed"))
            cost = sum(json.loads(c.output_json)["cost_usd"] for c in completed)
            assert cost > 0                                     # the preset's big model is priced
            # A failed attempt's tokens are not counted here: its error carries no account (the
            # adapter's own ledger has them).
            assign(node, "bad", "structured", {"instruction": "x", "schema": {"type": "object"}, "stream": False})
            await eventually(lambda: node.reports("failed", "bad"))
    assert (await adapter.get_status())["usage"]["tokens_prompt_total"] == 127 + 3 * 50
    s = scrape(metrics)
    labels = {"executor": "llm-1", "executor_type": "cloudru", "model": big}
    assert s[("llm_tokens_total", frozenset({**labels, "direction": "prompt"}.items()))] == 127
    assert s[("llm_tokens_total", frozenset({**labels, "direction": "completion"}.items()))] == 33
    assert math.isclose(s[("llm_cost_usd_total", frozenset(labels.items()))], cost, rel_tol=1e-6)
    latency = s[("executor_latency_seconds_count", frozenset({"executor": "llm-1", "executor_type": "cloudru"}.items()))]
    assert latency == 3


def test_llm_usage_reads_the_accounts_keys_and_refuses_bad_numbers() -> None:
    metrics = {"llm_calls_total": 1, "tokens_prompt_total": 12, "tokens_completion_total": 4, "tokens_total": 16,
               "cost_usd": 0.25, "cache_hits_total": 0}
    assert llm_usage({"model_id": "m/big", "model": "m/big-v3"}, metrics) == LLMUsage("m/big", "m/big-v3", 12, 4, 0.25)
    assert llm_usage({"model": "served"}, metrics).model == "served"            # no model_id: the served one
    assert llm_usage("plain text", metrics).model == "unknown"
    assert llm_usage({"model_id": "m"}, {"duration_s": 0.1}) is None              # not an LLM result
    assert llm_usage({"model_id": "m"}, None) is None
    for bad in (-1, float("nan"), float("inf"), True, "12"):
        assert llm_usage({"model_id": "m"}, {**metrics, "tokens_prompt_total": bad}) is None, bad
    assert llm_usage({"model_id": "m"}, {**metrics, "cost_usd": -0.5}) is None


def test_model_label_is_bounded_to_the_first_models() -> None:
    metrics = AgentMetrics(EXECUTOR, EXECUTOR_TYPE)
    models = [f"model-{i:02d}" for i in range(MODELS_LABELLED_MAX + 8)]
    for model in models:
        metrics.attempt_ran(0.01, LLMUsage(model, model, 10, 1, 0.5))
    metrics.attempt_ran(0.01, LLMUsage("model-00", "model-00", 10, 1, 0.5))       # a known one keeps its name
    metrics.attempt_ran(0.01, LLMUsage("x" * 500, "", 1, 1, 0.0))                 # long, and too late: other
    s = scrape(metrics)
    prompt = {dict(labels)["model"]: v for (name, labels), v in s.items()
              if name == "llm_tokens_total" and dict(labels)["direction"] == "prompt"}
    assert set(prompt) == set(models[:MODELS_LABELLED_MAX]) | {OTHER_MODEL}
    assert prompt["model-00"] == 20 and prompt["model-31"] == 10
    assert prompt[OTHER_MODEL] == 8 * 10 + 1
    assert value(s, "llm_cost_usd_total", model=OTHER_MODEL) == 8 * 0.5

    cut = AgentMetrics(EXECUTOR, EXECUTOR_TYPE, models_labelled_max=2, model_label_chars_max=5)
    assert [cut.model_label(m) for m in ("abcdefgh", "abcdeXYZ", "b", "c")] == ["abcde", "abcde", "b", OTHER_MODEL]


# ------------------------------------------------------------------------------------------ HTTP


async def test_metrics_healthz_and_readyz_over_http() -> None:
    fake = FakeExecutor(task_types=["work"])
    metrics = AgentMetrics(EXECUTOR, EXECUTOR_TYPE)
    async with fake_nodes(FakeCoordinator("n1")) as (node,):
        agent = ExecutorAgent(fake, executor_id=EXECUTOR, name=EXECUTOR, executor_type=EXECUTOR_TYPE, capacity=2,
                              endpoints=[node.endpoint], credentials=INSECURE, limits=FAST, metrics=metrics)
        server = serve_http("127.0.0.1:0", metrics.registry, agent.metrics_snapshot)
        base = f"http://127.0.0.1:{server.server_address[1]}"
        stop = asyncio.Event()
        task = None
        try:
            status, body = await asyncio.to_thread(http_get, base + "/readyz")       # not started: no stream
            assert status == 503 and json.loads(body)["checks"]["stream"]["ok"] is False
            status, body = await asyncio.to_thread(http_get, base + "/healthz")
            assert (status, json.loads(body)) == (200, {"status": "alive"})

            task = asyncio.create_task(agent.run(stop))
            assert await agent.wait_connected(WAIT_S)
            status, body = await asyncio.to_thread(http_get, base + "/readyz")
            ready = json.loads(body)
            assert status == 200 and ready["status"] == "ready"
            assert ready["checks"]["stream"] == {"ok": True, "endpoint": node.endpoint, "node_id": "n1"}
            assign(node, "e1", "work", {"x": 1})
            await eventually(lambda: node.reports("completed", "e1"))
            status, body = await asyncio.to_thread(http_get, base + "/metrics")
            s = samples_of(body.decode())
            assert status == 200
            assert value(s, "executor_attempts_total", outcome="completed") == 1
            assert value(s, "executor_latency_seconds_count") == 1 and value(s, "executor_connected") == 1

            await node.server.stop(grace=None)                  # the only node goes away
            node.server = None

            async def not_ready() -> bool:
                status, _ = await asyncio.to_thread(http_get, base + "/readyz")
                return status == 503
            loop = asyncio.get_running_loop()
            until_s = loop.time() + WAIT_S
            while not await not_ready():
                assert loop.time() < until_s, "/readyz still 200 after the node stopped"
                await asyncio.sleep(0.02)
        finally:
            stop.set()
            if task is not None:
                await asyncio.wait_for(task, 10)
            server.shutdown()
            server.server_close()


def test_parse_address_names_the_form() -> None:
    from cluster.metrics import parse_address

    assert parse_address("127.0.0.1:9470") == ("127.0.0.1", 9470)
    assert parse_address("localhost:0") == ("localhost", 0)
    for bad in ("9470", ":9470", "host:", "host:http", "host:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_address(bad)


# ---------------------------------------------------------------------------------------- traces


class TracedNode(FakeCoordinator):
    """Also answers the unary calls an attempt makes, recording their metadata."""

    def __init__(self, node_id: str) -> None:
        super().__init__(node_id)
        self.unary_metadata: list[tuple[str, dict[str, str]]] = []

    def _note(self, method: str, context: Any) -> None:
        self.unary_metadata.append((method, {k: v for k, v in context.invocation_metadata()}))

    async def Delegate(self, request, context):  # noqa: N802 — the gRPC name
        self._note("Delegate", context)
        return pb.DelegateResponse(task_ids=[f"{request.parent_task_id}-child"])

    async def RestoreCheckpoint(self, request, context):  # noqa: N802
        self._note("RestoreCheckpoint", context)
        return pb.RestoreCheckpointResponse(found=False)

    async def SaveCheckpoint(self, request, context):  # noqa: N802
        self._note("SaveCheckpoint", context)
        return pb.SaveCheckpointResponse(sequence_number=request.sequence_number)


class DelegatingAdapter(FakeExecutor):
    """`work` checkpoints once and delegates one subtask (both through the agent), then answers;
    `fail` fails permanently."""

    def __init__(self) -> None:
        super().__init__(task_types=["work", "fail"])
        self.script_type("fail", Permanent("scripted permanent failure"))

    async def execute(self, task: ExecutorTask, ctx: ExecutionContext) -> ExecutorResult:
        if task.type == "work":
            await ctx.checkpoint({"step": 1}, action={"id": "step-1"})
            children = await ctx.delegate([{"type": "echo", "input": 1}], request_id="r1")
            return ExecutorResult(output={"children": children})
        return await super().execute(task, ctx)


async def test_execute_and_adapter_spans_under_the_assignments_trace_parent(tmp_path) -> None:
    path = str(tmp_path / "agent-spans.jsonl")
    node = TracedNode("n1")
    async with fake_nodes(node):
        with traced_to(path):
            async with agent_on(node, DelegatingAdapter()):
                assign(node, "t-ok", "work", None, TRACE_PARENT)
                assign(node, "t-fail", "fail", None, TRACE_PARENT, attempt=2)
                assign(node, "t-plain", "work", None, "")                  # not traced
                await eventually(lambda: node.reports("completed", "t-ok") and node.reports("failed", "t-fail")
                                 and node.reports("completed", "t-plain"))
    spans = spans_in(path)                                                 # flushed by shutdown
    by_task = {}
    for span in spans:
        if span["name"] == "execute":
            by_task[span["attributes"]["task.id"]] = span
    assert set(by_task) == {"t-ok", "t-fail"}                               # t-plain made no span
    adapters = {s["parent_id"]: s for s in spans if s["name"] == f"adapter {EXECUTOR_TYPE}"}
    assert len(spans) == 4 and len(adapters) == 2

    ok, fail = by_task["t-ok"], by_task["t-fail"]
    for span in (ok, fail):
        assert span["context"]["trace_id"] == f"0x{TRACE_ID}" and span["parent_id"] == f"0x{PARENT_SPAN_ID}"
        assert span["kind"] == "SpanKind.CONSUMER"
        assert span["resource"]["attributes"]["service.name"] == "executor-agent"
        adapter = adapters[span["context"]["span_id"]]                     # the adapter span is its child
        assert adapter["context"]["trace_id"] == f"0x{TRACE_ID}"
    assert ok["attributes"] == {"task.id": "t-ok", "task.type": "work", "task.attempt": 1, "executor.id": EXECUTOR,
                                "executor.type": EXECUTOR_TYPE, "task.outcome": "completed"}
    assert ok["status"]["status_code"] == "UNSET"
    assert fail["attributes"]["task.attempt"] == 2 and fail["attributes"]["task.outcome"] == "failed"
    assert fail["status"]["status_code"] == "ERROR" and "scripted permanent failure" in fail["status"]["description"]
    assert (fail["attributes"]["error.type"], fail["attributes"]["error.retryable"]) == ("PERMANENT", False)
    assert adapters[fail["context"]["span_id"]]["status"]["status_code"] == "ERROR"

    # The unary calls of the traced attempt carried its context (the adapter span, current while
    # the adapter ran); those of the untraced attempt carried none.
    ok_adapter_span = adapters[ok["context"]["span_id"]]["context"]["span_id"]
    traced_calls = [(m, md) for m, md in node.unary_metadata if "traceparent" in md]
    assert {m for m, _ in traced_calls} == {"Delegate", "RestoreCheckpoint", "SaveCheckpoint"}
    for _, md in traced_calls:
        assert md["traceparent"] == f"00-{TRACE_ID}-{ok_adapter_span[2:]}-01"
    assert len(node.unary_metadata) == 2 * len(traced_calls)                # t-plain made the same 3 calls


async def test_a_queued_attempt_keeps_its_trace_parent_and_a_cancelled_one_is_no_error(tmp_path) -> None:
    path = str(tmp_path / "queued-spans.jsonl")
    fake = FakeExecutor(task_types=["work"])
    fake.script_task("first", Hang())
    async with fake_nodes(FakeCoordinator("n1")) as (node,):
        with traced_to(path):
            async with agent_on(node, fake, capacity=1, prefetch=1) as agent:
                assign(node, "first", "work", None, TRACE_PARENT)
                await fake.wait_started("first", timeout_s=WAIT_S)
                assign(node, "queued", "work", None, TRACE_PARENT)
                await eventually(lambda: agent.queued_attempts() == [("queued", 1)], what="queued behind first")
                node.stream.cancel("first", 1)
                await eventually(lambda: node.reports("completed", "queued"))
    execute = {s["attributes"]["task.id"]: s for s in spans_in(path) if s["name"] == "execute"}
    assert set(execute) == {"first", "queued"}
    assert execute["queued"]["parent_id"] == f"0x{PARENT_SPAN_ID}"
    assert execute["queued"]["attributes"]["task.outcome"] == "completed"
    assert execute["first"]["attributes"]["task.outcome"] == "cancelled"
    assert execute["first"]["status"]["status_code"] == "UNSET"          # the cluster's decision, not a failure


async def test_no_span_without_a_trace_parent_or_without_tracing(tmp_path) -> None:
    path = str(tmp_path / "spans.jsonl")
    node = TracedNode("n1")
    async with fake_nodes(node):
        with traced_to(path):                                   # tracing on, the task not traced
            async with agent_on(node, DelegatingAdapter()):
                assign(node, "plain", "work", None, "")
                assign(node, "malformed", "work", None, "00-not-a-trace-01")   # a hint only: ignored
                await eventually(lambda: node.reports("completed", "plain") and node.reports("completed", "malformed"))
        assert spans_in(path) == []
        assert all("traceparent" not in md for _, md in node.unary_metadata)

        assert not tracing.enabled()                            # tracing off, the task traced
        async with agent_on(node, DelegatingAdapter()):
            assign(node, "traced", "work", None, TRACE_PARENT)
            await eventually(lambda: node.reports("completed", "traced"))
        assert spans_in(path) == []
        assert all("traceparent" not in md for _, md in node.unary_metadata)


async def test_llm_model_and_tokens_on_the_adapter_span(tmp_path) -> None:
    path = str(tmp_path / "llm-spans.jsonl")
    api = FakeChatAPI("https://fm.example/v1")
    adapter = cloudru(api)
    big = adapter.tiers["big"]
    api.script(big, Reply("hello", prompt_tokens=40, completion_tokens=2, model=f"{big}-2025"))
    async with fake_nodes(FakeCoordinator("n1")) as (node,):
        with traced_to(path):
            async with agent_on(node, adapter, executor_id="llm-1", executor_type="cloudru"):
                assign(node, "c1", "chat", {"prompt": "hi"}, TRACE_PARENT)
                completed = (await eventually(lambda: node.reports("completed", "c1")))[0]
    (span,) = [s for s in spans_in(path) if s["name"] == "adapter cloudru"]
    attributes = span["attributes"]
    assert attributes["gen_ai.request.model"] == big and attributes["gen_ai.response.model"] == f"{big}-2025"
    assert (attributes["gen_ai.usage.input_tokens"], attributes["gen_ai.usage.output_tokens"]) == (40, 2)
    assert math.isclose(attributes["llm.cost_usd"], json.loads(completed.output_json)["cost_usd"], rel_tol=1e-6)


# ------------------------------------------------------------------------------------------- CLI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OTEL_EXPORTER_OTLP_ENDPOINT", "COORDCTL_TRACE_FILE")}
    return {**env, "COORDCTL_ENDPOINTS": ""}


async def coordctl(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cluster.cli", *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=cli_env())


async def test_cli_executor_run_serves_metrics_and_writes_spans(tmp_path) -> None:
    path = str(tmp_path / "cli-spans.jsonl")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    async with fake_nodes(FakeCoordinator("n1")) as (node,):
        proc = await coordctl("--insecure-dev", "executor", "run", "--type", "algorithmic", "--name", "cli-m",
                              "--endpoints", node.endpoint, "--metrics-address", f"127.0.0.1:{port}",
                              "--trace-file", path, "--trace-sample-ratio", "0.5", "--output", "json")
        try:
            await eventually(lambda: node.streams, timeout_s=30, what="the CLI agent's hello")

            async def ready() -> bool:
                try:
                    status, _ = await asyncio.to_thread(http_get, base + "/readyz")
                except OSError:
                    return False
                return status == 200
            loop = asyncio.get_running_loop()
            until_s = loop.time() + 30
            while not await ready():
                assert loop.time() < until_s, "/readyz never 200"
                await asyncio.sleep(0.05)
            assign(node, "e1", "echo", "hi", TRACE_PARENT)
            await eventually(lambda: node.reports("completed", "e1"))
            status, body = await asyncio.to_thread(http_get, base + "/metrics")
            s = samples_of(body.decode())
            labels = {"executor": "cli-m", "executor_type": "algorithmic"}
            assert s[("executor_attempts_total", frozenset({**labels, "outcome": "completed"}.items()))] == 1
            assert s[("executor_latency_seconds_count", frozenset(labels.items()))] == 1
            proc.send_signal(signal.SIGTERM)
            stdout, stderr = await asyncio.wait_for(proc.communicate(), 20)
            assert proc.returncode == 0, stderr.decode()[-2000:]
        finally:
            if proc.returncode is None:
                proc.kill()
                await asyncio.wait_for(proc.wait(), 10)
    # The sampling decision is the task's (sampled in its traceparent), not the ratio's.
    (execute,) = [s for s in spans_in(path) if s["name"] == "execute"]
    assert execute["parent_id"] == f"0x{PARENT_SPAN_ID}" and execute["attributes"]["task.id"] == "e1"
    assert execute["resource"]["attributes"]["service.instance.id"] == "cli-m"


@pytest.mark.parametrize(("args", "message"), [
    (["--trace-sample-ratio", "1.5"], "--trace-sample-ratio: between 0.0 and 1.0, got 1.5"),
    (["--trace-sample-ratio", "-0.1"], "--trace-sample-ratio: between 0.0 and 1.0"),
    (["--metrics-address", "9470"], "--metrics-address: HOST:PORT with a port in 0..65535"),
    (["--metrics-address", "127.0.0.1:99999"], "--metrics-address: HOST:PORT with a port in 0..65535"),
])
async def test_cli_bad_observability_options_name_the_option_and_limit(args: list[str], message: str) -> None:
    proc = await coordctl("--insecure-dev", "executor", "run", "--type", "algorithmic", "--name", "x",
                          "--endpoints", "127.0.0.1:1", *args)
    _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1 and message in " ".join(stderr.decode().split()), stderr.decode()
