"""POST, GET /admin/customers/{id}/credits and DELETE /admin/customers/{id}/credits/{grant}:
grants made once per Idempotency-Key, balances and ledgers read, grants revoked; on every
backend (memory, Redis, Redis Cluster)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import httpx
import pytest

from plangate import AsyncGate, MemoryStorage
from plangate.admin import AdminAPI
from plangate.config import max_credits
from plangate.engine import PROBLEM_BASE
from plangate.storage import Storage, open_storage
from tests.admin.support import AUTH, PROBLEM, START, TOKEN, admin, admin_config, mounted
from tests.servers import free_port
from tests.support import BASE_CONFIG, GRANT_KEYS, Clock, token

DAY = 86400.0
CREDITS = "/admin/customers/acme/credits"
#: ai_images is charged at 0.25 a call past pro's api_calls limit: kept in hundredths
IMAGES_SCALE = 100


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat()


def credits_config(**changes: Any) -> dict[str, Any]:
    """The admin tests' config with two credits features: ai_credits (whole credits; pro
    grants 100 a month; POST /v1/spend spends 4, POST /v1/generate what its response says)
    and ai_images (an overage of api_calls)."""
    base = admin_config()
    plans = copy.deepcopy(base["plans"])
    plans["pro"]["features"]["ai_credits"] = {"grant": 100, "period": "month"}
    # a plan that lets requests spend credits, with none of its own
    plans["payg"] = {"features": {"ai_credits": {"grant": 0, "period": "month"}}}
    plans["pro"]["features"]["api_calls"] = {
        "limit": 1000,
        "window": "1m",
        "overage": "ai_images",
        "rate": 0.25,
    }
    features = {
        **BASE_CONFIG["features"],
        "ai_credits": {"kind": "credits", "unit": "credit"},
        "ai_images": {"kind": "credits", "unit": "image"},
    }
    routes = [
        {"match": "POST /v1/spend", "meters": {"ai_credits": 4}},
        {
            "match": "POST /v1/generate",
            "meters": {"ai_credits": {"response_header": "X-Credits-Used", "estimate": 1}},
        },
        *BASE_CONFIG["routes"],
    ]
    return {**base, "plans": plans, "features": features, "routes": routes, **changes}


#: credits_config() as tests.admin.support.admin(**CHANGES) builds it
CHANGES = {key: value for key, value in credits_config().items() if key != "admin"}


@contextlib.asynccontextmanager
async def credits_admin(
    storage: Storage, *, auth: bool = True, **changes: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, AsyncGate]]:
    """A client of the admin API on a gate of ``credits_config(**changes)``, and the gate
    (for requests that spend credits); the store's connections of this loop closed at the end."""
    gate = AsyncGate(credits_config(**changes), storage=storage, clock=Clock(START))
    transport = httpx.ASGITransport(app=mounted(AdminAPI(gate)))
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers=AUTH if auth else None
        ) as client:
            yield client, gate
    finally:
        await storage.aclose()


Scenario = Callable[[httpx.AsyncClient, AsyncGate], Awaitable[Any]]


def run(storage: Storage, scenario: Scenario, **changes: Any) -> Any:
    async def main() -> Any:
        async with credits_admin(storage, **changes) as (client, gate):
            return await scenario(client, gate)

    return asyncio.run(main())


def grant(
    client: httpx.AsyncClient,
    body: dict[str, Any],
    key: str | None = "key-1",
    customer: str = "acme",
) -> Awaitable[httpx.Response]:
    headers = {} if key is None else {"idempotency-key": key}
    return client.post(f"/admin/customers/{customer}/credits", json=body, headers=headers)


async def balance(
    client: httpx.AsyncClient, feature: str = "ai_credits", customer: str = "acme"
) -> dict[str, Any]:
    response = await client.get(f"/admin/customers/{customer}/credits?feature={feature}")
    assert response.status_code == 200, response.text
    shown: dict[str, Any] = response.json()["credits"][feature]
    return shown


