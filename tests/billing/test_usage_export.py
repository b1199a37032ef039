"""Usage out: the hourly aggregates exported to Stripe meter events (through the official
client, to a local recording server), Zuora's usage upload CSV and JSON lines, exactly once:
a re-run sends nothing again, an interrupted run is resumed with the same identifiers."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from plangate import Gate
from plangate.billing import (
    Destination,
    ExportBusy,
    ExportInterrupted,
    JsonLines,
    StripeMeters,
    UsageEvent,
    UsageExport,
    ZuoraCsv,
)
from plangate.config import Config, load_config
from plangate.engine import CustomerRecord, Subscription
from plangate.errors import ConfigError
from plangate.storage import Storage
from tests.billing.stripe_server import Recorded, meter_event, stripe_api
from tests.support import Clock, config, token

HOUR = 3600
START = 1_800_000_000.0  # 2027-01-15T08:00:00Z, the start of an hour
METERS = {"api_calls": "api_requests", "ai_tokens": "ai_tokens_used"}


def export_config(api_base: str = "http://127.0.0.1:9", **billing: Any) -> dict[str, Any]:
    return config(
        billing={
            "stripe": {
                "webhook_secret": "whsec_x",
                "api_key": "sk_test_usage",
                "api_base": api_base,
                "meters": METERS,
            },
            "zuora": {
                "username": "u",
                "password": "p",
                "meters": {"api_calls": "API_CALL", "ai_tokens": {"uom": "TOKEN", "charge": "C-7"}},
            },
            **billing,
        }
    )


class Traffic:
    """Requests of customers on a gate whose clock the test moves."""

    def __init__(self, storage: Storage, settings: dict[str, Any]) -> None:
        self.clock = Clock(START + 60)
        self.gate = Gate(settings, storage=storage, clock=self.clock)

    def calls(self, n: int, path: str = "/v1/chat", customer: str = "acme", **settle: Any) -> None:
        for _ in range(n):
            decision = self.gate.check("POST", path, token(customer, "pro"))
            assert decision.allowed
            self.gate.settle(decision, 200, refund=settle.get("refund", False))


def link(storage: Storage, customer: str, provider: str = "stripe", account: str = "") -> None:
    """The customer's subscription in ``provider``, as its webhooks record it."""
    account = account or f"cus_{customer}"
    sub = Subscription(provider, f"sub_{customer}", "active", True, "pro", account=account)
    storage.put_customer(CustomerRecord(customer, plan="pro", subscriptions=(sub,)))


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def exporter(
    storage: Storage, settings: dict[str, Any], dest: Destination, traffic: Traffic
) -> UsageExport:
    return UsageExport(storage, load_config(settings), dest, clock=traffic.clock)


def test_jsonl_sends_what_was_not_exported_and_nothing_twice(storage: Storage) -> None:
    settings = export_config()
    traffic = Traffic(storage, settings)
    traffic.calls(3)  # 3 api_calls, 300 ai_tokens
    traffic.calls(2, customer="globex")
    out = io.StringIO()
    export = exporter(storage, settings, JsonLines(load_config(settings), out), traffic)
    report = export.run()
    sent = {(e["customer"], e["meter"]): e["value"] for e in lines(out)}
    assert sent == {
        ("acme", "api_calls"): 3,
        ("acme", "ai_tokens"): 300,
        ("globex", "api_calls"): 2,
        ("globex", "ai_tokens"): 200,
    }
    assert (report.sent, report.units) == (4, 505)
    first = lines(out)[0]
    assert first["start"] == "2027-01-15T08:00:00Z"
    assert first["end"] == "2027-01-15T08:01:00Z"

    again = io.StringIO()
    assert (
        exporter(storage, settings, JsonLines(load_config(settings), again), traffic).run().sent
        == 0
    )
    assert again.getvalue() == ""

    # usage of the running hour after an export, and of the next hour: only that is sent
    traffic.calls(1)
    traffic.clock.now = START + HOUR + 30
    traffic.calls(2)
    later = io.StringIO()
    exporter(storage, settings, JsonLines(load_config(settings), later), traffic).run()
    sent = {(e["customer"], e["meter"]): e["value"] for e in lines(later)}
    assert sent == {("acme", "api_calls"): 3, ("acme", "ai_tokens"): 300}
    assert {e["identifier"] for e in lines(later)}.isdisjoint(e["identifier"] for e in lines(out))


