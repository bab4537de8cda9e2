"""Static analysis of Python source with `ast`: the `code_analysis` task type of the
algorithmic executor. Pure: no I/O, no clock; the same source gives the same report.

    source ──ast.parse──► tree ──one iterative walk──► summary + findings ──sort, cap──► report

The report format is stable (its `summary.report_version` changes if it ever does):

    {"summary": {"report_version": 1,
                 "lines_total", "lines_blank", "functions_total", "classes_total",
                 "imports_total", "imported_modules": [...],
                 "complexity_threshold", "complexity_max",
                 "findings_total", "findings_by_rule": {rule: count}, "findings_truncated"},
     "findings": [{"rule", "line", "message", "severity"}, ...]}   sorted by (line, rule, message)

Rules:
    unused-import    a name bound by an import that is never read anywhere in the module
                     (scope-insensitive, so it errs towards silence; names listed in `__all__`,
                     names in string annotations and `import x as x` re-exports count as used)
    bare-except      `except:` with no exception type
    high-complexity  a function whose cyclomatic complexity exceeds the threshold: 1, plus one
                     for each if / elif / conditional expression / for / while / except handler /
                     with / match case / comprehension `if`, plus one for each extra operand of
                     `and` / `or`. Nested functions and classes are measured on their own.
                     Severity is "error" above twice the threshold, else "warning".

Walks are iterative (`ast.walk`-style), so a deeply nested tree that the parser accepted cannot
exhaust the Python stack here. Source that does not parse raises InvalidTaskInput naming the line.
Note: the parser may emit SyntaxWarning/DeprecationWarning (e.g. invalid escape sequences); if
the process turns warnings into errors, such source is reported as invalid.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any

from executors.base import InvalidTaskInput

REPORT_VERSION = 1
RULES = ("bare-except", "high-complexity", "unused-import")

_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_BRANCHES = (ast.If, ast.IfExp, ast.For, ast.AsyncFor, ast.While, ast.ExceptHandler, ast.With, ast.AsyncWith,
             ast.match_case)


@dataclass(frozen=True)
class AnalysisLimits:
    source_bytes_max: int = 256 * 1024          # UTF-8 bytes of `source`
    complexity_threshold_default: int = 10
    complexity_threshold_max: int = 1_000       # the highest threshold a task may ask for
    findings_max: int = 1_000                   # findings kept in the report; the rest are counted
    imported_modules_max: int = 1_000           # entries of summary.imported_modules


def analyze_source(source: str, *, complexity_threshold: int, limits: AnalysisLimits = AnalysisLimits(),
                   field: str = "input.source") -> dict[str, Any]:
    """Analyse `source` and return the report. Raises InvalidTaskInput (naming `field`) when
    the source is too large or does not parse."""
    source_bytes = len(source.encode("utf-8", errors="surrogatepass"))
    if source_bytes > limits.source_bytes_max:
        raise InvalidTaskInput(field, f"at most {limits.source_bytes_max} UTF-8 bytes, got {source_bytes}")
    tree = _parse(source, field)

    imports: list[tuple[int, str, str]] = []          # (line, bound name, shown name)
    modules: set[str] = set()
    imports_total = 0
    used: set[str] = set()
    findings: list[dict[str, Any]] = []
    functions_total = classes_total = 0
    complexity_max = 0

    stack: list[tuple[ast.AST, str]] = [(tree, "")]
    while stack:
        node, prefix = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            functions_total += 1
            qualname = prefix + node.name
            complexity = _complexity(node)
            complexity_max = max(complexity_max, complexity)
            if complexity > complexity_threshold:
                severity = "error" if complexity > 2 * complexity_threshold else "warning"
                findings.append(_finding("high-complexity", node.lineno, severity,
                                         f"function '{qualname}' has cyclomatic complexity {complexity} "
                                         f"(threshold {complexity_threshold})"))
            _used_in_annotations(node, used)
            prefix_children = qualname + "."
        elif isinstance(node, ast.ClassDef):
            classes_total += 1
            prefix_children = prefix + node.name + "."
        else:
            prefix_children = prefix
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                imports_total += _record_import(node, imports, modules)
            elif isinstance(node, ast.Name):
                if not isinstance(node.ctx, ast.Store):
                    used.add(node.id)
            elif isinstance(node, ast.ExceptHandler):
                if node.type is None:
                    findings.append(_finding("bare-except", node.lineno, "warning",
                                             "bare 'except:' also catches SystemExit and KeyboardInterrupt; "
                                             "name the exception types"))
            elif isinstance(node, ast.AnnAssign):
                _names_in_string_annotation(node.annotation, used)
            elif isinstance(node, (ast.Assign, ast.AugAssign)):
                _used_in_dunder_all(node, used)
        for child in ast.iter_child_nodes(node):
            stack.append((child, prefix_children))

    for line, bound, shown in imports:
        if bound not in used:
            findings.append(_finding("unused-import", line, "warning", f"'{shown}' imported but unused"))

    findings.sort(key=lambda f: (f["line"], f["rule"], f["message"]))
    by_rule = {rule: 0 for rule in RULES}
    for finding in findings:
        by_rule[finding["rule"]] += 1
    lines_total, lines_blank = _count_lines(source)
    summary = {
        "report_version": REPORT_VERSION,
        "lines_total": lines_total,
        "lines_blank": lines_blank,
        "functions_total": functions_total,
        "classes_total": classes_total,
        "imports_total": imports_total,
        "imported_modules": sorted(modules)[: limits.imported_modules_max],
        "complexity_threshold": complexity_threshold,
        "complexity_max": complexity_max,
        "findings_total": len(findings),
        "findings_by_rule": by_rule,
        "findings_truncated": len(findings) > limits.findings_max,
    }
    return {"summary": summary, "findings": findings[: limits.findings_max]}


def cyclomatic_complexity(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """The complexity of one function's own body (see the module docstring)."""
    return _complexity(function)


