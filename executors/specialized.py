"""The `specialized_ml` executor: one generic adapter around small, CPU-bound models, one model
per task type (STYLE §5: the port is `ModelSpec`; `FakeModel` ships beside the real models in
executors/specialized_models.py).

    task.input ──JSON Schema──► input_transformer ──► ModelInput(batches, context, items_total)
                                                          │
         for each batch: cancelled? → wait for an inference slot → model(batch) in a worker thread
                                                          │
    output ◄──JSON Schema── + model_versions ◄── output_transformer(context, [batch outputs])

  * The input is checked against the task type's input schema first (InvalidTaskInput naming
    the field and the bound, e.g. "input.texts: at most 64 items (embed_texts_max), got 70"),
    then by the input transformer for what a schema cannot say.
  * Model calls and the output transformer run in the adapter's own thread pool of
    `inferences_concurrent_max` threads; an asyncio semaphore of the same size is taken before
    a call is submitted and given back only when the thread is done with it, so a call that was
    abandoned (its task cancelled) still counts until it really ends.
  * Cancellation (`cancel(task_id)` or `ctx.cancelled`) is looked at before each batch, while
    waiting for a slot and while a batch runs; a running batch cannot be interrupted, so the
    task stops at once and the abandoned batch finishes in the background holding its slot.
  * The output gets `model_versions` ({model name: version}, to pin a checkpoint to the weights
    that produced it) and is checked against the output schema (InvalidModelOutput otherwise).
    Metrics: duration_s, items_total, batches_total, inference_s, slot_wait_s.

Errors (executors.base's tree, plus two of this module):

    TaskError
    ├── RetryableTaskError
    │   ├── ExecutorBusy          running_tasks_max attempts are already running here
    │   └── ModelUnavailable      the model could not be loaded (missing package or files, memory);
    │                             another executor, or a later attempt, may have it
    ├── PermanentTaskError
    │   ├── InvalidTaskInput      the input fails its schema or transformer; `.field` names it
    │   ├── UnsupportedTaskType   no model for this task type
    │   └── InvalidModelOutput    the model's output fails its output schema (a bug, or bad weights)
    └── TaskCancelled

`_mapping_model_errors` is the one place that maps what a model raises into this tree.

This module imports only the standard library, jsonschema and the core.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import jsonschema

from coordinator.model import ExecutorCapabilities, ExecutorType
from executors.base import (
    ExecutionContext,
    ExecutorResult,
    ExecutorTask,
    InvalidTaskInput,
    PermanentTaskError,
    RetryableTaskError,
    TaskCancelled,
    TaskError,
    admit,
    run_status,
)

SCHEMA_MESSAGE_CHARS_MAX = 300      # a schema error's message is cut here (it may quote the input)


# ------------------------------------------------------------------------------------------ errors


class ModelUnavailable(RetryableTaskError):
    code = "MODEL_UNAVAILABLE"


class InvalidModelOutput(PermanentTaskError):
    """The output fails the task type's output schema. `field` is a path such as "output.vectors[0]"."""

    code = "INVALID_OUTPUT"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


# -------------------------------------------------------------------------------------------- port


@dataclass(frozen=True)
class ModelInput:
    """What an input transformer makes of a task's input: the batches the model is called with,
    one call each, in order; `context` is handed to the output transformer unchanged;
    `items_total` is the number of items (texts, files...) for the metrics."""

    batches: Sequence[Any]
    context: Any = None
    items_total: int = 0


class InputTransformer(Protocol):
    def __call__(self, value: Any, /) -> ModelInput:
        """Turn a task input that passed the input schema into batches; raise InvalidTaskInput
        (naming the field and the bound) for what the schema cannot say. Runs on the event loop,
        so it must be cheap."""
        ...


class Model(Protocol):
    def __call__(self, batch: Any, /) -> Any:
        """Run the model on one batch. Blocking and CPU-bound: called in a worker thread, so it
        must be thread-safe (several may run at once up to inferences_concurrent_max)."""
        ...