def test_an_export_includes_the_running_hour_at_once(storage: Storage) -> None:
    """No waiting for the hour to end: what was committed before the export starts is in it."""
    settings = export_config()
    traffic = Traffic(storage, settings)
    traffic.clock.now = START + 5  # five seconds into the hour
    traffic.calls(1, "/v1/things")
    out = io.StringIO()
    exporter(storage, settings, JsonLines(load_config(settings), out), traffic).run()
    assert [(e["meter"], e["value"]) for e in lines(out)] == [("api_calls", 1)]


def test_refunds_after_an_export_are_carried_not_sent(storage: Storage) -> None:
    """Less than none (a refund after its usage was exported) waits for more usage."""
    settings = export_config()
    traffic = Traffic(storage, settings)
    traffic.clock.now = START + HOUR - 1
    decision = traffic.gate.check("POST", "/v1/things", token("acme", "pro"))
    traffic.calls(4, "/v1/things")
    out = io.StringIO()
    export = exporter(storage, settings, JsonLines(load_config(settings), out), traffic)
    export.run()
    assert [e["value"] for e in lines(out)] == [5]  # the open reservation counts
    traffic.clock.now = START + HOUR + 1
    traffic.gate.settle(decision, 200, refund=True)  # -1 in the next hour
    out.truncate(0)
    out.seek(0)
    export.run()
    assert out.getvalue() == ""  # nothing to send: -1 waits
    traffic.calls(3, "/v1/things")
    export.run()
    assert [e["value"] for e in lines(out)] == [2]


class Failing(Destination):
    """A JSON lines destination that stops after ``good`` events, the way a crash would:
    what it wrote before is delivered, the rest is not."""

    def __init__(self, inner: Destination, good: int) -> None:
        self.inner, self.good, self.name = inner, good, inner.name

    def account(self, record: CustomerRecord | None) -> tuple[str, str] | None:
        return self.inner.account(record)

    def meters(self) -> Sequence[str]:
        return self.inner.meters()

    def send(self, events: Sequence[UsageEvent], rejected: list[tuple[str, str]]) -> Iterator[str]:
        for n, event in enumerate(events):
            if n == self.good:
                raise ExportInterrupted("the destination went away")
            yield from self.inner.send([event], rejected)


def test_an_interrupted_export_resumes_with_the_same_identifiers(storage: Storage) -> None:
    settings = export_config()
    traffic = Traffic(storage, settings)
    for customer in ("acme", "globex", "initech"):
        traffic.calls(2, customer=customer)  # 6 events: 2 meters of 3 customers
    cfg = load_config(settings)
    first = io.StringIO()
    export = UsageExport(storage, cfg, Failing(JsonLines(cfg, first), 2), clock=traffic.clock)
    with pytest.raises(ExportInterrupted):
        export.run()
    assert len(lines(first)) == 2
    batch, confirmed = storage.pending_export("jsonl") or ("", frozenset())
    recorded = [e["identifier"] for e in json.loads(batch)]
    assert len(recorded) == 6
    assert confirmed == {e["identifier"] for e in lines(first)}

    traffic.calls(1, customer="hooli")  # usage after the interrupted run: sent after the batch
    second = io.StringIO()
    report = UsageExport(storage, cfg, JsonLines(cfg, second), clock=traffic.clock).run()
    resent = [e["identifier"] for e in lines(second)]
    assert resent[:4] == [i for i in recorded if i not in confirmed]  # exactly those, the same
    assert [e["customer"] for e in lines(second)[4:]] == ["hooli", "hooli"]
    assert (report.sent, report.resumed) == (6, 4)
    assert storage.pending_export("jsonl") is None

    third = io.StringIO()
    assert UsageExport(storage, cfg, JsonLines(cfg, third), clock=traffic.clock).run().sent == 0
    everything = lines(first) + lines(second)
    assert sum(e["value"] for e in everything if e["meter"] == "api_calls") == 7


