"""Zuora's callout notifications: HTTP Basic authentication or Zuora's HMAC option (the
template signs its body), then the callout template's body read into what it changes for
one customer.

The callout template (docs/billing.md) makes Zuora send exactly::

    {"eventId": "...", "eventType": "SubscriptionCreated|SubscriptionAmended|
     SubscriptionCancelled", "eventTime": "<ISO 8601>", "accountNumber": "...",
     "CrmId": "...", "subscriptionNumber": "...", "status": "Active", "ratePlanIds": [...]}

Each rate plan id is mapped through ``billing.zuora.rate_plans`` to a plan, an add-on (one
each) or credits (granted once per subscription and rate plan). ``Active`` gives them; any
other status, and a cancelled subscription, do not. Zuora does not deliver callouts in order:
``eventTime`` orders them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from ..config._models import ZuoraConfig
from ..engine import Subscription
from ._events import Change, Rejected, dotted, plausible

EVENT_TYPES = frozenset({"SubscriptionCreated", "SubscriptionAmended", "SubscriptionCancelled"})
FIELDS = (
    "eventId",
    "eventType",
    "eventTime",
    "accountNumber",
    "CrmId",
    "subscriptionNumber",
    "status",
    "ratePlanIds",
)
LIVE = frozenset({"Active"})
REALM = "plangate-webhooks"


def authorized(header: str | None, config: ZuoraConfig) -> bool:
    """Whether ``header`` (``Authorization``) is HTTP Basic with the configured user and
    password (each compared in constant time)."""
    scheme, _, encoded = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, sep, password = base64.b64decode(encoded.strip(), validate=True).partition(b":")
    except (binascii.Error, ValueError):
        return False
    expected_user = (config.username or "").encode()
    expected_password = (config.password or "").encode()
    user_ok = hmac.compare_digest(user, expected_user)
    password_ok = hmac.compare_digest(password, expected_password)
    return bool(sep) and user_ok and password_ok


def signed(body: bytes, header: str | None, config: ZuoraConfig) -> bool:
    """Whether ``header`` is the HMAC-SHA256 of the raw ``body`` with ``hmac_secret``, in
    base64 or hex (compared in constant time). The callout template signs its own body:
    docs/billing.md."""
    if not config.hmac_secret or not header:
        return False
    digest = hmac.new(config.hmac_secret.encode(), body, hashlib.sha256).digest()
    given = header.strip().encode()
    return hmac.compare_digest(given, base64.b64encode(digest)) or hmac.compare_digest(
        given.lower(), digest.hex().encode()
    )


def callout(body: Any, now: float) -> dict[str, Any]:
    """The callout's fields, checked (``now``: this machine's time, which ``eventTime`` may
    not be far ahead of); ``Rejected`` naming what is wrong."""
    if not isinstance(body, Mapping):
        raise Rejected("malformed-request", "a Zuora callout body is a JSON object")
    missing = [name for name in FIELDS if name not in body]
    if missing:
        raise Rejected("malformed-request", f"the callout lacks {', '.join(missing)}")
    for name in FIELDS[:-1]:
        if not isinstance(body[name], str):
            raise Rejected("malformed-request", f"{name}: a string, not {body[name]!r}")
    for name in ("eventId", "subscriptionNumber"):
        if not body[name].strip():
            raise Rejected("malformed-request", f"{name}: empty")
    plans = body["ratePlanIds"]
    if not isinstance(plans, list) or not all(isinstance(p, str) for p in plans):
        raise Rejected("malformed-request", "ratePlanIds: a list of rate plan ids")
    if body["eventType"] not in EVENT_TYPES:
        raise Rejected("malformed-request", f"eventType: one of {', '.join(sorted(EVENT_TYPES))}")
    try:
        at = datetime.fromisoformat(body["eventTime"].replace("Z", "+00:00"))
    except ValueError:
        raise Rejected("malformed-request", "eventTime: an ISO 8601 time") from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    try:
        when = at.timestamp()
    except (OverflowError, ValueError):
        when = -1.0
    if not plausible(when, now):
        raise Rejected("malformed-request", f"eventTime: {body['eventTime']} is not a time of now")
    return {**body, "eventTime": when}


def read(body: Mapping[str, Any], config: ZuoraConfig) -> Change:
    """What the checked callout ``body`` changes."""
    status = body["status"]
    if body["eventType"] == "SubscriptionCancelled":
        status = "Cancelled"
    plan: str | None = None
    addons: dict[str, int] = {}
    grants: list[tuple[str, int, str]] = []
    unmapped: list[str] = []
    for rate_plan in body["ratePlanIds"]:
        target = config.rate_plans.get(rate_plan)
        if isinstance(target, str):
            plan = plan or target
        elif isinstance(target, Mapping) and "addon" in target:
            addons[target["addon"]] = addons.get(target["addon"], 0) + 1
        elif isinstance(target, Mapping) and "credits" in target:
            if status in LIVE:
                key = f"zuora:{body['subscriptionNumber']}:{rate_plan}"
                grants.append((target["credits"], target["amount"], key))
        else:
            unmapped.append(rate_plan)
    subscription = Subscription(
        "zuora",
        body["subscriptionNumber"],
        status,
        live=status in LIVE,
        plan=plan,
        addons=addons,
        account=body["accountNumber"],
        event_at=body["eventTime"],
        event_id=body["eventId"],
    )
    customer = dotted(body, config.customer_from)
    return Change(
        body["eventId"],
        body["eventType"],
        customer,
        "zuora",
        subscription,
        grants=tuple(grants),
        unmapped=tuple(unmapped),
    )
