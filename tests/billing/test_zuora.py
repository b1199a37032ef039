"""Zuora's callout notifications (the documented callout template's body), and a customer
moving from Zuora to Stripe with both providers live at once."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from plangate import MemoryStorage
from plangate.asgi import ENTITLEMENTS_PATH, PlanGateMiddleware
from plangate.storage import Storage
from tests.billing.support import (
    PROBLEM,
    ZUORA_PASSWORD,
    billing_config,
    callout,
    credits_of,
    event,
    items,
    post,
    send_callout,
    webhooks,
)
from tests.support import bearer

LEGACY_PLAN = "8a8aa0b28d1e4c2e018d1f0a1b2c0001"  # billing.zuora.rate_plans: pro-2023
TOKEN_PACK = "8a8aa0b28d1e4c2e018d1f0a1b2c0002"
CREDIT_PACK = "8a8aa0b28d1e4c2e018d1f0a1b2c0003"


def test_a_callout_puts_the_customer_on_its_rate_plans_plan(storage: Storage) -> None:
    with webhooks(storage) as (client, _):
        answer = send_callout(client, callout(ratePlanIds=[LEGACY_PLAN, TOKEN_PACK]))
        record = client.get("/admin/customers/acme").json()
    assert answer.status_code == 200
    assert answer.json()["outcome"] == "applied"
    assert record["plan"] == "pro-2023"  # a legacy plan, as billing may give
    assert record["addons"] == {"token_pack": 1}
    (subscription,) = record["subscriptions"]
    assert (subscription["provider"], subscription["id"]) == ("zuora", "A-S00000101")
    assert subscription["account"] == "A00000042"


def test_a_credit_rate_plan_grants_once_per_subscription() -> None:
    with webhooks() as (client, _):
        send_callout(client, callout(ratePlanIds=[LEGACY_PLAN, CREDIT_PACK]))
        amended = callout(
            eventId="e2",
            eventType="SubscriptionAmended",
            eventTime="2027-01-11T00:00:00Z",
            ratePlanIds=[LEGACY_PLAN, CREDIT_PACK],
        )
        send_callout(client, amended)
        credits = credits_of(client)
    assert credits["balance"] == 500


def test_callouts_out_of_order_never_roll_the_subscription_back() -> None:
    cancelled = callout(
        eventId="e2",
        eventType="SubscriptionCancelled",
        eventTime="2027-01-12T00:00:00Z",
        status="Cancelled",
    )
    with webhooks() as (client, _):
        send_callout(client, cancelled)
        late = send_callout(client, callout())  # created, delivered after the cancellation
        again = send_callout(client, cancelled)
        record = client.get("/admin/customers/acme").json()
    assert late.json()["outcome"] == "outdated"
    assert again.json()["outcome"] == "duplicate"
    assert record["plan"] is None
    assert record["subscriptions"][0]["status"] == "Cancelled"


def test_without_credentials_zuora_is_challenged_and_with_wrong_ones_refused() -> None:
    with webhooks() as (client, _):
        bare = client.post("/webhooks/zuora", json=callout())  # non-preemptive: no header
        wrong = send_callout(client, callout(), auth=("zuora-callouts", "guess"))
        someone = send_callout(client, callout(), auth=("someone", ZUORA_PASSWORD))
        record = client.get("/admin/customers/acme")
    for answer in (bare, wrong, someone):
        assert answer.status_code == 401
        assert answer.headers["www-authenticate"] == 'Basic realm="plangate-webhooks"'
        assert answer.headers["content-type"] == PROBLEM
    assert record.status_code == 404


HMAC_SECRET = "a-zuora-hmac-key-from-the-environment"


def hmac_config(**zuora: object) -> dict[str, object]:
    """Zuora with its HMAC option only (no Basic credentials)."""
    config = billing_config()
    config["billing"]["zuora"] = {
        "customer_from": "CrmId",
        "hmac_secret": HMAC_SECRET,
        "rate_plans": {LEGACY_PLAN: "pro-2023"},
        **zuora,
    }
    return config


def signature(body: bytes, encoding: str = "base64") -> str:
    digest = hmac.new(HMAC_SECRET.encode(), body, hashlib.sha256).digest()
    return base64.b64encode(digest).decode() if encoding == "base64" else digest.hex()


@pytest.mark.parametrize("encoding", ["base64", "hex"])
def test_a_callout_signed_with_zuoras_hmac_option_is_taken(encoding: str) -> None:
    body = json.dumps(callout()).encode()
    with webhooks(config=hmac_config()) as (client, _):
        answer = client.post(
            "/webhooks/zuora",
            content=body,
            headers={"x-zuora-signature": signature(body, encoding)},
        )
        record = client.get("/admin/customers/acme").json()
    assert answer.status_code == 200
    assert record["plan"] == "pro-2023"


def test_a_callout_with_a_wrong_or_no_signature_is_refused() -> None:
    body = json.dumps(callout()).encode()
    altered = body.replace(b"A-S00000101", b"A-S00000999")
    with webhooks(config=hmac_config(hmac_header="X-Signature")) as (client, _):
        answers = [
            client.post("/webhooks/zuora", content=body),
            client.post(
                "/webhooks/zuora", content=altered, headers={"x-signature": signature(body)}
            ),
            client.post(
                "/webhooks/zuora", content=body, headers={"x-zuora-signature": signature(body)}
            ),
            client.post("/webhooks/zuora", content=body, headers={"x-signature": "bm9wZQ=="}),
        ]
        record = client.get("/admin/customers/acme")
    for answer in answers:
        assert answer.status_code == 401
        assert "www-authenticate" not in answer.headers  # no Basic to challenge for
        assert answer.headers["content-type"] == PROBLEM
    assert record.status_code == 404


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"eventId": "e1"}, "lacks"),
        (callout(eventType="AccountCreated"), "eventType"),
        (callout(eventTime="yesterday"), "eventTime"),
        (callout(ratePlanIds="8a8a"), "ratePlanIds"),
        (callout(eventId=""), "eventId"),
        (callout(subscriptionNumber=" "), "subscriptionNumber"),
        (callout(eventTime="0001-01-01T00:00:00+01:00"), "eventTime"),
        (callout(eventTime="2030-01-01T00:00:00Z"), "eventTime"),  # the gate's clock: 2027
        ([1, 2], "JSON object"),
    ],
)
def test_a_callout_that_is_not_the_template_is_a_400_naming_what_is_wrong(
    body: object, named: str
) -> None:
    with webhooks() as (client, _):
        answer = send_callout(client, body)
    assert answer.status_code == 400
    assert named in answer.json()["detail"]


def test_without_credentials_configured_the_endpoint_is_not_there() -> None:
    config = billing_config()
    config["billing"]["zuora"]["password"] = ""
    with webhooks(config=config) as (client, _):
        answer = send_callout(client, callout())
    assert answer.status_code == 404


def test_a_customer_moving_from_zuora_to_stripe_is_on_pro_throughout(storage: Storage) -> None:
    """Zuora's pro-2023 customer gets a Stripe pro subscription (Stripe comes first in
    billing.precedence), then the Zuora subscription is cancelled: the app's next request
    sees each step, and the customer is never without a pro plan."""
    stripe_pro = event(
        "customer.subscription.created", created=1800000500, items=items(("price_pro_monthly", 1))
    )
    zuora_cancelled = callout(
        eventId="e9",
        eventType="SubscriptionCancelled",
        eventTime="2027-01-15T07:59:00Z",  # the gate's clock reads 08:00
        status="Cancelled",
    )
    app = PlanGateMiddleware(Starlette(), billing_config(), storage=storage)
    seen: list[tuple[str, int]] = []
    with webhooks(storage) as (client, _), TestClient(app) as api:

        def then_the_app_sees(send: Callable[[], object]) -> None:
            heard = app.gate.customers.version("acme")
            send()
            if not isinstance(storage, MemoryStorage):  # read directly: nothing to hear
                # another process hears of a change through the store: awaited, not slept on
                assert app.gate.customers.wait_version("acme", heard + 1, 10)
            answer = api.get(ENTITLEMENTS_PATH, headers=bearer("acme")).json()
            (limit,) = answer["meters"]["api_calls"]["limits"]
            seen.append((answer["plan"], limit["limit"]))

        api.get(ENTITLEMENTS_PATH, headers=bearer("acme"))  # the app has read the customer
        then_the_app_sees(lambda: send_callout(client, callout()))  # Zuora's legacy plan
        # Stripe's subscription starts: Stripe comes first, its plan wins
        then_the_app_sees(lambda: post(client, stripe_pro))
        # the old subscription goes: nothing visible changes
        then_the_app_sees(lambda: send_callout(client, zuora_cancelled))
        record = client.get("/admin/customers/acme").json()
        assert api.portal is not None
        api.portal.call(app.gate.storage.aclose)
    assert seen == [("pro-2023", 5000), ("pro", 1000), ("pro", 1000)]
    assert sorted((s["provider"], s["live"]) for s in record["subscriptions"]) == [
        ("stripe", True),
        ("zuora", False),
    ]


def test_a_credit_rate_plan_grants_nothing_while_the_subscription_is_not_active() -> None:
    pending = callout(ratePlanIds=[CREDIT_PACK], status="Pending Activation")
    with webhooks() as (client, _):
        send_callout(client, pending)
        credits = credits_of(client)
    assert credits["balance"] == 0


def test_a_callout_time_without_a_zone_is_utc() -> None:
    cancelled = callout(
        eventId="e2",
        eventType="SubscriptionCancelled",
        eventTime="2027-01-10T09:30:00.001",  # a millisecond after the created one, in UTC
        status="Cancelled",
    )
    with webhooks() as (client, _):
        send_callout(client, callout())
        answer = send_callout(client, cancelled)
    assert answer.json()["outcome"] == "applied"
