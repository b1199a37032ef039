"""GET, PUT, PATCH and DELETE /admin/customers/{id}: what is written is what the entitlements
show, at once."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from plangate.engine import PROBLEM_BASE
from tests.admin.support import PROBLEM, START, admin
from tests.support import Clock

DAY = 86400.0


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat()


def limit(body: dict, meter: str) -> tuple[int, str]:
    """The first limit of ``meter`` in a record's entitlements, and where it comes from."""
    first = body["entitlements"]["meters"][meter]["limits"][0]
    return first["limit"], first["source"]


def test_a_put_record_reads_back_with_its_version_as_the_etag():
    with admin() as client:
        put = client.put(
            "/admin/customers/acme",
            json={"plan": "pro", "billing_anchor": "2027-01-01T00:00:00Z"},
        )
        got = client.get("/admin/customers/acme")
    assert put.status_code == got.status_code == 200
    assert put.json() == got.json()
    assert got.headers["etag"] == '"1"'
    body = got.json()
    assert {k: v for k, v in body.items() if k != "entitlements"} == {
        "customer": "acme",
        "plan": "pro",
        "addons": {},
        "overrides": {},
        "trial_ends_at": None,
        "billing_anchor": "2027-01-01T00:00:00+00:00",
        "previous_plan": None,
        "subscriptions": [],
        "version": 1,
    }
    assert body["entitlements"]["plan"] == "pro"
    assert body["entitlements"]["features"]["export_reports"] is True


def test_every_write_moves_the_version_and_the_etag_on():
    with admin() as client:
        client.put("/admin/customers/acme", json={"plan": "free"})
        client.patch("/admin/customers/acme", json={"plan": "pro"})
        put = client.put("/admin/customers/acme", json={"plan": "free"})
    assert put.json()["version"] == 3
    assert put.headers["etag"] == '"3"'


def test_a_put_replaces_the_whole_record():
    with admin() as client:
        client.put(
            "/admin/customers/acme",
            json={"plan": "pro", "addons": {"token_pack": 2}, "overrides": {"max_projects": 9}},
        )
        body = client.put("/admin/customers/acme", json={"plan": "free"}).json()
    assert (body["plan"], body["addons"], body["overrides"]) == ("free", {}, {})


def test_a_body_may_carry_back_what_get_answered():
    with admin() as client:
        got = client.put("/admin/customers/acme", json={"plan": "free"}).json()
        got["plan"] = "pro"
        put = client.put("/admin/customers/acme", json=got)
    assert put.status_code == 200
    assert put.json()["plan"] == "pro"


def test_a_merge_patch_changes_what_it_names_and_null_removes():
    with admin() as client:
        client.put(
            "/admin/customers/acme",
            json={
                "plan": "pro",
                "addons": {"token_pack": 2, "extra_calls": 1},
                "overrides": {"max_projects": 9, "export_reports": False},
            },
        )
        patched = client.patch(
            "/admin/customers/acme",
            json={
                "addons": {"token_pack": None, "reports": 1},
                "overrides": {"max_projects": None},
            },
            headers={"content-type": "application/merge-patch+json"},
        )
    assert patched.status_code == 200
    body = patched.json()
    assert body["plan"] == "pro"
    assert body["addons"] == {"extra_calls": 1, "reports": 1}
    assert body["overrides"] == {"export_reports": False}
    assert body["version"] == 2


def test_a_patch_of_an_unknown_customer_creates_its_record():
    with admin() as client:
        patched = client.patch("/admin/customers/globex", json={"plan": "pro"})
    assert patched.status_code == 200
    assert patched.json()["version"] == 1


@pytest.mark.parametrize("quantity", [0, 1, 5])
def test_addon_quantities_raise_limits_by_add_times_quantity(quantity):
    with admin() as client:
        body = client.put(
            "/admin/customers/acme",
            json={"plan": "pro", "addons": {"token_pack": quantity, "extra_calls": quantity}},
        ).json()
    assert body["addons"] == ({"token_pack": quantity, "extra_calls": quantity} if quantity else {})
    source = "addon" if quantity else "plan"
    assert limit(body, "ai_tokens") == (10000 + 1000 * quantity, source)
    assert limit(body, "api_calls") == (1000 + 100 * quantity, source)


def test_an_addon_enables_a_boolean_feature_the_plan_lacks():
    with admin() as client:
        body = client.put(
            "/admin/customers/acme", json={"plan": "free", "addons": {"reports": 1}}
        ).json()
    assert body["entitlements"]["features"]["export_reports"] is True
    assert body["entitlements"]["sources"]["export_reports"] == "addon"


def test_overrides_of_each_kind_show_in_the_entitlements():
    overrides = {
        "export_reports": True,
        "max_projects": 77,
        "api_calls": {"limit": 9, "window": "1m"},
    }
    with admin() as client:
        body = client.put(
            "/admin/customers/acme", json={"plan": "free", "overrides": overrides}
        ).json()
    entitlements = body["entitlements"]
    assert body["overrides"] == overrides
    assert entitlements["features"]["export_reports"] is True
    assert entitlements["features"]["max_projects"] == 77
    assert entitlements["sources"]["export_reports"] == "override"
    assert entitlements["sources"]["max_projects"] == "override"
    assert limit(body, "api_calls") == (9, "override")


