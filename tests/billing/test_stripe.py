"""Stripe's webhooks, on memory, a real Redis and a real Redis Cluster: events shaped like
Stripe's (tests/billing/fixtures/stripe, API version 2026-10-28.endive), signed and verified
with the official ``stripe`` package."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from plangate import AsyncGate, MemoryStorage, open_storage
from plangate.billing import Webhooks
from plangate.gateway import GatewayService
from plangate.storage import Storage
from tests.admin.support import START
from tests.billing.stripe_server import line_items, stripe_api
from tests.billing.support import (
    PROBLEM,
    SECRET,
    billing_config,
    callout,
    credits_of,
    event,
    items,
    post,
    send_callout,
    signed,
    webhooks,
)
from tests.gateways.support import gateway_config
from tests.support import Clock, bearer

CREATED = "customer.subscription.created"
UPDATED = "customer.subscription.updated"
DELETED = "customer.subscription.deleted"


def test_a_subscription_puts_its_customer_on_the_plan_it_maps_to(storage: Storage) -> None:
    with webhooks(storage) as (client, _):
        answer = post(client, event(CREATED))
        record = client.get("/admin/customers/acme").json()
    assert answer.status_code == 200
    assert answer.json()["outcome"] == "applied"
    assert answer.json()["customer"] == "acme"
    assert record["plan"] == "pro"
    assert record["entitlements"]["features"]["export_reports"] is True
    (subscription,) = record["subscriptions"]
    assert subscription["provider"] == "stripe"
    assert subscription["id"] == "sub_1QdFk1LkdIwHu7ixRsTuVw01"
    assert subscription["status"] == "active"
    assert subscription["account"] == "cus_RVxyz123Abc"  # kept for usage export


def test_a_price_is_found_by_its_lookup_key_and_may_give_a_legacy_plan() -> None:
    body = event(CREATED, items=items(("price_unknown_id", 1)))
    body["data"]["object"]["items"]["data"][0]["price"]["lookup_key"] = "pro_2023_yearly"
    with webhooks() as (client, _):
        answer = post(client, body)
        record = client.get("/admin/customers/acme").json()
    assert answer.json()["outcome"] == "applied"
    assert record["plan"] == "pro-2023"  # grandfathered: billing may assign a legacy plan


def test_an_add_on_item_gives_the_add_on_its_quantity_times() -> None:
    body = event(CREATED, items=items(("price_pro_monthly", 1), ("price_token_pack", 3)))
    with webhooks() as (client, _):
        post(client, body)
        record = client.get("/admin/customers/acme").json()
    assert record["plan"] == "pro"
    assert record["addons"] == {"token_pack": 3}
    (limit,) = record["entitlements"]["meters"]["ai_tokens"]["limits"]
    assert limit["limit"] == 10000 + 3 * 1000


@pytest.mark.parametrize(
    ("status", "plan"),
    [
        ("trialing", "pro"),
        ("past_due", "pro"),  # kept, and the status shows it
        ("canceled", None),
        ("unpaid", None),
        ("incomplete_expired", None),
    ],
)
def test_each_status_keeps_or_drops_the_plan(status: str, plan: str | None) -> None:
    with webhooks() as (client, _):
        post(client, event(CREATED))
        post(client, event(CREATED, id="evt_2", type=UPDATED, created=1800000100, status=status))
        record = client.get("/admin/customers/acme").json()
    assert record["plan"] == plan
    assert record["subscriptions"][0]["status"] == status


def test_a_deleted_subscription_drops_its_plan_and_add_ons() -> None:
    body = event(CREATED, items=items(("price_pro_monthly", 1), ("price_token_pack", 2)))
    with webhooks() as (client, _):
        post(client, body)
        client.patch("/admin/customers/acme", json={"addons": {"extra_calls": 1}})
        gone = {**body, "id": "evt_2", "type": DELETED, "created": 1800000200}
        post(client, gone)
        record = client.get("/admin/customers/acme").json()
    assert record["plan"] is None  # the customer falls to default_plan
    assert record["addons"] == {"extra_calls": 1}  # the one set by hand stays
    assert record["subscriptions"][0]["status"] == "canceled"


def test_the_same_event_three_times_at_once_changes_the_record_once(storage: Storage) -> None:
    content, header = signed(event(CREATED))

    async def run() -> list[httpx.Response]:
        gate = AsyncGate(billing_config(), storage=storage, clock=Clock(START))
        app = Starlette(routes=[Mount("/webhooks", app=Webhooks(gate))])
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                sends = [
                    client.post(
                        "/webhooks/stripe", content=content, headers={"stripe-signature": header}
                    )
                    for _ in range(3)
                ]
                return list(await asyncio.gather(*sends))
        finally:
            await storage.aclose()

    answers = asyncio.run(run())
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert sorted(a.json()["outcome"] for a in answers) == ["applied", "duplicate", "duplicate"]
    record = storage.get_customer("acme")
    assert record is not None
    assert record.version == 1  # one write
    assert record.plan == "pro"


def test_an_older_event_arriving_late_changes_nothing() -> None:
    canceled = event(CREATED, id="evt_late_2", type=UPDATED, created=1800000300, status="canceled")
    created = event(CREATED, id="evt_early_1", created=1800000000)
    with webhooks() as (client, _):
        first = post(client, canceled)
        late = post(client, created)
        record = client.get("/admin/customers/acme").json()
    assert first.json()["outcome"] == "applied"
    assert late.status_code == 200  # acknowledged: Stripe must not retry it
    assert late.json()["outcome"] == "outdated"
    assert record["plan"] is None
    assert record["subscriptions"][0]["status"] == "canceled"
    assert record["version"] == 1


def test_a_paid_invoice_grants_its_credit_pack_once(storage: Storage) -> None:
    paid = event("invoice.paid")
    with webhooks(storage) as (client, _):
        answers = [post(client, paid) for _ in range(3)]
        credits = credits_of(client)
    assert [a.json()["outcome"] for a in answers] == ["applied", "duplicate", "duplicate"]
    assert credits["balance"] == 2 * 1000  # the line's quantity times the pack
    (grant,) = credits["grants"]
    assert grant["source"] == "billing"
    invoice = paid["data"]["object"]["id"]
    assert grant["idempotency_key"] == f"stripe:{invoice}:il_1QdGa8LkdIwHu7ixLine0001"


def test_an_invoice_of_a_subscription_finds_its_customer_in_the_subscription_details() -> None:
    paid = event("invoice.paid", metadata={})
    paid["data"]["object"]["parent"] = {
        "type": "subscription_details",
        "subscription_details": {"metadata": {"org_id": "globex"}, "subscription": "sub_1"},
    }
    with webhooks() as (client, _):
        answer = post(client, paid)
        credits = credits_of(client, "globex")
    assert answer.json()["customer"] == "globex"
    assert credits["balance"] == 2000


def test_a_line_of_an_older_api_version_is_read_by_its_price_object() -> None:
    paid = event("invoice.paid")
    line = paid["data"]["object"]["lines"]["data"][0]
    del line["pricing"]
    line["price"] = {"id": "price_credits_1000", "object": "price", "lookup_key": None}
    with webhooks() as (client, _):
        post(client, paid)
        credits = credits_of(client)
    assert credits["balance"] == 2000


def test_what_the_config_does_not_map_is_acknowledged_logged_and_changes_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    unmapped = event(CREATED, items=items(("price_nobody_knows", 1)))
    nobody = event(CREATED, id="evt_nobody", metadata={})
    other = event(CREATED, id="evt_other", type="charge.refunded")
    with webhooks() as (client, _):
        answers = [post(client, body) for body in (unmapped, nobody, other)]
        record = client.get("/admin/customers/acme").json()
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert answers[0].json()["unmapped"] == ["price_nobody_knows"]
    assert answers[1].json()["outcome"] == "no-customer"
    assert answers[2].json()["outcome"] == "ignored"
    assert record["plan"] is None  # the unmapped subscription gives nothing
    assert "price_nobody_knows" in caplog.text


@pytest.mark.parametrize(
    "forgery",
    ["another secret", "an expired timestamp", "a body changed after signing", "no header"],
)
def test_a_webhook_not_signed_by_stripe_is_refused_and_writes_nothing(forgery: str) -> None:
    body = event(CREATED)
    content, header = signed(body)
    if forgery == "another secret":
        content, header = signed(body, secret="whsec_someone_else")
    elif forgery == "an expired timestamp":
        content, header = signed(body, at=int(time.time()) - 301)
    elif forgery == "a body changed after signing":
        content = content.replace(b"price_pro_monthly", b"price_enterprise")
    headers = {} if forgery == "no header" else {"stripe-signature": header}
    with webhooks() as (client, _):
        answer = client.post("/webhooks/stripe", content=content, headers=headers)
        record = client.get("/admin/customers/acme")
    assert answer.status_code == 400
    assert answer.headers["content-type"] == PROBLEM
    assert answer.json()["type"].endswith("/bad-signature")
    assert record.status_code == 404


def test_while_a_secret_is_rolled_either_signature_of_the_header_verifies() -> None:
    body = json.dumps(event(CREATED))
    _, old = signed(body, secret="whsec_the_old_one")
    _, new = signed(body, secret=SECRET)
    both = f"{old},{new.split(',', 1)[1]}"  # t=..., v1=<old>, v1=<new>
    with webhooks() as (client, _):
        answer = client.post("/webhooks/stripe", content=body, headers={"stripe-signature": both})
    assert answer.status_code == 200


def test_a_body_that_is_not_an_event_is_a_400_and_a_huge_one_a_413() -> None:
    with webhooks() as (client, _):
        content, header = signed('{"id": "evt_1", "type": "x"}')
        not_event = client.post(
            "/webhooks/stripe", content=content, headers={"stripe-signature": header}
        )
        huge = client.post(
            "/webhooks/stripe",
            content=b"{" + b" " * (1024 * 1024) + b"}",
            headers={"stripe-signature": header},
        )
    assert not_event.status_code == 400
    assert not_event.json()["type"].endswith("/malformed-request")
    assert huge.status_code == 413


def test_without_a_webhook_secret_the_endpoint_is_not_there() -> None:
    config = billing_config()
    config["billing"]["stripe"]["webhook_secret"] = ""
    with webhooks(config=config) as (client, _):
        answer = post(client, event(CREATED))
    assert answer.status_code == 404
    assert answer.headers["content-type"] == PROBLEM


@pytest.mark.redis
def test_while_the_store_is_unreachable_stripe_is_told_to_retry() -> None:
    storage = open_storage("redis://127.0.0.1:1/0?socket_timeout=0.2&socket_connect_timeout=0.2")
    with webhooks(storage) as (client, _):
        answer = post(client, event(CREATED))
    assert answer.status_code == 503
    assert answer.headers["content-type"] == PROBLEM


def test_an_admin_write_keeps_the_subscriptions() -> None:
    with webhooks() as (client, _):
        post(client, event(CREATED))
        client.put("/admin/customers/acme", json={"plan": "free"})
        record = client.get("/admin/customers/acme").json()
    assert record["plan"] == "free"  # the admin's word, until billing speaks again
    assert [s["id"] for s in record["subscriptions"]] == ["sub_1QdFk1LkdIwHu7ixRsTuVw01"]


@pytest.mark.redis
def test_another_process_sees_the_change_at_once(redis_server: object) -> None:
    url = redis_server.url  # type: ignore[attr-defined]
    with redis_server.client() as raw:  # type: ignore[attr-defined]
        raw.flushall()
    other = AsyncGate(billing_config(), storage=url, clock=Clock(START))

    async def cached_then_heard() -> str | None:
        assert await other.customers.load("acme") is None  # cached: no record
        with webhooks(open_storage(url)) as (client, _):
            assert post(client, event(CREATED)).json()["outcome"] == "applied"
        heard = await asyncio.to_thread(other.customers.wait_version, "acme", 1, 10)
        assert heard, "the invalidation was not heard"
        record = await other.customers.load("acme")
        await other.storage.aclose()
        return record.plan if record else None

    assert asyncio.run(cached_then_heard()) == "pro"


def test_the_gateway_serves_the_webhooks_and_its_next_check_sees_the_plan() -> None:
    config = {
        **gateway_config(),
        "billing": {
            "stripe": {
                "webhook_secret": SECRET,
                "customer_from": "metadata.org_id",
                "prices": {"price_pro_monthly": "pro"},
            }
        },
    }
    check = {"X-Original-Method": "POST", "X-Original-URI": "/v1/reports/7/export"}
    with TestClient(GatewayService(config)) as client:
        before = client.get("/check", headers={**check, **bearer("acme")}).status_code
        answer = post(client, event(CREATED, created=int(time.time())))  # the gateway's clock
        after = client.get("/check", headers={**check, **bearer("acme")}).status_code
    assert answer.status_code == 200
    assert (before, after) == (402, 200)


def checkout_config(api_base: str, api_key: str = "sk_test_plangate") -> dict[str, Any]:
    config = billing_config()
    config["billing"]["stripe"].update(api_key=api_key, api_base=api_base)
    return config


def test_a_paid_checkout_session_grants_its_line_items_read_from_stripes_api() -> None:
    session = event("checkout.session.completed")["data"]["object"]["id"]

    def answer(method: str, path: str, query: dict[str, list[str]]) -> tuple[int, Any]:
        assert (method, path) == ("GET", f"/v1/checkout/sessions/{session}/line_items")
        return 200, line_items(("price_credits_1000", 3), ("price_unknown", 1))

    with stripe_api(answer) as api, webhooks(config=checkout_config(api.url)) as (client, _):
        answers = [post(client, event("checkout.session.completed")) for _ in range(2)]
        credits = credits_of(client)
    assert [a.json()["outcome"] for a in answers] == ["applied", "duplicate"]
    assert answers[0].json()["unmapped"] == ["price_unknown"]
    assert credits["balance"] == 3000
    assert api.requests[0]["authorization"] == "Bearer sk_test_plangate"
    assert api.requests[0]["query"]["limit"] == ["100"]


def test_a_checkout_session_that_made_an_invoice_or_is_not_paid_yet_grants_nothing_here() -> None:
    with (
        stripe_api(lambda *_: (500, {})) as api,
        webhooks(config=checkout_config(api.url)) as (
            client,
            _,
        ),
    ):
        invoiced = post(client, event("checkout.session.completed", invoice="in_1"))
        unpaid = post(client, event("checkout.session.completed", payment_status="unpaid"))
    assert [invoiced.json()["outcome"], unpaid.json()["outcome"]] == ["ignored", "ignored"]
    assert api.requests == []  # the invoice's invoice.paid grants; async_payment_succeeded later


@pytest.mark.parametrize(
    ("trouble", "status", "outcome"),
    [
        ("no api key", 200, "not-read"),  # logged: retrying cannot help
        ("no such session", 200, "not-read"),
        ("Stripe is down", 503, None),  # for now: Stripe sends the event again later
    ],
)
def test_when_stripes_api_cannot_be_read_the_answer_says_whether_to_retry(
    trouble: str, status: int, outcome: str | None
) -> None:
    missing = {"error": {"type": "invalid_request_error", "message": "No such checkout session"}}
    down = {"error": {"type": "api_error", "message": "Service unavailable"}}

    def answer(*_: Any) -> tuple[int, Any]:
        return (503, down) if trouble == "Stripe is down" else (404, missing)

    with stripe_api(answer) as api:
        config = checkout_config(api.url, api_key="" if trouble == "no api key" else "sk_test_x")
        with webhooks(config=config) as (client, _):
            sent = post(client, event("checkout.session.completed"))
            credits = client.get("/admin/customers/acme/credits").json()["credits"]
    assert sent.status_code == status
    if outcome is None:
        assert sent.json()["type"].endswith("/billing-provider-unavailable")
    else:
        assert sent.json()["outcome"] == outcome
    assert credits["ai_credits"]["balance"] == 0
    assert (api.requests == []) == (trouble == "no api key")


def test_a_session_that_names_no_customer_is_not_read_from_stripe() -> None:
    with (
        stripe_api(lambda *_: (500, {})) as api,
        webhooks(config=checkout_config(api.url)) as (
            client,
            _,
        ),
    ):
        sent = post(client, event("checkout.session.completed", metadata={}))
    assert sent.json()["outcome"] == "no-customer"
    assert api.requests == []


@pytest.mark.parametrize(
    "body",
    [
        "[]",
        "null",
        '{"id": "evt_1", "type": "x", "created": 1800000000, "data": {"object": 1}}',
        "[" * 5000 + "]" * 5000,
    ],
)
def test_a_signed_body_that_is_not_an_event_is_a_400_not_a_500(body: str) -> None:
    with webhooks() as (client, _):
        content, header = signed(body)
        answer = client.post(
            "/webhooks/stripe", content=content, headers={"stripe-signature": header}
        )
    assert answer.status_code == 400
    assert answer.json()["type"].endswith("/malformed-request")


@pytest.mark.parametrize("header", [b"t=1,v1=\xe9", b"v1=abc", b"t=x,v1=abc", b"garbage"])
def test_a_malformed_signature_header_is_a_400_not_a_500(header: bytes) -> None:
    with webhooks() as (client, _):
        answer = client.post(
            "/webhooks/stripe",
            content=json.dumps(event(CREATED)).encode(),
            headers=[(b"stripe-signature", header)],
        )
    assert answer.status_code == 400
    assert answer.json()["type"].endswith("/bad-signature")


@pytest.mark.parametrize("created", [0, 4_102_444_800])  # 1970; 2100
def test_an_event_time_no_event_sent_now_has_is_refused(created: int) -> None:
    with webhooks() as (client, _):
        answer = post(client, event(CREATED, created=created))
        record = client.get("/admin/customers/acme")
    assert answer.status_code == 400
    assert record.status_code == 404  # nothing stored that would order later events wrongly


def test_a_redelivery_after_a_packs_amount_changed_in_the_config_is_acknowledged() -> None:
    paid = event("invoice.paid")
    config = billing_config()
    config["billing"]["stripe"]["prices"]["price_credits_1000"]["amount"] = 2000
    storage = MemoryStorage()
    with webhooks(storage) as (client, _):
        first = post(client, paid)
    with webhooks(storage, config=config) as (client, _):
        again = post(client, paid)
        credits = credits_of(client)
    assert first.json()["outcome"] == "applied"
    assert again.status_code == 200
    assert again.json()["outcome"] == "duplicate"
    assert credits["balance"] == 2000  # granted once, at the amount of the time


def test_a_zero_quantity_gives_nothing_and_a_proration_line_grants_nothing() -> None:
    zero = event(CREATED, items=items(("price_pro_monthly", 1), ("price_token_pack", 0)))
    paid = event("invoice.paid")
    line = paid["data"]["object"]["lines"]["data"][0]
    proration = {**line, "id": "il_proration", "amount": -500}
    paid["data"]["object"]["lines"]["data"].append(proration)
    paid["data"]["object"]["lines"]["data"].append({**line, "id": "il_zero", "quantity": 0})
    with webhooks() as (client, _):
        post(client, zero)
        post(client, paid)
        record = client.get("/admin/customers/acme").json()
        credits = credits_of(client)
    assert record["addons"] == {}
    assert credits["balance"] == 2000  # the one paid line only


def test_the_stripe_customer_is_remembered_when_a_later_event_lacks_it() -> None:
    later = event(CREATED, id="evt_2", type=UPDATED, created=1800000100, customer=None)
    with webhooks() as (client, _):
        post(client, event(CREATED))
        post(client, later)
        record = client.get("/admin/customers/acme").json()
    assert record["subscriptions"][0]["account"] == "cus_RVxyz123Abc"


def test_a_write_between_the_read_and_the_write_is_read_again(storage: Storage) -> None:
    """Compare-and-set: an admin write lands between the webhook's read of the record and
    its write; the webhook reads again and keeps the admin's change."""

    real_get = storage.aget_customer
    raced = False

    async def get_then_someone_writes(customer: str) -> Any:
        nonlocal raced
        record = await real_get(customer)
        if not raced:
            raced = True
            from plangate.engine import CustomerRecord

            await storage.aput_customer(CustomerRecord(customer, overrides={"max_projects": 7}))
        return record

    storage.aget_customer = get_then_someone_writes  # type: ignore[method-assign]
    with webhooks(storage) as (client, _):
        answer = post(client, event(CREATED))
        record = client.get("/admin/customers/acme").json()
    assert raced
    assert answer.json()["outcome"] == "applied"
    assert record["plan"] == "pro"
    assert record["overrides"] == {"max_projects": 7}  # the write in between is kept
    assert record["version"] == 2


