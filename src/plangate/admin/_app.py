"""The admin API: Starlette routes over ``gate.customers``, behind a bearer token."""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import unquote

import anyio.to_thread
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

from .._gate import AsyncGate
from ..config import Config
from ..customers import (
    CustomerNotFound,
    GrantNotFound,
    IdempotencyConflict,
    InvalidRecord,
    LegacyPlanRefused,
)
from ..customers._credits import MAX_KEY, MAX_PAGE
from ..customers._provisioning import UNSET, iter_errors
from ..engine._problems import bearer_challenge
from ..errors import StorageError, VersionConflict
from ..gateway._bodies import MAX_BODY, BadRequest, load_json, read_body
from ..storage import Storage
from ._problems import AdminError
from ._ui import SESSION_TTL

logger = logging.getLogger("plangate.admin")

REALM = "plangate-admin"
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
#: ledger entries a page of ``GET /customers/{id}/credits`` holds by default, and at most
DEFAULT_LEDGER = 50
MAX_LEDGER = MAX_PAGE
#: a ledger cursor as the stores make them: an entry's id (memory: 16 digits; Redis: a
#: stream id, ms-seq). Checked here, as Redis refuses a malformed one with an error.
LEDGER_CURSOR = re.compile(r"[0-9]{1,19}(-[0-9]{1,19})?")
#: the methods of a customer's record (``/customers/{id}``)
RECORD_METHODS = ("GET", "HEAD", "PUT", "PATCH", "DELETE")
JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
#: the members of a migration's body
MIGRATION = ("from", "to", "dry_run", "allow_legacy")


