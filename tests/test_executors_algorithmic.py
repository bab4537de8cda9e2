"""The built-in `algorithmic` executor: every task type, every bad input, cancellation,
fail-then-succeed by attempt, and code_analysis findings and robustness."""

from __future__ import annotations

import asyncio
import json
import math
import pathlib
import sys
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.model import ExecutorCapabilities
from executors.algorithmic import AlgorithmicAdapter, AlgorithmicLimits
from executors.base import (
    ExecutionContext,
    ExecutorAdapter,
    ExecutorBusy,
    ExecutorResult,
    ExecutorTask,
    InvalidTaskInput,
    LocalContext,
    PermanentTaskError,
    RetryableTaskError,
    TaskCancelled,
    TaskError,
    UnsupportedTaskType,
    task_error_from,
)
from executors.code_analysis import AnalysisLimits, analyze_source, cyclomatic_complexity

ROOT = pathlib.Path(__file__).resolve().parent.parent


def task(type_: str, input_: Any, *, task_id: str = "t-1", attempt: int = 1) -> ExecutorTask:
    return ExecutorTask(task_id=task_id, attempt=attempt, type=type_, input=input_, metadata={})


async def run(adapter: AlgorithmicAdapter, type_: str, input_: Any, **kw: Any) -> ExecutorResult:
    return await adapter.execute(task(type_, input_, **kw), LocalContext())


# ------------------------------------------------------------------------------------ the protocol


def test_adapter_and_context_satisfy_the_protocols() -> None:
    assert isinstance(AlgorithmicAdapter(), ExecutorAdapter)
    assert isinstance(LocalContext(), ExecutionContext)


def test_capabilities_list_the_types_with_json_schemas() -> None:
    caps = AlgorithmicAdapter().get_capabilities()
    assert isinstance(caps, ExecutorCapabilities)
    assert caps.supported_task_types == ["echo", "sleep", "fail", "code_analysis", "fanout", "steps"]
    assert set(caps.input_schema) == set(caps.output_schema) == set(caps.supported_task_types)
    assert caps.input_schema["sleep"]["properties"]["ms"]["maximum"] == 10 * 60 * 1000
    assert caps.input_schema["sleep"]["required"] == ["ms"]
    assert caps.input_schema["code_analysis"]["required"] == ["source"]
    # The coordinator stores schemas as JSON of at most executor_schema_bytes_max (64 KiB).
    assert len(json.dumps(caps.model_dump())) < 64 * 1024


async def test_fanout_needs_a_coordinator_and_checks_its_input() -> None:
    adapter = AlgorithmicAdapter()
    with pytest.raises(InvalidTaskInput, match="input.children"):
        await adapter.execute(ExecutorTask("t", 1, "fanout", {"children": []}, {}), LocalContext())
    with pytest.raises(PermanentTaskError, match="no coordinator"):
        await adapter.execute(ExecutorTask("t", 1, "fanout", {"children": [{"type": "echo"}]}, {}), LocalContext())


def test_error_tree_retryability() -> None:
    assert RetryableTaskError("x").retryable and ExecutorBusy("x").retryable
    for error in (PermanentTaskError("x"), InvalidTaskInput("input.ms", "x"), TaskCancelled("x"),
                  UnsupportedTaskType("nope", ["echo"])):
        assert isinstance(error, TaskError) and not error.retryable
    assert isinstance(InvalidTaskInput("input.ms", "x"), PermanentTaskError)
    assert not isinstance(TaskCancelled("x"), PermanentTaskError)
    assert InvalidTaskInput("input.ms", "too big").field == "input.ms"
    assert str(InvalidTaskInput("input.ms", "too big")) == "input.ms: too big"


def test_task_error_from_maps_foreign_exceptions() -> None:
    original = RetryableTaskError("x")
    assert task_error_from(original) is original
    assert isinstance(task_error_from(asyncio.CancelledError()), TaskCancelled)
    assert task_error_from(TimeoutError()).retryable
    assert task_error_from(ConnectionResetError("peer")).retryable
    bug = task_error_from(KeyError("k"))
    assert isinstance(bug, PermanentTaskError) and "KeyError" in bug.message