def test_the_same_usage_always_makes_the_same_identifiers(storage: Storage) -> None:
    """An export that sent but never confirmed (its confirmations lost) is run again from the
    store's usage alone: same events, same identifiers, so the destination can drop them."""
    settings = export_config()
    traffic = Traffic(storage, settings)
    traffic.calls(2)
    cfg = load_config(settings)
    runs = []
    for _ in range(2):
        out = io.StringIO()
        UsageExport(storage, cfg, JsonLines(cfg, out), clock=traffic.clock).run()
        runs.append([e["identifier"] for e in lines(out)])
        # forget that they were sent: every mark back to 0
        hours = storage.usage_hours("acme", int(START), int(START) + HOUR)
        storage.mark_usage(
            "acme", {h: {k: 0 for k in f if k.startswith("exported:")} for h, f in hours.items()}
        )
    assert runs[0] == runs[1]
    assert len(runs[0]) == 2


def test_each_destination_keeps_its_own_marks(storage: Storage) -> None:
    settings = export_config()
    traffic = Traffic(storage, settings)
    traffic.calls(1)
    link(storage, "acme", "zuora", account="A00000042")
    cfg = load_config(settings)
    jsonl, zuora = io.StringIO(), io.StringIO()
    UsageExport(storage, cfg, JsonLines(cfg, jsonl), clock=traffic.clock).run()
    UsageExport(storage, cfg, ZuoraCsv(cfg, zuora), clock=traffic.clock).run()
    assert len(lines(jsonl)) == 2
    assert len(list(csv.DictReader(io.StringIO(zuora.getvalue())))) == 2


def test_zuora_csv_rows(storage: Storage) -> None:
    settings = export_config()
    traffic = Traffic(storage, settings)
    traffic.calls(3)
    traffic.calls(1, customer="unlinked")
    link(storage, "acme", "zuora", account="A00000042")
    cfg = load_config(settings)
    out = io.StringIO()
    report = UsageExport(storage, cfg, ZuoraCsv(cfg, out), clock=traffic.clock).run()
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert list(rows[0]) == [
        "ACCOUNT_ID", "UOM", "QTY", "STARTDATE", "ENDDATE", "SUBSCRIPTION_ID", "CHARGE_ID",
        "DESCRIPTION", "UNIQUE_KEY",
    ]  # fmt: skip
    by_uom = {row["UOM"]: row for row in rows}
    assert by_uom["API_CALL"]["QTY"] == "3"
    assert by_uom["TOKEN"]["QTY"] == "300"
    assert by_uom["TOKEN"]["CHARGE_ID"] == "C-7"
    assert by_uom["API_CALL"]["CHARGE_ID"] == ""
    row = by_uom["API_CALL"]
    assert (row["ACCOUNT_ID"], row["SUBSCRIPTION_ID"]) == ("A00000042", "sub_acme")
    assert (row["STARTDATE"], row["ENDDATE"]) == ("01/15/2027", "01/15/2027")
    assert len({r["UNIQUE_KEY"] for r in rows}) == 2
    # a customer with no Zuora subscription is not sent, and its usage waits for one
    assert report.unlinked == ["unlinked"]
    link(storage, "unlinked", "zuora", account="A00000043")
    later = io.StringIO()
    UsageExport(storage, cfg, ZuoraCsv(cfg, later), clock=traffic.clock).run()
    assert {r["ACCOUNT_ID"] for r in csv.DictReader(io.StringIO(later.getvalue()))} == {"A00000043"}


def test_since_and_until_go_by_whole_hours(storage: Storage) -> None:
    settings = export_config()
    traffic = Traffic(storage, settings)
    for hour in range(3):
        traffic.clock.now = START + hour * HOUR + 60
        traffic.calls(hour + 1, "/v1/things")
    cfg = load_config(settings)
    out = io.StringIO()
    # it is 10:01. Since 09:30: from 09:00; until 10:00:30: the hours that ended by then
    UsageExport(storage, cfg, JsonLines(cfg, out), clock=traffic.clock).run(
        since=START + HOUR + 1800, until=START + 2 * HOUR + 30
    )
    assert [(e["value"], e["start"], e["end"]) for e in lines(out)] == [
        (2, "2027-01-15T09:00:00Z", "2027-01-15T10:00:00Z")
    ]
    out = io.StringIO()
    UsageExport(storage, cfg, JsonLines(cfg, out), clock=traffic.clock).run()
    assert [e["value"] for e in lines(out)] == [1 + 3]


