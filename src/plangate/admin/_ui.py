"""The admin dashboard: ``/admin/ui/``, HTML for people, on the admin API's code.

Server-rendered pages (Jinja2, autoescaped) that work without JavaScript; no script at all,
so the Content-Security-Policy allows none. A login form takes the admin token (compared in
constant time) and sets a session cookie: HttpOnly, SameSite=Strict, signed with a key
derived from the token (a new token ends every session) and valid ``session_ttl`` seconds.
Every form carries a CSRF token derived from the session, and a POST from another origin is
refused. Actions call the same customer store methods as the admin API.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import secrets
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from .._gate import AsyncGate
from ..customers import CustomerNotFound, IdempotencyConflict, InvalidRecord, LegacyPlanRefused
from ..customers._credits import MAX_KEY
from ..customers._provisioning import UNSET, WriteContention
from ..errors import StorageError, VersionConflict
from ..gateway._bodies import BadRequest, read_body
from ..storage._base import usage_hour

logger = logging.getLogger("plangate.admin")

SESSION_COOKIE = "plangate_admin"
#: seconds a dashboard session lasts
SESSION_TTL = 8 * 3600
LOGIN_COOKIE = "plangate_login"
PAGE = 50  # customers a page lists
FORM_BYTES = 64 * 1024  # a form's body, at most
FORM_FIELDS = 200
REFUSALS_SHOWN = 20
#: bytes of the decision log's end read for a customer's recent refusals
LOG_TAIL = 512 * 1024
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}
#: what a redirect after an action says, by the ``done`` it carries (never text from a
#: request: nothing a link can make the page say)
DONE = {
    "plan": "Plan changed.",
    "addons": "Add-ons saved.",
    "credits": "Credits granted.",
    "credits-again": "Those credits were granted before: nothing granted twice.",
    "migrated": "Customers moved.",
    "loggedin": "Signed in.",
}


class Dashboard:
    """The dashboard as an ASGI app, for ``gate``; mounted at ``/ui`` inside ``AdminAPI``
    (so at ``/admin/ui/``). ``token``: the admin token (default: the config's
    ``admin.token``, as reloaded); ``secure_cookies``: mark the cookie ``Secure`` (default:
    when the request came over HTTPS)."""

    def __init__(
        self,
        gate: AsyncGate,
        *,
        token: str | object | None = UNSET,
        session_ttl: int = SESSION_TTL,
        secure_cookies: bool | None = None,
    ) -> None:
        import jinja2  # the dashboard extra: pip install 'plangate[dashboard]'

        self.gate = gate
        self._given = token
        self.session_ttl = session_ttl
        self.secure_cookies = secure_cookies
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("plangate.admin", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.templates.filters["number"] = _number
        self.templates.filters["when"] = _when
        self.templates.filters["stamp"] = _stamp
        self.app = Starlette(
            routes=[
                Route("/", self.home, methods=["GET"]),
                Route("/login", self.login_form, methods=["GET"]),
                Route("/login", self.login, methods=["POST"]),
                Route("/logout", self.logout, methods=["POST"]),
                Route("/customers", self.customers, methods=["GET"]),
                Route("/customers/{customer:path}/plan", self.set_plan, methods=["POST"]),
                Route("/customers/{customer:path}/addons", self.set_addons, methods=["POST"]),
                Route("/customers/{customer:path}/credits", self.grant, methods=["POST"]),
                Route("/customers/{customer:path}", self.customer, methods=["GET"]),
                Route("/plans", self.plans, methods=["GET"]),
                Route("/plans/migrate", self.migrate, methods=["POST"]),
                Route("/config", self.config, methods=["GET"]),
                Route("/static/plangate.css", self.stylesheet, methods=["GET"]),
            ],
            exception_handlers={
                StorageError: self._unavailable,
                VersionConflict: self._conflict,
                HTTPException: self._http_error,
            },
        )
        self._css = (resources.files("plangate.admin") / "static" / "plangate.css").read_bytes()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    # what goes wrong ---------------------------------------------------------------------

    async def _unavailable(self, request: Request, exc: Exception) -> Response:
        logger.warning("dashboard: the store cannot be reached: %s", exc)
        response = self._page(
            request,
            "unavailable.html",
            503,
            heading="The store cannot be reached",
            message="plangate cannot read or write the store right now; nothing was changed. "
            "Try again in a moment.",
        )
        response.headers["retry-after"] = "1"
        return response

    async def _conflict(self, request: Request, exc: Exception) -> Response:
        if isinstance(exc, WriteContention):  # the admin API's answer: retry later
            return await self._unavailable(request, exc)
        return self._page(
            request,
            "unavailable.html",
            409,
            heading="Changed meanwhile",
            message="Someone changed this record at the same time; nothing was changed. "
            "Look at it again and retry.",
        )

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        status = exc.status_code if 400 <= exc.status_code < 500 else 404
        return self._page(
            request,
            "unavailable.html",
            status,
            heading="Not here",
            message="There is no such page in the dashboard.",
        )

    # the session -----------------------------------------------------------------------

    def _token(self) -> str | None:
        token = self._given
        if token is UNSET:
            token = self.gate.loaded.config.model.admin.token
        return token if isinstance(token, str) and token else None

    def _key(self) -> bytes | None:
        token = self._token()
        if token is None:
            return None
        return hmac.new(token.encode(), b"plangate dashboard session", hashlib.sha256).digest()

    def _session(self, request: Request) -> str | None:
        """The session id of a signed-in request, or None."""
        key = self._key()
        value = request.cookies.get(SESSION_COOKIE, "")
        if key is None or value.count(".") != 2:
            return None
        sid, issued, mac = value.split(".")
        expected = _mac(key, f"session.{sid}.{issued}")
        if not hmac.compare_digest(mac, expected) or not (issued.isascii() and issued.isdigit()):
            return None
        age = self.gate.clock() - int(issued)
        if not 0 <= age <= self.session_ttl:  # one dated later than now is forged
            return None
        return sid

    def _csrf(self, sid: str) -> str:
        key = self._key()
        assert key is not None
        return _mac(key, f"csrf.{sid}")

    def _same_origin(self, request: Request) -> bool:
        """A POST from the dashboard's own pages: Origin (or Referer) names this host and
        port. The scheme is not compared: behind a proxy that ends TLS the app sees http
        while the browser is on https (the CSRF token is what proves the page)."""
        source = request.headers.get("origin") or request.headers.get("referer")
        if not source:
            return False
        return urlsplit(source).netloc == request.url.netloc

    async def _form(self, request: Request, sid: str) -> Mapping[str, str]:
        """The form of an action, once it is shown to come from this dashboard."""
        form = await _read_form(request)
        given = form.get("csrf")
        if not (
            self._same_origin(request)
            and isinstance(given, str)
            and hmac.compare_digest(given, self._csrf(sid))
        ):
            raise _Refused()
        return form

    def _secure(self, request: Request) -> bool:
        """``Secure`` cookies when the browser is on HTTPS: as the request came, or as its
        Origin says (behind a proxy that ends TLS)."""
        if self.secure_cookies is not None:
            return self.secure_cookies
        origin = request.headers.get("origin") or request.headers.get("referer") or ""
        return request.url.scheme == "https" or origin.startswith("https://")

    # pages -----------------------------------------------------------------------------

    def _page(self, request: Request, template: str, status: int = 200, **context: Any) -> Response:
        sid = self._session(request)
        base = request.scope.get("root_path", "")
        done = DONE.get(request.query_params.get("done", ""))
        body = self.templates.get_template(template).render(
            base=base,
            signed_in=sid is not None,
            csrf=self._csrf(sid) if sid is not None else "",
            done=done,
            quote=_quote,
            version=self.gate.loaded.version,
            **context,
        )
        return HTMLResponse(body, status, headers=SECURITY_HEADERS)

    def _to(self, request: Request, path: str, **query: str) -> Response:
        base = request.scope.get("root_path", "")
        target = base + path + (f"?{urlencode(query)}" if query else "")
        return RedirectResponse(target, 303, headers=SECURITY_HEADERS)

    async def _guard(self, request: Request) -> str | Response:
        """The session id; or the login page (GET) or a 403 (POST) without one."""
        if self._token() is None:
            return HTMLResponse("Not found", 404, headers=SECURITY_HEADERS)
        sid = self._session(request)
        if sid is not None and not await self._signed_out(sid):
            return sid
        if request.method == "GET":
            return self._to(request, "/login", next=request.url.path)
        return self._refused(request)

    async def _signed_out(self, sid: str) -> bool:
        """Whether ``sid`` signed out (the store keeps it for every replica)."""
        storage = self.gate.storage
        if storage.in_process:
            return storage.session_revoked(sid)
        return await anyio.to_thread.run_sync(storage.session_revoked, sid)

    def _refused(self, request: Request) -> Response:
        return self._page(request, "refused.html", 403)

    async def home(self, request: Request) -> Response:
        guard = await self._guard(request)
        return guard if isinstance(guard, Response) else self._to(request, "/customers")

    async def login_form(self, request: Request, error: str = "", status: int = 200) -> Response:
        if self._token() is None:
            return HTMLResponse("Not found", 404, headers=SECURITY_HEADERS)
        nonce = secrets.token_urlsafe(24)
        response = self._page(
            request, "login.html", status, nonce=nonce, error=error, next=_next(request)
        )
        response.set_cookie(
            LOGIN_COOKIE,
            nonce,
            max_age=600,
            path=request.scope.get("root_path", "") or "/",
            httponly=True,
            samesite="strict",
            secure=self._secure(request),
        )
        return response

    async def login(self, request: Request) -> Response:
        token = self._token()
        if token is None:
            return HTMLResponse("Not found", 404, headers=SECURITY_HEADERS)
        form = await _read_form(request)
        nonce, given = form.get("nonce"), form.get("token")
        expected_nonce = request.cookies.get(LOGIN_COOKIE, "")
        if not (
            self._same_origin(request)
            and isinstance(nonce, str)
            and expected_nonce
            and hmac.compare_digest(nonce, expected_nonce)
        ):
            return self._refused(request)
        if not isinstance(given, str) or not hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            logger.warning("dashboard: a sign-in with a wrong token")
            return await self.login_form(request, "That is not the admin token.", 401)
        sid = secrets.token_urlsafe(18)
        issued = str(int(self.gate.clock()))
        key = self._key()
        assert key is not None
        target = _next(request, form.get("next"))
        response = RedirectResponse(target, 303, headers=SECURITY_HEADERS)
        root = request.scope.get("root_path", "") or "/"
        response.set_cookie(
            SESSION_COOKIE,
            f"{sid}.{issued}.{_mac(key, f'session.{sid}.{issued}')}",
            max_age=self.session_ttl,
            path=root,
            httponly=True,
            samesite="strict",
            secure=self._secure(request),
        )
        response.delete_cookie(LOGIN_COOKIE, path=root)
        logger.info("dashboard: signed in")
        return response

    async def logout(self, request: Request) -> Response:
        form = await self._action(request)
        if isinstance(form, Response):
            return form
        sid = self._session(request)
        assert sid is not None  # _action let it through
        # a copy of the cookie is worth nothing from now on, on every replica
        await anyio.to_thread.run_sync(self.gate.storage.revoke_session, sid, self.session_ttl)
        response = self._to(request, "/login")
        response.delete_cookie(SESSION_COOKIE, path=request.scope.get("root_path", "") or "/")
        return response

    async def customers(self, request: Request) -> Response:
        guard = await self._guard(request)
        if isinstance(guard, Response):
            return guard
        query = request.query_params
        wanted = query.get("q", "").strip()
        if wanted:
            try:
                await self.gate.customers.show(wanted)
            except CustomerNotFound:
                return await self._list(request, f"No customer {wanted!r} in the store.", 404)
            return self._to(request, f"/customers/{_quote(wanted)}")
        return await self._list(request)

    async def _list(self, request: Request, error: str = "", status: int = 200) -> Response:
        query = request.query_params
        plan = query.get("plan") or None
        cursor = query.get("cursor") or None
        try:
            page = await self.gate.customers.list(plan=plan, limit=PAGE, cursor=cursor)
        except ValueError:
            page, error, status = {"customers": [], "next_cursor": None}, "Not a page.", 400
        plans = self.gate.loaded.config.catalog.plans
        return self._page(
            request,
            "customers.html",
            status,
            page=page["customers"],
            next_cursor=page["next_cursor"],
            plan=plan or "",
            plans=sorted(plans),
            legacy={name for name, p in plans.items() if p.legacy},
            q=query.get("q", ""),
            error=error,
        )

    async def customer(
        self, request: Request, errors: Sequence[str] = (), status: int = 200
    ) -> Response:
        guard = await self._guard(request)
        if isinstance(guard, Response):
            return guard
        customer = request.path_params["customer"]
        customers = self.gate.customers
        try:
            record = await customers.show(customer)
        except CustomerNotFound:
            return await self._list(request, f"No customer {customer!r} in the store.", 404)
        credits = await customers.credits(customer) if record["entitlements"]["credits"] else {}
        span = "7d" if request.query_params.get("range") == "7d" else "24h"
        usage: dict[str, list[tuple[int, int]]] | None
        try:
            usage = await anyio.to_thread.run_sync(self._usage, customer, span)
        except (StorageError, NotImplementedError) as exc:
            logger.warning("dashboard: usage of %r not read: %s", customer, exc)
            usage = None  # said on the page: not "no usage"
        refusals = await anyio.to_thread.run_sync(self._refusals, customer)
        plans = self.gate.loaded.config.catalog.plans
        addons = self.gate.loaded.config.catalog.addons
        return self._page(
            request,
            "customer.html",
            status,
            customer=customer,
            record=record,
            entitlements=record["entitlements"],
            credits=credits,
            charts=None
            if usage is None
            else {meter: _chart(bars, span) for meter, bars in usage.items()},
            span=span,
            plans=sorted(plans),
            legacy={name for name, p in plans.items() if p.legacy},
            addons=sorted(addons),
            refusals=refusals,
            errors=errors,
            grant_key=secrets.token_hex(16),
            credit_features=sorted(
                name for name, kind in self.gate.loaded.engine.kinds.items() if kind == "credits"
            ),
        )

    def _usage(self, customer: str, span: str) -> dict[str, list[tuple[int, int]]]:
        """Units of each meter per hour (24h) or per day (7d), oldest first."""
        now = self.gate.clock()
        step = 3600 if span == "24h" else 86400
        count = 24 if span == "24h" else 7
        end = usage_hour(now) + 3600 if span == "24h" else _day(now) + 86400
        start = end - step * count
        hours = self.gate.storage.usage_hours(customer, start, end)
        kinds = self.gate.loaded.engine.kinds  # not the export's marks (exported:<to>:<meter>)
        meters = sorted({m for fields in hours.values() for m in fields if m in kinds})
        out: dict[str, list[tuple[int, int]]] = {}
        for meter in meters:
            bars = []
            for i in range(count):
                at = start + i * step
                total = sum(
                    fields.get(meter, 0) for hour, fields in hours.items() if at <= hour < at + step
                )
                bars.append((at, total))
            out[meter] = bars
        return out

    def _refusals(self, customer: str) -> dict[str, Any]:
        """The customer's last refusals in the decision log, when it goes to a file."""
        settings = self.gate.loaded.config.model.decision_log
        if settings is None or settings.to in ("stdout", "stderr"):
            return {"available": False, "readable": True, "entries": []}
        entries: list[dict[str, str]] = []
        try:
            with open(settings.to, "rb") as log:
                log.seek(0, os.SEEK_END)
                size = log.tell()
                log.seek(max(0, size - LOG_TAIL))
                tail = log.read().splitlines()
        except OSError as exc:
            logger.warning("dashboard: the decision log %s not read: %s", settings.to, exc)
            return {"available": True, "readable": False, "entries": []}
        for line in reversed(tail):
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # the first line of the tail, cut
            if (
                isinstance(entry, dict)
                and entry.get("customer") == customer
                and entry.get("decision") != "allow"
            ):
                policies = entry.get("policy")
                entries.append(
                    {
                        "time": str(entry.get("time", "")),
                        "request": f"{entry.get('method', '')} {entry.get('path', '')}",
                        "reason": str(entry.get("reason") or entry.get("decision") or ""),
                        "policy": ", ".join(map(str, policies))
                        if isinstance(policies, list)
                        else "",
                    }
                )
                if len(entries) >= REFUSALS_SHOWN:
                    break
        return {"available": True, "readable": True, "entries": entries}

    # actions ---------------------------------------------------------------------------

    async def _action(self, request: Request) -> Mapping[str, str] | Response:
        """The form of a signed-in action from this dashboard; else the page that says no."""
        guard = await self._guard(request)
        if isinstance(guard, Response):
            return guard
        try:
            return await self._form(request, guard)
        except _Refused:
            logger.warning("dashboard: a form refused (CSRF token or origin)")
            return self._refused(request)

    async def set_plan(self, request: Request) -> Response:
        form = await self._action(request)
        if isinstance(form, Response):
            return form
        customer = request.path_params["customer"]
        try:
            await self.gate.customers.patch(
                customer, {"plan": form.get("plan", "")}, allow_legacy="allow_legacy" in form
            )
        except LegacyPlanRefused as exc:
            return await self._failed(
                request,
                [f"{exc.plan} is a legacy plan: tick the box to assign it all the same."],
                409,
            )
        except InvalidRecord as exc:
            return await self._failed(request, _errors(exc), 422)
        logger.info("dashboard: customer %r moved to plan %r", customer, form.get("plan"))
        return self._to(request, f"/customers/{_quote(customer)}", done="plan")

    async def set_addons(self, request: Request) -> Response:
        form = await self._action(request)
        if isinstance(form, Response):
            return form
        customer = request.path_params["customer"]
        quantities: dict[str, Any] = {}
        for field, given in form.items():  # an add-on the config lacks: refused below
            if field.startswith("addon."):
                given = given.strip()
                quantities[field[6:]] = _whole(given) if given else 0  # cleared: none
        try:
            await self.gate.customers.patch(customer, {"addons": quantities})
        except InvalidRecord as exc:
            return await self._failed(request, _errors(exc), 422)
        return self._to(request, f"/customers/{_quote(customer)}", done="addons")

    async def grant(self, request: Request) -> Response:
        form = await self._action(request)
        if isinstance(form, Response):
            return form
        customer = request.path_params["customer"]
        amount = form.get("amount", "").strip()
        body: dict[str, Any] = {"feature": form.get("feature", ""), "amount": _whole(amount)}
        key = form.get("key", "").strip()
        if not key or len(key) > MAX_KEY or not key.isprintable():  # the admin API's rule
            return await self._failed(
                request, ["This form has no grant key: reload the page and grant again."], 422
            )
        if form.get("expires_at"):
            body["expires_at"] = form["expires_at"]
        customers = self.gate.customers
        try:
            created, grant = await customers._run(
                customers._credits().grant(customer, body, idempotency_key=key, source="admin")
            )
        except InvalidRecord as exc:
            return await self._failed(request, _errors(exc), 422)
        except IdempotencyConflict:
            return await self._failed(request, ["This form was used for another grant."], 422)
        if created:
            logger.info(
                "dashboard: customer %r granted %s %s", customer, grant["amount"], grant["feature"]
            )
        done = "credits" if created else "credits-again"
        return self._to(request, f"/customers/{_quote(customer)}", done=done)

    async def _failed(self, request: Request, errors: list[str], status: int) -> Response:
        request.scope["method"] = "GET"  # the page again, with what went wrong
        return await self.customer(request, errors, status)

    async def plans(
        self,
        request: Request,
        errors: Sequence[str] = (),
        status: int = 200,
        migration: dict[str, Any] | None = None,
    ) -> Response:
        guard = await self._guard(request)
        if isinstance(guard, Response):
            return guard
        catalog = self.gate.loaded.config.catalog
        model = self.gate.loaded.config.model
        names = list(catalog.plans)
        rows = []
        for feature, spec in model.features.items():
            rows.append(
                {
                    "feature": feature,
                    "kind": spec.kind,
                    "unit": spec.unit,
                    "cells": [_cell(catalog.plans[name], feature) for name in names],
                }
            )
        return self._page(
            request,
            "plans.html",
            status,
            plans=[catalog.plans[name] for name in names],
            rows=rows,
            default_plan=model.default_plan,
            errors=errors,
            migration=migration,
        )

    async def migrate(self, request: Request) -> Response:
        form = await self._action(request)
        if isinstance(form, Response):
            return form
        dry_run = "dry_run" in form  # a checkbox: sent when ticked, whatever its value
        request.scope["method"] = "GET"
        try:
            answer = await self.gate.customers.migrate(
                form.get("from", ""),
                form.get("to", ""),
                dry_run=dry_run,
                allow_legacy="allow_legacy" in form,
            )
        except LegacyPlanRefused as exc:
            return await self.plans(request, [f"{exc.plan} is a legacy plan."], 409)
        except InvalidRecord as exc:
            return await self.plans(request, _errors(exc), 422)
        if not dry_run:
            logger.info(
                "dashboard: %d customers moved from %r to %r",
                answer["migrated"],
                answer["from"],
                answer["to"],
            )
        return await self.plans(request, migration={**answer, "dry_run": dry_run})

    async def config(self, request: Request) -> Response:
        guard = await self._guard(request)
        if isinstance(guard, Response):
            return guard
        return self._page(request, "config.html", loaded_config=self.gate.config_status())

    async def stylesheet(self, request: Request) -> Response:
        return Response(
            self._css,
            media_type="text/css",
            headers={"cache-control": "max-age=3600", "x-content-type-options": "nosniff"},
        )


