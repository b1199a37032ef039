"""Denials as RFC 9457 problem details (SPEC §4)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import AuthenticationError, KeysUnavailableError

PROBLEM_BASE = "https://plangate.dev/problems/"
CONTENT_TYPE = "application/problem+json"

TITLES = {
    "unauthenticated": (401, "Authentication required"),
    "feature-not-in-plan": (402, "Feature not in plan"),
    "insufficient-credits": (402, "Insufficient credits"),
    "no-active-plan": (402, "No active plan"),
    "route-not-allowed": (403, "Route not allowed"),
    "quota-exceeded": (429, "Quota exceeded"),
    "entitlements-unavailable": (503, "Entitlements unavailable"),
}

#: the members each problem carries besides type, title, status and detail (SPEC §4)
MEMBERS: dict[str, frozenset[str]] = {
    "unauthenticated": frozenset(),
    "feature-not-in-plan": frozenset({"feature", "plan", "upgrade_url"}),
    "insufficient-credits": frozenset({"feature", "balance", "required", "upgrade_url"}),
    "no-active-plan": frozenset({"upgrade_url"}),
    "route-not-allowed": frozenset(),
    "quota-exceeded": frozenset({"violated-policies", "plan", "upgrade_url"}),
    "entitlements-unavailable": frozenset(),
}
#: the problems whose response says when to retry (``Retry-After``)
RETRIED = frozenset({"quota-exceeded", "entitlements-unavailable"})


@dataclass(frozen=True)
class Problem:
    """A denial: the HTTP status, the body members and the extra response headers."""

    name: str
    detail: str
    members: dict[str, Any] = field(default_factory=dict)
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def status(self) -> int:
        return TITLES[self.name][0]

    @property
    def type(self) -> str:
        return PROBLEM_BASE + self.name

    def body(self) -> dict[str, Any]:
        status, title = TITLES[self.name]
        return {
            "type": self.type,
            "title": title,
            "status": status,
            "detail": self.detail,
            **self.members,
        }

    def encode(self) -> bytes:
        return json.dumps(self.body(), separators=(",", ":")).encode()

    def response_headers(self) -> list[tuple[str, str]]:
        """Content-Type plus the problem's own headers (not Content-Length)."""
        return [("content-type", CONTENT_TYPE), *self.headers]


#: the protection space of every 401's challenge (RFC 9110 §11.5): one API, one realm
REALM = "api"


def bearer_challenge(*, token_given: bool, realm: str = REALM) -> str:
    """``WWW-Authenticate`` for a 401 (RFC 9110 §15.5.2 requires one on every 401).

    RFC 6750 §3: ``error="invalid_token"`` only where a token was given; a request without
    one (or with another scheme) gets the bare challenge.
    """
    challenge = f'Bearer realm="{realm}"'
    return f'{challenge}, error="invalid_token"' if token_given else challenge


def identity_problem(error: AuthenticationError | KeysUnavailableError) -> Problem:
    """The 401 for a missing or bad token; the 503 when the keys to check it are unreachable."""
    if isinstance(error, KeysUnavailableError):
        return Problem("entitlements-unavailable", str(error), headers=(("retry-after", "5"),))
    challenge = bearer_challenge(token_given=error.token_given)
    return Problem("unauthenticated", error.detail, headers=(("www-authenticate", challenge),))
