"""The benchmarks run outside the test suite; what they import from plangate must still exist."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).parents[1] / "benchmarks").glob("*.py"))
PROPAGATION = Path(__file__).parents[1] / "benchmarks" / "propagation.py"
COMPARE = Path(__file__).parents[1] / "benchmarks" / "compare.py"
RELOAD = Path(__file__).parents[1] / "benchmarks" / "reload.py"
LEASES = Path(__file__).parents[1] / "benchmarks" / "leases.py"


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


@pytest.mark.redis
def test_the_propagation_benchmark_runs_two_changes():
    """Its own redis-server, two uvicorn processes and the gateway, two plan changes heard by
    both processes; the figures are printed, never checked."""
    run = subprocess.run(
        [sys.executable, str(PROPAGATION), "--changes", "2", "--no-control"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "| both processes | 4 |" in run.stdout
    assert "| a cached customer's request: no Redis command | 0 per request |" in run.stdout


@pytest.mark.redis
def test_the_credits_rows_run_in_a_tiny_mode():
    """compare.py --credits --smoke: its own redis-server; the credits and overage routes on
    memory and Redis beside the plain metered one, each checked to charge what it should, then
    timed briefly, the reserve script's cost read and the memory of 5 customers with 10 grants
    measured; the timings are printed, never checked, and nothing is written."""
    run = subprocess.run(
        [sys.executable, str(COMPARE), "--credits", "--smoke"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "wrote" not in run.stdout
    for store in ("memory", "Redis"):
        for route in ("metered", "credits route", "overage route", "credits route, 10 grants"):
            assert f"| plangate, {store}, {route} |" in run.stdout, (store, route)
    for route in ("credits route", "overage route"):
        # one EVALSHA a request (and, should the customer's cached record expire meanwhile,
        # one read of it among the 50 requests counted)
        row = next(
            r for r in run.stdout.splitlines() if r.startswith(f"| plangate, Redis, {route} |")
        )
        trips = row.rstrip(" |").rsplit("| ", 1)[1]
        assert "EVALSHA" in trips, row
        assert float(trips.split()[0]) < 1.1, row
    assert "`credits:ai_credits:ledger`" in run.stdout


@pytest.mark.redis
def test_the_usage_benchmark_runs_in_a_tiny_mode():
    """usage.py --smoke: its own redis-server; reservations with and without the hourly
    aggregates on memory and Redis, and one customer-hour's memory; printed, never checked."""
    run = subprocess.run(
        [sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "usage.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[1] / "benchmarks",
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "| Redis |" in run.stdout
    assert "| as written by requests |" in run.stdout


@pytest.mark.redis
def test_the_reload_benchmark_runs_two_edits_and_two_publishes():
    """Its own redis-server, two uvicorn processes under load, two edits of their files and
    two configs published on the store, each seen by both processes; the figures are printed,
    never checked."""
    run = subprocess.run(
        [sys.executable, str(RELOAD), "--edits", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=RELOAD.parent,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "| the file, watched (watchfiles, inotify) | 4 |" in run.stdout
    assert "| published on the store (Redis pub/sub) | 4 |" in run.stdout


def test_the_lease_model_runs_quickly_and_keeps_every_limit():
    """benchmarks/leases.py --quick: the model asserts, as it runs, that nothing is admitted
    past a limit; its figures are printed, never checked."""
    run = subprocess.run(
        [sys.executable, str(LEASES), "--quick"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "| 64 | 1.000 |" in run.stdout  # today's path: one call per request
