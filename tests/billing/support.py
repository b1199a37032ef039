"""What the billing tests share: the admin tests' config with a credits feature and a
``billing:`` section, Stripe events from the recorded fixtures, signed with the official
``stripe`` package, and a client of the webhooks and the admin API on one gate."""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import stripe
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from plangate import AsyncGate, MemoryStorage
from plangate.admin import AdminAPI
from plangate.billing import Webhooks
from plangate.storage import Storage
from tests.admin.support import AUTH, START, admin_config
from tests.support import Clock

FIXTURES = Path(__file__).parent / "fixtures"
SECRET = "whsec_test_7f3a9c1e5b2d4f6a8c0e1b3d5f7a9c1e"
PROBLEM = "application/problem+json"
ZUORA_USER, ZUORA_PASSWORD = "zuora-callouts", "a-callout-password-from-the-environment"
ZUORA_AUTH = (ZUORA_USER, ZUORA_PASSWORD)  # HTTP Basic


def billing_config(**changes: Any) -> dict[str, Any]:
    """The admin tests' plans and add-ons, ``ai_credits`` (pay-as-you-go on every plan) and
    Stripe's prices mapped to a plan, a legacy plan, an add-on and a credit pack."""
    config = admin_config(**changes)
    config["features"]["ai_credits"] = {"kind": "credits", "unit": "credit"}
    for plan in config["plans"].values():
        plan["features"]["ai_credits"] = {"grant": 0, "period": "month"}
    config.setdefault(
        "billing",
        {
            "precedence": ["stripe", "zuora"],
            "stripe": {
                "webhook_secret": SECRET,
                "customer_from": "metadata.org_id",
                "prices": {
                    "price_pro_monthly": "pro",
                    "pro_2023_yearly": "pro-2023",  # a lookup key
                    "price_token_pack": {"addon": "token_pack"},
                    "price_credits_1000": {"credits": "ai_credits", "amount": 1000},
                },
            },
            "zuora": {
                "username": ZUORA_USER,
                "password": ZUORA_PASSWORD,
                "customer_from": "CrmId",
                "rate_plans": {
                    "8a8aa0b28d1e4c2e018d1f0a1b2c0001": "pro-2023",
                    "8a8aa0b28d1e4c2e018d1f0a1b2c0002": {"addon": "token_pack"},
                    "8a8aa0b28d1e4c2e018d1f0a1b2c0003": {"credits": "ai_credits", "amount": 500},
                },
            },
        },
    )
    return config


def event(
    name: str,
    *,
    id: str | None = None,
    type: str | None = None,
    created: int | None = None,
    **changes: Any,
) -> dict[str, Any]:
    """The recorded event ``fixtures/stripe/<name>.json``, its id, type and creation time
    replaced as given, and members of its object (``data.object``) replaced by ``changes``."""
    body = json.loads((FIXTURES / "stripe" / f"{name}.json").read_text())
    body = copy.deepcopy(body)
    if id is not None:
        body["id"] = id
    if type is not None:
        body["type"] = type
    if created is not None:
        body["created"] = created
    body["data"]["object"].update(changes)
    return body


def items(*prices: tuple[str, int]) -> dict[str, Any]:
    """A subscription's ``items`` list with each (price id, quantity)."""
    template = event("customer.subscription.created")["data"]["object"]["items"]
    item = template["data"][0]
    data = []
    for n, (price, quantity) in enumerate(prices):
        each = copy.deepcopy(item)
        each["id"] = f"si_item{n}"
        each["price"]["id"] = price
        each["price"]["lookup_key"] = None
        each["quantity"] = quantity
        data.append(each)
    return {**template, "data": data, "total_count": len(data)}


def signed(
    body: dict[str, Any] | str, *, secret: str = SECRET, at: int | None = None
) -> tuple[bytes, str]:
    """The body as sent, and its ``Stripe-Signature`` (Stripe's own helper computes it)."""
    text = body if isinstance(body, str) else json.dumps(body)
    header = stripe.WebhookSignature.generate_signature_header(
        text, secret, timestamp=int(time.time()) if at is None else at
    )
    return text.encode(), header


def post(client: TestClient, body: dict[str, Any], **sign: Any) -> Any:
    content, header = signed(body, **sign)
    return client.post(
        "/webhooks/stripe",
        content=content,
        headers={"stripe-signature": header, "content-type": "application/json"},
    )


@contextlib.contextmanager
def webhooks(
    storage: Storage | None = None, *, config: dict[str, Any] | None = None
) -> Iterator[tuple[TestClient, AsyncGate]]:
    """A client of ``/webhooks`` and ``/admin`` on one gate (the admin token in its
    headers: the webhooks ignore it), and the gate."""
    gate = AsyncGate(
        config or billing_config(), storage=storage or MemoryStorage(), clock=Clock(START)
    )
    app = Starlette(
        routes=[Mount("/admin", app=AdminAPI(gate)), Mount("/webhooks", app=Webhooks(gate))]
    )
    with TestClient(app, headers=AUTH) as client:
        try:
            yield client, gate
        finally:  # the store's connections of the client's event loop, closed on it
            assert client.portal is not None
            client.portal.call(gate.storage.aclose)


def callout(**changes: Any) -> dict[str, Any]:
    """The callout template's body as Zuora fills it in (fixtures/zuora), with ``changes``."""
    body = json.loads((FIXTURES / "zuora" / "SubscriptionCreated.json").read_text())
    return {**body, **changes}


def send_callout(client: TestClient, body: Any, *, auth: Any = None) -> Any:
    return client.post("/webhooks/zuora", json=body, auth=auth or ZUORA_AUTH)


def credits_of(client: TestClient, customer: str = "acme") -> dict[str, Any]:
    """The customer's ``ai_credits`` balance as the admin API shows it."""
    answer = client.get(f"/admin/customers/{customer}/credits").json()
    return dict(answer["credits"]["ai_credits"])