class OutputTransformer(Protocol):
    def __call__(self, context: Any, outputs: list[Any], /) -> dict[str, Any]:
        """Turn the batch outputs (in batch order) into the task's output object. Called in a
        worker thread."""
        ...


@dataclass(frozen=True)
class ModelSpec:
    """One task type of the specialized_ml executor.

    `model_versions()` returns {model name: version}; it is called in a worker thread and may
    be slow the first time (e.g. hash the weights), so cache it. `warmup()`, when given, loads
    the model (blocking); `status()` returns a small JSON-serializable dict (loaded, load_s...).
    """

    task_type: str
    input_schema: Mapping[str, Any]
    output_schema: Mapping[str, Any]
    input_transformer: InputTransformer
    model: Model
    output_transformer: OutputTransformer
    model_versions: Callable[[], Mapping[str, str]]
    warmup: Callable[[], None] | None = None
    status: Callable[[], Mapping[str, Any]] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.task_type, str) or self.task_type == "":
            raise ValueError("ModelSpec.task_type: a non-empty str")
        for name in ("input_schema", "output_schema"):
            try:
                jsonschema.Draft202012Validator.check_schema(dict(getattr(self, name)))
            except jsonschema.SchemaError as exc:
                raise ValueError(f"ModelSpec.{name} of {self.task_type!r}: not a JSON Schema: {exc.message}") from exc
        for name in ("input_transformer", "model", "output_transformer", "model_versions"):
            if not callable(getattr(self, name)):
                raise ValueError(f"ModelSpec.{name} of {self.task_type!r}: a callable")


# ------------------------------------------------------------------------------------------ limits