class AdminAPI:
    """The admin API as an ASGI app: customer records, credit balances and plan migrations
    over HTTP.

    Its routes are relative to where it is mounted (``Mount("/admin", app=AdminAPI(gate))``):
    ``/customers``, ``/customers/{id}``, ``/customers/{id}/credits``,
    ``/customers/{id}/credits/{grant}``, ``/plans/migrate``, ``/billing``, ``/config``,
    ``/config/reload``. Every request needs
    ``Authorization: Bearer <token>``; ``token`` defaults to the config's ``admin.token``,
    and without one the API answers 404 to everything. See docs/admin.md.
    """

    def __init__(
        self,
        gate: AsyncGate,
        *,
        token: str | None = UNSET,
        max_body: int = MAX_BODY,
        session_ttl: int = SESSION_TTL,
    ) -> None:
        self.gate = gate
        #: the token given here; UNSET: the config's ``admin.token``, as reloaded
        self._given = token
        #: bytes of a request body the API reads; past them, 413
        self.max_body = max_body
        self.app = Starlette(
            routes=[
                Route("/customers", self.list_customers, methods=["GET"]),
                # Before the record's route, whose {customer:path} would take them: the path
                # is matched percent-decoded, so /customers/x%2Fcredits comes here too, and
                # _record_named sends it back to the record of customer "x/credits".
                Route(
                    "/customers/{customer:path}/credits/{grant_id}",
                    self.credit_grant,
                    methods=["DELETE"],
                ),
                Route(
                    "/customers/{customer:path}/credits",
                    self.credits,
                    methods=["GET", "POST"],
                ),
                Route(
                    "/customers/{customer:path}",
                    self.customer,
                    methods=["GET", "PUT", "PATCH", "DELETE"],
                ),
                Route("/plans/migrate", self.migrate, methods=["POST"]),
                Route("/billing", self.billing, methods=["GET"]),
                Route("/config", self.config, methods=["GET"]),
                Route("/config/reload", self.reload, methods=["POST"]),
                Mount("/ui", app=_dashboard(gate, token, session_ttl)),
            ],
            exception_handlers={
                **problem_handlers(),
                InvalidRecord: _invalid_record,
                LegacyPlanRefused: _legacy_plan,
                CustomerNotFound: _customer_not_found,
                IdempotencyConflict: _idempotency_conflict,
                GrantNotFound: _grant_not_found,
            },
        )

    @classmethod
    def from_config(
        cls,
        config: str | os.PathLike[str] | Mapping[str, Any] | Config,
        storage: str | Storage | None = None,
        *,
        token: str | None = UNSET,
    ) -> AdminAPI:
        """The admin API on a gate of its own, for ``config`` (a path, a mapping or a
        loaded ``Config``) and ``storage`` (a URI or a ``Storage``; else the config's)."""
        return cls(AsyncGate(config, storage=storage), token=token)

    @property
    def _token(self) -> bytes | None:
        token = self._given
        if token is UNSET:
            token = self.gate.loaded.config.model.admin.token
        return token.encode() if token else None

    @property
    def enabled(self) -> bool:
        """Whether a token is set: without one, every request is answered 404."""
        return self._token is not None

    def __repr__(self) -> str:  # never the token
        state = "token set" if self.enabled else "no token: off"
        return f"<AdminAPI ({state})>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not _dashboard_path(scope):  # it signs people in
            refused = self._refused(scope)
            if refused is not None:
                await refused.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refused(self, scope: Scope) -> AdminError | None:
        """Why a request may not use the API (no token configured, or not the token)."""
        expected = self._token
        if expected is None:
            return _not_found()
        given = Headers(scope=scope).getlist("authorization")
        scheme, _, credentials = given[0].partition(" ") if len(given) == 1 else ("", "", "")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            credentials.strip().encode("latin-1"), expected
        ):
            return None
        challenge = bearer_challenge(token_given=scheme.lower() == "bearer", realm=REALM)
        return AdminError(
            "admin-token-required",
            "the admin API needs Authorization: Bearer <admin.token>",
            headers={"www-authenticate": challenge},
        )

    # /customers ---------------------------------------------------------------------------

    async def list_customers(self, request: Request) -> Response:
        """A page of records: ``?plan=NAME&limit=N&cursor=C``."""
        query = request.query_params
        limit = _limit(query.get("limit"))
        cursor = query.get("cursor") or None
        try:
            page = await self.gate.customers.list(
                plan=query.get("plan"), limit=limit, cursor=cursor
            )
        except ValueError:
            raise AdminError(
                "malformed-request",
                "cursor: not a cursor this API made; pass the next_cursor of the page before",
                {"parameter": "cursor"},
            ) from None
        return _json(page)

    # /customers/{id} ----------------------------------------------------------------------

    async def customer(self, request: Request) -> Response:
        return await self._record_route(request, _customer(request))

    async def _record_route(self, request: Request, customer: str) -> Response:
        """``GET``, ``PUT``, ``PATCH`` or ``DELETE`` of the record of ``customer``."""
        customers = self.gate.customers
        method = request.method
        if method not in RECORD_METHODS:
            raise HTTPException(405, headers={"allow": ", ".join(RECORD_METHODS)})
        if method in ("GET", "HEAD"):
            return _record(await customers.show(customer))
        if_version = _if_match(request)
        if method == "DELETE":
            await customers.remove(customer, if_version=if_version)
            logger.info("admin: customer %r deleted", customer)
            return Response(status_code=204, headers={"cache-control": "no-store"})
        allow_legacy = _flag(request, "allow_legacy")
        if method == "PUT":
            body = await self._body(request, (JSON,))
            answer = await customers.put(
                customer, body, if_version=if_version, allow_legacy=allow_legacy
            )
        else:
            patch = await self._body(request, (MERGE_PATCH, JSON))
            answer = await customers.patch(
                customer, patch, if_version=if_version, allow_legacy=allow_legacy
            )
        logger.info(
            "admin: customer %r written (%s), version %d", customer, method, answer["version"]
        )
        return _record(answer)

    # /customers/{id}/credits --------------------------------------------------------------

    async def credits(self, request: Request) -> Response:
        """``GET``: the customer's credit balances (``?feature=&limit=&cursor=``); ``POST``:
        a grant, made once per ``Idempotency-Key``."""
        whole = _record_named(request, "credits")
        if whole is not None:
            return await self._record_route(request, whole)
        customer = _customer(request, "credits")
        customers = self.gate.customers
        if request.method == "POST":
            key = _idempotency_key(request)
            body = await self._body(request, (JSON,))
            created, grant = await customers._run(
                customers._credits().grant(customer, body, idempotency_key=key, source="admin")
            )
            if created:
                logger.info(
                    "admin: customer %r granted %s %s (grant %s)",
                    customer,
                    grant["amount"],
                    grant["feature"],
                    grant["id"],
                )
            return _json(grant, status=201 if created else 200)
        query = request.query_params
        limit = _limit(query.get("limit"), default=DEFAULT_LEDGER, most=MAX_LEDGER)
        cursor = query.get("cursor") or None
        if cursor is not None and not LEDGER_CURSOR.fullmatch(cursor):
            raise AdminError(
                "malformed-request",
                "cursor: not a cursor this API made; pass the next_cursor of the page before",
                {"parameter": "cursor"},
            )
        shown = await customers._run(
            customers._credits().show(
                customer, feature=query.get("feature"), limit=limit, cursor=cursor
            )
        )
        return _json({"customer": customer, "credits": shown})

    async def credit_grant(self, request: Request) -> Response:
        """``DELETE``: what the grant still holds is taken away (its ledger keeps it)."""
        grant_id: str = request.path_params["grant_id"]
        whole = _record_named(request, "credits", grant_id)
        if whole is not None:
            return await self._record_route(request, whole)
        customer = _customer(request, "credits", grant_id)
        customers = self.gate.customers
        revoked = await customers._run(customers._credits().revoke(customer, grant_id))
        logger.info(
            "admin: customer %r: grant %s of %s revoked (%s)",
            customer,
            grant_id,
            revoked["feature"],
            revoked["revoked"],
        )
        return _json(revoked)

    # /plans/migrate -----------------------------------------------------------------------

    async def migrate(self, request: Request) -> Response:
        """``{"from", "to", "dry_run"?, "allow_legacy"?}``: every customer moved."""
        body = await self._body(request, (JSON,))
        errors = [
            (str(key), f"unknown member; a migration has {', '.join(MIGRATION)}")
            for key in body
            if key not in MIGRATION
        ]
        for key in ("dry_run", "allow_legacy"):
            if not isinstance(body.get(key, False), bool):
                errors.append((key, "true or false"))
        if errors:
            raise InvalidRecord(errors)
        allow_legacy = body.get("allow_legacy", False) or _flag(request, "allow_legacy")
        answer = await self.gate.customers.migrate(
            body.get("from", ""),
            body.get("to", ""),
            dry_run=body.get("dry_run", False),
            allow_legacy=allow_legacy,
        )
        if not body.get("dry_run", False):
            logger.info(
                "admin: %d customers moved from plan %r to %r",
                answer["migrated"],
                answer["from"],
                answer["to"],
            )
        return _json(answer)

    # /billing -----------------------------------------------------------------------------

    async def billing(self, request: Request) -> Response:
        """Per configured billing provider, how many times it sent each price (rate plan)
        the config maps to nothing (docs/billing.md)."""
        section = self.gate.config.model.billing
        providers = [p for p in ("stripe", "zuora") if getattr(section, p, None) is not None]
        counts = await self.gate.storage.aunmapped(providers)
        return _json({"providers": providers, "unmapped": counts})

    # /config ------------------------------------------------------------------------------

    async def config(self, request: Request) -> Response:
        """The config serving: its version, origin, when it was loaded, the last reload
        error (None once a reload succeeds)."""
        return _json(self.gate.config_status())

    async def reload(self, request: Request) -> Response:
        """Reload now (the file, or the store's published config with ``reload.store``):
        200 with the status, whether it changed or not; 422 with the errors when the config
        does not load (the old one still serves)."""
        outcome = await anyio.to_thread.run_sync(lambda: self.gate.reload(force=True))
        if outcome.error is not None and outcome.error.storage:
            raise AdminError(
                "storage-unavailable",
                f"the published config cannot be read now: {outcome.error.message}",
                headers={"retry-after": "1"},
            )
        if outcome.error is not None:
            raise AdminError(
                "invalid-config",
                "the config was not reloaded; the version serving is kept",
                {"errors": list(outcome.error.issues) or [{"message": outcome.error.message}]},
            )
        return _json({"changed": outcome.changed, **self.gate.config_status()})

    # reading requests ---------------------------------------------------------------------

    async def _body(self, request: Request, accepted: tuple[str, ...]) -> dict[str, Any]:
        """The request's JSON object: its media type checked before a byte is read, its
        size while reading (``read_body`` stops at ``max_body``)."""
        given = request.headers.get("content-type", "")
        if given.partition(";")[0].strip().lower() not in accepted:
            headers = {"accept-patch": ", ".join(accepted)} if MERGE_PATCH in accepted else {}
            raise AdminError(
                "unsupported-media-type",
                f"send {' or '.join(accepted)}, not {given or 'a body without Content-Type'}",
                headers=headers,
            )
        body = load_json(await read_body(request, self.max_body))
        if not isinstance(body, dict):
            raise AdminError("malformed-request", "the body must be a JSON object")
        return body