def problem(response: httpx.Response, status: int, name: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["type"] == PROBLEM_BASE + name
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    return body


TEN = {"feature": "ai_credits", "amount": 10}


# POST: a grant, once per Idempotency-Key ----------------------------------------------------


def test_a_grant_is_201_then_the_same_key_and_body_is_200_with_the_same_grant(storage):
    async def scenario(client, gate):
        first = await grant(client, TEN)
        again = await grant(client, TEN)
        return first, again, await balance(client)

    first, again, shown = run(storage, scenario)
    assert first.status_code == 201
    assert again.status_code == 200
    assert first.headers["cache-control"] == "no-store"
    assert again.json() == first.json()
    made = first.json()
    assert set(made) == GRANT_KEYS
    assert made["feature"] == "ai_credits"
    assert made["amount"] == made["remaining"] == 10
    assert made["source"] == "admin"
    assert made["category"] == "paid"
    assert made["idempotency_key"] == "key-1"
    assert made["expires_at"] is None
    assert made["created_at"] == iso(START)
    assert shown["balance"] == 10  # not 20
    assert [g["id"] for g in shown["grants"]] == [made["id"]]
    assert [(e["kind"], e["amount"], e["grant"]) for e in shown["ledger"]] == [
        ("grant", 10, made["id"])
    ]


def test_a_grant_keeps_its_expiry_priority_and_category(storage):
    body = {
        "feature": "ai_credits",
        "amount": 7,
        "expires_at": iso(START + 30 * DAY),
        "priority": 3,
        "category": "promotional",
    }

    async def scenario(client, gate):
        return await grant(client, body), await balance(client)

    made, shown = run(storage, scenario)
    assert made.status_code == 201
    assert made.json()["expires_at"] == iso(START + 30 * DAY)
    assert (made.json()["priority"], made.json()["category"]) == (3, "promotional")
    assert shown["grants"] == [made.json()]
    assert shown["balance"] == 7


@pytest.mark.parametrize(
    "other",
    [
        {"feature": "ai_credits", "amount": 11},
        {"feature": "ai_images", "amount": 10},
        {"feature": "ai_credits", "amount": 10, "priority": 5},
        {"feature": "ai_credits", "amount": 10, "category": "promotional"},
        {"feature": "ai_credits", "amount": 10, "expires_at": iso(START + DAY)},
    ],
    ids=["amount", "feature", "priority", "category", "expires_at"],
)
def test_the_same_key_with_another_body_is_422_and_adds_nothing(storage, other):
    async def scenario(client, gate):
        first = await grant(client, TEN)
        refused = await grant(client, other)
        return first, refused, await balance(client), await balance(client, "ai_images")

    first, refused, credits, images = run(storage, scenario)
    assert first.status_code == 201
    body = problem(refused, 422, "idempotency-conflict")
    assert body["parameter"] == "Idempotency-Key"
    assert body["idempotency_key"] == "key-1"
    assert credits["balance"] == 10
    assert len(credits["grants"]) == 1
    assert images["balance"] == 0
    assert images["grants"] == []


def test_an_idempotency_key_belongs_to_one_customer(storage):
    async def scenario(client, gate):
        acme = await grant(client, TEN)
        globex = await grant(client, TEN, customer="globex")
        return acme, globex, await balance(client), await balance(client, customer="globex")

    acme, globex, acme_balance, globex_balance = run(storage, scenario)
    assert acme.status_code == globex.status_code == 201
    assert acme.json()["id"] != globex.json()["id"]
    assert acme_balance["balance"] == globex_balance["balance"] == 10


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({}, "needs an Idempotency-Key"),
        ({"idempotency-key": ""}, "printable"),
        ({"idempotency-key": "   "}, "printable"),
        ({"idempotency-key": "k" * 256}, "printable"),
        ([("idempotency-key", "a"), ("idempotency-key", "b")], "not several"),
    ],
    ids=["missing", "empty", "blank", "too-long", "twice"],
)
def test_a_grant_without_one_idempotency_key_is_400_and_writes_nothing(storage, headers, detail):
    async def scenario(client, gate):
        refused = await client.post(CREDITS, json=TEN, headers=headers)
        shown = await balance(client)
        # the refusal used no key: a grant with one goes through
        return refused, shown, await grant(client, TEN, key="a")

    refused, shown, later = run(storage, scenario)
    body = problem(refused, 400, "malformed-request")
    assert body["parameter"] == "Idempotency-Key"
    assert "Idempotency-Key" in body["detail"]
    assert detail in body["detail"]
    assert shown["balance"] == 0
    assert shown["grants"] == shown["ledger"] == []
    assert later.status_code == 201


