"""The benchmarks run outside the test suite; what they import from plangate must still exist."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).parents[1] / "benchmarks").glob("*.py"))


def _plangate_imports(path: Path) -> list[tuple[str, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("plangate"):
            assert node.module is not None
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name.startswith("plangate")]
    return found


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_what_a_benchmark_imports_from_plangate_exists(path: Path) -> None:
    imports = _plangate_imports(path)
    for module, name in imports:
        imported = importlib.import_module(module)
        if name:
            assert hasattr(imported, name), f"{path.name}: from {module} import {name}"
