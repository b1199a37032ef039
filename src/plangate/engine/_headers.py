"""Quota headers, draft-ietf-httpapi-ratelimit-headers-10 syntax."""

from __future__ import annotations

import math
from collections.abc import Iterable


def ceil_seconds(seconds: float) -> int:
    """Whole seconds, rounded up, at least 1 (``Retry-After`` and ``t=`` never say 0)."""
    return max(1, math.ceil(seconds - 1e-9))


def policy_header(policies: Iterable[tuple[str, int, int]]) -> str:
    """``RateLimit-Policy`` from (name, quota, window seconds) triples."""
    return ", ".join(f'"{name}";q={quota};w={window}' for name, quota, window in policies)


def quota_headers(
    policy: str, states: Iterable[tuple[str, int, int, float]], legacy: bool
) -> list[tuple[str, str]]:
    """``RateLimit-Policy`` and ``RateLimit`` for (name, limit, remaining, reset) states.

    ``RateLimit`` names the policy closest to exhaustion: the smallest share left, then the
    longest wait.
    """
    best: tuple[str, int, int, float] | None = None
    best_key = (2.0, 0.0)
    for state in states:
        _, limit, remaining, reset = state
        key = (remaining / limit if limit else 0.0, -reset)
        if key < best_key:
            best, best_key = state, key
    if best is None:
        return []
    name, limit, remaining, reset = best
    t = ceil_seconds(reset)
    headers = [("ratelimit-policy", policy), ("ratelimit", f'"{name}";r={remaining};t={t}')]
    if legacy:
        headers += [
            ("x-ratelimit-limit", str(limit)),
            ("x-ratelimit-remaining", str(remaining)),
            ("x-ratelimit-reset", str(t)),
        ]
    return headers
