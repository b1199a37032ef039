"""What both middlewares do with HTTP messages, on (name, value) pairs in either str or bytes."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any, TypeVar

from .config import Rule
from .engine import Decision, Problem

logger = logging.getLogger("plangate")

AnyStr = TypeVar("AnyStr", str, bytes)

ENTITLEMENTS_PATH = "/.plangate/entitlements"


def take_usage(
    rule: Rule, headers: Iterable[tuple[AnyStr, AnyStr]]
) -> tuple[list[tuple[AnyStr, AnyStr]], dict[str, int]]:
    """Read the usage a response reports in its headers, and drop the headers not exposed."""
    wanted = rule.usage_headers
    if not wanted:
        return headers if isinstance(headers, list) else list(headers), {}
    kept: list[tuple[AnyStr, AnyStr]] = []
    reported: dict[str, int] = {}
    for name, value in headers:
        text = name.decode("latin-1") if isinstance(name, bytes) else name
        cost = wanted.get(text.lower())
        if cost is None:
            kept.append((name, value))
            continue
        raw = value.decode("latin-1") if isinstance(value, bytes) else value
        try:
            amount = int(raw.strip())
            if amount < 0:
                raise ValueError(raw)
        except ValueError:
            logger.warning(
                "%s: response header %s=%r is not a whole number ≥ 0; charging the estimate",
                cost.meter,
                text,
                raw,
            )
        else:
            reported[cost.meter] = amount
        if cost.expose:
            kept.append((name, value))
    return kept, reported


def log_shadow(decision: Decision, method: str, path: str) -> None:
    problem = decision.problem
    assert problem is not None
    logger.info(
        "shadow mode: would deny %s %s for customer %r with %d %s: %s",
        method,
        path,
        decision.customer,
        problem.status,
        problem.name,
        problem.detail,
    )


def json_body(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def problem_parts(problem: Problem) -> tuple[int, list[tuple[str, str]], bytes]:
    body = problem.encode()
    headers = [*problem.response_headers(), ("content-length", str(len(body)))]
    return problem.status, headers, body
