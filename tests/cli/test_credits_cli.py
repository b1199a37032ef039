"""``plangate credits grant|show`` and ``plangate usage``: credit balances and usage from a
shell, against the store the servers use (a real Redis here), never a traceback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from plangate import Gate
from tests.cli.support import run
from tests.support import GRANT_KEYS, config, token

pytestmark = pytest.mark.redis

DB = 6  # a database of the session's Redis of its own, emptied before each test


def catalog() -> dict[str, Any]:
    """The tests' config with credits: granted by pro each month, charged by its tokens past
    their limit, spent directly by one route."""
    data = config()
    data["features"]["ai_credits"] = {"kind": "credits", "unit": "credit"}
    data["plans"]["pro"]["features"]["ai_credits"] = {"grant": 100, "period": "month"}
    data["plans"]["pro"]["features"]["ai_tokens"] = {
        "limit": 1000,
        "period": "month",
        "overage": "ai_credits",
        "rate": 0.001,
    }
    data["routes"].insert(1, {"match": "POST /v1/images", "meters": {"ai_credits": 5}})
    return data


def write_config(path: Path, data: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture
def config_file(tmp_path: Path, storage_uri: str) -> str:
    return write_config(tmp_path / "plangate.yaml", {**catalog(), "storage": storage_uri})


@pytest.fixture
def gate(config_file: str) -> Iterator[Gate]:
    """A gate of its own, as a server built separately has."""
    built = Gate(config_file)
    yield built
    built.storage.close()


def grant(capsys: pytest.CaptureFixture[str], config_file: str, *argv: str) -> dict[str, Any]:
    status, out, err = run(capsys, "credits", "grant", *argv, "--config", config_file)
    assert (status, err) == (0, ""), err
    granted: dict[str, Any] = json.loads(out)
    return granted


def admin_grants(gate: Gate, customer: str = "acme") -> list[dict[str, Any]]:
    grants = gate.customers.credits(customer)["ai_credits"]["grants"]
    return [g for g in grants if g["source"] == "admin"]


# grant ---------------------------------------------------------------------------------


def test_grant_prints_the_grant_and_the_next_command_sees_it(config_file, gate, capsys):
    granted = grant(capsys, config_file, "acme", "ai_credits", "250")
    assert set(granted) == GRANT_KEYS
    assert (granted["feature"], granted["amount"], granted["remaining"]) == ("ai_credits", 250, 250)
    assert (granted["category"], granted["priority"], granted["source"]) == ("paid", 100, "admin")
    assert granted["expires_at"] is None
    assert granted["idempotency_key"].startswith("cli-")  # made up: one call, one grant

    assert gate.customers.balance("acme", "ai_credits") == 250  # free: no plan grant
    status, out, err = run(capsys, "credits", "show", "acme", "--config", config_file)
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "ai_credits: balance 250"
    assert lines[1].split() == [
        "grant",
        "source",
        "category",
        "priority",
        "remaining/amount",
        "expires",
    ]
    assert lines[2].split() == [granted["id"], "admin", "paid", "100", "250/250", "never"]
    assert "newest ledger entries:" in lines
    assert lines[-1].split()[1:] == ["grant", "250", granted["id"], granted["idempotency_key"]]


def test_each_call_without_a_key_is_a_grant_of_its_own(config_file, gate, capsys):
    first = grant(capsys, config_file, "acme", "ai_credits", "10")
    second = grant(capsys, config_file, "acme", "ai_credits", "10")
    assert first["idempotency_key"] != second["idempotency_key"]
    assert gate.customers.balance("acme", "ai_credits") == 20


def test_the_options_reach_the_grant(config_file, capsys):
    granted = grant(
        capsys,
        config_file,
        "acme",
        "ai_credits",
        "40",
        "--expires",
        "30d",
        "--priority",
        "7",
        "--category",
        "promotional",
        "--idempotency-key",
        "order-1",
    )
    expires = datetime.fromisoformat(granted["expires_at"])
    assert abs((expires - datetime.now(timezone.utc) - timedelta(days=30)).total_seconds()) < 60
    assert (granted["priority"], granted["category"]) == (7, "promotional")
    assert granted["idempotency_key"] == "order-1"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("2031-01-31T12:00:00Z", "2031-01-31T12:00:00+00:00"),
        ("2031-01-31T12:00:00+02:00", "2031-01-31T10:00:00+00:00"),
        ("2031-01-31", "2031-01-31T00:00:00+00:00"),  # UTC when it names no offset
    ],
)
def test_expires_takes_an_iso_time(given, expected, config_file, capsys):
    granted = grant(capsys, config_file, "acme", "ai_credits", "5", "--expires", given)
    assert datetime.fromisoformat(granted["expires_at"]) == datetime.fromisoformat(expected)


def test_the_same_idempotency_key_twice_is_one_grant(config_file, gate, capsys):
    argv = ("acme", "ai_credits", "50", "--idempotency-key", "invoice-42")
    first = grant(capsys, config_file, *argv)
    again = grant(capsys, config_file, *argv)
    assert again == first
    assert len(admin_grants(gate)) == 1
    assert gate.customers.balance("acme", "ai_credits") == 50


def test_a_key_used_for_another_grant_is_refused(config_file, gate, capsys):
    grant(capsys, config_file, "acme", "ai_credits", "50", "--idempotency-key", "invoice-42")
    argv = ["acme", "ai_credits", "60", "--idempotency-key", "invoice-42"]
    status, out, err = run(capsys, "credits", "grant", *argv, "--config", config_file)
    assert (status, out) == (1, "")
    assert err == (
        "plangate: idempotency_key: the idempotency key 'invoice-42' was used for another "
        "grant: use a new key for a new grant\n"
    )
    assert gate.customers.balance("acme", "ai_credits") == 50


def test_a_retry_gives_the_expiry_a_duration_came_to(config_file, gate, capsys):
    argv = ["acme", "ai_credits", "50", "--idempotency-key", "invoice-7", "--expires"]
    first = grant(capsys, config_file, *argv, "30d")
    status, out, err = run(capsys, "credits", "grant", *argv, "30d", "--config", config_file)
    assert (status, out) == (1, "")
    assert err == (
        "plangate: idempotency_key: the idempotency key 'invoice-7' was used for another grant: "
        "use a new key for a new grant; an --expires duration counts from each call: to retry a "
        "grant, give --expires its expires_at\n"
    )
    assert grant(capsys, config_file, *argv, first["expires_at"]) == first
    assert len(admin_grants(gate)) == 1


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (["1.5"], 2, "argument AMOUNT: a whole number, not '1.5'"),
        (["ten"], 2, "argument AMOUNT: a whole number, not 'ten'"),
        (["0"], 1, "plangate: amount: 0 is out of range: 1 to "),
        (["-5"], 1, "plangate: amount: -5 is out of range: 1 to "),
        (["10", "--priority", "high"], 2, "argument --priority: a whole number, not 'high'"),
        (["10", "--priority", "256"], 1, "plangate: priority: 256 is out of range: 0 to 255"),
        (["10", "--category", "gift"], 1, "plangate: category: paid or promotional, not 'gift'"),
        (
            ["10", "--expires", "2020-01-01T00:00:00Z"],
            1,
            "plangate: expires_at: 2020-01-01T00:00:00+00:00 is in the past",
        ),
        (["10", "--expires", "soon"], 2, "argument --expires: a duration such as 30d or an ISO"),
        (
            ["10", "--idempotency-key", ""],
            1,
            "plangate: idempotency_key: 1 to 255 printable characters, not ''",
        ),
    ],
)
def test_bad_input_names_the_field_and_writes_nothing(
    argv, status, message, config_file, gate, capsys
):
    got, out, err = run(
        capsys, "credits", "grant", "acme", "ai_credits", *argv, "--config", config_file
    )
    assert (got, out) == (status, "")
    last = err.splitlines()[-1]  # 2: argparse's usage, then this line
    assert message in last
    assert len(err.splitlines()) == 1 or status == 2
    assert admin_grants(gate) == []


def test_every_problem_of_a_grant_is_named(config_file, capsys):
    argv = ["acme", "ai_credits", "0", "--priority", "-1", "--category", "gift"]
    status, out, err = run(capsys, "credits", "grant", *argv, "--config", config_file)
    assert (status, out) == (1, "")
    assert [line.split(":")[1].strip() for line in err.splitlines()] == [
        "amount",
        "priority",
        "category",
    ]


@pytest.mark.parametrize(
    ("feature", "message"),
    [
        ("gold", "plangate: feature: unknown credits feature 'gold' (credits: ai_credits)\n"),
        ("ai_tokens", "plangate: feature: ai_tokens is a metered feature, not credits\n"),
    ],
)
def test_a_feature_that_is_not_credits_is_refused(feature, message, config_file, capsys):
    status, out, err = run(
        capsys, "credits", "grant", "acme", feature, "5", "--config", config_file
    )
    assert (status, out, err) == (1, "", message)


# show ----------------------------------------------------------------------------------


def test_show_json_is_the_python_apis_answer(config_file, gate, capsys):
    gate.customers.assign("acme", plan="pro")
    granted = grant(capsys, config_file, "acme", "ai_credits", "20", "--expires", "1w")
    status, out, err = run(capsys, "credits", "show", "acme", "--json", "--config", config_file)
    assert (status, err) == (0, "")
    shown = json.loads(out)
    assert shown == gate.customers.credits("acme")
    view = shown["ai_credits"]
    assert set(view) == {"balance", "debt", "grants", "ledger", "next_cursor"}
    assert (view["balance"], view["debt"]) == (120, 0)  # pro's 100 of the month, then ours
    assert [g["source"] for g in view["grants"]] == ["plan", "admin"]
    assert view["grants"][1] == granted
    assert all(set(g) == GRANT_KEYS for g in view["grants"])
    assert [e["kind"] for e in view["ledger"]] == ["grant", "grant"]
    assert set(view["ledger"][0]) == {"id", "kind", "amount", "grant", "ref", "at"}


def test_show_lists_grants_and_the_newest_ledger_entries(config_file, gate, capsys):
    gate.customers.assign("acme", plan="pro")
    granted = grant(capsys, config_file, "acme", "ai_credits", "20", "--priority", "5")
    decision = gate.check("POST", "/v1/images", token("acme"))  # spends 5
    assert decision.problem is None

    status, out, _ = run(capsys, "credits", "show", "acme", "--config", config_file)
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == "ai_credits: balance 115"
    plan, ours = lines[2].split(), lines[3].split()
    assert plan[1:5] == ["plan", "paid", "100", "100/100"]
    assert plan[0].startswith("plan-")
    assert datetime.fromisoformat(plan[5].replace("Z", "+00:00")).day == 1  # the month's end
    assert ours == [granted["id"], "admin", "paid", "5", "15/20", "never"]  # burnt first
    ledger = lines[lines.index("newest ledger entries:") + 2 :]
    assert [line.split()[1] for line in ledger] == ["burn", "grant", "grant"]


def test_show_tells_a_debt_and_a_grant_pays_it_first(config_file, gate, capsys):
    gate.customers.assign("acme", plan="pro")
    decision = gate.check("POST", "/v1/completions", token("acme"))
    assert decision.problem is None
    gate.settle(decision, 200, {"ai_tokens": 200_000})  # 199 000 past the limit: 199 credits
    _, out, _ = run(capsys, "credits", "show", "acme", "--config", config_file)
    assert out.splitlines()[0] == "ai_credits: balance -99 (in debt: 99)"
    assert "excess" in out.split()

    grant(capsys, config_file, "acme", "ai_credits", "150")
    _, out, _ = run(capsys, "credits", "show", "acme", "--config", config_file)
    assert out.splitlines()[0] == "ai_credits: balance 51"


def test_show_prints_only_the_newest_ledger_entries(config_file, gate, capsys, monkeypatch):
    monkeypatch.setattr("plangate.cli.LEDGER_SHOWN", 2)
    for _ in range(3):
        grant(capsys, config_file, "acme", "ai_credits", "1")
    _, out, _ = run(capsys, "credits", "show", "acme", "--config", config_file)
    lines = out.splitlines()
    at = lines.index("newest ledger entries (--json has more):")
    assert len(lines) - at == 4  # the header line, then 2


def test_show_of_one_feature(config_file, capsys):
    grant(capsys, config_file, "acme", "ai_credits", "3")
    argv = ["credits", "show", "acme", "--feature", "ai_credits", "--json", "--config", config_file]
    status, out, _ = run(capsys, *argv)
    assert status == 0
    assert list(json.loads(out)) == ["ai_credits"]

    argv[4] = "ai_tokens"
    assert run(capsys, *argv) == (
        1,
        "",
        "plangate: feature: ai_tokens is a metered feature, not credits\n",
    )


def test_show_of_a_customer_with_nothing(config_file, capsys):
    _, out, _ = run(capsys, "credits", "show", "nobody", "--config", config_file)
    assert out == "ai_credits: balance 0\nno grants\n"


def test_show_with_a_config_without_credits(tmp_path, storage_uri, capsys):
    path = write_config(tmp_path / "plain.yaml", config())
    assert run(capsys, "credits", "show", "acme", "--config", path) == (
        0,
        "the config has no credits feature\n",
        "",
    )
    status, out, _ = run(capsys, "credits", "show", "acme", "--json", "--config", path)
    assert (status, json.loads(out)) == (0, {})


# usage ---------------------------------------------------------------------------------


def test_usage_lists_the_meters_and_the_credits(config_file, gate, capsys):
    gate.customers.assign("acme", plan="pro")
    grant(capsys, config_file, "acme", "ai_credits", "20")
    for _ in range(3):
        assert gate.check("POST", "/v1/chat", token("acme")).problem is None  # 100 tokens
    assert gate.check("POST", "/v1/images", token("acme")).problem is None  # 5 credits

    status, out, err = run(capsys, "usage", "acme", "--config", config_file)
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "customer acme, plan pro"
    meters = lines[lines.index("") + 1 : lines.index("", 2)]
    assert meters[0].split() == ["meter", "policy", "used/limit", "remaining", "reset"]
    rows = {row.split()[1]: row.split() for row in meters[1:]}
    assert set(rows) == {"api_calls-1m", "ai_tokens-month"}
    assert rows["ai_tokens-month"][:4] == ["ai_tokens", "ai_tokens-month", "300/1000", "700"]
    assert rows["ai_tokens-month"][4] == "in"  # in 29d 23h, or however far the month's end is
    assert rows["api_calls-1m"][:4] == ["api_calls", "api_calls-1m", "3/1000", "997"]
    assert " ".join(rows["api_calls-1m"][4:]) in {"in 1m", "in 59s", "in 58s"}
    credits = lines[lines.index("", 2) + 1 :]
    assert [row.split() for row in credits] == [
        ["credits", "balance", "plan", "grant"],
        ["ai_credits", "115", "100", "a", "month"],
    ]


def test_usage_json_is_the_entitlements_endpoints_answer(config_file, gate, capsys):
    gate.customers.assign("acme", plan="pro")
    status, out, _ = run(capsys, "usage", "acme", "--json", "--config", config_file)
    assert status == 0
    answer = json.loads(out)
    assert answer == gate.entitlements(token("acme"))
    assert (answer["customer"], answer["plan"]) == ("acme", "pro")
    assert answer["meters"]["ai_tokens"]["limits"][0]["limit"] == 1000
    assert answer["credits"]["ai_credits"] == {
        "unit": "credit",
        "balance": 100,
        "grant": 100,
        "period": "month",
        "source": "plan",
    }


def test_usage_of_a_customer_on_the_default_plan(config_file, capsys):
    status, out, _ = run(capsys, "usage", "nobody", "--config", config_file)
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == "customer nobody, plan free"
    assert lines[-1] == "no credits"  # free neither grants nor charges credits
    assert any(line.split()[:3] == ["ai_tokens", "ai_tokens-month", "0/10000"] for line in lines)
    assert all(line.split()[-1] == "-" for line in lines[3:-2])  # nothing used: no reset


def test_usage_of_a_customer_without_a_plan(tmp_path, storage_uri, capsys):
    data = catalog()
    del data["default_plan"]
    path = write_config(tmp_path / "nodefault.yaml", data)
    status, out, err = run(capsys, "usage", "nobody", "--config", path)
    assert (status, out, err) == (1, "", "plangate: customer 'nobody' has no plan\n")


# the command line ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["credits", "grant", "acme", "ai_credits"], "required: AMOUNT"),
        (["credits", "show"], "the following arguments are required: ID"),
        (["usage"], "the following arguments are required: ID"),
    ],
)
def test_bad_command_lines_exit_2(argv, message, config_file, capsys):
    status, out, err = run(capsys, *argv, "--config", config_file)
    assert (status, out) == (2, "")
    assert message in err


def test_credits_alone_prints_its_commands(capsys):
    status, out, _ = run(capsys, "credits")
    assert status == 2
    assert "grant" in out
    assert "show" in out


def test_grant_help_says_a_key_is_made_up(capsys):
    status, out, _ = run(capsys, "credits", "grant", "--help")
    assert status == 0
    assert "one call is one grant" in " ".join(out.split())


def test_memory_storage_warns_that_no_server_sees_the_grant(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PLANGATE_STORAGE", raising=False)
    path = write_config(tmp_path / "memory.yaml", {**catalog(), "storage": "memory://"})
    for argv in (
        ["credits", "grant", "acme", "ai_credits", "5"],
        ["credits", "show", "acme"],
        ["usage", "acme"],
    ):
        status, out, err = run(capsys, *argv, "--config", path)
        assert status == 0
        assert out
        assert err.startswith("plangate: warning: the config's storage is memory://")
