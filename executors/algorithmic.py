"""The built-in `algorithmic` executor: real, dependency-free task types for tests, benchmarks
and anyone trying the system.

    echo           output = input (any JSON value)
    sleep          {"ms": M}          waits M ms in slices, reporting progress; stops on cancel
    fail           {"times": K}       RetryableTaskError while attempt <= K, then {"attempt": n}
    code_analysis  {"source": "...", "complexity_threshold"?: N}   see executors/code_analysis.py
    fanout         {"children": [...], "wait_s"?: S}   delegates subtasks and waits for them
    steps          {"steps": N, "step_ms"?: M}   N steps of M ms, a checkpoint after each; a later
                   attempt resumes after the last checkpointed step. The output lists, for every
                   step, the attempt that executed it, so resumption is visible from outside.

Bad input raises InvalidTaskInput naming the field and the limit; unknown fields are rejected
so that a typo is not silently ignored. `sleep` is meant to spend real time, so it uses the
event loop's clock rather than an injected one.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from coordinator.model import ExecutorCapabilities, ExecutorType
from executors.base import (
    ExecutionContext,
    ExecutorResult,
    ExecutorTask,
    InvalidTaskInput,
    RetryableTaskError,
    TaskCancelled,
    admit,
    run_status,
)
from executors.code_analysis import AnalysisLimits, analyze_source


@dataclass(frozen=True)
class AlgorithmicLimits:
    sleep_ms_max: int = 10 * 60 * 1000          # longest `sleep` a task may ask for
    sleep_slice_ms: int = 10                    # longest wait between two cancellation checks
    sleep_progress_interval_ms: int = 250       # at most one progress report per interval
    fail_times_max: int = 100                   # = coordinator Limits.max_attempts_max
    running_tasks_max: int = 1_024              # attempts running at once; beyond → ExecutorBusy
    fanout_children_max: int = 100              # subtasks one fanout task may delegate
    fanout_wait_s_max: int = 600                # how long a fanout task may wait for them
    # Steps of one `steps` task: its newest document lists every step done, and at this bound
    # it stays under the cluster's checkpoint_bytes_max (a unit test checks the worst case).
    steps_max: int = 5_000
    step_ms_max: int = 60_000                   # duration of one step
    analysis: AnalysisLimits = field(default_factory=AnalysisLimits)

    def __post_init__(self) -> None:
        for name in ("sleep_ms_max", "sleep_slice_ms", "sleep_progress_interval_ms", "fail_times_max",
                     "running_tasks_max", "fanout_children_max", "fanout_wait_s_max", "steps_max", "step_ms_max"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"AlgorithmicLimits.{name}: an int >= 1, got {value!r}")


@dataclass
class _Run:
    task_id: str
    attempt: int
    type: str
    started_s: float
    cancel_requested: asyncio.Event = field(default_factory=asyncio.Event)


Handler = Callable[[ExecutorTask, ExecutionContext, _Run], Awaitable[Any]]


class AlgorithmicAdapter:
    """Implements `executors.base.ExecutorAdapter`. Safe to run many attempts concurrently on
    one event loop (up to `running_tasks_max`)."""

    executor_type = ExecutorType.ALGORITHMIC

    def __init__(self, limits: AlgorithmicLimits | None = None) -> None:
        self.limits = limits or AlgorithmicLimits()
        self._handlers: dict[str, Handler] = {
            "echo": self._echo,
            "sleep": self._sleep,
            "fail": self._fail,
            "code_analysis": self._code_analysis,
            "fanout": self._fanout,
            "steps": self._steps,
        }
        self._running: dict[int, _Run] = {}
        self._run_ids = itertools.count(1)
        self._counts: Counter[str] = Counter()
        self._started_by_type: Counter[str] = Counter()

    # -------------------------------------------------------------------------- the protocol

    async def execute(self, task: ExecutorTask, ctx: ExecutionContext) -> ExecutorResult:
        admit(task, self._handlers, len(self._running), self.limits.running_tasks_max, self._counts)
        handler = self._handlers[task.type]
        loop = asyncio.get_running_loop()
        run_id = next(self._run_ids)
        run = _Run(task.task_id, task.attempt, task.type, loop.time())
        self._running[run_id] = run
        self._counts["started"] += 1
        self._started_by_type[task.type] += 1
        try:
            _raise_if_cancelled(run, ctx, "before it started")
            output = await handler(task, ctx, run)
            _raise_if_cancelled(run, ctx, "before its result was reported")
        except TaskCancelled:
            self._counts["cancelled"] += 1
            raise
        except asyncio.CancelledError:
            self._counts["cancelled"] += 1
            raise
        except Exception:                   # TaskError, or a bug that task_error_from maps
            self._counts["failed"] += 1
            raise
        finally:
            del self._running[run_id]
        self._counts["succeeded"] += 1
        return ExecutorResult(output=output, metrics={"duration_s": loop.time() - run.started_s})

    def get_capabilities(self) -> ExecutorCapabilities:
        return ExecutorCapabilities(
            supported_task_types=list(self._handlers),
            input_schema=self.input_schemas(),
            output_schema=self.output_schemas(),
            performance_profile={"cost_per_task": 0.0, "running_tasks_max": self.limits.running_tasks_max},
            resumable=True,  # `steps` resumes from its checkpoints; the other types keep none
        )

    def profile_inputs(self) -> dict[str, list[Any]]:
        """Small, cheap inputs per task type for `executors.profiling` (fanout needs a cluster)."""
        return {
            "echo": [{"hello": "world"}, list(range(50))],
            "sleep": [{"ms": 5}],
            "fail": [{"times": 0}],
            "code_analysis": [{"source": "import os\n\ndef f(x):\n    try:\n        return x * 2\n    except:\n"
                                         "        return None\n"}],
            "steps": [{"steps": 5, "step_ms": 0}],
        }

    async def get_status(self) -> dict[str, Any]:
        now_s = asyncio.get_running_loop().time()
        return {
            "executor_type": self.executor_type.value,
            **run_status(self._running.values(), now_s, self.limits.running_tasks_max, self._counts),
            "tasks_started_by_type": dict(sorted(self._started_by_type.items())),
        }

    async def cancel(self, task_id: str) -> None:
        for run in self._running.values():
            if run.task_id == task_id:
                run.cancel_requested.set()

    # --------------------------------------------------------------------------------- schemas

    def input_schemas(self) -> dict[str, Any]:
        """JSON Schema of each task type's input, keyed by task type."""
        analysis = self.limits.analysis
        return {
            "echo": {"description": "any JSON value; returned unchanged"},
            "sleep": _object_schema({"ms": {"type": "integer", "minimum": 0, "maximum": self.limits.sleep_ms_max}},
                                    required=["ms"]),
            "fail": _object_schema({"times": {"type": "integer", "minimum": 0,
                                              "maximum": self.limits.fail_times_max}}, required=["times"]),
            "code_analysis": _object_schema({
                "source": {"type": "string",
                           "description": f"Python source, at most {analysis.source_bytes_max} UTF-8 bytes"},
                "complexity_threshold": {"type": "integer", "minimum": 1,
                                         "maximum": analysis.complexity_threshold_max,
                                         "default": analysis.complexity_threshold_default},
            }, required=["source"]),
            "fanout": _object_schema({
                "children": {"type": "array", "maxItems": self.limits.fanout_children_max,
                             "items": {"type": "object", "required": ["type"]}},
                "wait_s": {"type": "integer", "minimum": 1, "maximum": self.limits.fanout_wait_s_max, "default": 60},
            }, required=["children"]),
            "steps": _object_schema({
                "steps": {"type": "integer", "minimum": 1, "maximum": self.limits.steps_max},
                "step_ms": {"type": "integer", "minimum": 0, "maximum": self.limits.step_ms_max, "default": 0},
            }, required=["steps"]),
        }

    def output_schemas(self) -> dict[str, Any]:
        """JSON Schema of each task type's output, keyed by task type."""
        finding = _object_schema({"rule": {"type": "string"}, "line": {"type": "integer", "minimum": 1},
                                  "message": {"type": "string"},
                                  "severity": {"enum": ["info", "warning", "error"]}},
                                 required=["rule", "line", "message", "severity"])
        return {
            "echo": {"description": "the input, unchanged"},
            "sleep": _object_schema({"slept_ms": {"type": "integer", "minimum": 0}}, required=["slept_ms"]),
            "fail": _object_schema({"attempt": {"type": "integer", "minimum": 1}}, required=["attempt"]),
            "code_analysis": _object_schema({"summary": {"type": "object"},
                                             "findings": {"type": "array", "items": finding}},
                                            required=["summary", "findings"]),
            "fanout": _object_schema({"children": {"type": "array"}}, required=["children"]),
            "steps": _object_schema({
                "steps": {"type": "array", "items": _object_schema(
                    {"step": {"type": "integer", "minimum": 1}, "attempt": {"type": "integer", "minimum": 1}},
                    required=["step", "attempt"])},
                "attempt": {"type": "integer", "minimum": 1},
                "resumed_from_sequence": {"type": "integer", "minimum": 0},
            }, required=["steps", "attempt", "resumed_from_sequence"]),
        }

    # -------------------------------------------------------------------------------- handlers

    async def _echo(self, task: ExecutorTask, ctx: ExecutionContext, run: _Run) -> Any:
        return task.input

    async def _sleep(self, task: ExecutorTask, ctx: ExecutionContext, run: _Run) -> Any:
        fields = _fields(task.input, allowed={"ms"}, required={"ms"}, shape='{"ms": int}')
        total_ms = _int_in_range(fields["ms"], "input.ms", 0, self.limits.sleep_ms_max, "sleep_ms_max")
        loop = asyncio.get_running_loop()
        start_s = loop.time()
        end_s = start_s + total_ms / 1000
        slice_s = self.limits.sleep_slice_ms / 1000
        interval_s = self.limits.sleep_progress_interval_ms / 1000
        await ctx.progress(0.0, f"sleeping {total_ms} ms")
        last_report_s = start_s
        waiter = asyncio.ensure_future(run.cancel_requested.wait())
        try:
            while (now_s := loop.time()) < end_s:
                if run.cancel_requested.is_set() or ctx.cancelled:
                    elapsed_ms = round((now_s - start_s) * 1000)
                    raise TaskCancelled(f"sleep cancelled after {elapsed_ms} of {total_ms} ms")
                if now_s - last_report_s >= interval_s:
                    last_report_s = now_s
                    await ctx.progress(min(1.0, (now_s - start_s) / (end_s - start_s)),
                                       f"slept {round((now_s - start_s) * 1000)} of {total_ms} ms")
                await asyncio.wait({waiter}, timeout=min(slice_s, end_s - now_s))
        finally:
            waiter.cancel()
        await ctx.progress(1.0, f"slept {total_ms} ms")
        return {"slept_ms": total_ms}

    async def _fail(self, task: ExecutorTask, ctx: ExecutionContext, run: _Run) -> Any:
        fields = _fields(task.input, allowed={"times"}, required={"times"}, shape='{"times": int}')
        times = _int_in_range(fields["times"], "input.times", 0, self.limits.fail_times_max, "fail_times_max")
        if task.attempt <= times:
            raise RetryableTaskError(f"fail: scripted failure on attempt {task.attempt} of the first {times}")
        return {"attempt": task.attempt}

    async def _fanout(self, task: ExecutorTask, ctx: ExecutionContext, run: _Run) -> Any:
        """Delegates `children` as subtasks of this task (in its DAG), waits for them and returns
        their outputs. The delegation's request id is fixed, so a retried attempt picks up the
        same subtasks instead of creating them again."""
        fields = _fields(task.input, allowed={"children", "wait_s"}, required={"children"},
                         shape='{"children": [{"type": str, "input"?: any}], "wait_s"?: int}')
        children = fields["children"]
        if not isinstance(children, list) or not 1 <= len(children) <= self.limits.fanout_children_max:
            raise InvalidTaskInput("input.children", f"a list of 1..{self.limits.fanout_children_max} subtasks")
        wait_s = _int_in_range(fields.get("wait_s", 60), "input.wait_s", 1, self.limits.fanout_wait_s_max,
                               "fanout_wait_s_max")
        ids = await ctx.delegate(children, request_id="fanout")
        await ctx.progress(0.1, f"delegated {len(ids)} subtasks")
        results = await ctx.wait_for(ids, wait_s)
        unfinished = [r for r in results if r["status"] != "completed"]
        if unfinished:
            first = unfinished[0]
            raise RetryableTaskError(f"fanout: {len(unfinished)} of {len(ids)} subtasks did not complete "
                                     f"(e.g. {first['id']}: {first['status']} {first['error']})".strip())
        return {"children": [{"id": r["id"], "output": r["output"]} for r in results]}

    async def _steps(self, task: ExecutorTask, ctx: ExecutionContext, run: _Run) -> Any:
        fields = _fields(task.input, allowed={"steps", "step_ms"}, required={"steps"},
                         shape='{"steps": int, "step_ms"?: int}')
        steps = _int_in_range(fields["steps"], "input.steps", 1, self.limits.steps_max, "steps_max")
        step_ms = _int_in_range(fields.get("step_ms", 0), "input.step_ms", 0, self.limits.step_ms_max, "step_ms_max")
        restored = await ctx.restore()
        done = [{"step": int(a["id"].removeprefix("step-")), "attempt": a["attempt"]}
                for a in (restored.executed_actions if restored else [])]
        for step in range(1, steps + 1):
            action_id = f"step-{step}"
            if ctx.executed(action_id):
                continue                    # an earlier attempt did it and checkpointed it
            await _pause(run, ctx, step_ms, f"in step {step} of {steps}")
            done.append({"step": step, "attempt": task.attempt})
            await ctx.checkpoint({"steps_done": step, "steps": steps},
                                 action={"id": action_id, "attempt": task.attempt},
                                 remaining_plan=[{"from_step": step + 1, "to_step": steps}] if step < steps else [])
            await ctx.progress(step / steps, f"step {step} of {steps}")
        return {"steps": done, "attempt": task.attempt,
                "resumed_from_sequence": restored.sequence_number if restored else 0}

    async def _code_analysis(self, task: ExecutorTask, ctx: ExecutionContext, run: _Run) -> Any:
        analysis = self.limits.analysis
        fields = _fields(task.input, allowed={"source", "complexity_threshold"}, required={"source"},
                         shape='{"source": str, "complexity_threshold"?: int}')
        source = fields["source"]
        if not isinstance(source, str):
            raise InvalidTaskInput("input.source", f"a string of Python source, got {_json_type(source)}")
        threshold = _int_in_range(fields.get("complexity_threshold", analysis.complexity_threshold_default),
                                  "input.complexity_threshold", 1, analysis.complexity_threshold_max,
                                  "complexity_threshold_max")
        await ctx.progress(0.0, "parsing")
        # Parsing 256 KiB takes ~0.1 s: off the event loop, so heartbeats keep flowing.
        report = await asyncio.to_thread(analyze_source, source, complexity_threshold=threshold, limits=analysis)
        await ctx.progress(1.0, f"{report['summary']['findings_total']} findings")
        return report