def from_environment() -> Starlette:
    """The admin API under ``/admin/``, and billing's webhooks under ``/webhooks/``, for ``uvicorn --factory
    plangate.admin:from_environment``: the config from ``PLANGATE_CONFIG`` (a path), the
    store from ``PLANGATE_STORAGE`` or the config. The store is checked at start-up and its
    connections closed at shutdown."""
    path = os.environ.get("PLANGATE_CONFIG")
    if not path:
        raise RuntimeError("plangate.admin: set PLANGATE_CONFIG to the path of plangate.yaml")
    api = AdminAPI.from_config(path)
    if not api.enabled:
        logger.warning("admin.token is not set: the admin API answers 404 to every request")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await api.gate.check_storage()
        api.gate.start()  # follow config reloads: the admin token, billing's secrets
        try:
            yield
        finally:
            api.gate.stop()
            await api.gate.storage.aclose()

    from ..billing import Webhooks  # plangate.billing imports this module

    return Starlette(
        routes=[Mount("/admin", app=api), Mount("/webhooks", app=Webhooks(api.gate))],
        exception_handlers={HTTPException: _http_error},
        lifespan=lifespan,
    )


# requests, read -----------------------------------------------------------------------------


def _raw_segments(request: Request, count: int) -> list[str] | None:
    """The last ``count`` segments of the path as the client sent it, each percent-decoded
    (None when the server does not give the raw path)."""
    raw = request.scope.get("raw_path")
    if not isinstance(raw, bytes):
        return None
    segments = raw.partition(b"?")[0].split(b"/")[-count:]
    return [unquote(segment.decode("latin-1")) for segment in segments]