def test_executor_task_fences_are_checked() -> None:
    with pytest.raises(AssertionError, match="attempt"):
        ExecutorTask(task_id="t", attempt=0, type="echo", input=None, metadata={})
    with pytest.raises(AssertionError, match="deadline_ms"):
        ExecutorTask(task_id="t", attempt=1, type="echo", input=None, metadata={}, deadline_ms=-1)


async def test_local_context_bounds_progress_and_validates() -> None:
    ctx = LocalContext(progress_reports_max=3)
    for i in range(5):
        await ctx.progress(i / 4, f"step {i}")
    assert [r.message for r in ctx.reports] == ["step 2", "step 3", "step 4"]
    assert ctx.progress_reports_total == 5
    with pytest.raises(ValueError, match=r"progress.fraction: a number in 0.0..1.0"):
        await ctx.progress(1.5)
    with pytest.raises(ValueError, match="progress.message: a str of at most 1024 chars"):
        await ctx.progress(0.5, "x" * 1025)
    assert not ctx.cancelled
    ctx.cancelled = True
    assert ctx.cancelled


async def test_unsupported_type_is_permanent_and_names_the_types() -> None:
    with pytest.raises(UnsupportedTaskType, match=r"type: 'nope' is not one of .*'echo'"):
        await run(AlgorithmicAdapter(), "nope", {})


# -------------------------------------------------------------------------------------------- echo


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(JSON)
def test_echo_round_trips_json_values(value: Any) -> None:
    decoded = json.loads(json.dumps(value))
    result = asyncio.run(run(AlgorithmicAdapter(), "echo", decoded))
    assert json.loads(json.dumps(result.output)) == decoded
    assert result.metrics["duration_s"] >= 0


# ------------------------------------------------------------------------------------------- sleep


async def test_sleep_sleeps_and_reports_progress() -> None:
    adapter = AlgorithmicAdapter(AlgorithmicLimits(sleep_progress_interval_ms=20))
    ctx = LocalContext()
    started = time.monotonic()
    result = await adapter.execute(task("sleep", {"ms": 120}), ctx)
    elapsed_s = time.monotonic() - started
    assert result.output == {"slept_ms": 120}
    assert 0.12 <= elapsed_s < 1.0
    fractions = [r.fraction for r in ctx.reports]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and len(fractions) >= 4
    assert fractions == sorted(fractions)


async def test_sleep_zero_returns_at_once() -> None:
    assert (await run(AlgorithmicAdapter(), "sleep", {"ms": 0})).output == {"slept_ms": 0}


async def test_sleep_stops_within_100_ms_of_adapter_cancel() -> None:
    adapter = AlgorithmicAdapter()
    running = asyncio.create_task(run(adapter, "sleep", {"ms": 60_000}, task_id="s-1"))
    await asyncio.sleep(0.05)
    status = await adapter.get_status()
    assert status["running_task_ids"] == ["s-1"] and status["running_total"] == 1
    asked = time.monotonic()
    await adapter.cancel("s-1")
    with pytest.raises(TaskCancelled, match="sleep cancelled after"):
        await running
    assert time.monotonic() - asked < 0.1
    status = await adapter.get_status()
    assert status["running_total"] == 0 and status["tasks_cancelled_total"] == 1


async def test_sleep_stops_within_100_ms_of_context_cancel() -> None:
    adapter = AlgorithmicAdapter()
    ctx = LocalContext()
    running = asyncio.create_task(adapter.execute(task("sleep", {"ms": 60_000}), ctx))
    await asyncio.sleep(0.05)
    asked = time.monotonic()
    ctx.cancel()
    with pytest.raises(TaskCancelled):
        await running
    assert time.monotonic() - asked < 0.1


async def test_asyncio_cancellation_of_sleep_cleans_up() -> None:
    adapter = AlgorithmicAdapter()
    running = asyncio.create_task(run(adapter, "sleep", {"ms": 60_000}))
    await asyncio.sleep(0.02)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert (await adapter.get_status())["running_total"] == 0


