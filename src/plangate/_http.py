"""What both middlewares do with HTTP messages, on (name, value) pairs in either str or bytes."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from typing import Any, TypeVar

from .config import Rule
from .engine import Decision, Problem

logger = logging.getLogger("plangate")

AnyStr = TypeVar("AnyStr", str, bytes)

ENTITLEMENTS_PATH = "/.plangate/entitlements"
_SLASHES = re.compile(r"//+")


def route_path(path: str) -> str:
    """The path rules are matched on: as the server decoded it, runs of slashes merged.

    werkzeug (Flask) routes ``//admin`` to its ``/admin`` view; the other frameworks answer 404
    to such a path. Merging makes plangate decide ``/admin`` either way, so no run of slashes
    reaches a gated view as an unmatched route. Dot segments are left alone, as the
    frameworks leave them (``/v1/../admin`` is routed, if at all, as written).
    """
    return _SLASHES.sub("/", path) if "//" in path else path


_MAX_DIGITS = 15  # a reported amount stays far inside a 64-bit counter


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
        raw = (value.decode("latin-1") if isinstance(value, bytes) else value).strip()
        if raw.isascii() and raw.isdigit() and len(raw) <= _MAX_DIGITS:
            reported[cost.meter] = int(raw)
        else:
            logger.warning(
                "%s: response header %s=%r is not a whole number from 0 to 10^15; "
                "charging the estimate",
                cost.meter,
                text,
                raw,
            )
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