def _customer(request: Request, *rest: str) -> str:
    """The customer id of the path, percent-decoded: ``/customers/a%2Fb`` is ``a/b``, while
    ``/customers/a/b`` (a slash as such) names no customer. ``rest``: the segments the route
    has after the id (``credits``, a grant's id)."""
    customer: str = request.path_params["customer"]
    segments = _raw_segments(request, 1 + len(rest))
    if segments is not None and segments != [customer, *rest]:
        raise _not_found()
    if not customer:
        raise _not_found()
    return customer


def _record_named(request: Request, *rest: str) -> str | None:
    """The customer whose record the path names when a credits route matched it only once
    decoded: ``/customers/x%2Fcredits`` is the record of ``x/credits``, not the credits of
    ``x``. None for a path of the credits route. (Without the raw path, which every ASGI
    server in use gives, the decoded path is all there is: it is the credits route's.)"""
    whole = "/".join([request.path_params["customer"], *rest])
    segments = _raw_segments(request, 1)
    return whole if segments == [whole] else None


def _idempotency_key(request: Request) -> str:
    """The ``Idempotency-Key`` header a grant needs: one, of 1 to 255 printable characters."""
    given = request.headers.getlist("idempotency-key")
    key = given[0].strip() if len(given) == 1 else ""
    if not key or len(key) > MAX_KEY or not key.isprintable():
        if not given:
            detail = "a grant needs an Idempotency-Key header (a new unique value per grant)"
        elif len(given) > 1:
            detail = "one Idempotency-Key header, not several"
        else:
            detail = f"1 to {MAX_KEY} printable characters, not {given[0][:40]!r}"
        raise AdminError(
            "malformed-request",
            f"Idempotency-Key: {detail}",
            {"parameter": "Idempotency-Key"},
        )
    return key


def _if_match(request: Request) -> int | None:
    """The version ``If-Match`` names: ``"3"`` as the ETag gives it, or ``3``."""
    value = request.headers.get("if-match")
    if value is None:
        return None
    text = value.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise AdminError(
            "malformed-request",
            f'If-Match: the version as the ETag gives it ("3"), not {value!r}',
            {"parameter": "If-Match"},
        )
    return int(text)


