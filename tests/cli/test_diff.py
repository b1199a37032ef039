"""``plangate diff OLD NEW [--storage URI]``: what changes between two configs, in words, and
with the live store, whom it touches (the session's real Redis)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from plangate import Gate
from plangate.config import load_config
from plangate.config._diff import diff
from plangate.engine import CustomerRecord
from plangate.storage import open_storage
from tests.cli.support import run
from tests.support import config, token

DB = 8  # a database of the session's Redis of its own, emptied before each test


def write(tmp_path: Path, name: str, settings: dict[str, Any]) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(settings))  # JSON is YAML
    return str(path)


def changed() -> dict[str, Any]:
    """The test config with one of each kind of change."""
    new = copy.deepcopy(config())
    new["plans"]["pro"]["features"]["api_calls"] = {"limit": 3, "window": "1m"}  # lowered
    new["plans"]["free"]["features"]["max_projects"] = 5
    new["plans"]["free"]["features"]["ai_tokens"] = {"limit": 20000, "period": "month"}  # raised
    new["features"]["sso"] = {"kind": "boolean"}
    new["plans"]["team"] = {"extends": "pro", "features": {"sso": True}}
    new["plans"]["enterprise"]["legacy"] = True
    new["routes"] = [r for r in new["routes"] if r["match"] != "POST /v1/stream"]
    new["routes"][2]["mode"] = "shadow"
    new["default_plan"] = "pro"
    return new


def test_every_kind_of_change_in_words() -> None:
    changes = diff(load_config(config()), load_config(changed()))
    lines = [f"{c.section} {c.sign} {c.name}: {c.text}" for c in changes]
    assert lines == [
        "features + sso: new boolean feature",
        "plans ~ enterprise: now legacy: kept by its customers, assigned to no one new",
        "plans ~ free: max_projects: 3 → 5",
        "plans ~ free: ai_tokens: ai_tokens-month 10,000 → 20,000 (raised)",
        # pro extends free: what free gains, pro gains unless it says otherwise
        "plans ~ pro: ai_tokens: ai_tokens-month 10,000 → 20,000 (raised)",
        "plans ~ pro: api_calls: api_calls-1m 1,000 → 3 (lowered)",
        "plans + team: new plan: export_reports true, max_projects 50, sso true, "
        "ai_tokens 20,000 a month, api_calls 3 per 1m",
        "routes ~ POST /v1/completions: mode enforce → shadow",
        "routes - POST /v1/stream: rule removed: its requests fall to the next rule that "
        "matches, or to unmatched",
        "settings ~ default_plan: free → pro",
    ]
    binds = {c.binds[0]: [lim.policy for lim in c.binds[1]] for c in changes if c.binds}
    assert binds == {"pro": ["api_calls-1m"], "team": ["ai_tokens-month", "api_calls-1m"]}


def test_a_rule_moved_past_another_is_a_change() -> None:
    new = config()
    new["routes"][1], new["routes"][2] = new["routes"][2], new["routes"][1]
    texts = [c.text for c in diff(load_config(config()), load_config(new))]
    assert any(t.startswith("moved: rule 2 → 3") for t in texts)


def test_exit_status_says_whether_anything_changes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    old = write(tmp_path, "old", config())
    status, out, _ = run(capsys, "diff", old, write(tmp_path, "same", config()))
    assert (status, out.strip()) == (0, f"{old} → {tmp_path / 'same.yaml'}: nothing changes")
    status, out, _ = run(capsys, "diff", old, write(tmp_path, "new", changed()))
    assert status == 1
    assert "  ~ pro: api_calls: api_calls-1m 1,000 → 3 (lowered)" in out.splitlines()
    broken = changed()
    broken["default_plan"] = "nope"
    status, _, err = run(capsys, "diff", old, write(tmp_path, "broken", broken))
    assert status == 2
    assert "default_plan: unknown plan 'nope'" in err


@pytest.mark.redis
def test_with_the_store_it_counts_customers_and_finds_who_is_over_a_lowered_limit(
    capsys: pytest.CaptureFixture[str], storage_uri: str, tmp_path: Path
) -> None:
    old = write(tmp_path, "old", config())
    store = open_storage(storage_uri)
    try:
        gate = Gate(config(), storage=store)
        for customer, plan, calls in (
            ("acme", "pro", 5),
            ("globex", "pro", 2),
            ("hooli", "pro", 4),
        ):
            store.put_customer(CustomerRecord(customer, plan=plan))
            for _ in range(calls):
                assert gate.check("GET", "/v1/things", token(customer)).allowed
        store.put_customer(CustomerRecord("initech", plan="free"))
    finally:
        store.close()
    argv = ("diff", old, write(tmp_path, "new", changed()), "--storage", storage_uri, "--top", "1")
    status, out, _ = run(capsys, *argv)
    assert status == 1
    impact = out[out.index("impact (") :].splitlines()
    assert impact[1:] == [
        "  enterprise: 0 customers with a record on it",
        "  free: 1 customers with a record on it",
        "  pro: 3 customers with a record on it",
        "    api_calls-1m at 3: 2 over it now: acme 5/3 (and 1 more)",
        "  team: 0 customers with a record on it",
        "    ai_tokens-month at 20,000: 0 over it now",
        "    api_calls-1m at 3: 0 over it now",
    ]


def test_a_limit_moved_in_or_out_of_shadow_is_a_change() -> None:
    shadow = config()
    shadow["plans"]["free"]["features"]["api_calls"] = {
        "limit": 5,
        "window": "1m",
        "mode": "shadow",
    }
    lower = copy.deepcopy(shadow)
    lower["plans"]["free"]["features"]["api_calls"]["limit"] = 2
    enforced = diff(load_config(shadow), load_config(config()))
    texts = [(c.name, c.text, c.binds is not None) for c in enforced]
    assert (
        "free: api_calls",
        "api_calls-1m enforced (was in shadow): it refuses from now on",
        True,
    ) in texts
    to_shadow = [c.text for c in diff(load_config(config()), load_config(shadow))]
    assert "api_calls-1m now in shadow: counted, no longer refused" in to_shadow
    # lowering a limit still in shadow puts no one over anything
    assert all(c.binds is None for c in diff(load_config(shadow), load_config(lower)))


def test_rules_of_the_same_match_and_whole_sections_are_compared() -> None:
    old = config()
    old["routes"].append({"match": "POST /v1/chat", "meters": {"api_calls": 9}})  # never reached
    new = copy.deepcopy(old)
    new["routes"][3]["meters"] = {"api_calls": 50, "ai_tokens": 100}  # the one that applies
    new["identity"]["jwt"]["audience"] = "another-api"
    new["storage"] = "redis://:s3cr3t@db2.internal:6379/0"
    lines = [f"{c.name}: {c.text}" for c in diff(load_config(old), load_config(new))]
    assert (
        "POST /v1/chat: meters {api_calls: 1, ai_tokens: 100} → {api_calls: 50, ai_tokens: 100}"
        in lines
    )
    assert "identity: changed (not shown: it may hold secrets)" in lines
    assert "storage: memory:// → redis://:***@db2.internal:6379/0" in lines


@pytest.mark.redis
def test_the_impact_goes_by_each_customers_own_limit(
    capsys: pytest.CaptureFixture[str], storage_uri: str, tmp_path: Path
) -> None:
    """An add-on raises acme's limit past its usage; an override replaces hooli's: only
    globex, on the plan's own limit, is over it."""
    settings = config(addons={"boost": {"features": {"api_calls": {"add": 100}}}})
    store = open_storage(storage_uri)
    try:
        gate = Gate(settings, storage=store)
        for customer, extra in (
            ("acme", {"addons": {"boost": 1}}),
            ("globex", {}),
            ("hooli", {"overrides": {"api_calls": {"limit": 500, "window": "1m"}}}),
        ):
            store.put_customer(CustomerRecord(customer, plan="pro", **extra))
            for _ in range(5):
                assert gate.check("GET", "/v1/things", token(customer)).allowed
    finally:
        store.close()
    new = copy.deepcopy(settings)
    new["plans"]["pro"]["features"]["api_calls"] = {"limit": 3, "window": "1m"}
    argv = (
        "diff",
        write(tmp_path, "old", settings),
        write(tmp_path, "new", new),
        "--storage",
        storage_uri,
    )
    status, out, _ = run(capsys, *argv)
    assert status == 1
    assert "    api_calls-1m at 3: 1 over it now: globex 5/3" in out.splitlines()


def test_an_unreachable_store_is_an_error_not_a_zero(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from tests.servers import free_port

    new = changed()
    uri = f"redis://127.0.0.1:{free_port()}/0"
    status, _, err = run(
        capsys,
        "diff",
        write(tmp_path, "old", config()),
        write(tmp_path, "new", new),
        "--storage",
        uri,
    )
    assert status == 2
    assert "plangate diff:" in err