def test_a_key_of_255_printable_characters_is_a_key():
    async def scenario(client, gate):
        return await grant(client, TEN, key="k" * 255)

    made = run(MemoryStorage(), scenario)
    assert made.status_code == 201
    assert made.json()["idempotency_key"] == "k" * 255


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"feature": "ai_credits", "amount": 0}, "amount"),
        ({"feature": "ai_credits", "amount": -5}, "amount"),
        ({"feature": "ai_credits", "amount": max_credits(1) + 1}, "amount"),
        ({"feature": "ai_images", "amount": max_credits(IMAGES_SCALE) + 1}, "amount"),
        ({"feature": "ai_credits", "amount": 10**30}, "amount"),
        ({"feature": "ai_credits", "amount": 1.5}, "amount"),
        ({"feature": "ai_credits", "amount": 10.0}, "amount"),
        ({"feature": "ai_credits", "amount": "10"}, "amount"),
        ({"feature": "ai_credits", "amount": True}, "amount"),
        ({"feature": "ai_credits", "amount": None}, "amount"),
        ({"feature": "ai_credits"}, "amount"),
        ({"feature": "ai_credits", "amount": 5, "expires_at": iso(START - 1)}, "expires_at"),
        ({"feature": "ai_credits", "amount": 5, "expires_at": iso(START)}, "expires_at"),
        ({"feature": "ai_credits", "amount": 5, "expires_at": "next week"}, "expires_at"),
        ({"feature": "ai_credits", "amount": 5, "expires_at": START + DAY}, "expires_at"),
        ({"feature": "ai_credits", "amount": 5, "priority": -1}, "priority"),
        ({"feature": "ai_credits", "amount": 5, "priority": 256}, "priority"),
        ({"feature": "ai_credits", "amount": 5, "priority": 1.0}, "priority"),
        ({"feature": "ai_credits", "amount": 5, "priority": "high"}, "priority"),
        ({"feature": "ai_credits", "amount": 5, "category": "free"}, "category"),
        ({"feature": "ai_tokens_credits", "amount": 5}, "feature"),
        ({"feature": "api_calls", "amount": 5}, "feature"),
        ({"feature": "max_projects", "amount": 5}, "feature"),
        ({"feature": None, "amount": 5}, "feature"),
        ({"amount": 5}, "feature"),
        ({"feature": "ai_credits", "amount": 5, "amout": 5}, "amout"),
        ({"feature": "ai_credits", "amount": 5, "source": "billing"}, "source"),
    ],
    ids=repr,
)
def test_a_grant_the_config_does_not_allow_is_422_naming_the_field_and_writes_nothing(
    storage, body, field
):
    async def scenario(client, gate):
        refused = await grant(client, body)
        shown = await client.get(CREDITS)
        # the refusal kept no key: the same key with a good body makes a grant
        return refused, shown, await grant(client, {"feature": "ai_credits", "amount": 1})

    refused, shown, later = run(storage, scenario)
    answer = problem(refused, 422, "invalid-record")
    assert answer["field"] == field
    assert answer["errors"][0]["field"] == field
    assert all(set(error) == {"field", "detail"} for error in answer["errors"])
    for feature in ("ai_credits", "ai_images"):
        assert shown.json()["credits"][feature]["balance"] == 0
        assert shown.json()["credits"][feature]["grants"] == []
    assert later.status_code == 201


@pytest.mark.parametrize(("feature", "scale"), [("ai_credits", 1), ("ai_images", IMAGES_SCALE)])
def test_a_grant_of_the_bound_is_made(storage, feature, scale):
    most = max_credits(scale)

    async def scenario(client, gate):
        return await grant(client, {"feature": feature, "amount": most}), await balance(
            client, feature
        )

    made, shown = run(storage, scenario)
    assert made.status_code == 201, made.text
    assert shown["balance"] == most


def test_several_errors_are_all_listed():
    async def scenario(client, gate):
        return await grant(client, {"feature": "ai_credits", "amount": 0, "priority": 900})

    refused = run(MemoryStorage(), scenario)
    assert [e["field"] for e in problem(refused, 422, "invalid-record")["errors"]] == [
        "amount",
        "priority",
    ]


