"""``plangate customer show|set|list`` and ``plangate plans migrate``: provisioning from a
shell, against the store the servers use (a real Redis here), never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from starlette.testclient import TestClient

from plangate import Gate, asgi, cli
from plangate.customers import CustomerStore
from tests.cli.support import run
from tests.middleware.apps import asgi_app
from tests.support import bearer, config, token

pytestmark = pytest.mark.redis

DB = 5  # a database of the session's Redis of its own, emptied before each test
WAIT = 15.0  # seconds a published change may take to be heard before the test fails


def catalog() -> dict[str, Any]:
    """The tests' config with a trial, a legacy plan and an add-on."""
    data = config()
    data["plans"]["pro"]["trial_days"] = 14
    data["plans"]["pro-2023"] = {"extends": "pro", "legacy": True}
    data["addons"] = {"token_pack": {"features": {"ai_tokens": {"add": 5000}}}}
    return data


@pytest.fixture
def config_file(tmp_path: Path, storage_uri: str) -> str:
    path = tmp_path / "plangate.yaml"
    path.write_text(yaml.safe_dump({**catalog(), "storage": storage_uri}))
    return str(path)


def set_(capsys: pytest.CaptureFixture[str], config_file: str, *argv: str) -> dict[str, Any]:
    status, out, err = run(capsys, "customer", "set", *argv, "--config", config_file)
    assert status == 0, err
    shown: dict[str, Any] = json.loads(out)
    return shown


@pytest.fixture
def gate(config_file: str) -> Iterator[Gate]:
    """A gate of its own, as a server built separately has."""
    built = Gate(config_file)
    yield built
    built.storage.close()


# show, set, list, migrate ----------------------------------------------------------------


def test_set_prints_the_record_and_show_reads_it_back_from_the_store(config_file, capsys):
    shown = set_(capsys, config_file, "acme", "--plan", "pro")
    assert (shown["customer"], shown["plan"], shown["version"]) == ("acme", "pro", 1)
    assert shown["entitlements"]["features"]["export_reports"] is True

    status, out, err = run(capsys, "customer", "show", "acme", "--config", config_file)
    assert (status, err) == (0, "")
    assert out.startswith('{\n  "customer": "acme",\n')  # indented JSON
    assert json.loads(out) == shown


def test_a_change_is_decided_on_by_a_gate_built_separately(config_file, gate, capsys):
    set_(capsys, config_file, "acme", "--plan", "enterprise")
    decision = gate.check("POST", "/v1/reports/1/export", token("acme", "free"), consume=False)
    assert decision.plan == "enterprise"  # the store's plan, not the token's claim
    assert decision.problem is None


def test_addons_and_overrides_are_merged_in_and_removed(config_file, capsys):
    set_(capsys, config_file, "acme", "--plan", "free")
    shown = set_(
        capsys,
        config_file,
        "acme",
        "--addon",
        "token_pack=2",
        "--override",
        "export_reports=true",
        "--override",
        "max_projects=7",
        "--override",
        'api_calls={"limit": 5, "window": "1m"}',
        "--override",
        "ai_tokens=unlimited",
    )
    assert shown["plan"] == "free"  # kept: not given
    assert shown["addons"] == {"token_pack": 2}
    assert shown["overrides"] == {
        "export_reports": True,
        "max_projects": 7,
        "api_calls": {"limit": 5, "window": "1m"},
        "ai_tokens": "unlimited",
    }
    assert shown["entitlements"]["features"] == {"export_reports": True, "max_projects": 7}

    shown = set_(
        capsys, config_file, "acme", "--addon", "token_pack=0", "--override", "max_projects=null"
    )
    assert shown["addons"] == {}
    assert set(shown["overrides"]) == {"export_reports", "api_calls", "ai_tokens"}
    assert shown["version"] == 3


def test_trial_starts_the_plans_trial_and_falls_back_to_the_plan_before(config_file, capsys):
    set_(capsys, config_file, "acme", "--plan", "free")
    shown = set_(capsys, config_file, "acme", "--plan", "pro", "--trial")
    ends = datetime.fromisoformat(shown["trial_ends_at"])
    expected = datetime.now(timezone.utc) + timedelta(days=14)
    assert abs((ends - expected).total_seconds()) < 60
    assert (shown["plan"], shown["previous_plan"]) == ("pro", "free")