def test_a_body_up_to_a_mebibyte_is_read_and_past_it_refused_even_unannounced() -> None:
    big = event(CREATED)
    big["data"]["object"]["description"] = "x" * (512 * 1024)  # a long event still fits
    content, header = signed(big)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        for _ in range(3):
            yield b" " * (512 * 1024)

    with webhooks() as (client, _):
        fits = client.post(
            "/webhooks/stripe", content=content, headers={"stripe-signature": header}
        )
        streamed = client.post(
            "/webhooks/stripe", content=chunks(), headers={"stripe-signature": header}
        )
    assert fits.status_code == 200
    assert streamed.status_code == 413


def test_unmapped_prices_are_counted_for_the_admin_api(storage: Storage) -> None:
    unmapped = event(CREATED, items=items(("price_nobody_knows", 1), ("price_pro_monthly", 1)))
    with webhooks(storage) as (client, _):
        post(client, unmapped)
        post(client, {**unmapped, "id": "evt_again", "created": 1800000100})
        send_callout(client, callout(ratePlanIds=["8a8a_unknown_rate_plan"]))
        counts = client.get("/admin/billing")
        refused = client.get("/admin/billing", headers={"authorization": "Bearer nope"})
    assert counts.status_code == 200
    assert counts.json() == {
        "providers": ["stripe", "zuora"],
        "unmapped": {"stripe": {"price_nobody_knows": 2}, "zuora": {"8a8a_unknown_rate_plan": 1}},
    }
    assert refused.status_code == 401  # behind the admin token, like the rest of /admin