@pytest.mark.parametrize(
    ("content", "content_type", "status", "name"),
    [
        (b'{"feature": "ai_credits", "amount": 10}', None, 415, "unsupported-media-type"),
        (b'{"feature": "ai_credits", "amount": 10}', "text/plain", 415, "unsupported-media-type"),
        (b"{", "application/json", 400, "malformed-request"),
        (b"[10]", "application/json", 400, "malformed-request"),
        (b"NaN", "application/json", 400, "malformed-request"),
        (b" " * (64 * 1024 + 1), "application/json", 413, "body-too-large"),
    ],
    ids=["no-type", "text", "truncated", "array", "nan", "too-large"],
)
def test_a_body_that_is_not_a_json_object_is_refused_and_writes_nothing(
    content, content_type, status, name
):
    headers = {"idempotency-key": "key-1"}
    if content_type is not None:
        headers["content-type"] = content_type

    async def scenario(client, gate):
        refused = await client.post(CREDITS, content=content, headers=headers)
        return refused, await balance(client), await grant(client, TEN)

    refused, shown, later = run(MemoryStorage(), scenario)
    problem(refused, status, name)
    assert shown["balance"] == 0
    assert later.status_code == 201


def test_a_grant_pays_the_debt_first(storage):
    async def scenario(client, gate):
        await client.put("/admin/customers/acme", json={"plan": "payg"})
        await grant(client, {"feature": "ai_credits", "amount": 3}, key="small")
        spent = await gate.check("POST", "/v1/generate", token("acme"))
        await gate.settle(spent, 200, {"ai_credits": 5})  # 5 of 3: 2 owed
        after_spend = await balance(client)
        await grant(client, TEN, key="top-up")
        return spent, after_spend, await balance(client)

    spent, after_spend, after_grant = run(storage, scenario)
    assert spent.allowed
    assert (after_spend["balance"], after_spend["debt"]) == (-2, 2)
    assert (after_grant["balance"], after_grant["debt"]) == (8, 0)


# GET: balances and ledgers ------------------------------------------------------------------


def test_the_credits_of_a_customer_list_every_credits_feature(storage):
    async def scenario(client, gate):
        await client.put("/admin/customers/acme", json={"plan": "pro"})
        made = await grant(client, TEN)
        every = await client.get(CREDITS)
        one = await client.get(f"{CREDITS}?feature=ai_images")
        return made, every, one

    made, every, one = run(storage, scenario)
    assert every.status_code == one.status_code == 200
    assert every.headers["cache-control"] == "no-store"
    body = every.json()
    assert set(body) == {"customer", "credits"}
    assert body["customer"] == "acme"
    assert list(body["credits"]) == ["ai_credits", "ai_images"]
    for shown in body["credits"].values():
        assert set(shown) == {"balance", "debt", "grants", "ledger", "next_cursor"}
    credits = body["credits"]["ai_credits"]
    assert credits["balance"] == 110  # pro's 100 of the month, and the grant
    assert credits["debt"] == 0
    by_source = {g["source"]: g for g in credits["grants"]}
    assert set(by_source) == {"plan", "admin"}
    assert by_source["plan"]["amount"] == 100
    assert by_source["plan"]["expires_at"] == "2027-02-01T00:00:00+00:00"  # the month's end
    assert by_source["admin"] == made.json()
    assert [e["kind"] for e in credits["ledger"]] == ["grant", "grant"]
    assert credits["next_cursor"] is None
    assert one.json() == {
        "customer": "acme",
        "credits": {"ai_images": every.json()["credits"]["ai_images"]},
    }
    assert one.json()["credits"]["ai_images"]["balance"] == 0


def test_a_customer_without_credits_has_empty_balances(storage):
    async def scenario(client, gate):
        return await client.get("/admin/customers/nobody/credits")

    shown = run(storage, scenario)
    assert shown.status_code == 200
    assert shown.json()["credits"]["ai_credits"] == {
        "balance": 0,
        "debt": 0,
        "grants": [],
        "ledger": [],
        "next_cursor": None,
    }


