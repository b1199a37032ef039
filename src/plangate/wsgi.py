"""``PlanGateMiddleware`` for any WSGI app (Flask, Django, …)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any

from ._enforcer import Clock, Enforcer
from ._http import ENTITLEMENTS_PATH, json_body, log_shadow, problem_parts, take_usage
from .config import Config
from .engine import Decision, Problem
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
    ) -> None:
        self.app = app
        self.gate = Enforcer(config, storage=storage, clock=clock)
        self.entitlements_path = entitlements_path
        header = self.gate.token_source.header
        self._token_key = "HTTP_" + header.upper().replace("-", "_")

    def _token(self, environ: dict[str, Any]) -> str | None:
        return self.gate.token_source.extract(environ.get(self._token_key))

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO") or "/"
        if path == self.entitlements_path and method in ("GET", "HEAD"):
            return self._entitlements(environ, start_response)

        decision = self.gate.check(method, path, self._token(environ))
        if decision.problem is not None:
            if not decision.shadowed:
                return _problem(start_response, decision.problem)
            log_shadow(decision, method, path)
        rule = decision.rule
        if rule is None or rule.public:
            return self.app(environ, start_response)
        environ["plangate"] = decision
        if not decision.reserved:
            if not decision.headers:
                return self.app(environ, start_response)

            def start_with_headers(
                status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
            ) -> Callable[[bytes], object]:
                return start_response(status, [*headers, *decision.headers], exc_info)

            return self.app(environ, start_with_headers)
        return self._call_metered(environ, start_response, decision)

    def _call_metered(
        self, environ: dict[str, Any], start_response: StartResponse, decision: Decision
    ) -> Iterable[bytes]:
        rule = decision.rule
        assert rule is not None
        seen: dict[str, Any] = {"status": 0, "reported": {}}

        def metered_start(
            status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
        ) -> Callable[[bytes], object]:
            seen["status"] = int(status[:3])
            kept, seen["reported"] = take_usage(rule, headers)
            return start_response(status, [*kept, *decision.headers], exc_info)

        try:
            body = self.app(environ, metered_start)
        except BaseException:
            self.gate.settle(decision, 500, refund=True)
            raise
        return _Settling(body, self.gate, decision, seen)

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


class _Settling:
    """The app's response body; settles the reservation once it is sent (or abandoned)."""

    def __init__(
        self, body: Iterable[bytes], gate: Enforcer, decision: Decision, seen: dict[str, Any]
    ) -> None:
        self._body = body
        self._gate = gate
        self._decision = decision
        self._seen = seen

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._body
        except GeneratorExit:  # the client went away mid-body: the work was done, charge it
            self._settle()
            raise
        except BaseException:
            self._gate.settle(self._decision, 500, refund=True)
            raise
        self._settle()

    def _settle(self) -> None:
        status = self._seen["status"]
        self._gate.settle(self._decision, status or 500, self._seen["reported"], refund=not status)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._settle()


def _problem(start_response: StartResponse, problem: Problem) -> list[bytes]:
    status, headers, body = problem_parts(problem)
    start_response(f"{status} {_REASONS.get(status, 'Error')}", headers)
    return [body]
