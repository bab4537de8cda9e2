"""Capability profiling: run an adapter on a small benchmark set per task type and measure what
the scheduler's matching score uses (latency, throughput, cost per task, success rate).

    profile = await profile_adapter(adapter, settings=ProfileSettings(repeats=5, concurrency=4))
    spec.performance_profile_json = json.dumps(profile)   # what `executor run --profile-file` sends

An adapter offers its benchmark inputs through an optional method

    def profile_inputs(self) -> dict[str, list[Any]]     # task type -> inputs, small and cheap

Task types it gives no inputs for are not profiled (and say so in the profile). The profile has
the executor-wide numbers the scheduler reads (`cost_per_task`, `latency_s_p50`) and the
per-type detail. Cost comes from the adapter's own result metrics (`cost_usd`), so an LLM
adapter profiled against a paid endpoint spends real money: keep its inputs tiny.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from executors.base import ExecutorAdapter, ExecutorTask, LocalContext, TaskError, task_error_from

PROFILE_FORMAT = "agent-coordinator-profile-v1"


@dataclass(frozen=True)
class ProfileSettings:
    repeats: int = 5                    # runs of each input, one at a time (latency)
    concurrency: int = 4                # runs at once for the throughput figure
    inputs_per_type_max: int = 8
    run_timeout_s: float = 60.0         # one run; a slower one counts as a failure

    def __post_init__(self) -> None:
        for name, low, high in (("repeats", 1, 1000), ("concurrency", 1, 256), ("inputs_per_type_max", 1, 100)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"ProfileSettings.{name}: an int in {low}..{high}, got {value!r}")
        if not 0 < self.run_timeout_s <= 3600:
            raise ValueError(f"ProfileSettings.run_timeout_s: in (0, 3600] s, got {self.run_timeout_s!r}")


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def _run_once(adapter: ExecutorAdapter, task_type: str, task_input: Any, n: int,
                    timeout_s: float) -> tuple[float, float, TaskError | None]:
    task = ExecutorTask(task_id=f"profile-{task_type}-{n}", attempt=1, type=task_type, input=task_input, metadata={})
    started = time.perf_counter()
    try:
        result = await asyncio.wait_for(adapter.execute(task, LocalContext()), timeout_s)
    except Exception as exc:            # noqa: BLE001 — a failed run is data, mapped in one place
        return time.perf_counter() - started, 0.0, task_error_from(exc)
    cost = float(result.metrics.get("cost_usd", 0.0)) if isinstance(result.metrics, Mapping) else 0.0
    return time.perf_counter() - started, cost, None


async def profile_adapter(adapter: ExecutorAdapter, *, settings: ProfileSettings | None = None,
                          inputs: Mapping[str, list[Any]] | None = None) -> dict[str, Any]:
    """Measure every task type the adapter offers inputs for (or `inputs`, if given)."""
    settings = settings or ProfileSettings()
    if inputs is None:
        offer = getattr(adapter, "profile_inputs", None)
        inputs = offer() if offer is not None else {}
    supported = list(adapter.get_capabilities().supported_task_types)
    unknown = sorted(set(inputs) - set(supported))
    if unknown:
        raise ValueError(f"inputs: task types {unknown} are not among the adapter's {supported}")
    per_type: dict[str, Any] = {}
    counter = 0
    for task_type in supported:
        samples = list(inputs.get(task_type, ()))[:settings.inputs_per_type_max]
        if not samples:
            continue
        latencies, costs, errors = [], [], []
        counter += 1  # one unmeasured run first: a model loaded on first use must not read as latency
        await _run_once(adapter, task_type, samples[0], counter, settings.run_timeout_s)
        for _ in range(settings.repeats):
            for sample in samples:
                counter += 1
                latency_s, cost, error = await _run_once(adapter, task_type, sample, counter, settings.run_timeout_s)
                if error is not None:
                    errors.append(error.message[:200])
                else:
                    latencies.append(latency_s)
                    costs.append(cost)
        runs = [samples[i % len(samples)] for i in range(settings.concurrency * 2)]
        started = time.perf_counter()
        outcomes = await asyncio.gather(*(_run_once(adapter, task_type, sample, counter + i + 1, settings.run_timeout_s)
                                          for i, sample in enumerate(runs)))
        counter += len(runs)
        wall_s = time.perf_counter() - started
        ok_runs = sum(1 for _, _, error in outcomes if error is None)
        total = settings.repeats * len(samples)
        per_type[task_type] = {
            "runs": total,
            "success_rate": round(len(latencies) / total, 4),
            "latency_s_p50": round(statistics.median(latencies), 6) if latencies else None,
            "latency_s_p95": round(_quantile(latencies, 0.95), 6) if latencies else None,
            "throughput_per_s": round(ok_runs / wall_s, 3) if wall_s > 0 else None,
            "throughput_concurrency": settings.concurrency,
            "cost_per_task": round(statistics.fmean(costs), 9) if costs else None,
            "errors": errors[:3],
        }
    measured = [v for v in per_type.values() if v["latency_s_p50"] is not None]
    return {
        "format": PROFILE_FORMAT,
        "profiled_at_unix_ms": int(time.time() * 1000),
        # Executor-wide figures the scheduler reads (scheduler.view.ExecutorView).
        "latency_s_p50": round(statistics.median(v["latency_s_p50"] for v in measured), 6) if measured else 0.0,
        "cost_per_task": round(statistics.fmean(v["cost_per_task"] for v in measured), 9) if measured else 0.0,
        "success_rate": round(statistics.fmean(v["success_rate"] for v in per_type.values()), 4) if per_type else 1.0,
        "task_types": per_type,
        "not_profiled": [t for t in supported if t not in per_type],
    }
