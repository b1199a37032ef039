"""Every exception plangate raises on purpose.

::

    PlanGateError
    ├── ConfigError            a config file or object that cannot be used; lists every issue
    ├── AuthenticationError    a missing, malformed, expired or forged token (→ 401)
    ├── KeysUnavailableError   the issuer's signing keys (JWKS) could not be fetched (→ 503)
    ├── StorageError           a storage backend failed; wraps the backend's exception
    └── VersionConflict        a customer record changed since the version a write expected

A denial (402, 403, 429) is not an exception: it is a decision, returned by the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "AuthenticationError",
    "ConfigError",
    "ConfigIssue",
    "KeysUnavailableError",
    "PlanGateError",
    "StorageError",
    "VersionConflict",
]


class PlanGateError(Exception):
    """Base class of every plangate exception."""


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config: where it is and what is wrong."""

    path: str
    message: str
    file: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = self.file or "<config>"
        if self.line is not None:
            where = f"{where}:{self.line}"
        key = f" {self.path}:" if self.path else ""
        return f"{where}:{key} {self.message}"


class ConfigError(PlanGateError):
    """The config cannot be used. ``issues`` lists every problem found, in file order."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(issue) for issue in issues))


class AuthenticationError(PlanGateError):
    """The request carries no usable identity.

    ``token_given`` tells whether a token was present (then the response carries
    ``WWW-Authenticate: Bearer error="invalid_token"``).
    """

    def __init__(self, detail: str, *, token_given: bool) -> None:
        self.detail = detail
        self.token_given = token_given
        super().__init__(detail)


class KeysUnavailableError(PlanGateError):
    """The keys that verify tokens could not be fetched: not the client's fault, and no
    identity can be trusted meanwhile. The backend's exception is the ``__cause__``."""


class StorageError(PlanGateError):
    """A storage backend failed. The backend's own exception is the ``__cause__``.

    ``maybe_applied``: the request reached the backend and its answer was lost (a timeout
    on the reply, a connection dropped after sending): it may have been carried out."""

    maybe_applied: bool = False


class VersionConflict(PlanGateError):
    """A write that expected a customer record at one version found another (an HTTP 412).

    ``current`` is the version the store holds (0: there is no record)."""

    def __init__(self, customer: str, expected: int, current: int) -> None:
        self.customer = customer
        self.expected = expected
        self.current = current
        super().__init__(
            f"customer {customer!r} is at version {current}, not {expected}: "
            "read it again and retry"
        )