def test_list_prints_json_lines_following_cursors_to_the_end(
    config_file, gate, capsys, monkeypatch
):
    monkeypatch.setattr(cli, "LIST_PAGE", 2)  # several pages of SCAN for seven customers
    for n in range(7):
        gate.customers.assign(f"c{n}", plan="pro" if n % 2 else "free")
    pages = []
    listing = CustomerStore.list

    def page(self: CustomerStore, **kwargs: Any) -> dict[str, Any]:
        pages.append(kwargs["cursor"])
        return listing(self, **kwargs)

    monkeypatch.setattr(CustomerStore, "list", page)

    status, out, _ = run(capsys, "customer", "list", "--config", config_file)
    assert status == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["customer"] for r in records) == [f"c{n}" for n in range(7)]
    assert all("entitlements" not in r for r in records)
    assert len(pages) > 1  # followed the cursors
    assert pages[0] is None
    assert None not in pages[1:]

    _, out, _ = run(capsys, "customer", "list", "--plan", "pro", "--config", config_file)
    assert sorted(json.loads(line)["customer"] for line in out.splitlines()) == ["c1", "c3", "c5"]

    _, out, _ = run(capsys, "customer", "list", "--limit", "3", "--config", config_file)
    assert len(out.splitlines()) == 3


def test_plans_migrate_moves_every_customer_and_a_dry_run_moves_none(config_file, gate, capsys):
    for name in ("a", "b", "c"):
        gate.customers.assign(name, plan="free")
    gate.customers.assign("d", plan="pro")
    argv = ["plans", "migrate", "--from", "free", "--to", "pro", "--config", config_file]

    status, out, _ = run(capsys, *argv, "--dry-run")
    assert status == 0
    assert json.loads(out) == {"from": "free", "to": "pro", "matched": 3, "migrated": 0}
    assert gate.customers.show("a")["plan"] == "free"

    status, out, _ = run(capsys, *argv)
    assert status == 0
    assert json.loads(out) == {"from": "free", "to": "pro", "matched": 3, "migrated": 3}
    assert {gate.customers.show(name)["plan"] for name in "abcd"} == {"pro"}


def test_a_legacy_plan_needs_allow_legacy(config_file, capsys):
    status, out, err = run(
        capsys, "customer", "set", "acme", "--plan", "pro-2023", "--config", config_file
    )
    assert (status, out) == (1, "")
    assert err == (
        "plangate: plan 'pro-2023' is a legacy plan: it stays with the customers who have it; "
        "pass --allow-legacy to assign it\n"
    )
    shown = set_(capsys, config_file, "acme", "--plan", "pro-2023", "--allow-legacy")
    assert shown["plan"] == "pro-2023"

    argv = ["plans", "migrate", "--from", "free", "--to", "pro-2023", "--config", config_file]
    status, _, err = run(capsys, *argv)
    assert status == 1
    assert "pass --allow-legacy" in err
    status, out, _ = run(capsys, *argv, "--allow-legacy")
    assert status == 0
    assert json.loads(out)["matched"] == 0


# a running app hears the change ----------------------------------------------------------


def test_a_running_app_decides_its_next_request_on_the_new_plan(config_file, storage_uri, capsys):
    # an hour of cache: only the change the store publishes can reach the app in time
    middleware = asgi.PlanGateMiddleware(
        asgi_app(), catalog(), storage=f"{storage_uri}?customer_cache_ttl=3600"
    )
    customers = middleware.gate.customers
    try:
        set_(capsys, config_file, "acme", "--plan", "free")
        with TestClient(middleware) as client:
            headers = bearer("acme", "pro")  # the store's plan beats the token's claim
            assert client.post("/v1/reports/1/export", headers=headers).status_code == 402
            # the first customer cached started the app's subscription: wait for it
            assert middleware.gate.storage.inner.changes.wait_subscribed(1, WAIT)  # type: ignore[attr-defined]
            seen = customers.version("acme")

            set_(capsys, config_file, "acme", "--plan", "pro")
            assert customers.wait_version("acme", seen + 1, WAIT), "the app did not hear it"
            assert client.post("/v1/reports/1/export", headers=headers).status_code == 200
    finally:
        middleware.gate.storage.close()


# errors: a message and an exit status, never a traceback ---------------------------------


