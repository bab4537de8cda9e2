"""Prometheus metrics, /healthz and /readyz of an executor agent (issue 7).

    coordctl executor run ... --metrics-address 127.0.0.1:9470
    GET /metrics    Prometheus text (below)
    GET /healthz    200 while the process answers
    GET /readyz     200 when the agent has a live stream to a node (welcomed), else 503; JSON details

Every metric carries `executor` (the executor id) and `executor_type`:

    executor_latency_seconds                   histogram: the adapter's run time of each attempt it ran
                                               (completed, failed or cancelled; 5 ms .. 30 min)
    executor_attempts_total{outcome}           completed | failed | cancelled: every attempt this agent
                                               ended; `failed` includes attempts refused without running
                                               (over capacity, bad input JSON, shutting down), so it can
                                               exceed the histogram's count
    executor_load                              running attempts / capacity
    executor_running_attempts                  attempts holding a slot (a cancelled one until it stops)
    executor_queued_attempts                   prefetched attempts waiting for a slot
    executor_connected                         1 while the agent has a welcomed stream to a node
    llm_tokens_total{model, direction}         prompt | completion tokens of completed LLM attempts
    llm_cost_usd_total{model}                  their cost in USD

LLM usage comes from what the LLM adapters (executors/llm/adapter.py: cloudru, local_llm) put in a
completed attempt's result: `metrics["tokens_prompt_total"]`, `metrics["tokens_completion_total"]`,
`metrics["cost_usd"]` (the attempt's TaskAccount) and the model from `output["model_id"]` (the model
id the tokens were priced under: the tier's model, or local_llm's base model / LoRA), else
`output["model"]` (what the server said it served). A failed attempt's tokens are not counted: the
adapter books them into its own ledger (`get_status()["usage"]`) but its error carries no account.

The `model` label is bounded: the first `models_labelled_max` distinct models keep their names
(cut to `model_label_chars_max`), later ones are counted as `other`.

The gauges and `executor_attempts_total` are read from the agent when scraped (AgentCollector, like
NodeCollector in cluster/metrics.py); the histogram and LLM counters are updated when an attempt
ends, on the agent's event loop (prometheus_client's metrics are thread-safe for the scrape).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

disable_created_metrics()   # as for nodes (cluster/metrics.py): no `_created` series, smaller scrapes

MODELS_LABELLED_MAX = 32          # distinct `model` label values; later models are `other`
MODEL_LABEL_CHARS_MAX = 128       # a longer model name is cut to this
OTHER_MODEL = "other"
UNKNOWN_MODEL = "unknown"         # an LLM result that names no model
# Adapter run time of one attempt: an echo takes milliseconds, an LLM call or a long
# checkpointed task minutes.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                     300.0, 600.0, 1200.0, 1800.0)
OUTCOMES = ("completed", "failed", "cancelled")

AgentSnapshot = Mapping[str, Any]
"""What the agent reports when scraped (ExecutorAgent.metrics_snapshot): running, queued, capacity,
connected, endpoint, node_id, stopping, attempts_completed_total, attempts_failed_total,
attempts_cancelled_total."""


# ------------------------------------------------------------------------------ LLM usage of a result
@dataclass(frozen=True)
class LLMUsage:
    model: str                    # the model id the tokens were priced under
    response_model: str           # what the server said it served ("" when not given)
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


def llm_usage(output: Any, metrics: Any) -> LLMUsage | None:
    """The LLM usage of a completed attempt's result, or None when it is no LLM result (no token
    counts in its metrics) or the counts are not finite non-negative numbers."""
    if not isinstance(metrics, Mapping):
        return None
    prompt, completion = metrics.get("tokens_prompt_total"), metrics.get("tokens_completion_total")
    if prompt is None and completion is None:
        return None
    cost = metrics.get("cost_usd", 0.0)
    values = (prompt or 0, completion or 0, cost or 0.0)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
               for v in values):
        return None
    model = response_model = ""
    if isinstance(output, Mapping):
        for key in ("model_id", "model"):
            if isinstance(output.get(key), str) and output[key]:
                model = output[key]
                break
        if isinstance(output.get("model"), str):
            response_model = output["model"]
    return LLMUsage(model=model or UNKNOWN_MODEL, response_model=response_model, prompt_tokens=int(values[0]),
                    completion_tokens=int(values[1]), cost_usd=float(values[2]))


# ------------------------------------------------------------------------------ the metrics
class AgentCollector(Collector):
    """The gauges and the attempt counter, from `snapshot()` at scrape time."""

    def __init__(self, labels: tuple[str, str], snapshot: Callable[[], AgentSnapshot]) -> None:
        self._labels = list(labels)
        self._snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        s = self._snapshot()
        names = ["executor", "executor_type"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(self._labels, value)
            return family

        yield gauge("executor_load", "running attempts / capacity", s["running"] / s["capacity"])
        yield gauge("executor_running_attempts", "attempts holding a slot", s["running"])
        yield gauge("executor_queued_attempts", "prefetched attempts waiting for a slot", s["queued"])
        yield gauge("executor_connected", "1 while the agent has a welcomed stream to a node",
                    1.0 if s["connected"] else 0.0)
        attempts = CounterMetricFamily("executor_attempts", "attempts this agent ended, by outcome (failed "
                                                            "includes attempts refused without running)",
                                       labels=[*names, "outcome"])
        for outcome in OUTCOMES:
            attempts.add_metric([*self._labels, outcome], s[f"attempts_{outcome}_total"])
        yield attempts


class AgentMetrics:
    """The metrics of one executor agent, in a registry of its own (several agents may run in
    one process). Give it to `ExecutorAgent(metrics=...)`, which attaches its collector."""

    def __init__(self, executor_id: str, executor_type: str, *, models_labelled_max: int = MODELS_LABELLED_MAX,
                 model_label_chars_max: int = MODEL_LABEL_CHARS_MAX) -> None:
        if not executor_id or not executor_type:
            raise ValueError("AgentMetrics: executor_id and executor_type are non-empty")
        if models_labelled_max < 0 or model_label_chars_max < 1:
            raise ValueError("AgentMetrics: models_labelled_max >= 0 and model_label_chars_max >= 1")
        self.executor_id = executor_id
        self.executor_type = executor_type
        self.models_labelled_max = models_labelled_max
        self.model_label_chars_max = model_label_chars_max
        self.registry = CollectorRegistry(auto_describe=False)
        labels = ["executor", "executor_type"]
        self._values = (executor_id, executor_type)
        self.latency = Histogram("executor_latency_seconds", "the adapter's run time of each attempt it ran",
                                 labels, registry=self.registry, buckets=LATENCY_BUCKETS_S).labels(*self._values)
        self._tokens = Counter("llm_tokens", "LLM tokens of completed attempts, by model and direction "
                                             "(prompt | completion)",
                               [*labels, "model", "direction"], registry=self.registry)
        self._cost = Counter("llm_cost_usd", "LLM cost in USD of completed attempts, by model",
                             [*labels, "model"], registry=self.registry)
        self._models: set[str] = set()
        self._collector: AgentCollector | None = None

    def attach(self, snapshot: Callable[[], AgentSnapshot]) -> None:
        """Read the gauges and the attempt counter from `snapshot` at scrape time (once)."""
        if self._collector is not None:
            raise ValueError("AgentMetrics: already attached to an agent")
        self._collector = AgentCollector(self._values, snapshot)
        self.registry.register(self._collector)

    def model_label(self, model: str) -> str:
        label = model[:self.model_label_chars_max]
        if label in self._models:
            return label
        if len(self._models) >= self.models_labelled_max:
            return OTHER_MODEL
        self._models.add(label)
        return label

    def attempt_ran(self, adapter_s: float, usage: LLMUsage | None) -> None:
        """One attempt the adapter ran, whatever its outcome; `usage` of a completed LLM attempt."""
        self.latency.observe(max(0.0, adapter_s))
        if usage is not None:
            model = self.model_label(usage.model)
            self._tokens.labels(*self._values, model, "prompt").inc(usage.prompt_tokens)
            self._tokens.labels(*self._values, model, "completion").inc(usage.completion_tokens)
            self._cost.labels(*self._values, model).inc(usage.cost_usd)


# ------------------------------------------------------------------------------ HTTP
def readiness(snapshot: AgentSnapshot) -> tuple[bool, dict[str, Any]]:
    """Ready = a welcomed stream to a node and not shutting down; each check says what it saw."""
    checks = {
        "stream": {"ok": bool(snapshot["connected"]), "endpoint": snapshot.get("endpoint") or "",
                   "node_id": snapshot.get("node_id") or ""},
        "running": {"ok": not snapshot.get("stopping", False), "stopping": bool(snapshot.get("stopping", False))},
    }
    return all(c["ok"] for c in checks.values()), checks


def serve_http(address: str, registry: CollectorRegistry, snapshot: Callable[[], AgentSnapshot]) -> Any:
    """/metrics, /healthz and /readyz (a live stream to a node) on a daemon thread
    (cluster.metrics.serve_http). Returns the server (its `server_address` names the bound port;
    call shutdown() and server_close() to stop). ValueError for a malformed address, OSError when
    it cannot be bound."""
    from cluster.metrics import serve_http as serve

    return serve(address, registry, lambda: readiness(snapshot()), "agent-metrics-http")
