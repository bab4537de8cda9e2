"""The code_report model of the specialized_ml executor on real sources: findings with line
numbers in the standardized report (executors/specialized_models.py's docstring)."""

from __future__ import annotations

import pathlib
import textwrap
from typing import Any

import jsonschema
import pytest

from executors.base import ExecutorTask, InvalidTaskInput, LocalContext
from executors.specialized import SpecializedMLAdapter
from executors.specialized_models import CODE_REPORT_FORMAT, ModelLimits, code_report_spec

ROOT = pathlib.Path(__file__).resolve().parent.parent

SOURCE = textwrap.dedent('''\
    import os
    import sys
    from typing import Any, List

    def read(path: str) -> Any:
        try:
            return open(path).read()
        except:
            return None

    def tangled(a, b, c, d):
        if a and b:
            return 1
        elif c or d:
            return 2
        for x in range(a):
            while x:
                x -= 1
        return 3 if a else 4

    print(sys.argv)
    ''')


@pytest.fixture
async def run():
    adapter = SpecializedMLAdapter([code_report_spec()])

    async def execute(input_: Any) -> dict[str, Any]:
        task = ExecutorTask(task_id="t", attempt=1, type="code_report", input=input_, metadata={})
        return (await adapter.execute(task, LocalContext())).output

    yield execute
    await adapter.aclose()


async def test_findings_have_rules_severities_and_line_numbers(run) -> None:
    report = await run({"source": SOURCE, "path": "pkg/io.py", "complexity_threshold": 4})
    assert report["tool"] == "agent-coordinator/code_analysis" and report["format"] == CODE_REPORT_FORMAT
    assert [(f["line"], f["rule"], f["severity"]) for f in report["findings"]] == [
        (1, "unused-import", "warning"),        # os
        (3, "unused-import", "warning"),        # typing.List
        (8, "bare-except", "warning"),
        (11, "high-complexity", "warning"),     # tangled: 1 + if/and/elif/or/for/while/ifexp = 8 ≤ 2·4
    ]
    assert all(f["path"] == "pkg/io.py" for f in report["findings"])
    assert "'os' imported but unused" in report["findings"][0]["message"]
    assert "'typing.List' imported but unused" in report["findings"][1]["message"]
    assert "'tangled' has cyclomatic complexity 8 (threshold 4)" in report["findings"][3]["message"]
    summary = report["summary"]
    assert summary["files_total"] == 1 and summary["lines_total"] == 21 and summary["functions_total"] == 2
    assert summary["complexity_max"] == 8 and summary["complexity_threshold"] == 4
    assert summary["findings_by_rule"] == {"bare-except": 1, "high-complexity": 1, "unused-import": 2}
    assert summary["findings_by_severity"] == {"info": 0, "warning": 4, "error": 0}
    assert report["model_versions"] == {"code_analysis": "report_version=1"}


async def test_default_threshold_and_default_path(run) -> None:
    report = await run({"source": SOURCE})
    assert {f["rule"] for f in report["findings"]} == {"unused-import", "bare-except"}
    assert report["files"] == [{"path": "<input>", "lines_total": 21, "functions_total": 2, "complexity_max": 8,
                                "findings_total": 3}]


async def test_report_on_this_repository_sources(run) -> None:
    paths = ["executors/code_analysis.py", "executors/specialized.py", "executors/specialized_models.py",
             "executors/algorithmic.py"]
    files = [{"path": p, "source": (ROOT / p).read_text()} for p in paths]
    report = await run({"files": files, "complexity_threshold": 5})
    jsonschema.validate(report, code_report_spec().output_schema)
    assert [f["path"] for f in report["files"]] == paths
    assert report["summary"]["files_total"] == 4
    lines = {f["path"]: len(f["source"].splitlines()) for f in files}
    assert report["summary"]["lines_total"] == sum(lines.values())
    assert report["findings"], "a threshold of 5 flags some function in these modules"
    for finding in report["findings"]:
        assert 1 <= finding["line"] <= lines[finding["path"]]
        if finding["rule"] == "high-complexity":
            line = files[paths.index(finding["path"])]["source"].splitlines()[finding["line"] - 1]
            assert line.lstrip().startswith(("def ", "async def ")), finding
    assert [f["path"] for f in report["findings"]] == sorted((f["path"] for f in report["findings"]), key=paths.index)


@pytest.mark.parametrize(("input_", "field", "words"), [
    ({}, "input", 'exactly one of "source" or "files"'),
    ({"source": "x = 1", "files": [{"path": "a.py", "source": ""}]}, "input", "exactly one"),
    ({"files": [{"path": "a.py", "source": ""}], "path": "b.py"}, "input.path", 'goes with "source"'),
    ({"files": [{"path": "a.py", "source": ""}, {"path": "a.py", "source": ""}]}, "input.files[1].path",
     "appears twice"),
    ({"files": [{"path": "a.py"}]}, "input.files[0].source", "required field is missing"),
    ({"files": []}, "input.files", "at least 1 items"),
    ({"files": [{"path": f"{i}.py", "source": ""} for i in range(65)]}, "input.files",
     "at most 64 items (code_files_max)"),
    ({"source": "x = 1", "complexity_threshold": 0}, "input.complexity_threshold", "must be >= 1"),
    ({"source": "def f(:\n  pass\n"}, "input.source", "not valid Python: line 1"),
    ({"files": [{"path": "ok.py", "source": "x = 1\n"}, {"path": "bad.py", "source": "x = 1\nif:\n"}]},
     "input.files[1].source", "not valid Python: line 2"),
    ({"source": "x = 1", "language": "go"}, "input.language", "unknown field"),
])
async def test_bad_input(run, input_, field, words) -> None:
    with pytest.raises(InvalidTaskInput) as caught:
        await run(input_)
    assert caught.value.field == field and words in str(caught.value)


async def test_total_source_bytes_are_bounded() -> None:
    adapter = SpecializedMLAdapter([code_report_spec(ModelLimits(code_bytes_max=100))])
    task = ExecutorTask(task_id="t", attempt=1, type="code_report", metadata={},
                        input={"files": [{"path": "a.py", "source": "#" * 60}, {"path": "b.py", "source": "#" * 60}]})
    with pytest.raises(InvalidTaskInput, match=r"at most 100 UTF-8 bytes \(code_bytes_max\), got 120"):
        await adapter.execute(task, LocalContext())
    await adapter.aclose()


async def test_findings_bound_truncates_and_says_so() -> None:
    adapter = SpecializedMLAdapter([code_report_spec(ModelLimits(code_findings_max=3))])
    source = "".join(f"import m{i}\n" for i in range(5))
    task = ExecutorTask(task_id="t", attempt=1, type="code_report", input={"source": source}, metadata={})
    report = (await adapter.execute(task, LocalContext())).output
    assert [f["line"] for f in report["findings"]] == [1, 2, 3]
    assert report["summary"]["findings_total"] == 5 and report["summary"]["findings_truncated"] is True
    await adapter.aclose()