def test_show_an_unknown_customer(config_file, capsys):
    assert run(capsys, "customer", "show", "nobody", "--config", config_file) == (
        1,
        "",
        "plangate: no customer 'nobody' in the store\n",
    )


def test_an_invalid_record_names_each_field(config_file, capsys):
    status, out, err = run(
        capsys,
        "customer",
        "set",
        "acme",
        "--plan",
        "gold",
        "--addon",
        "nope=1",
        "--override",
        "export_reports=3",
        "--config",
        config_file,
    )
    assert (status, out) == (1, "")
    assert err.splitlines() == [
        "plangate: plan: unknown plan 'gold'; known: enterprise, free, pro, pro-2023",
        "plangate: addons.nope: unknown add-on; known: token_pack",
        "plangate: overrides.export_reports: export_reports is a boolean feature: use true or "
        "false, got 3",
    ]


def test_a_trial_of_a_plan_without_trial_days_is_invalid(config_file, capsys):
    argv = ["customer", "set", "acme", "--plan", "free", "--trial", "--config", config_file]
    assert run(capsys, *argv) == (1, "", "plangate: trial: plan 'free' has no trial_days\n")


def test_the_store_unreachable(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PLANGATE_STORAGE", "redis://127.0.0.1:1/0")  # nothing listens there
    path = tmp_path / "plangate.yaml"
    path.write_text(yaml.safe_dump(catalog()))
    status, out, err = run(capsys, "customer", "show", "acme", "--config", str(path))
    assert (status, out) == (1, "")
    assert err.startswith("plangate: redis customer read failed: ")
    assert "Connection refused" in err


def test_a_bad_config_is_reported_as_check_reports_it(tmp_path, storage_uri, capsys):
    path = tmp_path / "plangate.yaml"
    path.write_text("version: 1\n")
    status, out, err = run(capsys, "customer", "show", "acme", "--config", str(path))
    assert (status, out, err) == (1, "", f"{path}:1: identity: required key is missing\n")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["set", "acme", "--addon", "token_pack"], "expected NAME=QTY, got 'token_pack'"),
        (["set", "acme", "--addon", "token_pack=two"], "is a whole number, not 'two'"),
        (["set", "acme", "--override", "max_projects"], "expected FEATURE=VALUE"),
        (["set", "acme", "--trial"], "--trial needs --plan (the plan to try)"),
        (["set", "acme"], "nothing to set: give --plan, --addon or --override"),
        (["list", "--limit", "0"], "a whole number of at least 1, not '0'"),
        (["show"], "the following arguments are required: ID"),
    ],
)
def test_bad_command_lines_exit_2(argv, message, config_file, capsys):
    status, out, err = run(capsys, "customer", *argv, "--config", config_file)
    assert (status, out) == (2, "")
    assert message in err


def test_customer_and_plans_alone_print_their_commands(capsys):
    for command, sub in (("customer", "show"), ("plans", "migrate")):
        status, out, _ = run(capsys, command)
        assert status == 2
        assert sub in out


def test_memory_storage_warns_that_no_server_sees_the_change(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no ./plangate.yaml: the demo's config, on memory://
    monkeypatch.delenv("PLANGATE_STORAGE", raising=False)
    status, out, err = run(capsys, "customer", "set", "acme-free", "--plan", "pro")
    assert status == 0
    assert json.loads(out)["plan"] == "pro"
    assert err.startswith("plangate: warning: the config's storage is memory://")
    assert "no server sees its changes" in err


# the console script ------------------------------------------------------------------------


def test_the_console_script_reads_what_the_cli_wrote(config_file, storage_uri, capsys):
    set_(capsys, config_file, "acme", "--plan", "pro", "--addon", "token_pack=1")
    env = {**os.environ, "PLANGATE_STORAGE": storage_uri}
    done = subprocess.run(
        [sys.executable, "-m", "plangate.cli", "customer", "show", "acme", "--config", config_file],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert (done.returncode, done.stderr) == (0, "")
    shown = json.loads(done.stdout)
    assert (shown["plan"], shown["addons"]) == ("pro", {"token_pack": 1})

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "plangate.cli",
            "customer",
            "show",
            "nobody",
            "--config",
            config_file,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "plangate: no customer 'nobody' in the store\n"