async def test_a_task_cancelled_before_it_starts_does_not_run() -> None:
    ctx = LocalContext()
    ctx.cancel()
    with pytest.raises(TaskCancelled, match="before it started"):
        await AlgorithmicAdapter().execute(task("echo", 1), ctx)


async def test_cancel_of_an_unknown_task_is_a_no_op() -> None:
    adapter = AlgorithmicAdapter()
    await adapter.cancel("never-ran")
    assert (await adapter.get_status())["running_total"] == 0


async def test_cancel_reaches_only_the_named_task() -> None:
    adapter = AlgorithmicAdapter()
    a = asyncio.create_task(run(adapter, "sleep", {"ms": 60_000}, task_id="a"))
    b = asyncio.create_task(run(adapter, "sleep", {"ms": 150}, task_id="b"))
    await asyncio.sleep(0.02)
    await adapter.cancel("a")
    with pytest.raises(TaskCancelled):
        await a
    assert (await b).output == {"slept_ms": 150}


async def test_running_tasks_max_is_enforced() -> None:
    adapter = AlgorithmicAdapter(AlgorithmicLimits(running_tasks_max=2))
    sleepers = [asyncio.create_task(run(adapter, "sleep", {"ms": 60_000}, task_id=f"s{i}")) for i in range(2)]
    await asyncio.sleep(0.02)
    with pytest.raises(ExecutorBusy, match="at most 2 at once"):
        await run(adapter, "echo", 1)
    for i in range(2):
        await adapter.cancel(f"s{i}")
    for sleeper in sleepers:
        with pytest.raises(TaskCancelled):
            await sleeper
    assert (await run(adapter, "echo", 1)).output == 1


# -------------------------------------------------------------------------------------------- fail


async def test_fail_fails_its_first_k_attempts_then_succeeds() -> None:
    adapter = AlgorithmicAdapter()
    for attempt in (1, 2, 3):
        with pytest.raises(RetryableTaskError, match=f"attempt {attempt} of the first 3"):
            await run(adapter, "fail", {"times": 3}, attempt=attempt)
    assert (await run(adapter, "fail", {"times": 3}, attempt=4)).output == {"attempt": 4}
    assert (await run(adapter, "fail", {"times": 0}, attempt=1)).output == {"attempt": 1}
    status = await adapter.get_status()
    assert status["tasks_failed_total"] == 3 and status["tasks_succeeded_total"] == 2


# -------------------------------------------------------------------------------------- bad inputs


BAD_INPUTS = [
    ("sleep", None, "input", "an object"),
    ("sleep", [1], "input", "got array"),
    ("sleep", {}, "input.ms", "required field is missing"),
    ("sleep", {"ms": "10"}, "input.ms", r"an integer in 0..600000 \(sleep_ms_max\), got string"),
    ("sleep", {"ms": 1.5}, "input.ms", "an integer in 0..600000"),
    ("sleep", {"ms": True}, "input.ms", "got boolean"),
    ("sleep", {"ms": -1}, "input.ms", r"must be in 0..600000 \(sleep_ms_max\), got -1"),
    ("sleep", {"ms": 600_001}, "input.ms", "must be in 0..600000"),
    ("sleep", {"ms": 1, "extra": 2}, "input.extra", r"unknown field; allowed fields are \['ms'\]"),
    ("fail", "3", "input", "an object"),
    ("fail", {}, "input.times", "required field is missing"),
    ("fail", {"times": None}, "input.times", "got null"),
    ("fail", {"times": -1}, "input.times", r"must be in 0..100 \(fail_times_max\)"),
    ("fail", {"times": 101}, "input.times", "must be in 0..100"),
    ("fail", {"times": 1, "ms": 2}, "input.ms", "unknown field"),
    ("code_analysis", "x = 1", "input", "an object"),
    ("code_analysis", {}, "input.source", "required field is missing"),
    ("code_analysis", {"source": 42}, "input.source", "a string of Python source, got number"),
    ("code_analysis", {"source": "x" * (256 * 1024 + 1)}, "input.source", "at most 262144 UTF-8 bytes, got 262145"),
    ("code_analysis", {"source": "é" * (128 * 1024 + 1)}, "input.source", "at most 262144 UTF-8 bytes"),
    ("code_analysis", {"source": "x", "complexity_threshold": 0}, "input.complexity_threshold",
     r"must be in 1..1000 \(complexity_threshold_max\)"),
    ("code_analysis", {"source": "x", "complexity_threshold": "9"}, "input.complexity_threshold", "an integer"),
    ("code_analysis", {"source": "x", "threshold": 9}, "input.threshold", "unknown field"),
    ("code_analysis", {"source": "def f(:\n  pass\n"}, "input.source", "not valid Python: line 1"),
    ("code_analysis", {"source": "x = 1\ny = (\n"}, "input.source", "not valid Python: line 2"),
    ("code_analysis", {"source": "if x:\npass\n"}, "input.source", "not valid Python: line 2"),
    ("code_analysis", {"source": "x = 1\ny\0 = 2\n"}, "input.source", "not valid Python: line 2"),
    ("code_analysis", {"source": "x = '\ud800'"}, "input.source", "not valid Python"),
    ("code_analysis", {"source": "(" * 300 + ")" * 300}, "input.source", "not valid Python"),
    ("code_analysis", {"source": "-" * 200_000 + "1"}, "input.source", "not valid Python"),
    ("code_analysis", {"source": "a" + "+a" * 100_000}, "input.source", "not valid Python"),
]