def test_a_trial_starts_now_and_ends_after_the_plans_trial_days():
    clock = Clock(START)
    with admin(clock=clock) as client:
        client.put("/admin/customers/acme", json={"plan": "free"})
        body = client.patch("/admin/customers/acme", json={"plan": "pro", "trial": True}).json()
    assert body["plan"] == "pro"
    assert body["previous_plan"] == "free"
    assert body["trial_ends_at"] == iso(START + 14 * DAY)
    assert body["entitlements"]["plan"] == "pro"
    assert body["entitlements"]["trial_ends_at"] == iso(START + 14 * DAY)


def test_after_the_trial_the_entitlements_are_the_previous_plans():
    clock = Clock(START)
    with admin(clock=clock) as client:
        client.put("/admin/customers/acme", json={"plan": "free"})
        client.patch("/admin/customers/acme", json={"plan": "pro", "trial": True})
        clock.now = START + 14 * DAY - 1
        during = client.get("/admin/customers/acme").json()["entitlements"]
        clock.now = START + 14 * DAY
        after = client.get("/admin/customers/acme").json()
    assert during["plan"] == "pro"
    assert after["plan"] == "pro"  # the record is not rewritten; its entitlements fall back
    assert after["entitlements"]["plan"] == "free"
    assert after["entitlements"]["features"]["export_reports"] is False
    assert limit(after, "api_calls") == (5, "plan")


def test_a_deleted_customer_is_gone():
    with admin() as client:
        client.put("/admin/customers/acme", json={"plan": "pro"})
        deleted = client.delete("/admin/customers/acme")
        got = client.get("/admin/customers/acme")
        again = client.delete("/admin/customers/acme")
    assert deleted.status_code == 204
    assert deleted.content == b""
    assert got.status_code == again.status_code == 404
    assert got.json()["type"] == PROBLEM_BASE + "customer-not-found"


def test_an_unknown_customer_is_a_404_problem():
    with admin() as client:
        response = client.get("/admin/customers/nobody")
    assert response.status_code == 404
    assert response.headers["content-type"] == PROBLEM
    assert response.json() == {
        "type": PROBLEM_BASE + "customer-not-found",
        "title": "Customer not found",
        "status": 404,
        "detail": "no customer 'nobody' in the store",
        "customer": "nobody",
    }


def test_a_customer_id_is_one_percent_encoded_path_segment():
    with admin() as client:
        put = client.put("/admin/customers/org%2F7%20%C3%BC", json={"plan": "pro"})
        got = client.get("/admin/customers/org%2F7%20%C3%BC")
        unencoded = client.get("/admin/customers/org/7 ü")
    assert put.status_code == got.status_code == 200
    assert got.json()["customer"] == "org/7 ü"
    assert unencoded.status_code == 404
    assert unencoded.json()["type"] == PROBLEM_BASE + "not-found"


# If-Match: compare-and-set ----------------------------------------------------------------


@pytest.mark.parametrize("if_match", ['"2"', "2", ' "2" '])
def test_if_match_naming_the_current_version_writes(if_match):
    with admin() as client:
        client.put("/admin/customers/acme", json={"plan": "free"})
        client.put("/admin/customers/acme", json={"plan": "free"})
        put = client.put(
            "/admin/customers/acme", json={"plan": "pro"}, headers={"if-match": if_match}
        )
    assert put.status_code == 200
    assert put.json()["version"] == 3


@pytest.mark.parametrize(
    ("method", "body"),
    [("PUT", {"plan": "pro"}), ("PATCH", {"addons": {"token_pack": 1}}), ("DELETE", None)],
)
def test_if_match_naming_another_version_is_412_and_writes_nothing(method, body):
    with admin() as client:
        client.put("/admin/customers/acme", json={"plan": "free"})
        client.patch("/admin/customers/acme", json={"overrides": {"max_projects": 4}})
        refused = client.request(
            method, "/admin/customers/acme", json=body, headers={"if-match": '"1"'}
        )
        after = client.get("/admin/customers/acme")
    assert refused.status_code == 412
    assert refused.headers["content-type"] == PROBLEM
    problem = refused.json()
    assert problem["type"] == PROBLEM_BASE + "version-conflict"
    assert problem["current_version"] == 2
    assert problem["expected_version"] == 1
    assert after.json()["version"] == 2
    assert after.json()["plan"] == "free"


