"""Billing webhooks as an ASGI app (``/stripe``, ``/zuora``), and the flow that applies what an event
changes to the customer's record and credits.

Answers (SPEC §7): 200 once the change is stored, or recognised as a duplicate, outdated,
about nobody plangate knows of, or about prices the config does not map (logged; a provider
must not retry those for days); 400 for a bad signature or body; 401 for a Zuora callout without its credentials; 404 while the provider is
not configured; 413 past ``MAX_BODY``; 503 only when the store cannot be reached, so that the
provider retries.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .._gate import AsyncGate
from ..admin._app import problem_handlers
from ..admin._problems import AdminError
from ..config._models import BillingConfig
from ..customers import IdempotencyConflict, InvalidRecord
from ..customers._credits import Credits
from ..customers._provisioning import PATCH_ATTEMPTS, ReadCustomer, WriteContention, WriteCustomer
from ..engine import Backend, Flow, Op, Subscription
from ..errors import StorageError, VersionConflict
from ..gateway._bodies import load_json, read_body
from . import _stripe, _zuora
from ._events import Change, ProviderRefused, ProviderUnavailable, Rejected
from ._subscriptions import APPLIED, DUPLICATE, apply

logger = logging.getLogger("plangate.billing")

#: bytes of a webhook body read at most (Stripe's events are a few KB)
MAX_BODY = 1024 * 1024


@dataclass(frozen=True, slots=True)
class CountUnmapped(Op[None]):
    provider: str
    names: tuple[str, ...]

    def run(self, backend: Backend) -> None:
        backend.count_unmapped(self.provider, self.names)

    async def arun(self, backend: Backend) -> None:
        await backend.acount_unmapped(self.provider, self.names)


class Billing:
    """Billing's flows for one gate: an event's change applied to the store."""

    def __init__(self, precedence: Sequence[str], credits: Credits) -> None:
        self.precedence = precedence
        self.credits = credits

    def apply(self, change: Change) -> Flow[dict[str, Any]]:
        """Store what ``change`` changes; what was done, as the webhook answers it."""
        answer: dict[str, Any] = {
            "received": True,
            "event": change.event,
            "type": change.kind,
            "customer": change.customer,
        }
        if change.unmapped:
            logger.warning(
                "billing: event %s (%s): not mapped by the config: %s",
                change.event,
                change.kind,
                ", ".join(change.unmapped),
            )
            answer["unmapped"] = list(change.unmapped)
            try:  # counted for the admin API; a count lost to an outage is only a count
                yield CountUnmapped(change.provider, change.unmapped)
            except StorageError as exc:
                logger.warning("billing: unmapped prices not counted: %s", exc)
        if change.subscription is None and not change.grants and change.session is None:
            answer["outcome"] = "ignored"
            return answer
        if change.customer is None:
            logger.warning(
                "billing: event %s (%s) names no customer at customer_from: ignored",
                change.event,
                change.kind,
            )
            answer["outcome"] = "no-customer"
            return answer
        outcomes: list[str] = []
        if change.subscription is not None:
            done = yield from self._subscription(change.customer, change.subscription)
            answer["subscription"] = done
            outcomes.append(done)
        granted: list[str] = []
        for feature, amount, key in change.grants:
            body = {"feature": feature, "amount": amount}
            try:
                created, _ = yield from self.credits.grant(
                    change.customer, body, idempotency_key=key, source="billing"
                )
            except InvalidRecord as exc:  # the mapping asks for what no grant can be
                logger.error("billing: event %s: grant %s refused: %s", change.event, body, exc)
                granted.append("refused")
                continue
            except IdempotencyConflict:  # granted before, when the config said another amount
                logger.warning(
                    "billing: event %s: %s was granted before with another amount: kept",
                    change.event,
                    key,
                )
                granted.append(DUPLICATE)
                continue
            granted.append(APPLIED if created else DUPLICATE)
        if granted:
            answer["grants"] = granted
        outcomes += granted
        answer["outcome"] = APPLIED if APPLIED in outcomes else outcomes[0]
        return answer

    def _subscription(self, customer: str, change: Subscription) -> Flow[str]:
        """Apply ``change`` to the record, compared and set (a write between the read and
        the write is read again)."""
        for _attempt in range(PATCH_ATTEMPTS):
            current = yield ReadCustomer(customer)
            changed = apply(current, customer, change, self.precedence)
            if isinstance(changed, str):
                return changed
            try:
                yield WriteCustomer(changed, current.version if current is not None else 0)
            except VersionConflict:
                continue
            logger.info(
                "billing: customer %r: %s subscription %s %s (plan %s)",
                customer,
                change.provider,
                change.id,
                change.status,
                changed.plan,
            )
            return APPLIED
        raise WriteContention(customer, PATCH_ATTEMPTS)


class Webhooks:
    """Billing providers' webhooks as an ASGI app: ``POST /stripe`` and ``POST /zuora``.
    Mount it at
    ``/webhooks`` (``plangate gateway`` does). Its requests carry no admin token: each
    provider's own signature authenticates them."""

    def __init__(self, gate: AsyncGate, *, max_body: int = MAX_BODY) -> None:
        self.gate = gate
        self.max_body = max_body
        self.clock = gate.clock
        self.app = Starlette(
            routes=[
                Route("/stripe", self.stripe, methods=["POST"]),
                Route("/zuora", self.zuora, methods=["POST"]),
            ],
            exception_handlers=problem_handlers(),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)

    # each event reads the config serving once: a reload changes secrets and mappings

    def _section(self) -> BillingConfig | None:
        return self.gate.loaded.config.model.billing

    async def zuora(self, request: Request) -> Response:
        section = self._section()
        config = section.zuora if section is not None else None
        basic = config is not None and bool(config.username and config.password)
        if config is None or not (basic or config.hmac_secret):
            raise AdminError(
                "not-found",
                "billing.zuora's username and password (or its hmac_secret) are not set",
            )
        authorized = basic and _zuora.authorized(request.headers.get("authorization"), config)
        raw = await read_body(request, self.max_body)
        if not authorized and not _zuora.signed(
            raw, request.headers.get(config.hmac_header), config
        ):
            # Zuora's non-preemptive mode sends the credentials after this challenge
            raise AdminError(
                "webhook-unauthorized",
                "a Zuora callout authenticates with billing.zuora's username and password"
                f" or signs its body ({config.hmac_header})",
                headers={"www-authenticate": f'Basic realm="{_zuora.REALM}"'} if basic else None,
            )
        try:
            body = load_json(raw)
            checked = _zuora.callout(body, self.clock())
        except Rejected as exc:
            logger.warning("billing: a Zuora callout refused: %s", exc.detail)
            raise AdminError(exc.problem, exc.detail) from None
        return await self._apply(_zuora.read(checked, config), section)

    async def stripe(self, request: Request) -> Response:
        section = self._section()
        config = section.stripe if section is not None else None
        if config is None or not config.webhook_secret:
            raise AdminError("not-found", "billing.stripe.webhook_secret is not configured")
        body = await read_body(request, self.max_body)
        try:
            event = _stripe.verified_event(
                body, request.headers.get("stripe-signature"), config.webhook_secret, self.clock()
            )
        except Rejected as exc:
            logger.warning("billing: a Stripe webhook refused: %s", exc.detail)
            raise AdminError(exc.problem, exc.detail) from None
        change = _stripe.read(event, config)
        if change.more_lines is not None and change.customer is not None and not config.api_key:
            logger.error(
                "billing: event %s: invoice %s has more lines than its event carries; only "
                "those were read (billing.stripe.api_key is not set)",
                change.event,
                change.more_lines[0],
            )
            change = replace(change, more_lines=None)
        if (change.session or change.more_lines) and change.customer is not None:
            if not config.api_key:
                logger.error(
                    "billing: event %s: Checkout session %s not read: billing.stripe.api_key "
                    "is not set",
                    change.event,
                    change.session,
                )
                return _answer(change, "not-read")
            try:
                change = await asyncio.to_thread(_stripe.api_grants, change, config)
            except ProviderUnavailable as exc:  # for now: Stripe sends the event again
                logger.error("billing: event %s: %s", change.event, exc)
                raise AdminError("billing-provider-unavailable", str(exc)) from None
            except ProviderRefused as exc:  # for good: retrying cannot help
                logger.error("billing: event %s: %s", change.event, exc)
                if change.more_lines is None:
                    return _answer(change, "not-read")
                change = replace(change, more_lines=None)  # what its event carries stands
        return await self._apply(change, section)

    async def _apply(self, change: Change, section: BillingConfig | None) -> Response:
        precedence = list(section.precedence) if section is not None else []
        billing = Billing(precedence, self.gate.customers._credits())
        answer = await self.gate.customers._run(billing.apply(change))
        return JSONResponse(answer, headers={"cache-control": "no-store"})


def _answer(change: Change, outcome: str) -> Response:
    """What an event that changes nothing is answered."""
    body = {"received": True, "event": change.event, "type": change.kind}
    return JSONResponse(
        {**body, "customer": change.customer, "outcome": outcome},
        headers={"cache-control": "no-store"},
    )
