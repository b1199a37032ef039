"""Usage out (SPEC §7): the store's hourly usage aggregates sent to billing, exactly once.

One event per customer and meter covers all its usage since what was last exported there:
every hour's units (``usage_key``) less what that hour's ``exported:<destination>:<meter>``
mark says was sent. An export takes everything committed before it starts, the running hour
included. Each batch is recorded in the store, with its events' identifiers, before anything
is sent; each event sent is confirmed there; the marks move once the batch is through. So a
run after a success sends nothing again, and a run after a crash first sends exactly the
recorded events it had not confirmed, with the same identifiers (and Stripe drops one it
already has: the identifier is the event's, and the call's idempotency key).

Destinations: Stripe meter events (``billing.stripe.meters``), Zuora's usage upload CSV
(``billing.zuora.meters``), JSON lines. See docs/billing.md "Usage export".
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from ..config import Config, parse_duration
from ..engine import USAGE_HOUR, CustomerRecord, usage_hour
from ..errors import StorageError
from ..storage import ExportLock, Storage

logger = logging.getLogger("plangate.billing")

#: events recorded, sent and marked together: at most one batch is ever left half-sent
BATCH = 500
#: seconds an export holds its lock without renewing it (renewed every third of that while
#: it runs): how long a crashed export keeps the next one waiting (``--take-over`` does not)
LOCK_TTL = 60.0


@dataclass(frozen=True)
class UsageEvent:
    """The usage of one customer's meter since what was last exported to a destination.

    ``start``..``end`` (epoch seconds): from the first hour it covers to the end of the
    last (at most the export's start). ``marks``: hour → that hour's units once this is
    sent. ``account``: the provider's customer (Stripe ``cus_…``, a Zuora account number);
    ``subscription``: the provider's subscription (Zuora)."""

    identifier: str
    customer: str
    meter: str
    value: int
    start: int
    end: int
    account: str = ""
    subscription: str = ""
    marks: Mapping[int, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["marks"] = {str(hour): units for hour, units in self.marks.items()}
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> UsageEvent:
        marks = {int(hour): int(units) for hour, units in data["marks"].items()}
        return cls(**{**data, "marks": marks})


class ExportInterrupted(Exception):
    """The destination stopped taking events (unreachable, or still refusing after its
    backoff): what was not confirmed is sent by the next run."""


class ExportBusy(Exception):
    """Another process is exporting to this destination now."""


@dataclass
class ExportReport:
    destination: str
    sent: int = 0  # events confirmed this run
    units: int = 0  # the units they carried
    resumed: int = 0  # of them, from a batch an earlier run had recorded
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (identifier, why)
    #: customers with usage for this destination but no account there (left unexported)
    unlinked: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        text = f"{self.destination}: {self.sent} events sent ({self.units} units)"
        if self.resumed:
            text += f", {self.resumed} of them resumed from an interrupted run"
        lines = [text]
        lines += [f"  rejected {identifier}: {why}" for identifier, why in self.rejected]
        if self.unlinked:
            shown = ", ".join(self.unlinked[:10]) + (" …" if len(self.unlinked) > 10 else "")
            lines.append(
                f"  {len(self.unlinked)} customers have no {self.destination} account "
                f"(their usage waits): {shown}"
            )
        return lines


class Destination(ABC):
    """Where usage goes: which meters, to which account, and how events are sent."""

    #: the name its marks and its recorded batch go by
    name: str
    #: seconds back it takes usage (None: any age)
    horizon: float | None = None

    @abstractmethod
    def meters(self) -> Sequence[str]:
        """The meters exported here."""

    def account(self, record: CustomerRecord | None) -> tuple[str, str] | None:
        """The customer's (account, subscription) here; None: it has none (yet)."""
        return ("", "")

    @abstractmethod
    def send(self, events: Sequence[UsageEvent], rejected: list[tuple[str, str]]) -> Iterator[str]:
        """Send ``events``, yielding each one's identifier once it is delivered; one the
        destination refuses for good goes to ``rejected`` (identifier, why).
        ``ExportInterrupted`` when it stops taking any."""


def _account(record: CustomerRecord | None, provider: str) -> tuple[str, str] | None:
    """The customer's account and subscription in ``provider``: its live subscription's,
    else the newest one's (usage from before a cancellation is still billed)."""
    if record is None:
        return None
    held = [s for s in record.subscriptions if s.provider == provider and s.account]
    if not held:
        return None
    best = max(held, key=lambda s: (s.live, s.event_at))
    return best.account, best.id


class StripeMeters(Destination):
    """Stripe Billing meter events, one call each through the official client: the event's
    ``identifier`` is also the call's idempotency key. 429s (and network errors) are tried
    again after a backoff that doubles, ``Retry-After`` when Stripe gives one."""

    name = "stripe"
    #: Stripe takes meter events up to 35 days old: older usage is not asked of it
    horizon = 35 * 86400 - USAGE_HOUR

    def __init__(
        self,
        config: Config,
        *,
        attempts: int = 6,
        backoff: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        billing = config.model.billing
        if billing is None or billing.stripe is None or not billing.stripe.meters:
            raise ValueError("exporting to Stripe needs billing.stripe.meters in the config")
        if not billing.stripe.api_key:
            raise ValueError("exporting to Stripe needs billing.stripe.api_key")
        from ._stripe import api_client

        self.event_names = dict(billing.stripe.meters)
        self.client = api_client(billing.stripe, retries=0)  # the backoff is ours
        self.attempts, self.backoff, self.sleep = attempts, backoff, sleep

    def meters(self) -> Sequence[str]:
        return list(self.event_names)

    def account(self, record: CustomerRecord | None) -> tuple[str, str] | None:
        return _account(record, "stripe")

    def send(self, events: Sequence[UsageEvent], rejected: list[tuple[str, str]]) -> Iterator[str]:
        for event in events:
            if event.meter not in self.event_names:
                rejected.append((event.identifier, f"{event.meter} is no longer in meters"))
                continue
            params = {
                "event_name": self.event_names[event.meter],
                "identifier": event.identifier,
                "timestamp": event.end - 1,
                "payload": {"stripe_customer_id": event.account, "value": str(event.value)},
            }
            why = self._create(params, event.identifier)
            if why is None:
                yield event.identifier
            else:
                rejected.append((event.identifier, why))

    def _create(self, params: dict[str, Any], identifier: str) -> str | None:
        """Send one event: None once Stripe has it, else why Stripe refuses it for good."""
        import stripe

        for attempt in range(self.attempts):
            try:
                self.client.v1.billing.meter_events.create(params, {"idempotency_key": identifier})
                return None
            except stripe.RateLimitError as exc:
                failure: stripe.StripeError = exc
            except stripe.APIConnectionError as exc:
                failure = exc
            except stripe.StripeError as exc:
                if (exc.http_status or 500) < 500:
                    return str(exc.user_message or exc)
                failure = exc
            if attempt + 1 < self.attempts:
                self.sleep(_retry_after(failure) or self.backoff * 2**attempt)
        raise ExportInterrupted(f"Stripe's API: {failure.user_message or failure}")


def _retry_after(exc: Any) -> float | None:
    headers = getattr(exc, "headers", None) or {}
    value = headers.get("retry-after") or headers.get("Retry-After")
    try:
        return None if value is None else min(60.0, float(value))
    except ValueError:
        return None


class ZuoraCsv(Destination):
    """Zuora's usage upload file (Billing → Usage → Import): one row per event, its
    identifier in ``UNIQUE_KEY`` (Zuora refuses a row whose key it has)."""

    name = "zuora-csv"
    COLUMNS = (
        "ACCOUNT_ID",
        "UOM",
        "QTY",
        "STARTDATE",
        "ENDDATE",
        "SUBSCRIPTION_ID",
        "CHARGE_ID",
        "DESCRIPTION",
        "UNIQUE_KEY",
    )

    def __init__(self, config: Config, out: IO[str]) -> None:
        billing = config.model.billing
        if billing is None or billing.zuora is None or not billing.zuora.meters:
            raise ValueError("exporting to Zuora needs billing.zuora.meters in the config")
        self.units = dict(billing.zuora.meters)
        self.out = out
        self.writer = csv.writer(out, lineterminator="\n")
        self.header = False

    def meters(self) -> Sequence[str]:
        return list(self.units)

    def account(self, record: CustomerRecord | None) -> tuple[str, str] | None:
        return _account(record, "zuora")

    def send(self, events: Sequence[UsageEvent], rejected: list[tuple[str, str]]) -> Iterator[str]:
        if not self.header:
            with contextlib.suppress(OSError, ValueError):  # a pipe has no position
                self.header = self.out.tell() > 0  # appending to a file that has one
        if not self.header:
            self.writer.writerow(self.COLUMNS)
            self.header = True
        known = [e for e in events if e.meter in self.units]
        rejected += [
            (e.identifier, f"{e.meter} is no longer in meters")
            for e in events
            if e.meter not in self.units
        ]
        events = known
        for e in events:
            unit = self.units[e.meter]
            self.writer.writerow(
                (
                    e.account,
                    unit.uom,
                    e.value,
                    _date(e.start),
                    _date(e.end - 1),
                    e.subscription,
                    unit.charge or "",
                    f"plangate {e.meter} {_iso(e.start)}/{_iso(e.end)}",
                    e.identifier,
                )
            )
        _written(self.out)
        for e in events:
            yield e.identifier


class JsonLines(Destination):
    """One JSON object a line, for anything else: every meter, every customer."""

    name = "jsonl"

    def __init__(self, config: Config, out: IO[str]) -> None:
        self.all = [n for n, f in config.model.features.items() if f.kind == "metered"]
        self.out = out

    def meters(self) -> Sequence[str]:
        return self.all

    def send(self, events: Sequence[UsageEvent], rejected: list[tuple[str, str]]) -> Iterator[str]:
        for e in events:
            line = {
                "identifier": e.identifier,
                "customer": e.customer,
                "meter": e.meter,
                "value": e.value,
                "start": _iso(e.start),
                "end": _iso(e.end),
            }
            self.out.write(json.dumps(line) + "\n")
        _written(self.out)
        for e in events:
            yield e.identifier


def _written(out: IO[str]) -> None:
    """Rows are delivered once they are on disk (or handed to the reader of a pipe)."""
    out.flush()
    with contextlib.suppress(OSError, ValueError, AttributeError):  # a pipe: flushed is all
        os.fsync(out.fileno())


def destination(config: Config, to: str, out: IO[str]) -> Destination:
    """The destination ``to`` names (``stripe``, ``zuora-csv``, ``jsonl``), files written to
    ``out``; ``ValueError`` says what the config lacks for it."""
    if to == "stripe":
        return StripeMeters(config)
    if to == "zuora-csv":
        return ZuoraCsv(config, out)
    if to == "jsonl":
        return JsonLines(config, out)
    raise ValueError(f"unknown destination {to!r}: stripe, zuora-csv or jsonl")


def _iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat().replace("+00:00", "Z")


def _date(epoch: int) -> str:
    """Zuora's import date form, MM/DD/YYYY (UTC)."""
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%m/%d/%Y")


def identifier(
    destination: str, customer: str, meter: str, span: Sequence[tuple[int, int, int]]
) -> str:
    """An event's identifier: from what it covers alone (each hour, its units exported
    before and now), so the same usage always makes the same one."""
    text = "\0".join([destination, customer, meter, *(f"{h}:{a}:{b}" for h, a, b in span)])
    return "plangate-" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def mark_field(destination: str, meter: str) -> str:
    """The field of an hour's aggregates holding its units of ``meter`` exported there."""
    return f"exported:{destination}:{meter}"


class _Keeper:
    """Renews an export's hold every third of its time, on a thread of its own, for as long
    as the export runs: a long scan of the store, or Stripe's backoff, never lets it lapse
    while this process is alive."""

    def __init__(self, lock: ExportLock) -> None:
        self.lock = lock
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="plangate-export-lock", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(LOCK_TTL / 3):
            try:
                self.lock.renew()
            except StorageError:
                logger.warning("usage export: its hold could not be renewed")

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


class UsageExport:
    """``run()`` exports the usage of ``[since, until)`` to ``destination`` (see the module).

    ``since`` defaults to the retention's start; ``until`` to now. Both go by whole hours:
    a ``since`` inside an hour takes that hour, an ``until`` in the past takes only the
    hours that ended by then; the running hour is taken as far as it has come."""

    def __init__(
        self,
        storage: Storage,
        config: Config,
        destination: Destination,
        *,
        clock: Callable[[], float] = time.time,
        batch: int = BATCH,
    ) -> None:
        self.storage = storage
        self.config = config
        self.destination = destination
        self.clock = clock
        self.batch = batch
        self._lock: ExportLock | None = None

    def _held(self) -> None:
        """Renew the hold now: ``StorageError`` if another export has it."""
        if self._lock is not None:
            self._lock.renew()

    def run(
        self, since: float | None = None, until: float | None = None, *, take_over: bool = False
    ) -> ExportReport:
        """``take_over``: start even if another export holds this destination (one that
        crashed and whose hold has not run out yet); never while one is still running."""
        name = self.destination.name
        lock = self.storage.export_lock(name, LOCK_TTL, force=take_over)
        if lock is None:
            raise ExportBusy(
                f"another process is exporting usage to {name} now (or crashed less than "
                f"{LOCK_TTL:.0f}s ago: --take-over if none runs)"
            )
        self._lock = lock
        keeper = _Keeper(lock)
        report = ExportReport(name)
        try:
            pending = self.storage.pending_export(name)
            if pending is not None:
                events = [UsageEvent.from_json(e) for e in json.loads(pending[0])]
                before = report.sent
                self._finish(events, pending[1], report)
                report.resumed = report.sent - before
            now = self.clock()
            kept = now - self.config.catalog.usage_retention  # older hours are gone
            if self.destination.horizon is not None:  # or the destination refuses them
                kept = max(kept, now - self.destination.horizon)
            first = usage_hour(kept if since is None else max(since, kept))
            if until is None or until >= now:  # every hour begun, the running one so far
                stop, cut = usage_hour(now) + USAGE_HOUR, int(now)
            else:  # the hours that ended by then
                stop = cut = usage_hour(until)
            events = []
            for event in self._events(first, stop, cut, report):
                events.append(event)
                if len(events) >= self.batch:
                    self._send(events, report)
                    events = []
            if events:
                self._send(events, report)
        finally:
            keeper.stop()
            try:
                lock.release()
            except StorageError:
                logger.warning("usage export to %s: its lock could not be released", name)
        return report

    def _events(
        self, first: int, stop: int, cut: int, report: ExportReport
    ) -> Iterator[UsageEvent]:
        """Each customer's events: per meter, the units of the hours ``[first, stop)`` not
        exported yet, if any; none ends after ``cut``."""
        dest = self.destination
        meters = dest.meters()
        for customer in self.storage.usage_customers(first, stop):
            hours = self.storage.usage_hours(customer, first, stop)
            wanted = []
            for meter in meters:
                mark = mark_field(dest.name, meter)
                span = [
                    (hour, fields.get(mark, 0), fields.get(meter, 0))
                    for hour, fields in sorted(hours.items())
                    if fields.get(mark, 0) != fields.get(meter, 0)
                ]
                value = sum(now_ - before for _, before, now_ in span)
                if value > 0:  # less than none (refunds after an export) waits for more
                    wanted.append((meter, span, value))
            if not wanted:
                continue
            where = dest.account(self.storage.get_customer(customer))
            if where is None:
                report.unlinked.append(customer)
                continue
            for meter, span, value in wanted:
                yield UsageEvent(
                    identifier(dest.name, customer, meter, span),
                    customer,
                    meter,
                    value,
                    start=span[0][0],
                    end=max(min(span[-1][0] + USAGE_HOUR, cut), span[-1][0] + 1),
                    account=where[0],
                    subscription=where[1],
                    marks={hour: units for hour, _, units in span},
                )

    def _send(self, events: Sequence[UsageEvent], report: ExportReport) -> None:
        """Record the batch, then send it and move its marks."""
        self._held()
        self.storage.begin_export(self.destination.name, json.dumps([e.to_json() for e in events]))
        self._finish(events, frozenset(), report)

    def _finish(
        self, events: Sequence[UsageEvent], confirmed: frozenset[str], report: ExportReport
    ) -> None:
        """Send what of a recorded batch was not confirmed, then move the marks of what
        was delivered and end the batch. ``ExportInterrupted`` leaves it recorded."""
        name = self.destination.name
        done = set(confirmed)
        waiting = [e for e in events if e.identifier not in done]
        for sent in self.destination.send(waiting, report.rejected):
            self.storage.confirm_export(name, [sent])
            done.add(sent)
            report.sent += 1
        self._held()  # no other export took over meanwhile: the marks are ours to move
        by_id = {e.identifier: e for e in events}
        report.units += sum(by_id[i].value for i in done - confirmed if i in by_id)
        marks: dict[str, dict[int, dict[str, int]]] = {}
        for event in events:
            if event.identifier in done:
                held = marks.setdefault(event.customer, {})
                for hour, units in event.marks.items():
                    held.setdefault(hour, {})[mark_field(name, event.meter)] = units
        for customer, hours in marks.items():
            self.storage.mark_usage(customer, hours)
        self.storage.end_export(name)


class PeriodicExport:
    """``billing.export`` in ``plangate gateway``: ``plangate usage export`` every ``every``,
    on a thread (the export's calls block). Zuora CSV and JSON lines go to a new file in
    ``path`` per run that sends anything. Among several gateways, one exports at a time
    (the others find the export held, and wait for their next turn)."""

    def __init__(
        self,
        storage: Storage,
        config: Config | Callable[[], Config],
        *,
        clock: Callable[[], float] = time.time,
        on_report: Callable[[ExportReport], None] | None = None,
    ) -> None:
        #: the config each run exports with: ``config()`` when a callable (the gateway's
        #: gate's, as reloaded: keys, meters, destinations); the schedule is read once
        self._config = config if callable(config) else (lambda: config)
        billing = self._config().model.billing
        if billing is None or billing.export is None:
            raise ValueError("the config sets no billing.export")
        self.storage, self.clock = storage, clock
        self.settings = billing.export
        self.every = parse_duration(billing.export.every)
        self.on_report = on_report

    async def run(self) -> None:
        """Forever, until cancelled: wait ``every``, export. Cancelled while an export runs,
        it waits for it to end (its thread cannot be stopped half-way)."""
        while True:
            await asyncio.sleep(self.every)
            running = asyncio.ensure_future(asyncio.to_thread(self.once))
            try:
                report = await asyncio.shield(running)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await running
                raise
            except ExportBusy:
                logger.info("usage export: another process is exporting now")
                continue
            except (ExportInterrupted, StorageError, OSError) as exc:
                logger.warning("usage export to %s failed: %s", self.settings.to, exc)
                continue
            except Exception:  # the timer goes on: the next run may succeed
                logger.exception("usage export to %s failed", self.settings.to)
                continue
            for line in report.lines():
                logger.info("usage export %s", line.strip())
            if self.on_report is not None:
                self.on_report(report)

    @property
    def config(self) -> Config:
        return self._config()

    def once(self) -> ExportReport:
        config = self._config()  # one config for the whole run
        billing = config.model.billing
        settings = billing.export if billing is not None and billing.export else self.settings
        to = settings.to
        if to == "stripe":
            return UsageExport(self.storage, config, StripeMeters(config), clock=self.clock).run()
        moment = datetime.fromtimestamp(self.clock(), timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        suffix = "csv" if to == "zuora-csv" else "jsonl"
        # a name of its own: another gateway's run in the same second writes its own file
        unique = f"{moment}-{os.getpid()}-{secrets.token_hex(3)}"
        path = Path(str(settings.path)) / f"plangate-usage-{to}-{unique}.{suffix}"
        with path.open("a", encoding="utf-8", newline="") as out:
            dest = destination(config, to, out)
            try:
                return UsageExport(self.storage, config, dest, clock=self.clock).run()
            finally:
                if out.tell() == 0:  # nothing to send: no file
                    path.unlink(missing_ok=True)
