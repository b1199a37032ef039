"""The forward-auth service: a Starlette app on the same gate as the middlewares."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import posixpath
import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .._exchange import Exchange, is_preflight, problem_answer
from .._gate import AsyncGate, Clock
from .._lifecycle import abegin, asettle
from ..config import Config
from ..engine import PROBLEM_BASE, Decision, Problem
from ..engine._problems import TITLES
from ..identity import TokenRead
from ..storage import Storage
from ._logs import LogCommitter, follow_file

logger = logging.getLogger("plangate.gateway")

#: how long a reservation waits for its commit before its estimate simply stands
RESERVATION_TTL = 600.0
_MAX_PENDING = 200_000
_TOKEN_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#$&'*+-.^_`|~"
)


class GatewayService:
    """Decides for gateways (``/check``) and settles what they report (``/commit``).

    Reservations wait in this process for their commit; a commit to another process, or none
    within ``reservation_ttl``, leaves the reservation's estimate standing (nothing is lost,
    nothing is refunded).
    """

    def __init__(
        self,
        config: str | os.PathLike[str] | Mapping[str, Any] | Config,
        *,
        storage: str | Storage | None = None,
        commit_token: str | None = None,
        reservation_ttl: float = RESERVATION_TTL,
        request_from: str = "auto",
        clock: Clock = time.time,
    ) -> None:
        if request_from not in STYLES:
            raise ValueError(f"request_from: one of {', '.join(STYLES)}, not {request_from!r}")
        self.gate = AsyncGate(config, storage=storage, clock=clock)
        #: where /check reads the original request (see ``original_request``)
        self.request_from = request_from
        self.commit_token = commit_token
        self.reservation_ttl = reservation_ttl
        self._pending: OrderedDict[str, tuple[Exchange, float]] = OrderedDict()
        self._lock = asyncio.Lock()
        self.settled = 0  # reservations settled so far
        self._settling = asyncio.Condition()
        self.app = Starlette(
            routes=[
                Route("/check", self.check, methods=_ANY),
                Route("/check/{path:path}", self.check, methods=_ANY),
                Route("/commit", self.commit, methods=["POST"]),
                Route("/render", self.render, methods=_ANY),
                Route("/entitlements", self.entitlements, methods=["GET", "HEAD"]),
                Route("/healthz", self.healthz, methods=["GET", "HEAD"]),
            ]
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    # /check -------------------------------------------------------------------------------

    async def check(self, request: Request) -> Response:
        """Decide the original request. Allow: 200. Deny: the real problem response."""
        try:
            method, path = original_request(request, self.request_from)
        except AmbiguousRequest as exc:
            logger.warning("check refused: %s", exc)
            return _error(400, "bad-request", f"cannot tell the original request: {exc}")
        token = self.gate.token_source.read(request.headers.getlist(self.gate.token_source.header))
        preflight = is_preflight(method, request.headers.__contains__)
        exchange = await self._begin(method, path, token, preflight=preflight)
        decision = exchange.decision
        if decision is None:  # a CORS preflight: the upstream answers it
            return Response(status_code=200)
        problem = decision.problem
        if problem is not None and not decision.shadowed:
            return self._denial(problem, request.query_params.get("deny") == "403")
        headers = list(exchange.quota_headers())
        if decision.customer is not None:
            headers.append(("x-plangate-customer", header_value(decision.customer)))
        if decision.plan is not None:
            headers.append(("x-plangate-plan", decision.plan))
        if decision.reserved:
            headers.append(("x-plangate-reservation", decision.reservation_id))
        return Response(status_code=200, headers=dict(_joined(headers)))

    async def decide(self, method: str, path: str, token: TokenRead) -> Decision:
        """The decision for an original request; what it reserved waits for its commit."""
        decision = (await self._begin(method, path, token)).decision
        assert decision is not None
        return decision

    async def _begin(
        self, method: str, path: str, token: TokenRead, *, preflight: bool = False
    ) -> Exchange:
        exchange = Exchange(method, path, entitlements_path=None, preflight=preflight)
        await abegin(self.gate, exchange, token)
        decision = exchange.decision
        if decision is not None and decision.reserved:
            await self._remember(exchange)
        return exchange

    def _denial(self, problem: Problem, as_403: bool) -> Response:
        answer = problem_answer(problem)
        status, headers, body = answer.status, answer.headers, answer.body
        headers += [
            ("x-plangate-status", str(status)),
            ("x-plangate-reason", problem.name),
            # nginx can only pass 401/403 on: it renders the problem from this header
            ("x-plangate-problem", json.dumps(problem.body(), separators=(",", ":"))),
        ]
        if as_403 and status != 401:
            status = 403
        return Response(body, status_code=status, headers=dict(_joined(headers)))

    async def _remember(self, exchange: Exchange) -> None:
        now = time.monotonic()
        async with self._lock:
            pending = self._pending
            while pending and (
                len(pending) >= _MAX_PENDING or next(iter(pending.values()))[1] < now
            ):
                pending.popitem(last=False)  # its estimate stands
            assert exchange.decision is not None
            pending[exchange.decision.reservation_id] = (exchange, now + self.reservation_ttl)

    # /commit ------------------------------------------------------------------------------

    async def commit(self, request: Request) -> Response:
        """``{"reservation", "status", "usage"?, "headers"?}`` → commit, adjust or refund."""
        if self.commit_token is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.commit_token}".encode()):
                return _error(401, "unauthorized", "a valid commit token is required")
        try:
            record = json.loads(await request.body())
        except ValueError:
            return _error(400, "bad-request", "the body is not JSON")
        outcome, detail = await self.settle(record)
        status = {"settled": 200, "already-settled": 200, "unknown": 404, "invalid": 400}[outcome]
        return JSONResponse({"outcome": outcome, "detail": detail}, status_code=status)

    async def settle(self, record: Any) -> tuple[str, str]:
        """Settle one commit record; the outcome (settled, already-settled, unknown, invalid)."""
        problem = _invalid(record)
        if problem:
            return "invalid", problem
        reservation = record["reservation"]
        entry = self._pending.get(reservation)
        if entry is None or entry[1] < time.monotonic():
            return "unknown", f"no reservation {reservation!r} waits here (expired, or elsewhere)"
        exchange = entry[0]
        decision = exchange.decision
        assert decision is not None
        if decision.settled:  # kept until it expires, so that a repeated commit is known
            return "already-settled", "this reservation was settled before"
        headers = record.get("headers") or {}
        exchange.response_started(
            int(record["status"]), [(str(k), str(v)) for k, v in headers.items()]
        )
        for meter, amount in (record.get("usage") or {}).items():
            if meter in decision.meters:
                decision.record(meter, amount)  # what the gateway says wins over the headers
        exchange.body_sent()
        exchange.finished()
        await asettle(self.gate, exchange)
        async with self._settling:
            self.settled += 1
            self._settling.notify_all()
        return "settled", "settled"

    # /render, /healthz --------------------------------------------------------------------

    async def render(self, request: Request) -> Response:
        """The real problem response behind nginx's 401/403 (``X-Plangate-Problem``)."""
        try:
            body = json.loads(request.headers.get("x-plangate-problem", ""))
            name = str(body["type"]).removeprefix(PROBLEM_BASE)
            status = TITLES[name][0]
            assert body["type"] == PROBLEM_BASE + name
        except (ValueError, KeyError, TypeError, AssertionError):
            return _error(400, "bad-request", "no plangate problem to render")
        headers = {"content-type": "application/problem+json"}
        retry = request.headers.get("x-plangate-retry-after")
        if retry and retry.isdigit():
            headers["retry-after"] = retry
        return Response(json.dumps(body, separators=(",", ":")), status, headers=headers)

    async def entitlements(self, request: Request) -> Response:
        """The caller's plan, features and meters: route a gateway's
        ``/.plangate/entitlements`` here (the caller's token is read as for ``/check``)."""
        token = self.gate.token_source.read(request.headers.getlist(self.gate.token_source.header))
        result = await self.gate.entitlements(token)
        answer = Exchange(request.method, "/", entitlements_path=None).answer_entitlements(result)
        return Response(answer.body, status_code=answer.status, headers=dict(answer.headers))

    async def healthz(self, request: Request) -> Response:
        """Up, with counts. ``?settled=N&wait=S`` first waits up to S seconds (at most 30)
        until N reservations have been settled: commits from access logs arrive on their own,
        and this lets a deploy check or a test wait for them without guessing."""
        wanted = request.query_params.get("settled", "")
        wait = request.query_params.get("wait", "")
        if wanted.isascii() and wanted.isdigit():
            number = wait.replace(".", "", 1)
            timeout = min(float(wait), 30.0) if number.isascii() and number.isdigit() else 0.0
            async with self._settling:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(
                        self._settling.wait_for(lambda: self.settled >= int(wanted)), timeout
                    )
        body = {"status": "ok", "pending": len(self._pending), "settled": self.settled}
        return JSONResponse(body)


