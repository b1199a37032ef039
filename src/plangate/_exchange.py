"""One request's passage through plangate, without I/O: what every front end translates into.

A front end (the ASGI and WSGI middlewares, the FastAPI, Flask and Django adapters, the gateway)
only moves its framework's shapes in and out of an ``Exchange``; the gate (``plangate._gate``)
does the storage calls (``plangate._lifecycle`` drives the two together)::

    exchange = Exchange(method, path, entitlements_path=..., head_body=...)
    exchange.wants_entitlements        # answer the entitlements endpoint (``answer_entitlements``)
    exchange.decided(decision)         # -> Answer (a denial: send it, skip the app) or None
    exchange.response_started(status, headers)   # -> the app's headers, usage headers taken
    exchange.quota_headers()           # -> the headers plangate adds
    exchange.body_sent()               # -> True when the outcome is certain: settle now
    exchange.finished(raised=..., cut=...)       # the app returned or raised
    exchange.settlements()             # -> what to commit, adjust or refund, once

What a response costs, whatever the front end:

- no response started → refunded (nothing was served);
- the handler raised (the exception reached the front end, or the framework's own exception
  signal reported it even though the framework turned it into a 500) → refunded;
- the client went away after the response started (``cut``) → charged as its status says:
  the client got some of it;
- otherwise → charged as its status and the rule's ``count`` say.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .config import Rule
from .engine import Decision, Problem
from .identity import TokenRead

logger = logging.getLogger("plangate")

AnyStr = TypeVar("AnyStr", str, bytes)

#: where the entitlements endpoint answers unless a front end is told otherwise
ENTITLEMENTS_PATH = "/.plangate/entitlements"
#: the request headers a gateway in front of the app sets; never the client's own
TRUSTED_PREFIX = "x-plangate-"

_SLASHES = re.compile(r"//+")
_MAX_DIGITS = 15  # a reported amount stays far inside a 64-bit counter


def route_path(path: str) -> str:
    """The path rules are matched on: as the server decoded it, runs of slashes merged.

    werkzeug (Flask) routes ``//admin`` to its ``/admin`` view; the other frameworks answer 404
    to such a path. Merging makes plangate decide ``/admin`` either way, so no run of slashes
    reaches a gated view as an unmatched route. Dot segments are left alone, as the
    frameworks leave them (``/v1/../admin`` is routed, if at all, as written).
    """
    return _SLASHES.sub("/", path) if "//" in path else path


@dataclass(frozen=True, slots=True)
class Answer:
    """A response plangate sends itself, instead of calling the app."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


def problem_answer(problem: Problem, *, head: bool = False) -> Answer:
    """A denial as a response: ``application/problem+json`` (no body for ``HEAD``)."""
    body = problem.encode()
    headers = [*problem.response_headers(), ("content-length", str(len(body)))]
    return Answer(problem.status, headers, b"" if head else body)


def json_answer(payload: Any, *, head: bool = False) -> Answer:
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        ("cache-control", "no-store"),
    ]
    return Answer(200, headers, b"" if head else body)


class Settlement:
    """What to tell the store about one decision once its response is known."""

    __slots__ = ("decision", "refund", "reported", "status")

    def __init__(
        self, decision: Decision, status: int, reported: dict[str, int], refund: bool
    ) -> None:
        self.decision = decision
        self.status = status
        self.reported = reported
        self.refund = refund