def _flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name)
    if value is None or value.lower() in ("false", "0", ""):
        return False
    if value.lower() in ("true", "1"):
        return True
    raise AdminError(
        "malformed-request", f"{name}: true or false, not {value!r}", {"parameter": name}
    )


def _limit(value: str | None, *, default: int = DEFAULT_LIMIT, most: int = MAX_LIMIT) -> int:
    if value is None:
        return default
    if value.isascii() and value.isdigit() and len(value) <= 4 and 1 <= int(value) <= most:
        return int(value)
    raise AdminError(
        "malformed-request",
        f"limit: a whole number from 1 to {most}, not {value!r}",
        {"parameter": "limit"},
    )


# answers ------------------------------------------------------------------------------------


def _json(
    body: Mapping[str, Any], headers: Mapping[str, str] | None = None, *, status: int = 200
) -> Response:
    return JSONResponse(body, status, headers={"cache-control": "no-store", **(headers or {})})


def _record(body: Mapping[str, Any]) -> Response:
    """A customer's record, with its version as the ETag (what If-Match names)."""
    return _json(body, {"etag": f'"{body["version"]}"'})


def _not_found() -> AdminError:
    return AdminError("not-found", "no such admin resource")


def _dashboard_path(scope: Scope) -> bool:
    root = scope.get("root_path", "")
    path: str = scope["path"]
    route = path[len(root) :] if root and path.startswith(root) else path
    return route == "/ui" or route.startswith("/ui/")


def _dashboard(gate: AsyncGate, token: str | object | None, session_ttl: int) -> Any:
    """The dashboard (``/ui``); without Jinja2 (the ``dashboard`` extra), a 404 saying so."""
    try:
        from ._ui import Dashboard

        return Dashboard(gate, token=token, session_ttl=session_ttl)
    except ImportError:
        detail = "the dashboard needs Jinja2: pip install 'plangate[dashboard]'"
        return JSONResponse({"detail": detail}, status_code=404)


def problem_handlers() -> dict[Any, Any]:
    """The exception handlers of every app answering admin problems (the admin API, the
    billing webhooks): HTTP errors, ``AdminError``, unreadable bodies, version conflicts and
    an unreachable store."""
    return {
        HTTPException: _http_error,
        AdminError: _admin_error,
        BadRequest: _bad_request,
        VersionConflict: _version_conflict,
        StorageError: _storage_error,
    }


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return AdminError(
            "method-not-allowed",
            f"{request.method} is not a method of {request.url.path}",
            headers=exc.headers,
        ).response()
    return _not_found().response()


async def _admin_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AdminError)
    return exc.response()


async def _bad_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BadRequest)
    name = "body-too-large" if exc.status == 413 else "malformed-request"
    return AdminError(name, exc.detail).response()


async def _invalid_record(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, InvalidRecord)
    members = {"field": exc.field, "errors": list(iter_errors(exc))}
    return AdminError("invalid-record", str(exc), members).response()


async def _legacy_plan(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LegacyPlanRefused)
    return AdminError("legacy-plan", str(exc), {"plan": exc.plan}).response()


async def _customer_not_found(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, CustomerNotFound)
    return AdminError("customer-not-found", str(exc), {"customer": exc.customer}).response()


async def _idempotency_conflict(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, IdempotencyConflict)
    members = {"parameter": "Idempotency-Key", "idempotency_key": exc.key}
    return AdminError("idempotency-conflict", str(exc), members).response()


async def _grant_not_found(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GrantNotFound)
    members = {"customer": exc.customer, "grant": exc.grant_id}
    return AdminError("grant-not-found", str(exc), members).response()


async def _version_conflict(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, VersionConflict)
    if "if-match" not in request.headers:  # the store retried, and lost every time
        detail = "other writes to this customer kept coming first; retry"
        return AdminError("write-contention", detail, headers={"retry-after": "1"}).response()
    members = {"current_version": exc.current, "expected_version": exc.expected}
    return AdminError("version-conflict", str(exc), members).response()


async def _storage_error(request: Request, exc: Exception) -> Response:
    logger.warning("admin: %s %s: the store failed: %s", request.method, request.url.path, exc)
    detail = "the store of customer records cannot be reached; retry"
    return AdminError("storage-unavailable", detail, headers={"retry-after": "5"}).response()
