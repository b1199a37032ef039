"""The decision engine: pure logic, no I/O, no framework, the clock passed in (see README.md)."""

from __future__ import annotations

from ._decision import Charge, Decision
from ._engine import Engine
from ._headers import quota_headers
from ._periods import period_bounds
from ._problems import PROBLEM_BASE, Problem, identity_problem
from ._protocol import (
    EXACT_WINDOW_LIMIT,
    SLIDING_BUCKETS,
    Backend,
    Counter,
    CounterState,
    CustomerPage,
    CustomerRecord,
    Flow,
    LoadCustomer,
    Op,
    Peek,
    Record,
    Reserve,
    ReserveResult,
    Settle,
    customer_key,
    customer_of_key,
    customer_prefix,
)

__all__ = [
    "EXACT_WINDOW_LIMIT",
    "PROBLEM_BASE",
    "SLIDING_BUCKETS",
    "Backend",
    "Charge",
    "Counter",
    "CounterState",
    "CustomerPage",
    "CustomerRecord",
    "Decision",
    "Engine",
    "Flow",
    "LoadCustomer",
    "Op",
    "Peek",
    "Problem",
    "Record",
    "Reserve",
    "ReserveResult",
    "Settle",
    "customer_key",
    "customer_of_key",
    "customer_prefix",
    "identity_problem",
    "period_bounds",
    "quota_headers",
]
