"""The dashboard over HTTP: sign-in and its cookie, CSRF and origins refused, the security
headers, every page and action (through the customer store the admin API uses)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from starlette.testclient import TestClient

from plangate import AsyncGate
from tests.admin.support import TOKEN
from tests.billing.support import billing_config
from tests.dashboard.support import ORIGIN, dashboard_app, field, post, put, sign_in
from tests.support import Clock
from tests.support import token as jwt


@pytest.fixture
def app() -> tuple[Any, AsyncGate]:
    app, gate = dashboard_app()
    put(gate, "acme", {"plan": "pro"})
    return app, gate


@pytest.fixture
def client(app: tuple[Any, AsyncGate]) -> TestClient:
    client = TestClient(app[0], base_url=ORIGIN)
    assert sign_in(client).status_code == 303
    return client


def _record(gate: AsyncGate, customer: str) -> dict[str, Any]:
    return asyncio.run(gate.customers.show(customer))


# signing in -------------------------------------------------------------------------------


def test_a_page_without_a_session_sends_to_the_login_form(app: tuple[Any, AsyncGate]) -> None:
    client = TestClient(app[0], base_url=ORIGIN)
    answer = client.get("/admin/ui/customers/acme", follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/admin/ui/login?next=%2Fadmin%2Fui%2Fcustomers%2Facme"


def test_signing_in_sets_a_strict_http_only_cookie_that_expires(
    app: tuple[Any, AsyncGate],
) -> None:
    client = TestClient(app[0], base_url=ORIGIN)
    answer = sign_in(client)
    assert answer.headers["location"] == "/admin/ui/customers"
    cookie = next(
        c for c in answer.headers.get_list("set-cookie") if c.startswith("plangate_admin=")
    )
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert "Path=/admin/ui" in cookie
    assert "Max-Age=28800" in cookie
    assert client.get("/admin/ui/customers").status_code == 200


def test_the_cookie_is_secure_over_https(app: tuple[Any, AsyncGate]) -> None:
    client = TestClient(app[0], base_url="https://testserver")
    page = client.get("/admin/ui/login")
    answer = client.post(
        "/admin/ui/login",
        data={"nonce": field(page.text, "nonce"), "token": TOKEN},
        headers={"origin": "https://testserver"},
        follow_redirects=False,
    )
    cookie = next(
        c for c in answer.headers.get_list("set-cookie") if c.startswith("plangate_admin=")
    )
    assert "Secure" in cookie


def test_a_wrong_token_is_refused_and_sets_no_session(app: tuple[Any, AsyncGate]) -> None:
    client = TestClient(app[0], base_url=ORIGIN)
    answer = sign_in(client, "not-the-token")
    assert answer.status_code == 401
    assert "That is not the admin token." in answer.text
    assert not any(c.startswith("plangate_admin=") for c in answer.headers.get_list("set-cookie"))
    assert client.get("/admin/ui/customers", follow_redirects=False).status_code == 303


def test_a_login_from_another_origin_or_without_its_nonce_is_refused(
    app: tuple[Any, AsyncGate],
) -> None:
    client = TestClient(app[0], base_url=ORIGIN)
    page = client.get("/admin/ui/login")
    nonce = field(page.text, "nonce")
    other = client.post(
        "/admin/ui/login",
        data={"nonce": nonce, "token": TOKEN},
        headers={"origin": "http://evil.test"},
        follow_redirects=False,
    )
    assert other.status_code == 403
    forged = client.post(
        "/admin/ui/login",
        data={"nonce": "guessed", "token": TOKEN},
        headers={"origin": ORIGIN},
        follow_redirects=False,
    )
    assert forged.status_code == 403


def test_after_signing_in_only_a_dashboard_page_is_a_destination(
    app: tuple[Any, AsyncGate],
) -> None:
    client = TestClient(app[0], base_url=ORIGIN)
    for wanted in ("//evil.test/x", "https://evil.test/", "/elsewhere", "/admin/ui\\..\\x"):
        page = client.get("/admin/ui/login")
        answer = client.post(
            "/admin/ui/login",
            data={"nonce": field(page.text, "nonce"), "token": TOKEN, "next": wanted},
            headers={"origin": ORIGIN},
            follow_redirects=False,
        )
        assert answer.headers["location"] == "/admin/ui/customers"


def test_a_session_ends_when_it_expires_or_the_token_changes(tmp_path: Path) -> None:
    settings = billing_config()
    file = tmp_path / "plangate.yaml"
    file.write_text(yaml.safe_dump(settings))
    app, gate = dashboard_app(str(file))
    client = TestClient(app, base_url=ORIGIN)
    sign_in(client)
    assert client.get("/admin/ui/customers").status_code == 200
    settings["admin"]["token"] = "a-new-admin-token-after-a-leak"
    file.write_text(yaml.safe_dump(settings))
    assert gate.reload().changed
    assert client.get("/admin/ui/customers", follow_redirects=False).status_code == 303
    # and one that has lived its hour
    clock = Clock(1_800_000_000.0)
    expiring, _ = dashboard_app(billing_config(), clock=clock, session_ttl=3600)
    client = TestClient(expiring, base_url=ORIGIN)
    sign_in(client)
    clock.now += 3600
    assert client.get("/admin/ui/customers").status_code == 200
    clock.now += 1
    assert client.get("/admin/ui/customers", follow_redirects=False).status_code == 303


def test_signing_out_clears_the_cookie(client: TestClient) -> None:
    answer = post(client, "/admin/ui/logout", {}, follow_redirects=False)
    assert answer.status_code == 303
    assert any(c.startswith('plangate_admin=""') for c in answer.headers.get_list("set-cookie"))
    assert client.get("/admin/ui/customers", follow_redirects=False).status_code == 303


def test_without_an_admin_token_the_dashboard_is_not_there() -> None:
    settings = billing_config()
    settings["admin"] = {"token": None}
    app, _ = dashboard_app(settings)
    client = TestClient(app, base_url=ORIGIN)
    assert client.get("/admin/ui/login").status_code == 404
    assert client.get("/admin/ui/customers").status_code == 404


# what protects every page ------------------------------------------------------------------


def test_every_page_has_a_strict_content_security_policy(client: TestClient) -> None:
    for path in (
        "/admin/ui/login",
        "/admin/ui/customers",
        "/admin/ui/customers/acme",
        "/admin/ui/plans",
        "/admin/ui/config",
    ):
        answer = client.get(path)
        assert answer.status_code == 200, path
        policy = answer.headers["content-security-policy"]
        assert "default-src 'none'" in policy
        assert "script-src" not in policy
        assert "frame-ancestors 'none'" in policy
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["cache-control"] == "no-store"
        assert "<script" not in answer.text
        assert ' style="' not in answer.text  # no inline style: the policy allows none


@pytest.mark.parametrize(
    ("csrf", "origin"),
    [("missing", ORIGIN), ("wrong", ORIGIN), ("right", "http://evil.test"), ("right", None)],
)
def test_a_form_without_its_csrf_token_or_from_elsewhere_changes_nothing(
    client: TestClient, app: tuple[Any, AsyncGate], csrf: str, origin: str | None
) -> None:
    page = client.get("/admin/ui/customers/acme")
    data = {"plan": "free"}
    if csrf == "right":
        data["csrf"] = field(page.text, "csrf")
    elif csrf == "wrong":
        data["csrf"] = "0" * 64
    headers = {"origin": origin} if origin else {}
    answer = client.post("/admin/ui/customers/acme/plan", data=data, headers=headers)
    assert answer.status_code == 403
    assert "Nothing was changed" in answer.text
    assert _record(app[1], "acme")["plan"] == "pro"


def test_the_admin_api_still_wants_its_bearer_token(client: TestClient) -> None:
    assert client.get("/admin/customers/acme").status_code == 401  # the cookie is not a token


# pages --------------------------------------------------------------------------------------


def test_customers_are_listed_filtered_by_plan_and_paginated(app: tuple[Any, AsyncGate]) -> None:
    _, gate = app
    for n in range(55):
        put(gate, f"org-{n:02d}", {"plan": "free"})
    client = TestClient(app[0], base_url=ORIGIN)
    sign_in(client)
    first = client.get("/admin/ui/customers", params={"plan": "free"})
    assert first.text.count('<th scope="row">') == 50
    assert "/admin/ui/customers/acme" not in first.text  # on pro
    following = first.text.split('rel="next"')[0].rsplit('href="', 1)[1].split('"')[0]
    second = client.get(following.replace("&amp;", "&"))
    assert second.text.count('<th scope="row">') == 5


def test_a_search_by_id_opens_the_customer_or_says_it_is_not_there(client: TestClient) -> None:
    found = client.get("/admin/ui/customers", params={"q": "acme"}, follow_redirects=False)
    assert found.headers["location"] == "/admin/ui/customers/acme"
    missing = client.get("/admin/ui/customers", params={"q": "<b>nobody</b>"})
    assert missing.status_code == 404
    assert "No customer &#39;&lt;b&gt;nobody&lt;/b&gt;&#39;" in missing.text  # escaped


def test_a_customer_id_with_a_slash_has_its_page(app: tuple[Any, AsyncGate]) -> None:
    put(app[1], "team/7", {"plan": "free"})
    client = TestClient(app[0], base_url=ORIGIN)
    sign_in(client)
    page = client.get("/admin/ui/customers/team%2F7")
    assert page.status_code == 200
    assert 'id="current-plan">free' in page.text


def test_any_refusal_in_the_log_is_shown_and_odd_lines_are_skipped(tmp_path: Path) -> None:
    log = tmp_path / "decisions.jsonl"
    lines = [
        {
            "customer": "acme",
            "decision": "deny",
            "reason": "feature-not-in-plan",
            "method": "POST",
            "path": "/v1/reports/7/export",
            "time": "2026-12-02T07:00:00Z",
        },
        {"customer": "acme", "decision": "deny", "reason": "<script>x</script>"},
        {"customer": "acme", "decision": "allow"},
        ["not", "an", "object"],
    ]
    log.write_text("not json\n" + "\n".join(json.dumps(line) for line in lines) + "\n")
    app, gate = dashboard_app(billing_config(decision_log={"to": str(log)}))
    put(gate, "acme", {"plan": "free"})
    client = TestClient(app, base_url=ORIGIN)
    sign_in(client)
    page = client.get("/admin/ui/customers/acme")
    assert page.status_code == 200
    assert "<code>POST /v1/reports/7/export</code>" in page.text
    assert "feature-not-in-plan" in page.text
    assert "&lt;script&gt;x&lt;/script&gt;" in page.text  # escaped
    assert page.text.count("<tr><td>") == 2


def test_the_customer_page_shows_usage_credits_and_refusals(tmp_path: Path) -> None:
    log = tmp_path / "decisions.jsonl"
    settings = billing_config(decision_log={"to": str(log)})
    app, gate = dashboard_app(settings)
    put(gate, "acme", {"plan": "free"})
    asyncio.run(gate.customers.grant_credits("acme", "ai_credits", 250))

    async def use() -> None:
        for _ in range(7):  # free: 5 a minute — 2 refused
            decision = await gate.check("GET", "/v1/projects", jwt("acme", "free"))
            await gate.settle(decision, 200)

    asyncio.run(use())
    client = TestClient(app, base_url=ORIGIN)
    sign_in(client)
    page = client.get("/admin/ui/customers/acme").text
    assert '<meter id="m-api_calls-1" min="0" max="5" value="5"' in page
    assert "5 of 5 used (call)" in page
    assert 'id="balance-ai_credits">250<' in page
    assert page.count("quota-exceeded") == 2  # the two refusals, from the decision log
    assert 'class="bar"' in page  # the chart of the hour's usage
    assert "api_calls: 5 units in the last 24 hours" in page
    week = client.get("/admin/ui/customers/acme", params={"range": "7d"}).text
    assert "api_calls: 5 units in the last 7 days" in week


def test_the_plans_page_is_the_pricing_table(client: TestClient) -> None:
    page = client.get("/admin/ui/plans").text
    assert '<th scope="col">pro-2023 <span class="tag">legacy</span>' in page
    assert "5 per minute" in page  # free's api_calls
    assert "✓" in page  # a boolean feature granted


def test_the_config_page_shows_the_last_reload_error(tmp_path: Path) -> None:
    file = tmp_path / "plangate.yaml"
    file.write_text(yaml.safe_dump(billing_config()))
    app, gate = dashboard_app(str(file))
    file.write_text("version: 1\n")
    assert gate.reload().error is not None
    client = TestClient(app, base_url=ORIGIN)
    sign_in(client)
    page = client.get("/admin/ui/config").text
    assert "identity: required key is missing" in page
    assert "the version above still serves" in page


# actions ------------------------------------------------------------------------------------


def test_changing_a_plan_and_a_legacy_plan_needs_the_box(
    client: TestClient, app: tuple[Any, AsyncGate]
) -> None:
    moved = post(client, "/admin/ui/customers/acme/plan", {"plan": "free"}, follow_redirects=False)
    assert moved.headers["location"] == "/admin/ui/customers/acme?done=plan"
    assert _record(app[1], "acme")["plan"] == "free"
    refused = post(client, "/admin/ui/customers/acme/plan", {"plan": "pro-2023"})
    assert refused.status_code == 409
    assert "pro-2023 is a legacy plan" in refused.text
    assert _record(app[1], "acme")["plan"] == "free"
    post(client, "/admin/ui/customers/acme/plan", {"plan": "pro-2023", "allow_legacy": "on"})
    assert _record(app[1], "acme")["plan"] == "pro-2023"
    unknown = post(client, "/admin/ui/customers/acme/plan", {"plan": "platinum"})
    assert unknown.status_code == 422
    assert "Nothing was changed" in unknown.text


def test_add_on_quantities_are_set(client: TestClient, app: tuple[Any, AsyncGate]) -> None:
    post(client, "/admin/ui/customers/acme/addons", {"addon.token_pack": "3"})
    assert _record(app[1], "acme")["addons"] == {"token_pack": 3}
    wrong = post(client, "/admin/ui/customers/acme/addons", {"addon.token_pack": "lots"})
    assert wrong.status_code == 422
    assert _record(app[1], "acme")["addons"] == {"token_pack": 3}


@pytest.mark.parametrize("typed", ["²", "9" * 5000, "-3", "lots"])
def test_a_number_that_is_not_one_is_refused_not_a_crash(
    client: TestClient, app: tuple[Any, AsyncGate], typed: str
) -> None:
    grant = post(
        client,
        "/admin/ui/customers/acme/credits",
        {"key": "k-1", "feature": "ai_credits", "amount": typed},
    )
    assert grant.status_code == 422
    addons = post(client, "/admin/ui/customers/acme/addons", {"addon.token_pack": typed})
    assert addons.status_code == 422
    assert "Nothing was changed" in addons.text
    assert _record(app[1], "acme")["addons"] == {}


def test_an_add_on_cleared_is_removed_and_an_unknown_one_refused(
    client: TestClient, app: tuple[Any, AsyncGate]
) -> None:
    post(client, "/admin/ui/customers/acme/addons", {"addon.token_pack": "2"})
    assert _record(app[1], "acme")["addons"] == {"token_pack": 2}
    post(client, "/admin/ui/customers/acme/addons", {"addon.token_pack": ""})
    assert not _record(app[1], "acme")["addons"].get("token_pack")
    unknown = post(client, "/admin/ui/customers/acme/addons", {"addon.gold_pack": "1"})
    assert unknown.status_code == 422


def test_a_grant_without_its_key_is_refused(client: TestClient, app: tuple[Any, AsyncGate]) -> None:
    for key in ("", " ", "k" * 300):
        answer = post(
            client,
            "/admin/ui/customers/acme/credits",
            {"key": key, "feature": "ai_credits", "amount": "5"},
        )
        assert answer.status_code == 422
    assert asyncio.run(app[1].customers.credits("acme")) == {} or (
        asyncio.run(app[1].customers.balance("acme", "ai_credits")) == 0
    )


def test_a_grant_is_made_once_per_form(client: TestClient, app: tuple[Any, AsyncGate]) -> None:
    page = client.get("/admin/ui/customers/acme").text
    form = {"key": field(page, "key"), "feature": "ai_credits", "amount": "40"}
    first = post(client, "/admin/ui/customers/acme/credits", form, follow_redirects=False)
    again = post(client, "/admin/ui/customers/acme/credits", form, follow_redirects=False)
    assert first.headers["location"].endswith("done=credits")
    assert again.headers["location"].endswith("done=credits-again")
    assert asyncio.run(app[1].customers.balance("acme", "ai_credits")) == 40
    other = client.get("/admin/ui/customers/acme").text
    assert field(other, "key") != form["key"]  # a new form, a new grant


def test_a_plan_migration_counts_then_moves(client: TestClient, app: tuple[Any, AsyncGate]) -> None:
    put(app[1], "globex", {"plan": "pro"})
    dry = post(client, "/admin/ui/plans/migrate", {"from": "pro", "to": "free", "dry_run": "yes"})
    assert "Would move 2 customers from pro to free." in dry.text
    assert _record(app[1], "acme")["plan"] == "pro"
    done = post(client, "/admin/ui/plans/migrate", {"from": "pro", "to": "free"})
    assert "Moved 2 customers from pro to free." in done.text
    assert _record(app[1], "acme")["plan"] == "free"


def test_the_stylesheet_is_served_with_the_pages(client: TestClient) -> None:
    css = client.get("/admin/ui/static/plangate.css")
    assert css.status_code == 200
    assert css.headers["content-type"].startswith("text/css")
    assert "--accent" in css.text
    assert json.dumps


def test_every_control_has_a_label_and_the_page_a_language(client: TestClient) -> None:
    import re

    for path in ("/admin/ui/customers", "/admin/ui/customers/acme", "/admin/ui/plans"):
        page = client.get(path).text
        assert '<html lang="en">' in page
        labelled = set(re.findall(r'<label for="([^"]+)"', page))
        controls = re.findall(r"<(input|select)([^>]*)>", page)
        for kind, attributes in controls:
            if 'type="hidden"' in attributes:
                continue
            named = re.search(r'id="([^"]+)"', attributes)
            wrapped = 'type="checkbox"' in attributes  # inside its <label>
            assert wrapped or (named and named.group(1) in labelled), (path, kind, attributes)


def test_the_gateway_serves_the_dashboard() -> None:
    from plangate.gateway import GatewayService

    with TestClient(GatewayService(billing_config()), base_url=ORIGIN) as gateway:
        assert sign_in(gateway).status_code == 303
        assert gateway.get("/admin/ui/plans").status_code == 200


def test_a_store_that_cannot_be_reached_is_a_503_page_not_a_crash(
    client: TestClient, app: tuple[Any, AsyncGate], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def down(*args: Any, **kwargs: Any) -> Any:
        from plangate.errors import StorageError

        raise StorageError("redis://127.0.0.1:1/0: connection refused")

    monkeypatch.setattr(app[1].customers, "show", down)
    monkeypatch.setattr(app[1].customers, "list", down)
    for path in ("/admin/ui/customers", "/admin/ui/customers/acme"):
        answer = client.get(path)
        assert answer.status_code == 503
        assert "The store cannot be reached" in answer.text
        assert answer.headers["retry-after"] == "1"
        assert answer.headers["content-security-policy"].startswith("default-src 'none'")
    assert client.get("/admin/ui/nowhere").status_code == 404
