"""Stripe's webhooks: the signature checked by Stripe's own package on the raw body, then the
event read into what it changes for one customer.

Events read (API version ``2026-10-28.endive``, the one ``stripe`` 16 pins; older shapes of
invoice lines are read too):

- ``customer.subscription.created|updated|deleted``: the subscription's items, each price
  mapped by id or ``lookup_key`` through ``billing.stripe.prices`` to a plan or an add-on
  (the item's ``quantity`` is the add-on's). ``active``, ``trialing`` and ``past_due`` give
  them; ``canceled``, ``unpaid``, ``incomplete``, ``incomplete_expired``, ``paused`` and a
  deleted subscription do not.
- ``invoice.paid``: each line whose price maps to ``{credits: FEATURE, amount: N}`` grants
  N times its quantity, once (the invoice and line ids are the grant's idempotency key):
  one-off top-ups and credit packs renewed with a subscription alike.
- ``checkout.session.completed`` (and ``.async_payment_succeeded``) of a paid session in
  ``payment`` mode that made no invoice: its line items, read from Stripe's API with the
  official client (``billing.stripe.api_key``), grant the same way, once per session and
  line item.

The customer is ``billing.stripe.customer_from``, a dotted path into the subscription (for an
invoice: into the invoice, else the subscription details Stripe copies into it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..config._models import StripeConfig
from ..engine import Subscription
from ..gateway._bodies import BadRequest, load_json
from ._events import Change, ProviderRefused, ProviderUnavailable, Rejected, dotted, plausible

logger = logging.getLogger("plangate.billing")

#: seconds a signature's timestamp may be old (Stripe's default)
TOLERANCE = 300
LIVE = frozenset({"active", "trialing", "past_due"})
SUBSCRIPTION_EVENTS = frozenset(
    {
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
    }
)
PURCHASE_EVENTS = frozenset({"invoice.paid"})
CHECKOUT_EVENTS = frozenset(
    {"checkout.session.completed", "checkout.session.async_payment_succeeded"}
)
#: a Checkout session's line items read a page at a time
LINE_ITEMS_PAGE = 100
#: seconds a call to Stripe's API may take (a webhook waits for it)
API_TIMEOUT = 10


def verified_event(body: bytes, header: str | None, secret: str, now: float) -> dict[str, Any]:
    """The event in ``body`` once ``header`` (``Stripe-Signature``) is found to sign it with
    ``secret`` within ``TOLERANCE`` seconds; any ``v1`` signature of the header may match
    (Stripe sends two while a secret is rolled). ``Rejected`` otherwise."""
    try:
        import stripe
    except ImportError:  # pragma: no cover - the billing extra is part of dev
        raise RuntimeError(
            "Stripe webhooks need the stripe package: pip install 'plangate[billing]'"
        ) from None
    if not header:
        raise Rejected("bad-signature", "the Stripe-Signature header is missing")
    if not header.isascii():  # Stripe's compare takes ASCII only
        raise Rejected("bad-signature", "Stripe-Signature is not ASCII")
    try:
        stripe.WebhookSignature.verify_header(body, header, secret, TOLERANCE)
    except stripe.SignatureVerificationError as exc:
        raise Rejected(
            "bad-signature", f"Stripe-Signature does not sign this body: {exc.args[0]}"
        ) from None
    except (ValueError, TypeError):  # a body that is not UTF-8, a malformed header
        raise Rejected("bad-signature", "Stripe-Signature does not sign this body") from None
    try:  # verified: now parsed, its depth bounded
        data = load_json(body)
    except BadRequest:
        data = None
    obj = data.get("data") if isinstance(data, dict) else None
    obj = obj.get("object") if isinstance(obj, dict) else None
    if not (
        isinstance(data, dict)
        and isinstance(data.get("id"), str)
        and data["id"]
        and isinstance(data.get("type"), str)
        and isinstance(data.get("created"), int)
        and not isinstance(data.get("created"), bool)
        and isinstance(obj, dict)
    ):
        raise Rejected("malformed-request", "a Stripe event has id, type, created and data.object")
    if not plausible(data["created"], now):
        raise Rejected("malformed-request", f"created: {data['created']} is not a time of now")
    if data["type"] in SUBSCRIPTION_EVENTS and not (isinstance(obj.get("id"), str) and obj["id"]):
        raise Rejected("malformed-request", "a subscription event's object has an id")
    return data


def read(event: Mapping[str, Any], config: StripeConfig) -> Change:
    """What ``event`` (verified) changes."""
    kind: str = event["type"]
    obj: Mapping[str, Any] = event["data"]["object"]
    if kind in SUBSCRIPTION_EVENTS:
        return _subscription(event, obj, config)
    if kind in PURCHASE_EVENTS:
        return _invoice(event, obj, config)
    if kind in CHECKOUT_EVENTS and obj.get("mode") == "payment" and not obj.get("invoice"):
        # (a session that made an invoice is granted by its invoice.paid)
        if obj.get("payment_status") not in ("paid", "no_payment_required"):
            return Change(event["id"], kind, None)  # paid later: async_payment_succeeded
        customer = dotted(obj, config.customer_from)
        return Change(event["id"], kind, customer, session=str(obj.get("id", "")))
    return Change(event["id"], kind, None)


def api_client(config: StripeConfig, *, retries: int) -> Any:
    """The official client, on ``billing.stripe.api_key`` and ``api_base``; ``retries``:
    how often it tries a call again after a network error by itself."""
    import stripe

    return stripe.StripeClient(
        str(config.api_key),
        base_addresses={"api": config.api_base},
        max_network_retries=retries,
        http_client=stripe.new_default_http_client(timeout=API_TIMEOUT),
    )


def api_grants(change: Change, config: StripeConfig) -> Change:
    """``change`` with what it left to read from Stripe's API, with the official client
    (blocking): its Checkout session's line items (not in its events), or its invoice's
    lines past those its event carries. ``ProviderUnavailable`` when Stripe cannot be asked,
    ``ProviderRefused`` when it will not answer this."""
    import stripe

    client = api_client(config, retries=1)
    grants: list[tuple[str, int, str]] = list(change.grants)
    unmapped: list[str] = list(change.unmapped)
    try:
        if change.more_lines is not None:
            invoice, after = change.more_lines
            params = {"limit": LINE_ITEMS_PAGE, "starting_after": after}
            listing = client.v1.invoices.line_items.list(invoice, params=params)
            for item in listing.auto_paging_iter():
                _invoice_line(item.to_dict(), invoice, config, grants, unmapped)
            return replace(change, grants=tuple(grants), unmapped=tuple(unmapped), more_lines=None)
        page = client.v1.checkout.sessions.line_items.list(
            str(change.session), params={"limit": LINE_ITEMS_PAGE}
        )
        for item in page.auto_paging_iter():
            line = item.to_dict()
            price = line.get("price")
            price = price if isinstance(price, Mapping) else {}
            target, name = _target(config.prices, price.get("id"), price.get("lookup_key"))
            if target is None:
                unmapped.append(name)
            elif isinstance(target, Mapping) and "credits" in target:
                quantity = _quantity(line)
                key = f"stripe:{change.session}:{line.get('id', name)}"
                if quantity > 0:
                    grants.append((target["credits"], target["amount"] * quantity, key))
    except (stripe.APIConnectionError, stripe.RateLimitError) as exc:
        raise ProviderUnavailable(f"Stripe's API: {exc.user_message or exc}") from None
    except stripe.StripeError as exc:
        if (exc.http_status or 500) >= 500:
            raise ProviderUnavailable(f"Stripe's API: {exc.user_message or exc}") from None
        raise ProviderRefused(f"Stripe's API: {exc.user_message or exc}") from None
    return replace(change, grants=tuple(grants), unmapped=tuple(unmapped), session=None)


def _subscription(event: Mapping[str, Any], obj: Mapping[str, Any], config: StripeConfig) -> Change:
    status = str(obj.get("status", ""))
    if event["type"] == "customer.subscription.deleted":
        status = "canceled"
    plan: str | None = None
    addons: dict[str, int] = {}
    unmapped: list[str] = []
    for item in _data(obj.get("items")):
        price = item.get("price")
        price = price if isinstance(price, Mapping) else {}
        target, name = _target(config.prices, price.get("id"), price.get("lookup_key"))
        quantity = _quantity(item)
        if isinstance(target, str):
            plan = plan or target
        elif isinstance(target, Mapping) and "addon" in target and quantity > 0:
            addons[target["addon"]] = addons.get(target["addon"], 0) + quantity
        elif target is None:
            unmapped.append(name)
        # a credits price on a subscription grants with each paid invoice (invoice.paid)
    subscription = Subscription(
        "stripe",
        str(obj.get("id", "")),
        status,
        live=status in LIVE,
        plan=plan,
        addons=addons,
        account=_id(obj.get("customer")),
        event_at=float(event["created"]),
        event_id=event["id"],
    )
    customer = dotted(obj, config.customer_from)
    return Change(
        event["id"], event["type"], customer, subscription=subscription, unmapped=tuple(unmapped)
    )


def _invoice(event: Mapping[str, Any], obj: Mapping[str, Any], config: StripeConfig) -> Change:
    details = obj.get("parent", {}) or {}
    details = details.get("subscription_details") if isinstance(details, Mapping) else None
    customer = dotted(obj, config.customer_from) or dotted(
        details or obj.get("subscription_details") or {}, config.customer_from
    )
    grants: list[tuple[str, int, str]] = []
    unmapped: list[str] = []
    lines = obj.get("lines")
    invoice = str(obj.get("id", event["id"]))
    data = _data(lines)
    for line in data:
        _invoice_line(line, invoice, config, grants, unmapped)
    more = None
    if isinstance(lines, Mapping) and lines.get("has_more") and data:
        more = (invoice, str(data[-1].get("id", "")))  # the rest is read from Stripe's API
    return Change(
        event["id"],
        event["type"],
        customer,
        grants=tuple(grants),
        unmapped=tuple(unmapped),
        more_lines=more,
    )


def _invoice_line(
    line: Mapping[str, Any],
    invoice: str,
    config: StripeConfig,
    grants: list[tuple[str, int, str]],
    unmapped: list[str],
) -> None:
    """What one invoice line grants (into ``grants``), or that its price is unmapped."""
    price_id, lookup_key = _line_price(line)
    target, name = _target(config.prices, price_id, lookup_key)
    if target is None:
        unmapped.append(name)
    elif isinstance(target, Mapping) and "credits" in target:
        if _proration(line):
            return  # a credit for unused time, or time added mid-period: not a pack
        quantity = _quantity(line)
        key = f"stripe:{invoice}:{line.get('id', price_id)}"
        if quantity > 0:
            grants.append((target["credits"], target["amount"] * quantity, key))


def _quantity(item: Mapping[str, Any]) -> int:
    """An item's or a line's quantity: 1 when it has none (0 is a quantity: nothing)."""
    quantity = item.get("quantity")
    if quantity is None:
        return 1
    return quantity if isinstance(quantity, int) and not isinstance(quantity, bool) else 0


def _proration(line: Mapping[str, Any]) -> bool:
    """Whether an invoice line is a proration (of any API version), or credits an amount."""
    amount = line.get("amount")
    if isinstance(amount, int) and amount <= 0:
        return True
    if line.get("proration") is True:  # before 2025-03-31
        return True
    parent = line.get("parent")
    if isinstance(parent, Mapping):
        for details in parent.values():
            if isinstance(details, Mapping) and details.get("proration") is True:
                return True
    return False


def _line_price(line: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """An invoice line's price id and lookup key: ``pricing.price_details.price`` (API
    2025-03-31 on), else ``price`` (before)."""
    pricing = line.get("pricing")
    if isinstance(pricing, Mapping) and isinstance(pricing.get("price_details"), Mapping):
        price = pricing["price_details"].get("price")
        if isinstance(price, Mapping):
            return price.get("id"), price.get("lookup_key")
        return (price if isinstance(price, str) else None), None
    price = line.get("price")
    if isinstance(price, Mapping):
        return price.get("id"), price.get("lookup_key")
    return None, None


def _target(prices: Mapping[str, Any], price_id: Any, lookup_key: Any) -> tuple[Any, str]:
    """What ``billing.stripe.prices`` maps a price to (by id, else lookup key), and its name."""
    for key in (price_id, lookup_key):
        if isinstance(key, str) and key in prices:
            return prices[key], key
    return None, str(price_id or lookup_key or "(a price without id)")


def _data(listing: Any) -> list[Mapping[str, Any]]:
    """The ``data`` of a Stripe list object (its first page, as events carry it)."""
    if isinstance(listing, Mapping) and isinstance(listing.get("data"), list):
        return [item for item in listing["data"] if isinstance(item, Mapping)]
    return []


def _id(value: Any) -> str:
    """An id, whether the field holds it or the object it names (expanded)."""
    if isinstance(value, Mapping):
        value = value.get("id")
    return value if isinstance(value, str) else ""
