"""``plangate usage export``: on the session's real Redis, to JSON lines, a Zuora CSV file and
Stripe (a local recording server, through the official client), and a real crash: the
command killed with SIGKILL in the middle of a batch, then run again."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from plangate import Gate
from plangate.engine import CustomerRecord, Subscription
from plangate.storage import open_storage
from tests.billing.stripe_server import meter_event, stripe_api
from tests.cli.support import run
from tests.support import config, token

pytestmark = pytest.mark.redis

DB = 7  # a database of the session's Redis of its own, emptied before each test
PLANGATE = Path(sys.executable).parent / "plangate"


def write_config(tmp_path: Path, api_base: str = "http://127.0.0.1:9") -> str:
    settings = config(
        billing={
            "stripe": {
                "webhook_secret": "whsec_x",
                "api_key": "sk_test_cli",
                "api_base": api_base,
                "meters": {"api_calls": "api_requests"},
            },
            "zuora": {"username": "u", "password": "p", "meters": {"api_calls": "API_CALL"}},
        }
    )
    path = tmp_path / "plangate.yaml"
    path.write_text(json.dumps(settings))  # JSON is YAML
    return str(path)


def use(uri: str, path: str, calls: dict[str, int], provider: str = "stripe") -> None:
    """Each customer's calls, made through a gate on the store; each linked to ``provider``."""
    store = open_storage(uri)
    try:
        gate = Gate(path, storage=store)
        for customer, n in calls.items():
            sub = Subscription(
                provider, f"sub_{customer}", "active", True, "pro", account=f"acct_{customer}"
            )
            store.put_customer(CustomerRecord(customer, plan="pro", subscriptions=(sub,)))
            for _ in range(n):
                decision = gate.check("GET", "/v1/things", token(customer, "pro"))
                assert decision.allowed
                gate.settle(decision, 200)
    finally:
        store.close()


def test_jsonl_to_standard_output_then_nothing(
    capsys: pytest.CaptureFixture[str], storage_uri: str, tmp_path: Path
) -> None:
    path = write_config(tmp_path)
    use(storage_uri, path, {"acme": 3, "globex": 1})
    status, out, err = run(capsys, "usage", "export", "--config", path, "--to", "jsonl")
    assert status == 0
    sent = sorted(
        (e["customer"], e["meter"], e["value"]) for e in map(json.loads, out.split("\n")[:-1])
    )
    assert sent == [("acme", "api_calls", 3), ("globex", "api_calls", 1)]
    assert "jsonl: 2 events sent (4 units)" in err  # the report goes where the events do not
    status, out, err = run(capsys, "usage", "export", "--config", path, "--to", "jsonl")
    assert (status, out) == (0, "")
    assert "0 events sent" in err


def test_zuora_csv_to_a_file(
    capsys: pytest.CaptureFixture[str], storage_uri: str, tmp_path: Path
) -> None:
    path = write_config(tmp_path)
    use(storage_uri, path, {"acme": 2}, provider="zuora")
    target = tmp_path / "usage.csv"
    argv = ("usage", "export", "--config", path, "--to", "zuora-csv", "--out", str(target))
    status, out, _ = run(capsys, *argv)
    assert status == 0
    assert "zuora-csv: 1 events sent (2 units)" in out
    rows = target.read_text().splitlines()
    assert rows[0].startswith("ACCOUNT_ID,UOM,QTY,STARTDATE,ENDDATE,SUBSCRIPTION_ID")
    assert rows[1].startswith("acct_acme,API_CALL,2,")


def test_what_the_command_refuses(
    capsys: pytest.CaptureFixture[str], storage_uri: str, tmp_path: Path, monkeypatch: Any
) -> None:
    path = write_config(tmp_path)
    status, _, err = run(
        capsys, "usage", "export", "--config", path, "--to", "jsonl", "--since", "yesterday"
    )
    assert status == 2
    assert "'yesterday' is not an ISO 8601 time" in err
    monkeypatch.setenv("PLANGATE_STORAGE", "memory://")
    status, _, err = run(capsys, "usage", "export", "--config", path, "--to", "jsonl")
    assert status == 1
    assert "storage is memory://" in err


def test_a_customer_named_export_is_still_shown(
    capsys: pytest.CaptureFixture[str], storage_uri: str, tmp_path: Path
) -> None:
    status, out, _ = run(capsys, "usage", "--config", write_config(tmp_path), "--", "export")
    assert status == 0
    assert "export" in out


def test_killed_in_the_middle_a_rerun_sends_exactly_the_rest(
    capsys: pytest.CaptureFixture[str], storage_uri: str, tmp_path: Path
) -> None:
    """SIGKILL while Stripe holds the second event: the next run sends what the first had
    not confirmed, with the identifiers it recorded, and nothing the first confirmed."""
    arrived, release = threading.Event(), threading.Event()
    requests: list[dict[str, Any]] = []

    def answer(method: str, path: str, query: Any) -> tuple[Any, ...]:
        if len(requests) == 2 and not release.is_set():
            arrived.set()
            release.wait(30)  # the command is killed meanwhile
        return 200, meter_event(requests[-1]["form"])

    with stripe_api(answer) as server:
        requests = server.requests
        path = write_config(tmp_path, server.url)
        use(storage_uri, path, {"acme": 1, "globex": 2, "initech": 3})
        command = [str(PLANGATE), "usage", "export", "--config", path, "--to", "stripe"]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert arrived.wait(60), process.communicate(timeout=5)
            process.send_signal(signal.SIGKILL)
            process.communicate(timeout=30)
        finally:
            release.set()
        first = [r["form"]["identifier"][0] for r in requests]
        store = open_storage(storage_uri)
        try:
            batch, confirmed = store.pending_export("stripe") or ("", frozenset())
        finally:
            store.close()
        recorded = [e["identifier"] for e in json.loads(batch)]
        assert len(recorded) == 3
        assert confirmed == {first[0]}

        again = ("usage", "export", "--config", path, "--to", "stripe")
        status, _, err = run(capsys, *again)
        assert status == 1  # the killed export still holds Stripe for up to a minute
        assert "--take-over if none runs" in err
        status, out, _ = run(capsys, *again, "--take-over")
        assert status == 0
        assert "2 of them resumed" in out
        second = [r["form"]["identifier"][0] for r in requests[len(first) :]]
        assert second == recorded[1:]  # the same identifiers, the confirmed one not again
        status, out, _ = run(capsys, "usage", "export", "--config", path, "--to", "stripe")
        assert len(requests) == len(first) + 2
    values = {
        r["form"]["payload[stripe_customer_id]"][0]: r["form"]["payload[value]"][0]
        for r in requests
    }
    assert values == {"acct_acme": "1", "acct_globex": "2", "acct_initech": "3"}