class Exchange:
    """One request, from its request line to the settlement of what it reserved."""

    __slots__ = (
        "_reported",
        "_settled",
        "complete",
        "cut",
        "decision",
        "decisions",
        "head",
        "loaded",
        "method",
        "path",
        "preflight",
        "raised",
        "status",
        "token",
        "wants_entitlements",
    )

    def __init__(
        self,
        method: str,
        path: str,
        *,
        entitlements_path: str | None = ENTITLEMENTS_PATH,
        preflight: bool = False,
    ) -> None:
        self.method = method.upper()
        #: a CORS preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``):
        #: by the Fetch standard it carries no credentials
        self.preflight = preflight and self.method == "OPTIONS"
        #: the path rules are matched on (``route_path``)
        self.path = route_path(path or "/")
        self.head = self.method == "HEAD"
        self.wants_entitlements = (
            entitlements_path is not None
            and self.path == entitlements_path
            and self.method in ("GET", "HEAD")
        )
        self.token: TokenRead = None
        #: the config the request is decided with, from start to end (``Gate.loaded``; a
        #: ``plangate._reload.Loaded``), once begun
        self.loaded: Any = None
        #: the route rule's decision, once decided
        self.decision: Decision | None = None
        #: every decision to settle: the route rule's, then those of requirements on views
        self.decisions: list[Decision] = []
        self.status = 0
        self.complete = False
        self.raised = False
        self.cut = False
        self._reported: list[dict[str, int]] = []
        self._settled = False

    def __repr__(self) -> str:
        return f"<Exchange {self.method} {self.path} status={self.status}>"

    # before the app ------------------------------------------------------------------------

    def answer_entitlements(self, result: dict[str, Any] | Problem) -> Answer:
        if isinstance(result, Problem):
            return problem_answer(result, head=self.head)
        return json_answer(result, head=self.head)

    def decided(self, decision: Decision) -> Answer | None:
        """The denial to send instead of calling the app, or None: call the app."""
        self.decision = decision
        if decision.problem is not None:
            if not decision.shadowed:
                return problem_answer(decision.problem, head=self.head)
            log_shadow(decision, self.method, self.path)
        self.add(decision)
        return None

    @property
    def gated(self) -> bool:
        """Whether a non-public rule matched: the app sees the decision."""
        rule = self.decision.rule if self.decision is not None else None
        return rule is not None and not rule.public

    def add(self, decision: Decision) -> Decision:
        """A requirement declared on a view was decided for this request: settle it too."""
        if decision.allowed and (decision.reserved or decision.headers):
            self.decisions.append(decision)
        return decision

    # the response ------------------------------------------------------------------------

    def response_started(
        self, status: int, headers: Iterable[tuple[AnyStr, AnyStr]]
    ) -> list[tuple[AnyStr, AnyStr]]:
        """The response's own headers as they go to the client: the usage headers read, and
        dropped unless exposed. The front end then adds ``quota_headers()``."""
        self.status = status
        kept = list(headers)
        self._reported = []
        for decision in self.decisions:
            rule = decision.rule
            assert rule is not None
            kept, usage = take_usage(rule, kept)
            self._reported.append(usage)
        return kept

    def quota_headers(self) -> list[tuple[str, str]]:
        """The quota headers of every decision (``RateLimit-Policy``, ``RateLimit``)."""
        if len(self.decisions) == 1:
            return self.decisions[0].headers
        return [h for d in self.decisions for h in d.headers]

    def body_sent(self) -> bool:
        """The last byte of the body is about to leave. True when nothing can change what the
        response costs any more, so it can be settled now and the client's next request sees
        it; False for a 5xx of a ``count: always`` rule, which waits for ``finished`` (a
        handler that raised is refunded, and some frameworks raise after sending their 500)."""
        self.complete = True
        return self.status < 500 or not any(
            d.rule is not None and d.rule.count_always for d in self.decisions
        )

    def finished(self, *, raised: bool = False, cut: bool = False) -> None:
        """The app returned (or raised: ``raised``), or the client went away (``cut``)."""
        self.raised = self.raised or raised
        self.cut = self.cut or cut

    def handler_raised(self) -> None:
        """The framework reports that the view raised (and turned it into a response)."""
        self.raised = True

    @property
    def settled(self) -> bool:
        """Whether ``settlements`` was asked already (it answers once)."""
        return self._settled

    def settlements(self) -> list[Settlement]:
        """What each decision's store must do; empty once settled (settles happen once)."""
        if self._settled:
            return []
        self._settled = True
        refund = not self.status or (self.raised and not self.cut)
        status = self.status or 500
        reported = self._reported
        return [
            Settlement(d, status, reported[i] if i < len(reported) else {}, refund)
            for i, d in enumerate(self.decisions)
            if not d.settled
        ]


def is_preflight(method: str, has_header: Callable[[str], bool]) -> bool:
    """Whether a request is a CORS preflight; ``has_header(name)`` looks a header up."""
    return (
        method.upper() == "OPTIONS"
        and has_header("origin")
        and has_header("access-control-request-method")
    )


def take_usage(
    rule: Rule, headers: Sequence[tuple[AnyStr, AnyStr]]
) -> tuple[list[tuple[AnyStr, AnyStr]], dict[str, int]]:
    """Read the usage a response reports in its headers, and drop the headers not exposed.

    A value that is not a whole number from 0 to 10^15, or a header sent twice (which value
    would be meant?), is refused: the estimate is charged and a warning logged.
    """
    wanted = rule.usage_headers
    if not wanted:
        return list(headers), {}
    kept: list[tuple[AnyStr, AnyStr]] = []
    seen: dict[str, list[str]] = {}
    for name, value in headers:
        text = name.decode("latin-1") if isinstance(name, bytes) else name
        cost = wanted.get(text.lower())
        if cost is None:
            kept.append((name, value))
            continue
        raw = value.decode("latin-1") if isinstance(value, bytes) else value
        seen.setdefault(text.lower(), []).append(raw.strip())
        if cost.expose:
            kept.append((name, value))
    reported: dict[str, int] = {}
    for header, values in seen.items():
        meter = wanted[header].meter
        raw = values[0]
        if len(values) > 1:
            logger.warning(
                "%s: response header %s was sent %d times (%s); charging the estimate",
                meter,
                header,
                len(values),
                ", ".join(repr(v) for v in values),
            )
        elif raw.isascii() and raw.isdigit() and len(raw) <= _MAX_DIGITS:
            reported[meter] = int(raw)
        else:
            logger.warning(
                "%s: response header %s=%r is not a whole number from 0 to 10^15; "
                "charging the estimate",
                meter,
                header,
                raw,
            )
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


def encoded(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """Header pairs as ASGI carries them."""
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers]