@dataclass(frozen=True)
class SpecializedLimits:
    running_tasks_max: int = 256            # attempts running (or queued for a slot) at once; beyond → ExecutorBusy
    inferences_concurrent_max: int = 1      # model calls running at once (threads); CPU models use every core
    batches_max: int = 1_024                # batches one task may be split into
    cancel_poll_interval_ms: int = 10       # how often a waiting task looks at ctx.cancelled
    output_bytes_max: int = 1 << 20         # JSON of one output (= cluster dispatch result_bytes_max)

    def __post_init__(self) -> None:
        for name in ("running_tasks_max", "inferences_concurrent_max", "batches_max", "cancel_poll_interval_ms",
                     "output_bytes_max"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SpecializedLimits.{name}: an int >= 1, got {value!r}")


# ------------------------------------------------------------------------------------------ adapter


@dataclass
class _Run:
    task_id: str
    attempt: int
    type: str
    started_s: float
    batch: int = 0
    batches_total: int = 0
    cancel_requested: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Timing:
    inference_s: float = 0.0
    slot_wait_s: float = 0.0


class SpecializedMLAdapter:
    """Implements `executors.base.ExecutorAdapter` for the task types of `specs`. One instance
    serves one event loop. Call `aclose()` to stop its threads."""

    executor_type = ExecutorType.SPECIALIZED_ML

    def __init__(self, specs: Sequence[ModelSpec], limits: SpecializedLimits | None = None) -> None:
        self.limits = limits or SpecializedLimits()
        self._specs: dict[str, ModelSpec] = {}
        self._input_validators: dict[str, jsonschema.protocols.Validator] = {}
        self._output_validators: dict[str, jsonschema.protocols.Validator] = {}
        for spec in specs:
            if not isinstance(spec, ModelSpec):
                raise ValueError(f"specs: ModelSpec values, got {type(spec).__name__}")
            if spec.task_type in self._specs:
                raise ValueError(f"specs: task type {spec.task_type!r} appears twice")
            self._specs[spec.task_type] = spec
            self._input_validators[spec.task_type] = jsonschema.Draft202012Validator(dict(spec.input_schema))
            self._output_validators[spec.task_type] = jsonschema.Draft202012Validator(dict(spec.output_schema))
        if not self._specs:
            raise ValueError("specs: at least one ModelSpec")
        self._pool = concurrent.futures.ThreadPoolExecutor(self.limits.inferences_concurrent_max,
                                                           thread_name_prefix="specialized-ml")
        self._slots = asyncio.Semaphore(self.limits.inferences_concurrent_max)
        self._inferences_running = 0
        self._running: dict[int, _Run] = {}
        self._run_ids = itertools.count(1)
        self._counts: Counter[str] = Counter()
        self._started_by_type: Counter[str] = Counter()
        self._latency_s: dict[str, float] = {}     # measured by warmup(), shown in the capabilities

    # -------------------------------------------------------------------------- the protocol

    async def execute(self, task: ExecutorTask, ctx: ExecutionContext) -> ExecutorResult:
        admit(task, self._specs, len(self._running), self.limits.running_tasks_max, self._counts)
        spec = self._specs[task.type]
        loop = asyncio.get_running_loop()
        run_id = next(self._run_ids)
        run = _Run(task.task_id, task.attempt, task.type, loop.time())
        self._running[run_id] = run
        self._counts["started"] += 1
        self._started_by_type[task.type] += 1
        try:
            output, prepared, timing = await self._run(spec, task, ctx, run)
        except (TaskCancelled, asyncio.CancelledError):
            self._counts["cancelled"] += 1
            raise
        except Exception:                   # a TaskError, or a bug that task_error_from maps
            self._counts["failed"] += 1
            raise
        finally:
            del self._running[run_id]
        self._counts["succeeded"] += 1
        return ExecutorResult(output=output, metrics={
            "duration_s": loop.time() - run.started_s,
            "items_total": float(prepared.items_total),
            "batches_total": float(len(prepared.batches)),
            "inference_s": timing.inference_s,
            "slot_wait_s": timing.slot_wait_s,
        })

    def get_capabilities(self) -> ExecutorCapabilities:
        profile: dict[str, Any] = {"cost_per_task": 0.0, "running_tasks_max": self.limits.running_tasks_max,
                                   "inferences_concurrent_max": self.limits.inferences_concurrent_max,
                                   "device": "cpu"}
        if self._latency_s:
            profile["latency_s_measured"] = dict(sorted(self._latency_s.items()))
        return ExecutorCapabilities(
            supported_task_types=list(self._specs),
            input_schema=self.input_schemas(),
            output_schema=self.output_schemas(),
            performance_profile=profile,
            resumable=False,
        )

    async def get_status(self) -> dict[str, Any]:
        now_s = asyncio.get_running_loop().time()
        return {
            "executor_type": self.executor_type.value,
            **run_status(self._running.values(), now_s, self.limits.running_tasks_max, self._counts,
                         batch="batch", batches_total="batches_total"),
            "inferences_running": self._inferences_running,
            "inferences_concurrent_max": self.limits.inferences_concurrent_max,
            "tasks_started_by_type": dict(sorted(self._started_by_type.items())),
            "models": {t: dict(s.status()) if s.status else {} for t, s in sorted(self._specs.items())},
        }

    async def cancel(self, task_id: str) -> None:
        for run in self._running.values():
            if run.task_id == task_id:
                run.cancel_requested.set()

    # ----------------------------------------------------------------------------------- extras

    def input_schemas(self) -> dict[str, Any]:
        """JSON Schema of each task type's input, keyed by task type."""
        return {t: dict(s.input_schema) for t, s in self._specs.items()}

    def output_schemas(self) -> dict[str, Any]:
        """JSON Schema of each task type's output, keyed by task type."""
        return {t: dict(s.output_schema) for t, s in self._specs.items()}

    async def warmup(self, samples: Mapping[str, Any] | None = None) -> dict[str, float]:
        """Load every model now (instead of on its first task) and, for each task type with a
        sample input in `samples`, run it once and keep its latency for the capabilities'
        `performance_profile.latency_s_measured`. Returns {"<type>_load_s" | "<type>_latency_s": s}."""
        from executors.base import LocalContext

        timings: dict[str, float] = {}
        loop = asyncio.get_running_loop()
        for task_type, spec in self._specs.items():
            if spec.warmup is not None:
                start_s = time.perf_counter()
                async with self._slots:
                    await loop.run_in_executor(self._pool, _call_model, spec, spec.warmup)
                timings[f"{task_type}_load_s"] = time.perf_counter() - start_s
        for task_type, sample in (samples or {}).items():
            if task_type not in self._specs:
                raise ValueError(f"samples: {task_type!r} is not one of the task types {sorted(self._specs)}")
            task = ExecutorTask(task_id=f"warmup-{task_type}", attempt=1, type=task_type, input=sample, metadata={})
            result = await self.execute(task, LocalContext())
            self._latency_s[task_type] = round(float(result.metrics["duration_s"]), 6)
            timings[f"{task_type}_latency_s"] = float(result.metrics["duration_s"])
        return timings

    async def aclose(self) -> None:
        """Stop the worker threads (a running model call finishes first)."""
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown, True)

    # --------------------------------------------------------------------------------- pipeline

    async def _run(self, spec: ModelSpec, task: ExecutorTask, ctx: ExecutionContext,
                   run: _Run) -> tuple[dict[str, Any], ModelInput, _Timing]:
        _raise_if_cancelled(run, ctx, "before it started")
        _validate(self._input_validators[spec.task_type], task.input, "input", InvalidTaskInput)
        prepared = spec.input_transformer(task.input)
        if not isinstance(prepared, ModelInput):
            raise PermanentTaskError(f"input transformer of {spec.task_type!r} returned "
                                     f"{type(prepared).__name__}, not ModelInput")
        batches = list(prepared.batches)
        if len(batches) > self.limits.batches_max:
            raise InvalidTaskInput("input", f"needs {len(batches)} batches; at most {self.limits.batches_max} "
                                            "(batches_max)")
        run.batches_total = len(batches)
        timing = _Timing()
        outputs: list[Any] = []
        for number, batch in enumerate(batches, start=1):
            where = f"before batch {number} of {len(batches)}"
            _raise_if_cancelled(run, ctx, where)
            run.batch = number
            outputs.append(await self._in_thread(run, ctx, timing, where, _call_model, spec, spec.model, batch))
            await ctx.progress(number / (len(batches) + 1), f"batch {number} of {len(batches)}")
        _raise_if_cancelled(run, ctx, "before its output was made")
        output = await self._in_thread(run, ctx, timing, "while its output was made", self._finish, spec,
                                       prepared.context, outputs)
        _raise_if_cancelled(run, ctx, "before its result was reported")
        await ctx.progress(1.0, f"{len(batches)} batches done")
        return output, prepared, timing

    def _finish(self, spec: ModelSpec, context: Any, outputs: list[Any]) -> dict[str, Any]:
        """In a worker thread: the output transformer, model_versions, the output's checks."""
        output = _call_model(spec, spec.output_transformer, context, outputs)
        if not isinstance(output, dict):
            raise InvalidModelOutput("output", f"an object, got {type(output).__name__}")
        versions = _call_model(spec, spec.model_versions)
        output = {**output, "model_versions": dict(versions)}
        _validate(self._output_validators[spec.task_type], output, "output", InvalidModelOutput)
        size = len(json.dumps(output, separators=(",", ":")).encode())
        if size > self.limits.output_bytes_max:
            raise PermanentTaskError(f"output: at most {self.limits.output_bytes_max} bytes of JSON "
                                     f"(output_bytes_max), got {size}; ask for fewer items")
        return output

    async def _in_thread(self, run: _Run, ctx: ExecutionContext, timing: _Timing, where: str,
                         fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) in the pool once a slot is free; raise TaskCancelled as soon as
        cancellation is asked (while waiting for the slot or for fn, which then finishes in the
        background and only then gives its slot back)."""
        loop = asyncio.get_running_loop()
        waiter = asyncio.ensure_future(run.cancel_requested.wait())
        try:
            wait_start_s = loop.time()
            await self._acquire_slot(run, ctx, waiter, where)
            timing.slot_wait_s += loop.time() - wait_start_s
            self._inferences_running += 1
            call_start_s = loop.time()
            try:
                future = self._pool.submit(fn, *args)
            except BaseException:
                self._release_slot()
                raise
            future.add_done_callback(lambda _: _call_soon_threadsafe(loop, self._release_slot))
            result = asyncio.wrap_future(future)
            try:
                while True:
                    done, _ = await asyncio.wait({result, waiter}, timeout=self.limits.cancel_poll_interval_ms / 1000,
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if result in done:
                        timing.inference_s += loop.time() - call_start_s
                        return result.result()
                    _raise_if_cancelled(run, ctx, where.replace("before", "during", 1))
            except BaseException:
                result.add_done_callback(_retrieve)    # it finishes in the background, holding its slot
                raise
        finally:
            waiter.cancel()

    async def _acquire_slot(self, run: _Run, ctx: ExecutionContext, waiter: asyncio.Future[Any], where: str) -> None:
        acquire = asyncio.ensure_future(self._slots.acquire())
        try:
            while True:
                done, _ = await asyncio.wait({acquire, waiter}, timeout=self.limits.cancel_poll_interval_ms / 1000,
                                             return_when=asyncio.FIRST_COMPLETED)
                if acquire in done:
                    return
                _raise_if_cancelled(run, ctx, where + " (waiting for an inference slot)")
        except BaseException:
            if acquire.done() and not acquire.cancelled():
                self._slots.release()       # it was acquired just as we gave up
            else:
                acquire.cancel()
            raise

    def _release_slot(self) -> None:
        self._inferences_running -= 1
        self._slots.release()


# --------------------------------------------------------------------------------------- helpers


def _raise_if_cancelled(run: _Run, ctx: ExecutionContext, when: str) -> None:
    if run.cancel_requested.is_set() or ctx.cancelled:
        raise TaskCancelled(f"{run.type} task {run.task_id!r} attempt {run.attempt} cancelled {when}")


def _call_soon_threadsafe(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    with contextlib.suppress(RuntimeError):     # the loop is closed: nobody is left to wait for a slot
        loop.call_soon_threadsafe(fn)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark an abandoned call's outcome as seen, so asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()


def _call_model(spec: ModelSpec, fn: Callable[..., Any], *args: Any) -> Any:
    with _mapping_model_errors(spec.task_type):
        return fn(*args)


@contextlib.contextmanager
def _mapping_model_errors(task_type: str) -> Iterator[None]:
    """The one place that maps what a model, a transformer or a model loader raises (STYLE §6)."""
    try:
        yield
    except TaskError:
        raise
    except MemoryError as exc:
        raise RetryableTaskError(f"model for {task_type!r}: out of memory") from exc
    except Exception as exc:                 # torch's RuntimeError, a tokenizer's ValueError, a bug
        raise PermanentTaskError(f"model for {task_type!r} failed: {type(exc).__name__}: {exc}") from exc


def _validate(validator: Any, value: Any, root: str, error: type[InvalidTaskInput] | type[InvalidModelOutput]) -> None:
    """Check `value` against a JSON Schema; raise `error(field, problem)` for the most relevant
    violation, naming the bound (the schema's "x-bound") without quoting a large value."""
    best = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if best is None:
        return
    path = root + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in best.absolute_path)
    raise error(*_describe(best, path))