def test_one_exporter_at_a_time(storage: Storage) -> None:
    settings = export_config()
    traffic = Traffic(storage, settings)
    lock = storage.export_lock("jsonl", 60)
    assert lock is not None
    cfg = load_config(settings)
    with pytest.raises(ExportBusy):
        UsageExport(storage, cfg, JsonLines(cfg, io.StringIO()), clock=traffic.clock).run()
    lock.release()
    UsageExport(storage, cfg, JsonLines(cfg, io.StringIO()), clock=traffic.clock).run()


# Stripe: the official client, a local server that answers as Stripe does ------------------


def stripe_answers(
    recorded: list[Recorded], refuse: dict[int, tuple[Any, ...]] | None = None
) -> Any:
    """Meter events taken, except the n-th request (1-based) answered as ``refuse`` says."""

    def answer(method: str, path: str, query: Any) -> tuple[Any, ...]:
        server = recorded[0]
        n = len(server.requests)
        if refuse and n in refuse:
            return refuse[n]
        assert (method, path) == ("POST", "/v1/billing/meter_events")
        return 200, meter_event(server.requests[-1]["form"])

    return answer


def test_stripe_meter_events(storage: Storage) -> None:
    holder: list[Recorded] = []
    with stripe_api(stripe_answers(holder)) as server:
        holder.append(server)
        settings = export_config(server.url)
        traffic = Traffic(storage, settings)
        traffic.calls(3)
        link(storage, "acme")
        cfg = load_config(settings)
        report = UsageExport(storage, cfg, StripeMeters(cfg), clock=traffic.clock).run()
        again = UsageExport(storage, cfg, StripeMeters(cfg), clock=traffic.clock).run()
    assert (report.sent, again.sent, len(server.requests)) == (2, 0, 2)
    forms = {r["form"]["event_name"][0]: r for r in server.requests}
    calls = forms["api_requests"]
    assert calls["authorization"] == "Bearer sk_test_usage"
    form = calls["form"]
    assert form["payload[stripe_customer_id]"] == ["cus_acme"]
    assert form["payload[value]"] == ["3"]
    assert form["timestamp"] == [str(int(START) + 59)]  # the last second it covers
    assert form["identifier"][0] == calls["idempotency_key"]
    assert forms["ai_tokens_used"]["form"]["payload[value]"] == ["300"]


def test_stripe_429s_are_retried_after_a_backoff(storage: Storage) -> None:
    holder: list[Recorded] = []
    too_many = (429, {"error": {"type": "invalid_request_error", "message": "Too many"}})
    later = (*too_many, {"Retry-After": "3"})
    with stripe_answers_server(holder, {1: too_many, 2: later}) as server:
        traffic, cfg = calls_to_stripe(storage, server, 1)
        waits: list[float] = []
        report = UsageExport(
            storage, cfg, StripeMeters(cfg, sleep=waits.append), clock=traffic.clock
        ).run()
    assert report.sent == 1
    assert waits == [0.5, 3.0]
    keys = {r["idempotency_key"] for r in server.requests}
    assert len(server.requests) == 3
    assert len(keys) == 1


def test_stripe_still_refusing_leaves_the_batch_for_the_next_run(storage: Storage) -> None:
    holder: list[Recorded] = []
    busy = (429, {"error": {"type": "invalid_request_error", "message": "Too many"}})
    with stripe_answers_server(holder, dict.fromkeys(range(1, 4), busy)) as server:
        traffic, cfg = calls_to_stripe(storage, server, 1)
        meters = StripeMeters(cfg, attempts=3, sleep=lambda _: None)
        with pytest.raises(ExportInterrupted, match="Too many"):
            UsageExport(storage, cfg, meters, clock=traffic.clock).run()
        assert storage.pending_export("stripe") is not None
        report = UsageExport(storage, cfg, StripeMeters(cfg), clock=traffic.clock).run()
    assert (report.sent, report.resumed) == (1, 1)
    assert len({r["form"]["identifier"][0] for r in server.requests}) == 1