def test_an_invoices_lines_past_its_events_page_are_read_from_stripes_api() -> None:
    """Stripe embeds an invoice's first lines in its event; the rest are listed from the API
    (after the last one embedded), and each credit pack among them is granted once."""
    paid = event("invoice.paid")
    invoice = paid["data"]["object"]
    invoice["lines"]["has_more"] = True
    embedded = invoice["lines"]["data"][0]["id"]
    second = copy.deepcopy(invoice["lines"]["data"][0])
    second["id"], second["quantity"] = "il_1QdGa8LkdIwHu7ixLine0002", 3

    def answer(method: str, path: str, query: dict[str, list[str]]) -> tuple[int, Any]:
        assert (method, path) == ("GET", f"/v1/invoices/{invoice['id']}/lines")
        assert query["starting_after"] == [embedded]
        listing = {"object": "list", "data": [second], "has_more": False, "url": path}
        return 200, listing

    with stripe_api(answer) as api, webhooks(config=checkout_config(api.url)) as (client, _):
        answers = [post(client, paid) for _ in range(2)]
        credits = credits_of(client)
    assert [a.json()["outcome"] for a in answers] == ["applied", "duplicate"]
    assert credits["balance"] == (2 + 3) * 1000
    assert len(credits["grants"]) == 2


def test_without_an_api_key_an_invoice_grants_the_lines_its_event_carries() -> None:
    paid = event("invoice.paid")
    paid["data"]["object"]["lines"]["has_more"] = True
    with (
        stripe_api(lambda *_: (500, {})) as api,
        webhooks(config=checkout_config(api.url, api_key="")) as (client, _),
    ):
        answer = post(client, paid)
        credits = credits_of(client)
    assert answer.json()["outcome"] == "applied"
    assert credits["balance"] == 2000
    assert api.requests == []
