"""The decision engine: pure logic, no I/O, no framework, the clock passed in (see README.md)."""

from __future__ import annotations

from ._decision import Charge, Decision
from ._engine import Engine
from ._headers import quota_headers
from ._periods import period_bounds
from ._problems import PROBLEM_BASE, Problem, identity_problem

__all__ = [
    "PROBLEM_BASE",
    "Charge",
    "Decision",
    "Engine",
    "Problem",
    "identity_problem",
    "period_bounds",
    "quota_headers",
]