def test_an_event_stripe_refuses_is_reported_and_kept(storage: Storage) -> None:
    holder: list[Recorded] = []
    refused = (
        400,
        {"error": {"type": "invalid_request_error", "message": "No such customer: 'cus_acme'"}},
    )
    with stripe_answers_server(holder, {1: refused}) as server:
        traffic, cfg = calls_to_stripe(storage, server, 2)
        report = UsageExport(storage, cfg, StripeMeters(cfg), clock=traffic.clock).run()
        assert report.sent == 0
        assert "No such customer" in report.rejected[0][1]
        retried = UsageExport(storage, cfg, StripeMeters(cfg), clock=traffic.clock).run()
    assert retried.sent == 1  # not marked: tried again, with the same identifier
    assert len({r["form"]["identifier"][0] for r in server.requests}) == 1


def calls_to_stripe(storage: Storage, server: Recorded, calls: int) -> tuple[Traffic, Config]:
    """``calls`` api_calls of acme (a Stripe customer), whose one meter goes to ``server``."""
    settings = export_config(server.url)
    settings["billing"]["stripe"]["meters"] = {"api_calls": "api_requests"}
    traffic = Traffic(storage, settings)
    traffic.calls(calls)
    link(storage, "acme")
    return traffic, load_config(settings)


def stripe_answers_server(holder: list[Recorded], refuse: dict[int, tuple[Any, ...]]) -> Any:
    import contextlib

    @contextlib.contextmanager
    def serving() -> Iterator[Recorded]:
        with stripe_api(stripe_answers(holder, refuse)) as server:
            holder.append(server)
            yield server

    return serving()