@pytest.mark.parametrize(("type_", "input_", "field", "message"), BAD_INPUTS)
async def test_bad_input_is_permanent_and_names_the_field_and_limit(type_: str, input_: Any, field: str,
                                                                    message: str) -> None:
    adapter = AlgorithmicAdapter()
    with pytest.raises(InvalidTaskInput, match=message) as caught:
        await run(adapter, type_, input_)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    assert not caught.value.retryable
    assert (await adapter.get_status())["running_total"] == 0


def test_limits_reject_nonsense() -> None:
    with pytest.raises(ValueError, match="AlgorithmicLimits.sleep_slice_ms: an int >= 1"):
        AlgorithmicLimits(sleep_slice_ms=0)


# ----------------------------------------------------------------------------------- code_analysis


SAMPLE = '''\
"""A sample with one of each problem."""
import os
import sys
import json as j
from typing import TYPE_CHECKING, Sequence
from collections import OrderedDict as OrderedDict

if TYPE_CHECKING:
    from decimal import Decimal

__all__ = ["exported"]
from math import pi as exported


def load(path: "Decimal") -> Sequence[str]:
    try:
        return open(path).read().split()
    except:
        return []


def tangled(a, b, items):
    if a and b:
        return 1
    elif a or b:
        for item in items:
            while item:
                item -= 1
    try:
        pass
    except ValueError:
        pass
    with open(a) as fh:
        return [x for x in items if x if fh]


class Tool:
    def run(self):
        return sys.argv
'''


async def test_code_analysis_reports_findings_with_lines() -> None:
    report = (await run(AlgorithmicAdapter(), "code_analysis", {"source": SAMPLE, "complexity_threshold": 5})).output
    assert set(report) == {"summary", "findings"}
    by_rule = {(f["rule"], f["line"]) for f in report["findings"]}
    assert by_rule == {("unused-import", 2), ("unused-import", 4), ("bare-except", 18), ("high-complexity", 22)}
    messages = {f["line"]: f["message"] for f in report["findings"]}
    assert messages[2] == "'os' imported but unused"
    assert messages[4] == "'json as j' imported but unused"
    # 1 + if + and + elif + or + for + while + except + with + two comprehension ifs = 11
    assert messages[22] == "function 'tangled' has cyclomatic complexity 11 (threshold 5)"
    severities = {f["line"]: f["severity"] for f in report["findings"]}
    assert severities[22] == "error" and severities[18] == "warning"
    for finding in report["findings"]:
        assert list(finding) == ["rule", "line", "message", "severity"]
    summary = report["summary"]
    assert summary["report_version"] == 1
    assert summary["lines_total"] == SAMPLE.count("\n")
    assert summary["functions_total"] == 3 and summary["classes_total"] == 1
    assert summary["imports_total"] == 8
    assert summary["imported_modules"] == ["collections", "decimal", "json", "math", "os", "sys", "typing"]
    assert summary["complexity_max"] == 11 and summary["complexity_threshold"] == 5
    assert summary["findings_by_rule"] == {"bare-except": 1, "high-complexity": 1, "unused-import": 2}
    assert summary["findings_total"] == 4 and summary["findings_truncated"] is False
    assert [f["line"] for f in report["findings"]] == sorted(f["line"] for f in report["findings"])
    json.dumps(report)