# ------------------------------------------------------------------------------------- validation


def _raise_if_cancelled(run: _Run, ctx: ExecutionContext, when: str) -> None:
    if run.cancel_requested.is_set() or ctx.cancelled:
        raise TaskCancelled(f"{run.type} task {run.task_id!r} attempt {run.attempt} cancelled {when}")


async def _pause(run: _Run, ctx: ExecutionContext, ms: int, where: str) -> None:
    """Wait `ms`, or raise TaskCancelled as soon as cancellation is asked."""
    _raise_if_cancelled(run, ctx, where)
    if ms > 0:
        try:
            await asyncio.wait_for(run.cancel_requested.wait(), ms / 1000)
        except TimeoutError:
            pass
    _raise_if_cancelled(run, ctx, where)


def _fields(value: Any, *, allowed: set[str], required: set[str], shape: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidTaskInput("input", f"an object {shape}, got {_json_type(value)}")
    for name in sorted(required):
        if name not in value:
            raise InvalidTaskInput(f"input.{name}", f"required field is missing; expected {shape}")
    for name in sorted(map(str, value)):
        if name not in allowed:
            raise InvalidTaskInput(f"input.{name}", f"unknown field; allowed fields are {sorted(allowed)}")
    return value


def _int_in_range(value: Any, field_name: str, low: int, high: int, bound_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidTaskInput(field_name, f"an integer in {low}..{high} ({bound_name}), got {_json_type(value)}")
    if not low <= value <= high:
        raise InvalidTaskInput(field_name, f"must be in {low}..{high} ({bound_name}), got {value}")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, (list, tuple)):
        return "array"
    return type(value).__name__


def _object_schema(properties: dict[str, Any], *, required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