_ANY = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


STYLES = ("auto", "original", "forwarded", "path")


class AmbiguousRequest(ValueError):
    """The check request says where the original request went in two ways."""


def original_request(request: Request, style: str = "auto") -> tuple[str, str]:
    """The method and path the client asked the gateway for.

    ``original``: ``X-Original-Method``/``X-Original-URI`` (nginx); ``forwarded``:
    ``X-Forwarded-Method``/``X-Forwarded-Uri`` (Traefik, Caddy, HAProxy); ``path``: the path
    after ``/check`` with the request's own method (Envoy's HTTP ext_authz). ``auto`` takes the
    one present, and refuses a request that carries both header styles: gateways pass client
    headers on to the check, so the style the gateway did not set may be the client's.
    The path is percent-decoded and its dot segments resolved, as the upstream will see it.
    """
    headers = request.headers
    original, forwarded = headers.get("x-original-uri"), headers.get("x-forwarded-uri")
    if style == "auto":
        if original is not None and forwarded is not None:
            raise AmbiguousRequest("both X-Original-URI and X-Forwarded-Uri are present")
        style = "original" if original is not None else "forwarded" if forwarded else "path"
    if style == "path":
        # The path as sent, still percent-encoded: decoding it once is normalize_path's job
        # (the server's decoded path would be decoded twice: %252F would become "/").
        raw = request.scope.get("raw_path") or request.url.path.encode()
        path = raw.decode("latin-1").split("?", 1)[0][len("/check") :]
        return request.method.upper(), normalize_path(path)
    uri = original if style == "original" else forwarded
    if uri is None:
        raise AmbiguousRequest(f"no X-{style.title()}-URI header")
    method = headers.get(f"x-{style}-method") or request.method
    return method.upper(), normalize_path(_path_of(uri))