async def _read_form(request: Request) -> dict[str, str]:
    """An HTML form's fields (``application/x-www-form-urlencoded``: the only kind the pages
    send; anything else is an empty form, which every action refuses). Bounded: 64 KiB."""
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return {}
    try:
        body = await read_body(request, FORM_BYTES)
        fields = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=FORM_FIELDS)
    except (BadRequest, UnicodeDecodeError, ValueError):
        return {}
    return dict(fields)


class _Refused(Exception):
    """A form without this session's CSRF token, or from another origin."""


def _mac(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def _quote(customer: str) -> str:
    return quote(customer, safe="")


def _next(request: Request, given: Any = None) -> str:
    """Where to go after signing in: a dashboard page only (never another site)."""
    base = str(request.scope.get("root_path", ""))
    wanted = given if isinstance(given, str) else request.query_params.get("next", "")
    if wanted.startswith(base + "/") and not wanted.startswith("//") and "\\" not in wanted:
        return str(wanted)
    return base + "/customers"


def _whole(text: str) -> int | str:
    """A whole number typed in a form, or the text as typed (the store's checks refuse it
    with its message): ``"²"`` passes ``isdigit`` but is no number; 18 digits at most."""
    if text.isascii() and text.isdigit() and len(text) <= 18:
        return int(text)
    return text


def _errors(exc: InvalidRecord) -> list[str]:
    return [f"{field}: {message}" if field else message for field, message in exc.errors]


def _day(at: float) -> int:
    return int(at // 86400 * 86400)


def _number(value: Any) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "unlimited"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _when(value: Any) -> str:
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return str(value) if value else "—"


def _stamp(value: Any) -> str:
    """An ISO 8601 time, as a person reads it: ``2026-12-02 06:56`` (UTC)."""
    try:
        at = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return str(value)
    return at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M")


def _cell(plan: Any, feature: str) -> str:
    """What ``plan`` grants of ``feature``, in words, for the pricing table."""
    if feature in plan.meters:
        grant = plan.meters[feature]
        if grant.unlimited:
            return "unlimited"
        parts = []
        for limit in grant.limits:
            per = f"per {limit.period}" if limit.period else f"per {_window(limit.window)}"
            shadow = " (shadow)" if limit.shadow else ""
            parts.append(f"{_number(limit.limit)} {per}{shadow}")
        if grant.overage:
            parts.append(f"then {grant.rate:g} {grant.overage} each")
        return ", ".join(parts)
    if feature in plan.credits:
        grant = plan.credits[feature]
        return f"{_number(grant.grant)} a {grant.period}" if grant.grant else "pay as you go"
    if feature in plan.values:
        value = plan.values[feature]
        return "✓" if value is True else _number(value)
    return "—"


def _window(seconds: float | None) -> str:
    if not seconds:
        return "window"
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds % size == 0:
            count = int(seconds // size)
            return unit if count == 1 else f"{count} {unit}s"
    return f"{seconds:g} s"


def _chart(bars: list[tuple[int, int]], span: str) -> dict[str, Any]:
    """An SVG bar chart's geometry: one bar per hour or day, scaled to the highest."""
    width, height, gap = 480, 120, 2
    top = max((units for _, units in bars), default=0)
    step = width / max(len(bars), 1)
    shapes = []
    for i, (at, units) in enumerate(bars):
        h = 0 if top == 0 else max(1, round(units / top * (height - 20)))
        label = datetime.fromtimestamp(at, timezone.utc).strftime(
            "%H:00" if span == "24h" else "%a %d"
        )
        shapes.append(
            {
                "x": round(i * step + gap / 2, 1),
                "y": height - h,
                "w": round(step - gap, 1),
                "h": h,
                "units": units,
                "label": label,
            }
        )
    return {
        "width": width,
        "height": height,
        "bars": shapes,
        "top": top,
        "total": sum(u for _, u in bars),
    }
