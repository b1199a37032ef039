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


def identity_problem(error: AuthenticationError | KeysUnavailableError) -> Problem:
    """The 401 for a missing or bad token; the 503 when the keys to check it are unreachable."""
    if isinstance(error, KeysUnavailableError):
        return Problem("entitlements-unavailable", str(error), headers=(("retry-after", "5"),))
    headers: tuple[tuple[str, str], ...] = ()
    if error.token_given:
        headers = (("www-authenticate", 'Bearer error="invalid_token"'),)
    return Problem("unauthenticated", error.detail, headers=headers)
