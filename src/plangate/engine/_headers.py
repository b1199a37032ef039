"""Quota headers, draft-ietf-httpapi-ratelimit-headers-10 syntax."""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable

#: the largest Structured Fields integer (RFC 9651 §3.3.1: at most 15 digits); a parser
#: drops a whole header with a larger one, so every number plangate writes stays within it
MAX_INTEGER = 999_999_999_999_999

#: (policy name, limit, remaining, seconds until capacity returns)
QuotaState = tuple[str, int, int, float]


def sf_integer(number: int) -> int:
    """``number`` clamped to what a Structured Fields integer can say."""
    return max(-MAX_INTEGER, min(MAX_INTEGER, number))


def ceil_seconds(seconds: float) -> int:
    """Whole seconds, rounded up, at least 1 (``Retry-After`` and ``t=`` never say 0), at
    most ``MAX_INTEGER``."""
    if not seconds < MAX_INTEGER:  # also infinity and NaN
        return MAX_INTEGER
    return max(1, math.ceil(seconds - 1e-9))


def policy_header(policies: Iterable[tuple[str, int, int]]) -> str:
    """``RateLimit-Policy`` from (name, quota, window seconds) triples."""
    return ", ".join(
        f'"{name}";q={sf_integer(quota)};w={sf_integer(window)}' for name, quota, window in policies
    )


def named_policy(
    states: Iterable[QuotaState], violated: Collection[str] | None = None
) -> QuotaState | None:
    """The policy ``RateLimit`` names.

    Without ``violated``: the one closest to exhaustion, the smallest share left, then the
    longest wait. On a refusal, one of the ``violated`` policies: the one capacity returns to
    last, so that ``Retry-After`` (when every violated policy can take the request) is never
    earlier than its ``t``.
    """
    best: QuotaState | None = None
    best_key = (math.inf, math.inf)
    for state in states:
        name, limit, remaining, reset = state
        share = remaining / limit if limit else 0.0
        if violated is None:
            key = (share, -reset)
        elif name in violated:
            key = (-reset, share)
        else:
            continue
        if key < best_key:
            best, best_key = state, key
    return best


def quota_headers(
    policy: str,
    states: Iterable[QuotaState],
    legacy: bool,
    *,
    violated: Collection[str] | None = None,
) -> list[tuple[str, str]]:
    """``RateLimit-Policy`` and ``RateLimit`` for (name, limit, remaining, reset) states;
    ``RateLimit`` names ``named_policy(states, violated)``."""
    best = named_policy(states, violated)
    if best is None:
        return []
    name, limit, remaining, reset = best
    t = ceil_seconds(reset)
    r = sf_integer(remaining)
    headers = [("ratelimit-policy", policy), ("ratelimit", f'"{name}";r={r};t={t}')]
    if legacy:
        headers += [
            ("x-ratelimit-limit", str(sf_integer(limit))),
            ("x-ratelimit-remaining", str(r)),
            ("x-ratelimit-reset", str(t)),
        ]
    return headers