def test_the_ledger_pages_newest_first(storage):
    async def scenario(client, gate):
        for amount in range(1, 6):
            made = await grant(
                client, {"feature": "ai_credits", "amount": amount}, key=f"k{amount}"
            )
            assert made.status_code == 201
        pages = []
        cursor = None
        for _ in range(10):
            query = "feature=ai_credits&limit=2" + (f"&cursor={cursor}" if cursor else "")
            response = await client.get(f"{CREDITS}?{query}")
            assert response.status_code == 200, response.text
            pages.append(response.json()["credits"]["ai_credits"])
            cursor = pages[-1]["next_cursor"]
            if cursor is None:
                break
        return pages

    pages = run(storage, scenario)
    assert [[e["amount"] for e in page["ledger"]] for page in pages] == [[5, 4], [3, 2], [1]]
    assert all(page["balance"] == 15 for page in pages)
    assert all(len(page["grants"]) == 5 for page in pages)
    assert all(e["kind"] == "grant" for page in pages for e in page["ledger"])
    ids = [e["id"] for page in pages for e in page["ledger"]]
    assert len(set(ids)) == 5


def test_a_ledger_page_holds_50_entries_unless_told():
    async def scenario(client, gate):
        for i in range(52):
            await grant(client, {"feature": "ai_credits", "amount": 1}, key=f"k{i}")
        default = await client.get(f"{CREDITS}?feature=ai_credits")
        most = await client.get(f"{CREDITS}?feature=ai_credits&limit=500")
        return default, most

    default, most = run(MemoryStorage(), scenario)
    assert len(default.json()["credits"]["ai_credits"]["ledger"]) == 50
    assert default.json()["credits"]["ai_credits"]["next_cursor"] is not None
    assert len(most.json()["credits"]["ai_credits"]["ledger"]) == 52
    assert most.json()["credits"]["ai_credits"]["next_cursor"] is None


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("feature=nope", "feature"),
        ("feature=api_calls", "feature"),
        ("feature=", "feature"),
        ("cursor=0000000000000001", "cursor"),
    ],
)
def test_a_read_the_config_does_not_allow_is_422(storage, query, field):
    async def scenario(client, gate):
        return await client.get(f"{CREDITS}?{query}")

    assert problem(run(storage, scenario), 422, "invalid-record")["field"] == field


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("feature=ai_credits&limit=0", "limit"),
        ("feature=ai_credits&limit=501", "limit"),
        ("feature=ai_credits&limit=-1", "limit"),
        ("feature=ai_credits&limit=ten", "limit"),
        ("feature=ai_credits&limit=", "limit"),
        ("feature=ai_credits&cursor=not-a-cursor", "cursor"),
        ("feature=ai_credits&cursor=1-2-3", "cursor"),
        ("feature=ai_credits&cursor=" + "9" * 25, "cursor"),
    ],
)
def test_a_bad_limit_or_cursor_is_400_naming_it(storage, query, parameter):
    async def scenario(client, gate):
        await grant(client, TEN)
        return await client.get(f"{CREDITS}?{query}")

    body = problem(run(storage, scenario), 400, "malformed-request")
    assert body["parameter"] == parameter


# DELETE: revoking a grant -------------------------------------------------------------------


def test_a_revoke_takes_what_the_grant_still_holds(storage):
    async def scenario(client, gate):
        await client.put("/admin/customers/acme", json={"plan": "payg"})
        first = {"feature": "ai_credits", "amount": 10, "priority": 1}  # burns first
        first = (await grant(client, first, key="first")).json()
        second = (await grant(client, {"feature": "ai_credits", "amount": 5}, key="second")).json()
        spent = await gate.check("POST", "/v1/spend", token("acme"))  # 4 of the first's 10
        before = await balance(client)
        revoked = await client.delete(f"{CREDITS}/{first['id']}")
        after = await balance(client)
        again = await client.delete(f"{CREDITS}/{first['id']}")
        return first, second, spent, before, revoked, after, again

    first, second, spent, before, revoked, after, again = run(storage, scenario)
    assert spent.allowed
    assert before["balance"] == 11
    held = {g["id"]: g["remaining"] for g in before["grants"] if g["source"] == "admin"}
    assert held == {first["id"]: 6, second["id"]: 5}
    assert revoked.status_code == 200
    assert revoked.headers["cache-control"] == "no-store"
    assert revoked.json() == {"feature": "ai_credits", "grant": first["id"], "revoked": 6}
    assert after["balance"] == 5
    assert after["ledger"][0]["kind"] == "revoke"
    assert after["ledger"][0]["amount"] == -6
    assert after["ledger"][0]["grant"] == first["id"]
    revoked_grant = next(g for g in after["grants"] if g["id"] == first["id"])
    assert (revoked_grant["amount"], revoked_grant["remaining"]) == (10, 0)
    assert again.status_code == 200  # nothing left to take
    assert again.json()["revoked"] == 0
    assert after["balance"] == 5


