"""Dependencies point inward: coordinator/ imports only the standard library and pydantic,
wal/ never imports pysyncobj or our outer packages (it may import the core: the checkpoint
store is an adapter over coordinator/'s ports), and nothing imports cluster/ (the
composition root) except cluster/ itself, tests and benchmarks."""

from __future__ import annotations

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
OURS = {"proto", "coordinator", "scheduler", "executors", "wal", "knowledge", "security", "finetune", "cluster"}
ALLOWED = {
    "coordinator": {"coordinator"} | {"pydantic"},
    "wal": {"wal", "lmdb", "coordinator"},
    "scheduler": {"scheduler", "coordinator"},
    # the LLM adapters' clients (openai uses httpx2 underneath; stream errors surface from it)
    "executors": {"executors", "coordinator", "pydantic", "openai", "httpx", "httpx2", "jsonschema"},
    # JWTs (pyjwt) and the RBAC policy file (YAML)
    "security": {"security", "coordinator", "cryptography", "jwt", "yaml"},
}


def imports_of(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text())
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_inner_packages_import_only_what_they_may() -> None:
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for package, allowed in ALLOWED.items():
        for path, names in imports_of(package).items():
            bad = {n for n in names if n not in stdlib and n not in allowed}
            assert not bad, f"{path} imports {sorted(bad)}; {package}/ may import only {sorted(allowed)} and the stdlib"


def test_nothing_imports_the_composition_root() -> None:
    for package in OURS - {"cluster"}:
        for path, names in imports_of(package).items():
            assert "cluster" not in names, f"{path} imports cluster/"


def test_only_cluster_imports_pysyncobj() -> None:
    for package in OURS - {"cluster"}:
        for path, names in imports_of(package).items():
            assert "pysyncobj" not in names, f"{path} imports pysyncobj; only cluster/ wraps it"
