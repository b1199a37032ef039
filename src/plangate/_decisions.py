"""The decision log (``decision_log:``): one JSON line per decision logged — every refusal
by default, a sample of the rest — so that "why was this customer refused at 14:02?" has
an answer without a debugger."""

from __future__ import annotations

import json
import logging
import random
import sys
import time
import weakref
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from .config._models import DecisionLogConfig

if TYPE_CHECKING:
    from .engine import Decision


class DecisionLog:
    """Writes the decisions its settings ask for, through a logger of its own (thread-safe;
    a file is reopened when rotated away)."""

    def __init__(self, settings: DecisionLogConfig, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.sample = settings.sample
        self.refusals = settings.refusals
        self.logger = logging.Logger("plangate.decisions")  # not the global tree's: no echo
        handler: logging.Handler
        if settings.to == "stdout":
            handler = logging.StreamHandler(sys.stdout)
        elif settings.to == "stderr":
            handler = logging.StreamHandler(sys.stderr)
        else:
            from logging.handlers import WatchedFileHandler

            # opened at the first line: a gate that only explains never touches the file
            handler = WatchedFileHandler(settings.to, encoding="utf-8", delay=True)
        handler.setFormatter(logging.Formatter("%(message)s"))
        self.logger.addHandler(handler)
        # the file is closed with the gate that keeps this log, whenever that goes
        weakref.finalize(self, handler.close)

    def wanted(self, decision: Decision) -> bool:
        if decision.problem is not None or decision.shadow_refused:
            return self.refusals
        return self.sample > 0 and (self.sample >= 1 or random.random() < self.sample)

    def write(self, method: str, path: str, decision: Decision) -> None:
        """Log ``decision`` (of ``method path``) if the settings ask for it."""
        if not self.wanted(decision):
            return
        line = entry(method, path, decision, self.clock())
        self.logger.info(json.dumps(line, ensure_ascii=False))


def entry(method: str, path: str, decision: Decision, now: float) -> dict[str, object]:
    """One line of the log: the request, the rule, the customer and plan, the decision and
    why, and the quota it was decided on (each policy's units left)."""
    problem = decision.problem
    outcome = "allow" if problem is None else "shadow-deny" if decision.shadowed else "deny"
    charge = decision.charge
    remaining: dict[str, int] = {}
    if charge is not None and decision.states:
        for limit, state in zip(charge.limits, decision.states, strict=True):
            if limit is not None:
                remaining[limit.policy] = max(0, limit.limit - state.used)
    line: dict[str, object] = {
        "time": datetime.fromtimestamp(now, timezone.utc).isoformat().replace("+00:00", "Z"),
        "method": method,
        "path": path,
        "rule": decision.rule.match if decision.rule is not None else None,
        "customer": decision.customer,
        "plan": decision.plan,
        "decision": outcome,
        "status": 200 if problem is None else problem.status,
        "reason": None if problem is None else problem.name,
        "detail": None if problem is None else problem.detail,
        "remaining": remaining,
    }
    if problem is not None and "violated-policies" in problem.members:
        line["policy"] = problem.members["violated-policies"]
    if decision.shadow_refused:  # what shadow limits would have refused
        line["shadow_policy"] = list(decision.shadow_refused)
    return line