def test_a_revoke_of_a_plan_grant_and_of_another_features_grant(storage):
    async def scenario(client, gate):
        await client.put("/admin/customers/acme", json={"plan": "pro"})
        plan = next(g for g in (await balance(client))["grants"] if g["source"] == "plan")
        images = (await grant(client, {"feature": "ai_images", "amount": 3})).json()
        return (
            await client.delete(f"{CREDITS}/{plan['id']}"),
            await client.delete(f"{CREDITS}/{images['id']}"),
            await client.get(CREDITS),
        )

    plan, images, shown = run(storage, scenario)
    assert plan.json()["feature"] == "ai_credits"
    assert plan.json()["revoked"] == 100
    assert images.json()["feature"] == "ai_images"
    assert images.json()["revoked"] == 3
    assert shown.json()["credits"]["ai_credits"]["balance"] == 0
    assert shown.json()["credits"]["ai_images"]["balance"] == 0


def test_an_unknown_grant_is_404(storage):
    async def scenario(client, gate):
        made = (await grant(client, TEN)).json()
        return (
            await client.delete(f"{CREDITS}/no-such-grant"),
            await client.delete(f"/admin/customers/globex/credits/{made['id']}"),
            await balance(client),
        )

    unknown, others, shown = run(storage, scenario)
    body = problem(unknown, 404, "grant-not-found")
    assert (body["customer"], body["grant"]) == ("acme", "no-such-grant")
    body = problem(others, 404, "grant-not-found")
    assert body["customer"] == "globex"
    assert shown["balance"] == 10


# concurrency --------------------------------------------------------------------------------


def test_ten_parallel_grants_with_one_key_make_exactly_one_grant(storage):
    async def scenario(client, gate):
        answers = await asyncio.gather(*(grant(client, TEN, key="once") for _ in range(10)))
        return answers, await balance(client)

    answers, shown = run(storage, scenario)
    assert sorted(answer.status_code for answer in answers) == [200] * 9 + [201]
    assert len({answer.json()["id"] for answer in answers}) == 1
    assert shown["balance"] == 10
    assert [g["source"] for g in shown["grants"]] == ["admin"]
    assert [e["kind"] for e in shown["ledger"]] == ["grant"]


def test_ten_parallel_grants_with_their_own_keys_all_land(storage):
    async def scenario(client, gate):
        answers = await asyncio.gather(*(grant(client, TEN, key=f"k{i}") for i in range(10)))
        return answers, await balance(client)

    answers, shown = run(storage, scenario)
    assert [answer.status_code for answer in answers] == [201] * 10
    assert shown["balance"] == 100
    assert len(shown["grants"]) == 10


# the token ----------------------------------------------------------------------------------


ROUTES = [
    ("POST", CREDITS, TEN),
    ("GET", CREDITS, None),
    ("DELETE", f"{CREDITS}/some-grant", None),
]


@pytest.mark.parametrize("authorization", [None, "Bearer not-the-admin-token", f"Basic {TOKEN}"])
def test_without_the_admin_token_the_credits_routes_are_401_and_write_nothing(authorization):
    headers = {"idempotency-key": "key-1"}
    if authorization is not None:
        headers["authorization"] = authorization

    async def scenario(client, gate):
        answers = [
            await client.request(method, path, json=body, headers=headers)
            for method, path, body in ROUTES
        ]
        return answers, await client.get(CREDITS, headers=AUTH)

    async def main():
        async with credits_admin(MemoryStorage(), auth=False) as (client, gate):
            return await scenario(client, gate)

    answers, shown = asyncio.run(main())
    for answer in answers:
        problem(answer, 401, "admin-token-required")
        assert answer.headers["www-authenticate"].startswith('Bearer realm="plangate-admin"')
    assert shown.json()["credits"]["ai_credits"]["grants"] == []


def test_without_a_configured_token_the_credits_routes_are_404():
    async def main():
        async with credits_admin(MemoryStorage(), admin={"token": None}) as (client, gate):
            answers = [
                await client.request(method, path, json=body, headers={"idempotency-key": "k"})
                for method, path, body in ROUTES
            ]
            return answers, await gate.customers.balance("acme", "ai_credits")

    answers, left = asyncio.run(main())
    for answer in answers:
        problem(answer, 404, "not-found")
    assert left == 0


