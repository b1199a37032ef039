"""What the admin API does the same on every backend (memory, Redis, Redis Cluster): listings,
migrations, and concurrent writes that never lose each other's fields."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from plangate.engine import PROBLEM_BASE
from plangate.storage import Storage
from tests.admin.support import PROBLEM, async_admin

PRO = [f"pro-{i}" for i in range(7)]
FREE = [f"free-{i}" for i in range(5)]


def run(storage: Storage, scenario: Any, **changes: Any) -> Any:
    async def main() -> Any:
        async with async_admin(storage, **changes) as client:
            return await scenario(client)

    return asyncio.run(main())


async def provision(client: httpx.AsyncClient, plans: dict[str, list[str]]) -> None:
    for plan, customers in plans.items():
        for customer in customers:
            response = await client.put(
                f"/admin/customers/{customer}?allow_legacy=true", json={"plan": plan}
            )
            assert response.status_code == 200, response.text


async def every_page(client: httpx.AsyncClient, query: str) -> list[dict[str, Any]]:
    pages = []
    cursor = None
    for _ in range(100):
        params = query + (f"&cursor={cursor}" if cursor else "")
        response = await client.get(f"/admin/customers?{params}")
        assert response.status_code == 200, response.text
        pages.append(response.json())
        cursor = response.json()["next_cursor"]
        if cursor is None:
            return pages
    raise AssertionError("the listing never ended")


# listing -----------------------------------------------------------------------------------


def test_a_listing_pages_through_the_customers_of_a_plan(storage):
    async def scenario(client):
        await provision(client, {"pro": PRO, "free": FREE})
        return await every_page(client, "plan=pro&limit=2"), await every_page(client, "limit=5")

    pro_pages, all_pages = run(storage, scenario)
    pro = [record for page in pro_pages for record in page["customers"]]
    assert len(pro_pages) > 1  # a page holds about limit records (Redis: SCAN's COUNT)
    assert all(record["plan"] == "pro" for record in pro)
    assert {record["customer"] for record in pro} == set(PRO)  # SCAN may repeat, never misses
    assert {record["customer"] for page in all_pages for record in page["customers"]} == {
        *PRO,
        *FREE,
    }
    listed = pro[0]
    assert set(listed) == {
        "customer",
        "plan",
        "addons",
        "overrides",
        "trial_ends_at",
        "billing_anchor",
        "previous_plan",
        "subscriptions",
        "version",
    }


def test_a_listing_answers_one_page_of_100_by_default(storage):
    async def scenario(client):
        await provision(client, {"free": FREE})
        return (await client.get("/admin/customers")).json()

    page = run(storage, scenario)
    assert {record["customer"] for record in page["customers"]} == set(FREE)
    assert page["next_cursor"] is None


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=-1", "limit"),
        ("limit=ten", "limit"),
        ("limit=1e3", "limit"),
        ("limit=", "limit"),
        ("cursor=not-a-cursor!", "cursor"),
    ],
)
def test_a_bad_limit_or_cursor_is_400_naming_it(storage, query, parameter):
    async def scenario(client):
        return await client.get(f"/admin/customers?{query}")

    response = run(storage, scenario)
    assert response.status_code == 400
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["type"] == PROBLEM_BASE + "malformed-request"
    assert response.json()["parameter"] == parameter


# migration ---------------------------------------------------------------------------------


def test_a_migration_dry_run_counts_then_moves_then_finds_nothing(storage):
    async def scenario(client):
        await provision(client, {"pro-2023": PRO, "free": FREE})
        body = {"from": "pro-2023", "to": "pro"}
        dry = await client.post("/admin/plans/migrate", json={**body, "dry_run": True})
        listed_after_dry = await every_page(client, "plan=pro-2023")
        real = await client.post("/admin/plans/migrate", json=body)
        again = await client.post("/admin/plans/migrate", json={**body, "dry_run": False})
        moved = await client.get(f"/admin/customers/{PRO[0]}")
        untouched = await client.get(f"/admin/customers/{FREE[0]}")
        return dry, listed_after_dry, real, again, moved, untouched

    dry, listed_after_dry, real, again, moved, untouched = run(storage, scenario)
    assert dry.json() == {"from": "pro-2023", "to": "pro", "matched": 7, "migrated": 0}
    assert {r["customer"] for page in listed_after_dry for r in page["customers"]} == set(PRO)
    assert real.status_code == 200
    assert real.json() == {"from": "pro-2023", "to": "pro", "matched": 7, "migrated": 7}
    assert again.json() == {"from": "pro-2023", "to": "pro", "matched": 0, "migrated": 0}
    assert moved.json()["plan"] == "pro"
    assert moved.json()["entitlements"]["plan"] == "pro"
    assert moved.json()["version"] == 2
    assert untouched.json()["version"] == 1


def test_a_trial_that_would_fall_back_to_the_old_plan_falls_back_to_the_new(storage):
    async def scenario(client):
        await provision(client, {"pro-2023": ["acme"]})
        await client.patch("/admin/customers/acme", json={"plan": "pro", "trial": True})
        migrated = await client.post(
            "/admin/plans/migrate", json={"from": "pro-2023", "to": "free"}
        )
        return migrated, await client.get("/admin/customers/acme")

    migrated, record = run(storage, scenario)
    assert migrated.json()["migrated"] == 1
    assert (record.json()["plan"], record.json()["previous_plan"]) == ("pro", "free")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"from": "pro-2023", "to": "pro", "dryrun": True}, "dryrun"),
        ({"from": "pro-2023", "to": "platinum"}, "to"),
        ({"from": "pro-2023"}, "to"),
        ({"to": "pro"}, "from"),
        ({"from": "pro-2023", "to": "pro", "dry_run": "yes"}, "dry_run"),
        ({"from": "pro-2023", "to": "pro", "allow_legacy": 1}, "allow_legacy"),
    ],
)
def test_a_migration_the_config_does_not_allow_is_422_and_moves_nobody(storage, body, field):
    async def scenario(client):
        await provision(client, {"pro-2023": ["acme"]})
        refused = await client.post("/admin/plans/migrate", json=body)
        return refused, await client.get("/admin/customers/acme")

    refused, record = run(storage, scenario)
    assert refused.status_code == 422
    assert refused.json()["type"] == PROBLEM_BASE + "invalid-record"
    assert refused.json()["field"] == field
    assert record.json()["plan"] == "pro-2023"


def test_a_migration_to_a_legacy_plan_needs_allow_legacy(storage):
    async def scenario(client):
        await provision(client, {"pro": ["acme"], "free": ["globex"]})
        refused = await client.post("/admin/plans/migrate", json={"from": "pro", "to": "pro-2023"})
        in_body = await client.post(
            "/admin/plans/migrate", json={"from": "pro", "to": "pro-2023", "allow_legacy": True}
        )
        in_query = await client.post(
            "/admin/plans/migrate?allow_legacy=true", json={"from": "free", "to": "pro-2023"}
        )
        return refused, in_body, in_query

    refused, in_body, in_query = run(storage, scenario)
    assert refused.status_code == 409
    assert refused.json()["type"] == PROBLEM_BASE + "legacy-plan"
    assert refused.json()["plan"] == "pro-2023"
    assert in_body.json()["migrated"] == 1
    assert in_query.json()["migrated"] == 1


# concurrency -------------------------------------------------------------------------------

# 20 writers at once: the store retries a patch up to 20 times, and each retry means that
# one of the 19 others has written
MANY = 20
PACKS = {f"pack_{i}": {"features": {"ai_tokens": {"add": 2**i}}} for i in range(MANY - 2)}


def test_concurrent_patches_of_different_fields_all_survive(storage):
    async def scenario(client):
        await client.put("/admin/customers/acme", json={"plan": "pro"})
        writes = [
            client.patch("/admin/customers/acme", json={"addons": {name: 1}}) for name in PACKS
        ]
        writes += [
            client.patch("/admin/customers/acme", json={"overrides": {"max_projects": 100}}),
            client.patch("/admin/customers/acme", json={"overrides": {"export_reports": False}}),
        ]
        answers = await asyncio.gather(*writes)
        return answers, await client.get("/admin/customers/acme")

    answers, record = run(storage, scenario, addons=PACKS)
    assert [answer.status_code for answer in answers] == [200] * MANY
    body = record.json()
    assert body["addons"] == dict.fromkeys(PACKS, 1)
    assert body["overrides"] == {"max_projects": 100, "export_reports": False}
    assert body["version"] == MANY + 1  # every patch one write, none lost
    tokens = body["entitlements"]["meters"]["ai_tokens"]["limits"][0]["limit"]
    assert tokens == 10000 + 2 ** len(PACKS) - 1  # each pack a bit of its own


def test_concurrent_puts_each_write_and_the_last_wins(storage):
    async def scenario(client):
        await client.put("/admin/customers/acme", json={"plan": "free"})
        bodies = [{"plan": "pro", "overrides": {"max_projects": i}} for i in range(MANY)]
        answers = await asyncio.gather(
            *(client.put("/admin/customers/acme", json=body) for body in bodies)
        )
        return answers, await client.get("/admin/customers/acme")

    answers, record = run(storage, scenario)
    assert [answer.status_code for answer in answers] == [200] * MANY
    last = max(answers, key=lambda answer: answer.json()["version"])
    assert record.json()["version"] == MANY + 1
    assert record.json()["overrides"] == last.json()["overrides"]


def test_concurrent_patches_with_the_same_if_match_let_exactly_one_write(storage):
    async def scenario(client):
        await client.put("/admin/customers/acme", json={"plan": "pro"})
        return await asyncio.gather(
            *(
                client.patch(
                    "/admin/customers/acme",
                    json={"addons": {name: 1}},
                    headers={"if-match": '"1"'},
                )
                for name in list(PACKS)[:5]
            )
        )

    answers = run(storage, scenario, addons=PACKS)
    assert sorted(answer.status_code for answer in answers) == [200, 412, 412, 412, 412]