# ----------------------------------------------------------------------------------------- helpers


def _parse(source: str, field: str) -> ast.Module:
    """The one place that maps the parser's errors to ours (STYLE §6)."""
    try:
        return ast.parse(source, filename="<input.source>", mode="exec")
    except SyntaxError as exc:             # IndentationError and TabError are SyntaxErrors
        line = exc.lineno if exc.lineno is not None else _line_of_nul(source)
        where = f"line {line}" if line is not None else "unknown line"
        column = f", column {exc.offset}" if exc.offset else ""
        raise InvalidTaskInput(field, f"not valid Python: {where}{column}: {exc.msg}") from exc
    except ValueError as exc:              # NUL bytes (older Pythons), lone surrogates
        line = _line_of_nul(source)
        where = f"line {line}: " if line is not None else ""
        raise InvalidTaskInput(field, f"not valid Python: {where}{exc}") from exc
    except (RecursionError, MemoryError) as exc:   # the parser's own nesting limits
        raise InvalidTaskInput(field, "not valid Python: nesting exceeds the parser's depth limit") from exc


def _record_import(node: ast.Import | ast.ImportFrom, imports: list[tuple[int, str, str]], modules: set[str]) -> int:
    """Add the names an import binds to `imports` as (line, bound name, shown name) and its
    modules to `modules`; return how many names it imports. `__future__`, `*` and `x as x`
    re-exports bind nothing that must be used."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            modules.add(alias.name)
            if alias.asname is None:
                imports.append((node.lineno, alias.name.split(".")[0], alias.name))
            elif alias.asname != alias.name:
                imports.append((node.lineno, alias.asname, f"{alias.name} as {alias.asname}"))
        return len(node.names)
    module = "." * node.level + (node.module or "")
    modules.add(module)
    for alias in node.names:
        if module == "__future__" or alias.name == "*" or alias.asname == alias.name:
            continue
        shown = module + alias.name if module.endswith(".") else f"{module}.{alias.name}"
        if alias.asname:
            shown += f" as {alias.asname}"
        imports.append((node.lineno, alias.asname or alias.name, shown))
    return len(node.names)


def _line_of_nul(source: str) -> int | None:
    position = source.find("\0")
    return None if position < 0 else source.count("\n", 0, position) + 1


def _complexity(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    complexity = 1
    stack: list[ast.AST] = list(function.body)
    while stack:
        node = stack.pop()
        if isinstance(node, _SCOPES):
            continue
        if isinstance(node, _BRANCHES):
            complexity += 1
        elif isinstance(node, ast.BoolOp):
            complexity += len(node.values) - 1
        elif isinstance(node, ast.comprehension):
            complexity += len(node.ifs)
        stack.extend(ast.iter_child_nodes(node))
    return complexity


def _used_in_annotations(function: ast.FunctionDef | ast.AsyncFunctionDef, used: set[str]) -> None:
    args = function.args
    for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
        if arg is not None and arg.annotation is not None:
            _names_in_string_annotation(arg.annotation, used)
    if function.returns is not None:
        _names_in_string_annotation(function.returns, used)


def _names_in_string_annotation(annotation: ast.AST, used: set[str]) -> None:
    """Names inside quoted annotations such as `x: "Sequence[int]"` count as used."""
    for node in ast.walk(annotation):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            try:
                inner = ast.parse(node.value, mode="eval")
            except (SyntaxError, ValueError, RecursionError, MemoryError):
                continue
            used.update(n.id for n in ast.walk(inner) if isinstance(n, ast.Name))


def _used_in_dunder_all(node: ast.Assign | ast.AugAssign, used: set[str]) -> None:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    if not any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
        return
    if isinstance(node.value, (ast.List, ast.Tuple)):
        used.update(e.value for e in node.value.elts if isinstance(e, ast.Constant) and isinstance(e.value, str))


def _count_lines(source: str) -> tuple[int, int]:
    text = source.replace("\r\n", "\n").replace("\r", "\n")
    if text == "":
        return 0, 0
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    return len(lines), sum(1 for line in lines if line.strip() == "")


def _finding(rule: str, line: int, severity: str, message: str) -> dict[str, Any]:
    return {"rule": rule, "line": line, "message": message, "severity": severity}