_ABSOLUTE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _path_of(uri: str) -> str:
    """The path of a request target. Only an absolute URI (``http://host/path``) has a host:
    ``//v1/projects`` is the path ``//v1/projects``, not the host ``v1``."""
    if _ABSOLUTE.match(uri):
        return urlsplit(uri).path
    return uri.split("?", 1)[0].split("#", 1)[0]


def normalize_path(path: str) -> str:
    """Percent-decoded, duplicate slashes merged, ``.`` and ``..`` resolved — as nginx and the
    other gateways hand the path to the upstream. A trailing slash (or ``/.``) is kept."""
    path = unquote(path) or "/"
    if not path.startswith("/"):
        path = "/" + path
    normal = "/" + posixpath.normpath(path).lstrip("/")
    if normal != "/" and path.endswith(("/", "/.", "/..")):
        normal += "/"
    return normal


def header_value(text: str) -> str:
    """``text`` as a header value: as it is when it is a plain token, else percent-encoded."""
    return text if set(text) <= _TOKEN_CHARS else quote(text, safe="")


def _joined(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """One value per name (a dict of headers); repeated names are joined as lists are."""
    merged: dict[str, str] = {}
    for name, value in headers:
        merged[name] = f"{merged[name]}, {value}" if name in merged else value
    return list(merged.items())


def _invalid(record: Any) -> str:
    if not isinstance(record, dict):
        return "expected a JSON object"
    if not isinstance(record.get("reservation"), str) or not record["reservation"]:
        return "'reservation' must be the id from X-Plangate-Reservation"
    status = record.get("status")
    if isinstance(status, str):
        # nginx's $upstream_status lists every upstream tried ("502, 200", "504 : 200"):
        # the last one answered the client
        last = re.split(r"[,:]", status)[-1].strip()
        if last.isascii() and last.isdigit():
            record["status"] = status = int(last)
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        return "'status' must be the upstream's HTTP status (100-599)"
    usage = record.get("usage")
    if usage is not None and (
        not isinstance(usage, dict)
        or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 10**15
            for v in usage.values()
        )
    ):
        return "'usage' maps meters to whole numbers from 0 to 10^15"
    headers = record.get("headers")
    if headers is not None and not isinstance(headers, dict):
        return "'headers' maps response header names to their values"
    return ""


def _error(status: int, name: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": name, "detail": detail}, status_code=status)


def serve(
    service: GatewayService,
    host: str = "127.0.0.1",
    port: int = 8787,
    *,
    log_listen: tuple[str, int] | None = None,
    follow: str | None = None,
    access_log: bool = False,
) -> None:
    """Run the service with uvicorn, with the access-log listeners asked for."""
    import uvicorn

    async def main() -> None:
        server = uvicorn.Server(
            uvicorn.Config(service, host=host, port=port, log_level="info", access_log=access_log)
        )
        tasks = []
        committer = LogCommitter(service)
        if log_listen is not None:
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(
                lambda: committer, local_addr=log_listen
            )
            logger.info("committing from access logs on udp://%s:%d", *log_listen)
        if follow is not None:
            tasks.append(asyncio.create_task(follow_file(follow, committer)))
        try:
            await server.serve()
        finally:
            for task in tasks:
                task.cancel()
            if log_listen is not None:
                transport.close()

    asyncio.run(main())