async def test_code_analysis_default_threshold_is_ten() -> None:
    report = (await run(AlgorithmicAdapter(), "code_analysis", {"source": SAMPLE})).output
    assert report["summary"]["complexity_threshold"] == 10
    assert ("high-complexity", 22) in {(f["rule"], f["line"]) for f in report["findings"]}


def test_complexity_counts_each_branch_kind_and_skips_nested_functions() -> None:
    import ast

    cases = {
        "def f():\n    pass\n": 1,
        "def f(x):\n    return 1 if x else 2\n": 2,
        "def f(x):\n    return x and x and x or x\n": 4,
        "def f(x):\n    async def g():\n        async for _ in x:\n            async with x:\n                pass\n"
        "    return [y for y in x if y]\n": 2,
        "def f(x):\n    match x:\n        case 1:\n            pass\n        case _:\n            pass\n": 3,
        "def f(x):\n    try:\n        pass\n    except A:\n        pass\n    except B:\n        pass\n"
        "    finally:\n        pass\n": 3,
        "def f(x):\n    class C:\n        def m(self):\n            if x: pass\n    return C\n": 1,
        "def f(x):\n    return lambda: 1 if x else 0\n": 2,
    }
    for source, expected in cases.items():
        function = ast.parse(source).body[0]
        assert cyclomatic_complexity(function) == expected, source


def test_unused_import_understands_common_uses() -> None:
    source = (
        "import a.b.c\nimport d.e\nimport f as f\nfrom g import h as h\nfrom __future__ import annotations\n"
        "from k import *\nfrom . import rel\nfrom .m import q\nimport t\n"
        "x: 'Optional[t.T]'\nprint(a.b)\n"
    )
    report = analyze_source(source, complexity_threshold=10)
    assert [f["message"] for f in report["findings"]] == [
        "'d.e' imported but unused", "'.rel' imported but unused", "'.m.q' imported but unused"]
    assert report["summary"]["imported_modules"] == [".", ".m", "__future__", "a.b.c", "d.e", "f", "g", "k", "t"]


def test_findings_are_capped_and_counted() -> None:
    source = "".join(f"import m{i}\n" for i in range(30))
    report = analyze_source(source, complexity_threshold=10, limits=AnalysisLimits(findings_max=10))
    assert len(report["findings"]) == 10
    assert report["summary"]["findings_total"] == 30 and report["summary"]["findings_truncated"] is True


async def test_code_analysis_of_empty_and_crlf_sources() -> None:
    adapter = AlgorithmicAdapter()
    empty = (await run(adapter, "code_analysis", {"source": ""})).output
    assert empty["summary"]["lines_total"] == 0 and empty["findings"] == []
    crlf = (await run(adapter, "code_analysis", {"source": "import os\r\n\r\nx = 1\r\n"})).output
    assert crlf["summary"]["lines_total"] == 3 and crlf["summary"]["lines_blank"] == 1
    assert crlf["findings"][0]["line"] == 1


async def test_code_analysis_of_a_real_module_is_stable() -> None:
    source = (ROOT / "coordinator" / "fsm.py").read_text()
    first = (await run(AlgorithmicAdapter(), "code_analysis", {"source": source})).output
    second = (await run(AlgorithmicAdapter(), "code_analysis", {"source": source})).output
    assert first == second
    assert first["summary"]["functions_total"] > 10


