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
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from .._exchange import ENTITLEMENTS_PATH, Exchange, is_preflight, problem_answer
from .._gate import AsyncGate, Clock
from .._lifecycle import abegin, asettle
from .._reload import Loaded
from ..config import Config
from ..engine import PROBLEM_BASE, Decision, Engine, Problem
from ..engine._headers import MAX_INTEGER
from ..engine._problems import MEMBERS, RETRIED, TITLES, bearer_challenge
from ..identity import TokenRead
from ..storage import Storage
from ._bodies import MAX_BODY, BadRequest, load_json, read_json
from ._logs import LogCommitter, follow_file

logger = logging.getLogger("plangate.gateway")

#: how long a reservation waits for its commit before its estimate simply stands
RESERVATION_TTL = 600.0
_MAX_PENDING = 200_000
_MAX_PROBLEM = 16 * 1024  # characters of X-Plangate-Problem (nginx buffers 16k of headers)
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
        max_body: int = MAX_BODY,
    ) -> None:
        if request_from not in STYLES:
            raise ValueError(f"request_from: one of {', '.join(STYLES)}, not {request_from!r}")
        self.gate = AsyncGate(config, storage=storage, clock=clock)
        #: where /check reads the original request (see ``original_request``)
        self.request_from = request_from
        self.commit_token = commit_token
        self.reservation_ttl = reservation_ttl
        #: bytes of a request body the service reads; past them, 413
        self.max_body = max_body
        self._pending: OrderedDict[str, tuple[Exchange, float]] = OrderedDict()
        self._lock = asyncio.Lock()
        self.settled = 0  # reservations settled so far
        self._settling = asyncio.Condition()
        from ..admin import AdminAPI  # not at the top: plangate.admin imports ._bodies
        from ..billing import PeriodicExport, Webhooks

        billing = self.gate.config.model.billing
        #: the periodic usage export (``billing.export``), run while the service runs
        self.export = (
            PeriodicExport(self.gate.storage, lambda: self.gate.loaded.config, clock=clock)
            if billing is not None and billing.export is not None
            else None
        )

        self.app = Starlette(
            routes=[
                Route("/check", self.check, methods=_ANY),
                Route("/check/{path:path}", self.check, methods=_ANY),
                Route("/commit", self.commit, methods=["POST"]),
                Route("/render", self.render, methods=_ANY),
                Route("/entitlements", self.entitlements, methods=["GET", "HEAD"]),
                Route("/healthz", self.healthz, methods=["GET", "HEAD"]),
                Mount("/admin", app=AdminAPI(self.gate)),
                Mount("/webhooks", app=Webhooks(self.gate)),
                Route("/metrics", self._metrics(), methods=["GET", "HEAD"]),
            ],
            lifespan=self._lifespan,
        )

    def _metrics(self) -> Any:
        """``/metrics``: Prometheus's text format of this gate's metrics (the ``metrics``
        extra); without prometheus-client, a 404 saying so."""
        try:
            import prometheus_client  # noqa: F401
        except ImportError:  # pragma: no cover - the extra is in the test environment
            detail = "metrics need prometheus-client: pip install 'plangate[metrics]'"
            return JSONResponse({"detail": detail}, status_code=404)
        from ..metrics import instrument, metrics_app

        instrument(self.gate)
        return metrics_app()

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Any) -> AsyncIterator[None]:
        """Config reloads followed and the periodic usage export (``billing.export``) run,
        for as long as the service runs; at shutdown the store's connections of this event
        loop close (and what its leases did not use goes back), as the ASGI middleware's do."""
        self.gate.start()
        task = None if self.export is None else asyncio.create_task(self.export.run())
        try:
            yield
        finally:
            self.gate.stop()
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.gate.storage.aclose()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    # /check -------------------------------------------------------------------------------

    async def check(self, request: Request) -> Response:
        """Decide the original request. Allow: 200. Deny: the real problem response."""
        try:
            method, path = original_request(request, self.request_from)
        except AmbiguousRequest as exc:
            logger.warning("check refused: %s", exc)
            return _problem(400, f"cannot tell the original request: {exc}")
        loaded = self.gate.loaded  # one config for the whole request
        source = loaded.token_source
        token = source.read(request.headers.getlist(source.header))
        preflight = is_preflight(method, request.headers.__contains__)
        exchange = await self._begin(method, path, token, preflight=preflight, loaded=loaded)
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
        self,
        method: str,
        path: str,
        token: TokenRead,
        *,
        preflight: bool = False,
        loaded: Loaded | None = None,
    ) -> Exchange:
        exchange = Exchange(method, path, entitlements_path=None, preflight=preflight)
        await abegin(self.gate, exchange, token, loaded)
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
                tried = given[:7].lower() == "bearer "
                challenge = bearer_challenge(token_given=tried, realm="plangate-commit")
                return _problem(
                    401,
                    "a valid commit token is required",
                    {"www-authenticate": challenge},
                )
        try:
            record = await read_json(request, self.max_body)
        except BadRequest as exc:
            return _problem(exc.status, exc.detail)
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
        """The real problem response behind nginx's 401/403 (``X-Plangate-Problem``).

        Renders only a problem plangate itself could have issued, rebuilt from its parts
        (``_reissued``), never the bytes it was sent; anything else is a 400.
        """
        try:
            problem = self._reissued(request.headers.get("x-plangate-problem", ""))
            retry = _retry_after(problem, request.headers.get("x-plangate-retry-after"))
        except BadRequest as exc:
            return _problem(400, f"no plangate problem to render: {exc.detail}")
        headers = dict(problem.response_headers())
        if retry is not None:
            headers["retry-after"] = retry
        return Response(problem.encode(), problem.status, headers=headers)

    def _reissued(self, text: str) -> Problem:
        """The problem ``text`` (a problem body as ``/check`` sends it) describes, if plangate
        could have issued it: a type, title and status of plangate's own table, only the
        members that problem carries, each with a value from this config (a plan, a feature,
        policies, the upgrade URL). Raises ``BadRequest`` saying what is not plangate's."""
        if len(text) > _MAX_PROBLEM:
            raise BadRequest(400, f"the problem is longer than {_MAX_PROBLEM} characters")
        body = load_json(text, max_depth=2)
        if not isinstance(body, dict):
            raise BadRequest(400, "the problem is not a JSON object")
        kind = body.pop("type", None)
        name = kind.removeprefix(PROBLEM_BASE) if isinstance(kind, str) else ""
        if kind != PROBLEM_BASE + name or name not in TITLES:
            raise BadRequest(400, "its type is not a plangate problem type")
        status, title = TITLES[name]
        given_status = body.pop("status", None)
        if type(given_status) is not int or given_status != status:
            raise BadRequest(400, f"the status of {name} is {status}")
        if body.pop("title", None) != title:
            raise BadRequest(400, f"the title of {name} is {title!r}")
        detail = body.pop("detail", None)
        if not isinstance(detail, str):
            raise BadRequest(400, "its detail is not text")
        for member, value in body.items():
            if member not in MEMBERS[name]:
                raise BadRequest(400, f"{name} has no member {member!r}")
            if not self._issued_value(member, value):
                raise BadRequest(400, f"its {member!r} is not one this config has")
        return Problem(name, detail, body)

    def _issued_value(self, member: str, value: Any) -> bool:
        """Whether a problem's ``member`` is one the config serving issues — or the one it
        replaced: a reload may land between a /check and its /render."""
        previous = self.gate.previous
        return self._issued_by(self.gate.engine, member, value) or (
            previous is not None and self._issued_by(previous.engine, member, value)
        )

    @staticmethod
    def _issued_by(engine: Engine, member: str, value: Any) -> bool:
        if member == "plan":
            return isinstance(value, str) and value in engine.catalog.plans
        if member == "feature":
            return isinstance(value, str) and value in engine.kinds
        if member == "upgrade_url":
            return engine.upgrade_url is not None and value == engine.upgrade_url
        if member == "violated-policies":
            policies = {
                limit.policy
                for plan in engine.catalog.plans.values()
                for grant in plan.meters.values()
                for limit in grant.limits
            }
            return (
                isinstance(value, list)
                and 0 < len(value) == len(set(map(str, value)))
                and all(isinstance(policy, str) and policy in policies for policy in value)
            )
        # balance, required
        return type(value) is int and 0 <= value <= MAX_INTEGER

    async def entitlements(self, request: Request) -> Response:
        """The caller's plan, features and meters: route a gateway's
        ``/.plangate/entitlements`` here (the caller's token is read as for ``/check``)."""
        loaded = self.gate.loaded
        source = loaded.token_source
        token = source.read(request.headers.getlist(source.header))
        exchange = Exchange(request.method, ENTITLEMENTS_PATH)
        answer = await abegin(self.gate, exchange, token, loaded)
        assert answer is not None  # the entitlements path is always answered
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


def _retry_after(problem: Problem, value: str | None) -> str | None:
    """``Retry-After`` for a rendered problem: whole seconds, and only where plangate sends it."""
    if not value:
        return None
    if problem.name not in RETRIED:
        raise BadRequest(400, f"{problem.name} has no Retry-After")
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value[:16]) <= MAX_INTEGER:
        raise BadRequest(400, f"Retry-After is not whole seconds from 1 to {MAX_INTEGER}")
    return str(int(value))


#: the titles of the service's own errors (RFC 9457 ``about:blank``: the status phrase)
_PHRASES = {400: "Bad Request", 401: "Unauthorized", 413: "Content Too Large"}


def _problem(status: int, detail: str, headers: Mapping[str, str] | None = None) -> Response:
    """An error of the service itself (not a decision): an ``about:blank`` problem."""
    body = {"type": "about:blank", "title": _PHRASES[status], "status": status, "detail": detail}
    return Response(
        json.dumps(body, separators=(",", ":")),
        status,
        headers=dict(headers or {}),
        media_type="application/problem+json",
    )


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