# paths: customer ids with slashes -----------------------------------------------------------


def test_a_customer_id_with_a_slash_is_one_encoded_segment(storage):
    async def scenario(client, gate):
        made = await grant(client, TEN, customer="org%2F7")
        shown = await client.get("/admin/customers/org%2F7/credits")
        literal = await client.get("/admin/customers/org/7/credits")
        revoked = await client.delete(f"/admin/customers/org%2F7/credits/{made.json()['id']}")
        return made, shown, literal, revoked, await gate.customers.balance("org/7", "ai_credits")

    made, shown, literal, revoked, left = run(storage, scenario)
    assert made.status_code == 201
    assert shown.json()["customer"] == "org/7"
    assert shown.json()["credits"]["ai_credits"]["balance"] == 10
    problem(literal, 404, "not-found")  # org/7 with a slash as such names no customer
    assert revoked.json()["revoked"] == 10
    assert left == 0


def test_a_customer_whose_id_ends_in_credits_keeps_its_record_routes():
    async def scenario(client, gate):
        put = await client.put("/admin/customers/x%2Fcredits", json={"plan": "pro"})
        got = await client.get("/admin/customers/x%2Fcredits")
        posted = await client.post(
            "/admin/customers/x%2Fcredits", json=TEN, headers={"idempotency-key": "k"}
        )
        its_credits = await grant(client, TEN, customer="x%2Fcredits")
        x_credits = await client.get("/admin/customers/x/credits")
        await client.put("/admin/customers/a%2Fcredits%2Fg1", json={"plan": "pro"})
        deleted = await client.delete("/admin/customers/a%2Fcredits%2Fg1")
        gone = await client.get("/admin/customers/a%2Fcredits%2Fg1")
        return put, got, posted, its_credits, x_credits, deleted, gone

    put, got, posted, its_credits, x_credits, deleted, gone = run(MemoryStorage(), scenario)
    assert put.status_code == got.status_code == 200
    assert got.json()["customer"] == "x/credits"
    assert got.json()["plan"] == "pro"
    assert problem(posted, 405, "method-not-allowed")
    assert "PUT" in posted.headers["allow"]
    assert its_credits.status_code == 201  # /customers/x%2Fcredits/credits: x/credits's credits
    assert x_credits.json()["customer"] == "x"
    assert x_credits.json()["credits"]["ai_credits"]["grants"] == []
    assert deleted.status_code == 204
    problem(gone, 404, "customer-not-found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", CREDITS),
        ("PATCH", CREDITS),
        ("DELETE", CREDITS),
        ("GET", f"{CREDITS}/some-grant"),
        ("GET", "/admin/customers//credits"),
        ("DELETE", "/admin/customers//credits/g"),
    ],
)
def test_what_the_credits_routes_do_not_answer_is_a_problem(method, path):
    with admin(**CHANGES) as client:
        response = client.request(method, path)
    assert response.status_code in (404, 405)
    assert response.headers["content-type"] == PROBLEM


# the store, the audit log -------------------------------------------------------------------


def test_a_store_that_cannot_be_reached_is_503_on_every_credits_route():
    storage = open_storage(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    try:
        with admin(storage, **CHANGES) as client:
            for method, path, body in ROUTES:
                response = client.request(
                    method, path, json=body, headers={"idempotency-key": "key-1"}
                )
                problem(response, 503, "storage-unavailable")
                assert response.headers["retry-after"] == "5"
    finally:
        storage.close()


def test_grants_and_revocations_are_logged(caplog):
    async def scenario(client, gate):
        made = (await grant(client, TEN)).json()
        await grant(client, TEN)  # the same grant: nothing new to log
        await client.delete(f"{CREDITS}/{made['id']}")
        return made

    with caplog.at_level(logging.INFO, logger="plangate.admin"):
        made = run(MemoryStorage(), scenario)
    assert [record.getMessage() for record in caplog.records] == [
        f"admin: customer 'acme' granted 10 ai_credits (grant {made['id']})",
        f"admin: customer 'acme': grant {made['id']} of ai_credits revoked (10)",
    ]
