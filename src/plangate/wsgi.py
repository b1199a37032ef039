"""``PlanGateMiddleware`` for any WSGI app (Flask, Django, …)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any

from ._gate import Clock, Gate
from ._http import (
    ENTITLEMENTS_PATH,
    json_body,
    log_shadow,
    problem_parts,
    route_path,
    take_usage,
)
from ._requirements import PENDING_KEY, Pending
from .config import Config
from .engine import Problem
from .storage import Storage

ExcInfo = tuple[type[BaseException], BaseException, TracebackType]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

__all__ = ["PlanGateMiddleware"]

_REASONS = {
    200: "OK",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    429: "Too Many Requests",
    503: "Service Unavailable",
}


class PlanGateMiddleware:
    """Enforce ``config`` on every request before it reaches ``app``.

    ``app.wsgi_app = PlanGateMiddleware(app.wsgi_app, config="plangate.yaml")``. The handler
    reads the decision as ``environ["plangate"]``.
    """

    def __init__(
        self,
        app: WSGIApp,
        config: str | os.PathLike[str] | Mapping[str, Any] | Config,
        *,
        storage: str | Storage | None = None,
        entitlements_path: str | None = ENTITLEMENTS_PATH,
        clock: Clock = time.time,
        views: bool = False,
        gate: Gate | None = None,
    ) -> None:
        self.app = app
        self.gate = gate or Gate(config, storage=storage, clock=clock)
        #: requirements may be declared on views (the Flask adapter turns this on)
        self.views = views
        self.entitlements_path = entitlements_path
        header = self.gate.token_source.header
        self._token_key = "HTTP_" + header.upper().replace("-", "_")

    def _token(self, environ: dict[str, Any]) -> str | None:
        return self.gate.token_source.extract(environ.get(self._token_key))

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        path = route_path(environ.get("PATH_INFO") or "/")
        if path == self.entitlements_path and method in ("GET", "HEAD"):
            return self._entitlements(environ, start_response)

        for key in [k for k in environ if k.startswith("HTTP_X_PLANGATE_")]:
            # The app may trust X-Plangate-* (a gateway sets them): never the client's own.
            del environ[key]
        token = self._token(environ)
        decision = self.gate.check(method, path, token)
        if decision.problem is not None:
            if not decision.shadowed:
                return _problem(start_response, decision.problem)
            log_shadow(decision, method, path)
        rule = decision.rule
        matched = rule is not None and not rule.public
        if not matched and not self.views:
            return self.app(environ, start_response)
        pending = Pending(self.gate, token)
        if matched:
            environ["plangate"] = decision
            pending.decisions.append(decision)
        if self.views:  # where adapters find the gate for requirements declared on views
            environ[PENDING_KEY] = pending
        if not self.views and not decision.reserved:
            if not decision.headers:
                return self.app(environ, start_response)

            def start_with_headers(
                status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
            ) -> Callable[[bytes], object]:
                return start_response(status, [*headers, *decision.headers], exc_info)

            return self.app(environ, start_with_headers)
        return self._call_tracked(environ, start_response, pending)

    def _call_tracked(
        self, environ: dict[str, Any], start_response: StartResponse, pending: Pending
    ) -> Iterable[bytes]:
        """Call the app; settle every decision of ``pending`` once the body has been sent.

        Adapters may add decisions while the app runs (requirements declared on views).
        """
        seen = _Seen()

        def tracked_start(
            status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
        ) -> Callable[[bytes], object]:
            seen.status = int(status[:3])
            seen.reported = []
            for decision in pending.decisions:
                assert decision.rule is not None
                headers, usage = take_usage(decision.rule, headers)
                seen.reported.append(usage)
                headers = [*headers, *decision.headers]
            return start_response(status, headers, exc_info)

        try:
            body = self.app(environ, tracked_start)
        except BaseException:
            seen.settle(self.gate, pending, refund=True)
            raise
        return _Settling(body, self.gate, pending, seen)

    def _entitlements(
        self, environ: dict[str, Any], start_response: StartResponse
    ) -> Iterable[bytes]:
        result = self.gate.entitlements(self._token(environ))
        if isinstance(result, Problem):
            return _problem(start_response, result)
        body = json_body(result)
        start_response(
            "200 OK",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
            ],
        )
        return [body] if environ["REQUEST_METHOD"] == "GET" else []


class _Seen:
    """What the app said in ``start_response``: its status and the usage its headers report."""

    __slots__ = ("reported", "status")

    def __init__(self) -> None:
        self.status = 0
        self.reported: list[dict[str, int]] = []

    def settle(self, gate: Gate, pending: Pending, *, refund: bool = False) -> None:
        refund = refund or not self.status
        for i, decision in enumerate(pending.decisions):
            usage = self.reported[i] if i < len(self.reported) else None
            gate.settle(decision, self.status or 500, usage, refund=refund)


class _Settling:
    """The app's response body; settles the reservations once it is sent (or abandoned)."""

    def __init__(self, body: Iterable[bytes], gate: Gate, pending: Pending, seen: _Seen) -> None:
        self._body = body
        self._gate = gate
        self._pending = pending
        self._seen = seen

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._body
        finally:
            # Sent, or cut off after the response started (the client went away, the body
            # failed): the client got (some of) it, so it is charged as its status says.
            self._seen.settle(self._gate, self._pending)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._seen.settle(self._gate, self._pending)


def _problem(start_response: StartResponse, problem: Problem) -> list[bytes]:
    status, headers, body = problem_parts(problem)
    start_response(f"{status} {_REASONS.get(status, 'Error')}", headers)
    return [body]