async def test_code_analysis_at_the_size_limit_runs_off_the_loop() -> None:
    body = "def f(x):\n    if x:\n        return 1\n    return 2\n\n"
    source = body * ((256 * 1024) // len(body))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    beating = asyncio.create_task(ticker())
    report = (await run(AlgorithmicAdapter(), "code_analysis", {"source": source})).output
    beating.cancel()
    assert report["summary"]["functions_total"] == source.count("def f")
    assert ticks >= 2   # the event loop kept running while the source was parsed


PYTHONISH = st.lists(
    st.sampled_from([
        "import os", "from a import b", "def f(x):", "    if x and y:", "        return x", "    return [i for i in x if i]",
        "class C:", "    pass", "try:", "    pass", "except:", "except ValueError:", "while True:", "    break",
        "with a as b:", "x = lambda: 1 if y else 2", "(", ")", "[", "]", "'", '"""', "\t", "    ", "#", "\\",
        "async def g():", "    await x", "match x:", "    case 1:", "        pass", "@dec", "x: 'T' = 1",
    ]) | st.text(max_size=20),
    max_size=40,
).map("\n".join)



def _indent(lines: list[str]) -> list[str]:
    return ["    " + line for line in lines]


_SIMPLE = st.sampled_from([
    "pass", "x = 1", "import os", "import a.b as ab", "from a import b, c as d", "print(os, d)",
    "return [i for i in x if i if y]", "y = a or b and c", "z = lambda: 1 if y else 2", "x: 'ab.T' = 1",
]).map(lambda line: [line])
_HEADERS = st.sampled_from(["if x and y:", "elif_free = 0\nif x:", "for i in x:", "while x or y:", "with a as b:",
                            "def f(x):", "async def g():", "class C:"])


def _blocks(body: st.SearchStrategy[list[str]]) -> st.SearchStrategy[list[str]]:
    headed = st.tuples(_HEADERS, body).map(lambda hb: hb[0].split("\n") + _indent(hb[1]))
    tried = st.tuples(body, body, st.booleans()).map(
        lambda t: ["try:", *_indent(t[0]), "except:" if t[2] else "except ValueError:", *_indent(t[1])])
    sequence = st.lists(body, min_size=1, max_size=3).map(lambda parts: [line for part in parts for line in part])
    return st.one_of(headed, tried, sequence)


VALID_PYTHON = st.recursive(_SIMPLE, _blocks, max_leaves=25).map(lambda lines: "\n".join(lines) + "\n")


def test_valid_python_strategy_parses() -> None:
    import ast

    @settings(max_examples=50, deadline=None)
    @given(VALID_PYTHON)
    def parses(source: str) -> None:
        ast.parse(source)

    parses()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(), PYTHONISH, VALID_PYTHON), st.integers(min_value=1, max_value=20))
def test_code_analysis_never_crashes(source: str, threshold: int) -> None:
    """Arbitrary text gives a report or InvalidTaskInput, nothing else."""
    import warnings

    adapter = AlgorithmicAdapter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = asyncio.run(run(adapter, "code_analysis", {"source": source, "complexity_threshold": threshold}))
        except InvalidTaskInput as exc:
            assert exc.field == "input.source" and "not valid Python" in exc.message
            return
    report = result.output
    assert set(report) == {"summary", "findings"}
    assert report["summary"]["findings_total"] == len(report["findings"])
    for finding in report["findings"]:
        assert finding["rule"] in {"unused-import", "bare-except", "high-complexity"}
        assert isinstance(finding["line"], int) and finding["line"] >= 1
        assert finding["severity"] in {"warning", "error"}
    json.dumps(report)


def test_metrics_are_finite_numbers() -> None:
    result = asyncio.run(run(AlgorithmicAdapter(), "echo", {"a": 1}))
    assert all(isinstance(v, float) and math.isfinite(v) for v in result.metrics.values())


# ------------------------------------------------------------------------------------------ layers


def test_executors_import_only_the_stdlib_pydantic_coordinator_and_the_llm_clients() -> None:
    import ast

    # Never grpc, cluster/ or an ML stack: the LLM adapters' HTTP clients and JSON Schema only
    # (tests/test_layers.py holds the same rule for every package).
    llm_clients = {"openai", "httpx", "httpx2", "jsonschema"}
    allowed = {"executors", "coordinator", "pydantic"} | llm_clients | set(sys.stdlib_module_names) | {"__future__"}
    for path in (ROOT / "executors").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