def _describe(error: jsonschema.ValidationError, path: str) -> tuple[str, str]:
    kind, limit, value = error.validator, error.validator_value, error.instance
    bound = error.schema.get("x-bound") if isinstance(error.schema, Mapping) else None
    named = f" ({bound})" if bound else ""
    if kind == "required":
        missing = [name for name in limit if isinstance(value, Mapping) and name not in value]
        return f"{path}.{missing[0] if missing else '?'}", "required field is missing"
    if kind == "additionalProperties" and isinstance(value, Mapping):
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(str(k) for k in value if k not in allowed)
        return f"{path}.{extra[0] if extra else '?'}", f"unknown field; allowed fields are {allowed}"
    if kind == "type":
        return path, f"expected {limit}, got {_json_type(value)}"
    if kind in ("maxItems", "maxLength", "maxProperties"):
        unit = {"maxItems": "items", "maxLength": "characters", "maxProperties": "entries"}[kind]
        return path, f"at most {limit} {unit}{named}, got {len(value)}"
    if kind in ("minItems", "minLength", "minProperties"):
        unit = {"minItems": "items", "minLength": "characters", "minProperties": "entries"}[kind]
        return path, f"at least {limit} {unit}{named}, got {len(value)}"
    if kind in ("maximum", "minimum"):
        relation = "<=" if kind == "maximum" else ">="
        return path, f"must be {relation} {limit}{named}, got {value!r}"
    if kind == "propertyNames":
        return path, f"a key is not allowed: {error.message}"[:SCHEMA_MESSAGE_CHARS_MAX]
    return path, f"{error.message}"[:SCHEMA_MESSAGE_CHARS_MAX]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, (list, tuple)):
        return "array"
    return type(value).__name__