# the config ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("billing", "message"),
    [
        ({"stripe": {"meters": {"nope": "x"}}}, "'nope' is not a metered feature"),
        ({"zuora": {"meters": {"max_projects": "X"}}}, "'max_projects' is not a metered"),
        ({"export": {"every": "5m", "to": "stripe"}}, "export to stripe needs billing.stripe"),
        (
            {"export": {"every": "5m", "to": "zuora-csv", "path": "/tmp"}},
            "export to zuora-csv needs billing.zuora.meters",
        ),
        ({"export": {"every": "5m", "to": "jsonl"}}, "needs a directory to write to"),
        ({"export": {"every": "500ms", "to": "jsonl", "path": "/x"}}, "at least 1s"),
        ({"retention": "10m"}, "retention 10m: from 1h to 3650d"),
    ],
)
def test_the_config_says_what_an_export_lacks(billing: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(config(billing=billing))


class TakenOver(Destination):
    """Sends everything, but another export takes the destination over meanwhile (this
    process stalled past its hold)."""

    def __init__(self, inner: JsonLines, storage: Storage) -> None:
        self.inner, self.storage, self.name = inner, storage, inner.name

    def meters(self) -> Sequence[str]:
        return self.inner.meters()

    def send(self, events: Sequence[UsageEvent], rejected: list[tuple[str, str]]) -> Iterator[str]:
        yield from self.inner.send(events, rejected)
        assert self.storage.export_lock(self.name, 60, force=True) is not None


def test_an_export_that_lost_its_hold_moves_no_marks(storage: Storage) -> None:
    from plangate.errors import StorageError

    settings = export_config()
    traffic = Traffic(storage, settings)
    traffic.calls(1)
    cfg = load_config(settings)
    out = io.StringIO()
    with pytest.raises(StorageError):
        UsageExport(
            storage, cfg, TakenOver(JsonLines(cfg, out), storage), clock=traffic.clock
        ).run()
    # its batch stays recorded, all of it confirmed: whoever holds the export now finishes it
    batch, confirmed = storage.pending_export("jsonl") or ("", frozenset())
    assert {e["identifier"] for e in json.loads(batch)} == confirmed
    hours = storage.usage_hours("acme", int(START), int(START) + HOUR)
    assert not any(k.startswith("exported:") for f in hours.values() for k in f)
    again = io.StringIO()
    report = UsageExport(storage, cfg, JsonLines(cfg, again), clock=traffic.clock).run(
        take_over=True
    )
    assert (report.sent, again.getvalue()) == (0, "")  # nothing sent twice


def test_an_event_never_ends_before_it_starts(storage: Storage) -> None:
    settings = export_config()
    traffic = Traffic(storage, settings)
    traffic.clock.now = START + 0.5  # in the first second of the hour
    traffic.calls(1, "/v1/things")
    out = io.StringIO()
    exporter(storage, settings, JsonLines(load_config(settings), out), traffic).run()
    (event,) = lines(out)
    assert (event["start"], event["end"]) == ("2027-01-15T08:00:00Z", "2027-01-15T08:00:01Z")


def test_a_meter_taken_out_of_the_config_rejects_its_recorded_events(storage: Storage) -> None:
    """A batch recorded before a meter left ``billing.zuora.meters``: on resume its events
    of that meter are refused (and reported), the others sent."""
    settings = export_config()
    traffic = Traffic(storage, settings)
    traffic.calls(1)
    link(storage, "acme", "zuora", account="A1")
    before = load_config(settings)
    with pytest.raises(ExportInterrupted):
        UsageExport(
            storage, before, Failing(ZuoraCsv(before, io.StringIO()), 0), clock=traffic.clock
        ).run()
    del settings["billing"]["zuora"]["meters"]["ai_tokens"]
    after = load_config(settings)
    out = io.StringIO()
    report = UsageExport(storage, after, ZuoraCsv(after, out), clock=traffic.clock).run()
    assert (report.sent, report.resumed) == (1, 1)
    assert [why for _, why in report.rejected] == ["ai_tokens is no longer in meters"]
    assert storage.pending_export("zuora-csv") is None


def test_appending_runs_to_one_csv_file_writes_one_header(storage: Storage, tmp_path: Any) -> None:
    settings = export_config()
    traffic = Traffic(storage, settings)
    link(storage, "acme", "zuora", account="A1")
    cfg = load_config(settings)
    target = tmp_path / "usage.csv"
    for _ in range(2):
        traffic.calls(1)
        with target.open("a", encoding="utf-8", newline="") as out:
            UsageExport(storage, cfg, ZuoraCsv(cfg, out), clock=traffic.clock).run()
    rows = target.read_text().splitlines()
    assert [r for r in rows if r.startswith("ACCOUNT_ID")] == [rows[0]]
    assert len(rows) == 1 + 2 * 2


def test_a_periodic_run_that_finds_the_export_held_leaves_no_file(tmp_path: Any) -> None:
    """Several gateways' timers fire together: the run that finds the export held removes
    only its own (empty) file, never the one the holder writes into."""
    from plangate import MemoryStorage
    from plangate.billing import PeriodicExport

    storage = MemoryStorage()
    settings = export_config(export={"every": "5m", "to": "jsonl", "path": str(tmp_path)})
    traffic = Traffic(storage, settings)
    traffic.calls(1)
    cfg = load_config(settings)
    periodic = PeriodicExport(storage, cfg, clock=traffic.clock)
    theirs = storage.export_lock("jsonl", 60)
    assert theirs is not None
    holder = tmp_path / "plangate-usage-jsonl-written-by-the-holder.jsonl"
    holder.write_text("{}\n")
    with pytest.raises(ExportBusy):
        periodic.once()
    assert list(tmp_path.iterdir()) == [holder]
    theirs.release()
    report = periodic.once()
    assert report.sent == 2
    assert len(list(tmp_path.glob("plangate-usage-jsonl-*.jsonl"))) == 2


def test_stripe_is_not_asked_for_usage_older_than_it_takes(storage: Storage) -> None:
    holder: list[Recorded] = []
    with stripe_answers_server(holder, {}) as server:
        settings = export_config(server.url, retention="60d")
        settings["billing"]["stripe"]["meters"] = {"api_calls": "api_requests"}
        traffic = Traffic(storage, settings)
        traffic.calls(1)  # 40 days before the export
        link(storage, "acme")
        cfg = load_config(settings)
        traffic.clock.now += 40 * 86400
        report = UsageExport(storage, cfg, StripeMeters(cfg), clock=traffic.clock).run()
        jsonl = io.StringIO()
        UsageExport(storage, cfg, JsonLines(cfg, jsonl), clock=traffic.clock).run()
    assert (report.sent, server.requests) == (0, [])
    assert [e["value"] for e in lines(jsonl) if e["meter"] == "api_calls"] == [1]