def test_the_etag_of_a_get_is_what_if_match_takes():
    with admin() as client:
        client.put("/admin/customers/acme", json={"plan": "free"})
        etag = client.get("/admin/customers/acme").headers["etag"]
        first = client.patch(
            "/admin/customers/acme", json={"plan": "pro"}, headers={"if-match": etag}
        )
        second = client.patch(
            "/admin/customers/acme", json={"plan": "free"}, headers={"if-match": etag}
        )
    assert first.status_code == 200
    assert second.status_code == 412  # a lost update caught


# legacy plans -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_a_legacy_plan_is_refused_naming_it_unless_allowed(method):
    with admin() as client:
        refused = client.request(method, "/admin/customers/acme", json={"plan": "pro-2023"})
        allowed = client.request(
            method, "/admin/customers/acme?allow_legacy=true", json={"plan": "pro-2023"}
        )
    assert refused.status_code == 409
    assert refused.headers["content-type"] == PROBLEM
    assert refused.json()["type"] == PROBLEM_BASE + "legacy-plan"
    assert refused.json()["plan"] == "pro-2023"
    assert allowed.status_code == 200
    assert allowed.json()["entitlements"]["plan"] == "pro-2023"


def test_a_customer_on_a_legacy_plan_keeps_it_through_other_changes():
    with admin() as client:
        client.put("/admin/customers/acme?allow_legacy=1", json={"plan": "pro-2023"})
        patched = client.patch("/admin/customers/acme", json={"addons": {"token_pack": 1}})
    assert patched.status_code == 200
    assert patched.json()["plan"] == "pro-2023"


def test_a_trial_of_a_legacy_plan_needs_allow_legacy_too():
    with admin() as client:
        refused = client.patch("/admin/customers/acme", json={"plan": "pro-2023", "trial": True})
        allowed = client.patch(
            "/admin/customers/acme?allow_legacy=true", json={"plan": "pro-2023", "trial": True}
        )
    assert refused.status_code == 409
    assert allowed.json()["trial_ends_at"] == iso(START + 30 * DAY)


# a record the config does not allow -------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"plan": "pro", "addons": {"token_pack": "lots"}}, "addons.token_pack"),
        ({"plan": "pro", "addons": {"token_pack": -1}}, "addons.token_pack"),
        ({"plan": "pro", "addons": {"gift_cards": 1}}, "addons.gift_cards"),
        ({"plan": "pro", "overrides": {"api_calls": "many"}}, "overrides.api_calls"),
        ({"plan": "pro", "overrides": {"api_calls": {"limit": 5}}}, "overrides.api_calls"),
        ({"plan": "pro", "overrides": {"teleport": True}}, "overrides.teleport"),
        ({"plan": "platinum"}, "plan"),
        ({"plan": 7}, "plan"),
        ({"plan": "free", "trial": True}, "trial"),
        ({"plan": "pro", "trial_ends_at": "next tuesday"}, "trial_ends_at"),
        ({"plan": "pro", "colour": "blue"}, "colour"),
        ({"customer": "globex", "plan": "pro"}, "customer"),
    ],
)
@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_a_record_the_config_does_not_allow_is_422_naming_the_field(method, body, field):
    with admin() as client:
        response = client.request(method, "/admin/customers/acme", json=body)
        stored = client.get("/admin/customers/acme")
    assert response.status_code == 422
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["type"] == PROBLEM_BASE + "invalid-record"
    assert problem["field"] == field
    assert problem["errors"][0]["field"] == field
    assert problem["errors"][0]["detail"]
    assert stored.status_code == 404  # nothing was written


def test_every_error_of_a_record_is_listed():
    with admin() as client:
        problem = client.put(
            "/admin/customers/acme",
            json={"plan": "platinum", "addons": {"token_pack": "lots"}, "overrides": {"x": 1}},
        ).json()
    assert [error["field"] for error in problem["errors"]] == [
        "plan",
        "addons.token_pack",
        "overrides.x",
    ]
    assert problem["field"] == "plan"


def test_a_get_answers_head_too():
    with admin() as client:
        client.put("/admin/customers/acme", json={"plan": "pro"})
        head = client.head("/admin/customers/acme")
    assert head.status_code == 200
    assert head.headers["etag"] == '"1"'


def test_records_are_not_cached_by_intermediaries():
    with admin() as client:
        response = client.put("/admin/customers/acme", json={"plan": "pro"})
    assert response.headers["cache-control"] == "no-store"


def test_a_change_is_seen_by_the_next_request_in_the_same_process():
    with admin() as client:
        client.put("/admin/customers/acme", json={"plan": "free"})
        assert client.get("/admin/customers/acme").json()["entitlements"]["plan"] == "free"
        client.patch("/admin/customers/acme", json={"plan": "pro"})
        assert client.get("/admin/customers/acme").json()["entitlements"]["plan"] == "pro"


def test_the_trial_end_is_an_iso_time_with_offset():
    with admin() as client:
        body = client.patch("/admin/customers/acme", json={"plan": "pro", "trial": True}).json()
    ends = datetime.fromisoformat(body["trial_ends_at"])
    assert ends - datetime.fromtimestamp(START, timezone.utc) == timedelta(days=14)