def object_schema(properties: dict[str, Any], *, required: Sequence[str] = (), **extra: Any) -> dict[str, Any]:
    """A closed object schema (unknown fields are rejected, so a typo is not silently ignored)."""
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False,
            **extra}


MODEL_VERSIONS_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": {"type": "string"},
    "description": "{model name: version}: pins a result or checkpoint to the weights that produced it",
}


def output_object_schema(properties: dict[str, Any], *, required: Sequence[str] = ()) -> dict[str, Any]:
    """An output schema: `properties` plus the `model_versions` the adapter adds to every output."""
    return object_schema({**properties, "model_versions": MODEL_VERSIONS_SCHEMA},
                         required=[*required, "model_versions"])


# ------------------------------------------------------------------------------------------- fake


class FakeModel:
    """A scriptable model for tests of the generic adapter (task type "double" by default):
    input {"items": [int, ...]} is cut into batches of `batch_items`; each call doubles its batch;
    the output is {"doubled": [...]}.

    * `fail_on={item: exception}`: a batch holding `item` raises that exception;
    * `gate`: a threading.Event every call waits for (tests hold calls to see the bound);
    * `calls` records each batch; `running_peak` is the most calls that ran at once;
      `wait_calls(n)` blocks until n calls have started (use it with asyncio.to_thread).
    """

    def __init__(self, *, batch_items: int = 2, fail_on: Mapping[int, BaseException] | None = None,
                 gate: threading.Event | None = None, items_max: int = 100) -> None:
        self.batch_items = batch_items
        self.items_max = items_max
        self.fail_on = dict(fail_on or {})
        self.gate = gate
        self.calls: list[list[int]] = []
        self.running = 0
        self.running_peak = 0
        self._lock = threading.Condition()

    def spec(self, task_type: str = "double") -> ModelSpec:
        item_schema = {"type": "integer", "minimum": 0, "maximum": 1_000_000, "x-bound": "fake_item_max"}
        return ModelSpec(
            task_type=task_type,
            input_schema=object_schema({"items": {"type": "array", "items": item_schema, "minItems": 1,
                                                  "maxItems": self.items_max, "x-bound": "fake_items_max"}},
                                       required=["items"]),
            output_schema=output_object_schema({"doubled": {"type": "array", "items": {"type": "integer"}}},
                                               required=["doubled"]),
            input_transformer=self.transform_input,
            model=self,
            output_transformer=self.transform_output,
            model_versions=lambda: {"fake-doubler": "1"},
            description="doubles integers (a fake for tests)",
        )

    def transform_input(self, value: Any) -> ModelInput:
        items = list(value["items"])
        batches = [items[i:i + self.batch_items] for i in range(0, len(items), self.batch_items)]
        return ModelInput(batches=batches, context=None, items_total=len(items))

    def transform_output(self, context: Any, outputs: list[Any]) -> dict[str, Any]:
        return {"doubled": [x for batch in outputs for x in batch]}

    def __call__(self, batch: Any) -> Any:
        with self._lock:
            self.calls.append(list(batch))
            self.running += 1
            self.running_peak = max(self.running_peak, self.running)
            self._lock.notify_all()
        try:
            if self.gate is not None:
                self.gate.wait()
            for item in batch:
                if item in self.fail_on:
                    raise self.fail_on[item]
            return [2 * x for x in batch]
        finally:
            with self._lock:
                self.running -= 1

    def wait_calls(self, count: int, timeout_s: float = 30.0) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: len(self.calls) >= count, timeout_s)
