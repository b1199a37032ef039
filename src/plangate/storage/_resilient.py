"""A store that survives its backend: a circuit breaker, in-process fallback, replay.

``ResilientStorage`` wraps a remote store (Redis). Each call goes to the backend unless the
breaker (``_breaker``) is open. When the backend fails or the breaker is open, each counter
follows its ``on_error`` policy: ``local`` counts and enforces in this process, starting from
the usage the backend last reported (``_remembered``), ``allow`` counts without refusing,
``deny`` refuses (``StorageUnavailable``, a 503 to the client). Usage admitted during an
outage, and settles that could not reach the backend, wait in a bounded outbox (``_outbox``)
and are replayed — idempotently — once the backend answers again: before any reservation on
the same counters, then in small batches. Refusals are answered from memory for a moment
(``_remembered``).

The logic is written once, as flows of ``Op``s against the backend, run by ``drive`` for the
blocking methods and by ``adrive`` for the asyncio ones.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import TypeVar

from .._drivers import adrive, drive
from ..errors import StorageError, VersionConflict
from ._base import (
    MADE_THERE,
    ConfigListener,
    Counter,
    CounterState,
    CreditCharge,
    CreditView,
    CustomerListener,
    CustomerPage,
    CustomerRecord,
    ExportLock,
    Flow,
    GrantCredits,
    GrantResult,
    LoadCustomer,
    Op,
    Peek,
    PublishedConfig,
    ReadCredits,
    Record,
    Reserve,
    ReserveResult,
    RevokeCredits,
    Settle,
    Storage,
)
from ._breaker import CircuitBreaker, StorageRejected, StorageUnavailable
from ._leases import Leases, too_late
from ._memory import MemoryStorage
from ._outbox import OUTBOX_LIMIT, Entry, Outbox, Usage
from ._remembered import REFUSAL_TTL, REPORTED, Refusals, ReportedUsage

logger = logging.getLogger("plangate.storage")

T = TypeVar("T")

REPLAY_BATCH = 50  # records replayed after each successful backend call
_TOO_LATE = (
    "lease units a failed call meant to give back waited too long (the store may have "
    "forgotten the call): they stay counted until their window or period ends"
)
FLUSH_JOIN = 5.0  # seconds close waits for a background flush under way


class ResilientStorage(Storage):
    """``inner`` behind a circuit breaker, with the fallback and replay described above."""

    def __init__(
        self,
        inner: Storage,
        *,
        breaker: CircuitBreaker | None = None,
        outbox_limit: int = OUTBOX_LIMIT,
        replay_batch: int = REPLAY_BATCH,
        refusal_ttl: float = REFUSAL_TTL,
        leases: Leases | None = None,
    ) -> None:
        self.inner = inner
        #: local quota leases (``_leases``); None: every request asks the backend
        self.leases = leases
        self._flusher: _Flusher | None = None
        self.customer_cache_ttl = inner.customer_cache_ttl
        self.breaker = breaker or CircuitBreaker()
        self.local = MemoryStorage()
        self.outbox = Outbox(outbox_limit)
        self.replay_batch = replay_batch
        self.refusals = Refusals(refusal_ttl)
        self.reported = ReportedUsage()
        #: the balance the backend last reported for each credit balance with a ``local``
        #: policy: an outage's local balance starts from it
        self.balances: dict[str, int] = {}
        self.backend_calls = 0  # calls the breaker let through to the backend
        #: units of usage admitted during an outage and now replayed to the backend
        self.replayed_units = 0
        #: told of each replay: ``on_replayed(units)`` (plangate.metrics counts them)
        self.on_replayed: Callable[[int], None] | None = None

    def __repr__(self) -> str:
        return f"ResilientStorage({self.inner!r}, breaker={self.breaker.state})"

    @property
    def pending(self) -> int:
        """Records waiting in the outbox for the backend."""
        return len(self.outbox)

    @property
    def dropped(self) -> int:
        """Usage records lost because the outbox was full."""
        return self.outbox.dropped

    @property
    def outbox_limit(self) -> int:
        return self.outbox.limit

    @property
    def refusal_ttl(self) -> float:
        return self.refusals.ttl

    # the backend, behind the breaker -------------------------------------------------------

    def _call(self, op: Op[T], counters: Iterable[Counter] = ()) -> Flow[T]:
        """Run ``op`` on the backend after replaying what waits for ``counters``.

        Raises ``StorageError`` when the breaker is open or the backend fails (recorded), and
        ``StorageRejected`` when the backend answered with an error about the request's data:
        the backend is up, so that is no failure of the breaker's.
        """
        if not self.breaker.allow():
            raise StorageError("the storage circuit breaker is open")
        self.backend_calls += 1
        try:
            if self.outbox:
                for entry in self.outbox.waiting_for(c.key for c in counters):
                    yield from self._replay(entry)
            result: T = yield op
        except StorageRejected:
            self.breaker.succeeded()
            raise
        except BaseException as exc:  # a cancelled call says nothing good about the backend
            self.breaker.failed(exc)
            raise
        self.breaker.succeeded()
        if self.outbox:
            yield from self._replay_some()
        return result

    def _replay_some(self) -> Flow[None]:
        """Replay up to ``replay_batch`` waiting records; stop quietly at the first failure."""
        try:
            for entry in self.outbox.batch(self.replay_batch):
                yield from self._replay(entry)
        except StorageError as exc:
            self.breaker.failed(exc)

    def _replay(self, entry: Entry) -> Flow[None]:
        op = self.outbox.take(entry)
        if op is None:
            return
        if isinstance(op, Settle) and too_late(op, self.leases.clock() if self.leases else 0.0):
            self.outbox.discard(entry)
            logger.warning(_TOO_LATE)
            return
        try:
            result = yield op
        except StorageRejected as exc:  # it would be refused again: never retried
            self.outbox.discard(entry)
            logger.error("storage refused a record waiting since the outage, dropped: %s", exc)
            return
        except BaseException:
            self.outbox.put_back(entry)
            raise
        for settle in self.outbox.replayed(entry, result):  # settled while it was on its way
            yield from self._settle_on_backend(settle)
        if isinstance(entry, Usage) and result != MADE_THERE:  # not there already
            units = sum(entry.costs)
            self.replayed_units += units
            if self.on_replayed is not None:
                self.on_replayed(units)
        if isinstance(entry, Usage) and not self.outbox:
            logger.info("storage is back: usage buffered during the outage is replayed")

    # operations ----------------------------------------------------------------------------

    def _reserve(self, op: Reserve) -> Flow[ReserveResult]:
        leases = self.leases if self.leases is not None and self.leases.eligible(op) else None
        ask = op
        if leases is not None:
            held = leases.admit(op)
            if held is not None:
                return held
        refused = self.refusals.answer(op)
        if refused is not None:
            return refused
        if leases is not None:
            ask = leases.ask(op)
        try:
            result = yield from self._call(ask, op.counters)
        except StorageError as exc:
            if ask.lease is not None:
                assert leases is not None
                leases.failed(ask)  # what it gave back goes back later, once
            if isinstance(exc, StorageRejected):
                logger.error(
                    "storage refused a reservation of %s (not an outage; on_storage_error "
                    "decides this request): %s",
                    op.counters[0].key if op.counters else "nothing",
                    exc,
                )
            return self._reserve_locally(op, exc)
        self.reported.note(op.counters, result.states, op.now)
        if not result.admitted and leases is not None and leases.holding:
            # refused while a request of this process was being leased units: use them
            held = leases.admit(op)
            if held is not None:
                return held
        if ask.lease is not None and leases is not None:
            result = leases.granted(ask, result)
            if result.admitted and (self._flusher is None or not self._flusher.is_alive()):
                if self._flusher is None:  # a process ending without close gives back too
                    atexit.register(_give_back_at_exit, weakref.ref(self))
                self._flusher = _Flusher(self, leases.ttl)
                self._flusher.start()
        if op.credits:
            self._note_balances(op, result)
        if not result.admitted and op.enforce and result.waits:
            self.refusals.remember(op, result)
        return result

    def _reserve_locally(self, op: Reserve, cause: StorageError) -> ReserveResult:
        # A balance the route spends itself must be answered for here (``allow``, or a
        # ``local`` balance seen), else the request is refused (503). A balance that only a
        # meter's overage would charge is dropped instead: the meter is held to its quota
        # alone (a 429 past the limit), never refused below it.
        local: list[CreditCharge] = []  # one per charge of op, as its result is
        unanswered = False
        for charge in op.credits:
            # The period's plan grant is the backend's to issue (on replay), not this one's.
            charge = replace(charge, grant=0, period_start=0, period_end=0)
            if charge.on_error != "deny" and self._seen(charge):
                local.append(charge)
            elif charge.direct:
                unanswered = True
            else:  # the meter keeps its quota: this balance is asked for nothing
                local.append(replace(charge, overage=(), cost=0))
        if unanswered or any(c.on_error == "deny" for c in op.counters):
            raise StorageUnavailable(
                f"usage cannot be counted: {cause}", max(1.0, self.breaker.retry_after)
            ) from cause
        if self.reported:
            self.reported.catch_up(self.local, op.counters, op.now)
        counters = tuple(
            replace(c, limit=None) if c.on_error == "allow" else c for c in op.counters
        )
        result = self.local.reserve(replace(op, counters=counters, credits=tuple(local)))
        # Admitted, or counted in shadow mode: the usage is real, and waits for the backend;
        # unless the backend refused it, as it would refuse its replay.
        if (result.slots or result.admitted) and not isinstance(cause, StorageRejected):
            # a reservation that reached the backend (no answer) may have been made there
            spent = tuple(state.charged for state in result.credits)
            self.outbox.count(op, spent, sent=cause.maybe_applied)
        return result

    def _seen(self, charge: CreditCharge) -> bool:
        """Whether this process can answer for ``charge`` during an outage: ``allow``, or a
        balance the backend reported (the local balance starts from it, once per report)."""
        if charge.on_error == "allow":
            self.local.seed_credits(charge.key, None)
            return True
        balance = self.balances.pop(charge.key, None)
        if balance is not None:
            self.local.seed_credits(charge.key, balance)
            return True
        return self.local.has_credits(charge.key)

    def _note_balances(self, op: Reserve, result: ReserveResult) -> None:
        for charge, state in zip(op.credits, result.credits, strict=True):
            if charge.on_error == "local":
                self.balances.pop(charge.key, None)
                self.balances[charge.key] = state.balance
        while len(self.balances) > REPORTED:
            self.balances.pop(next(iter(self.balances)))

    def _settle(self, op: Settle) -> Flow[bool]:
        if self.refusals and any(d < 0 for d in op.deltas):
            self.refusals.forget(op.counters)  # units given back: what was refused may fit now
        if self.leases is not None and self.leases.holding and not op.credits:
            left = self.leases.absorb(op)
            if left is None:
                return True
            op = left
        outage = self.outbox.settle(op)
        if outage is None:
            return (yield from self._settle_on_backend(op))
        settled, replayed = outage
        if not settled:
            return False
        self.local.settle(op)
        if replayed is not None:
            yield from self._settle_on_backend(replayed)
        return True

    def _settle_on_backend(self, op: Settle) -> Flow[bool]:
        try:
            return (yield from self._call(op))
        except StorageRejected as exc:  # it would be refused again: not kept
            logger.error("storage refused a settle, dropped: %s", exc)
            return True
        except StorageError:
            self.outbox.keep_settle(op)
            return True

    def _peek(self, op: Peek) -> Flow[tuple[CounterState, ...]]:
        try:
            states = yield from self._call(op, op.counters)
        except StorageError:
            if self.reported:
                self.reported.catch_up(self.local, op.counters, op.now)
            return self.local.peek(op)
        self.reported.note(op.counters, states, op.now)
        return states

    def reserve(self, op: Reserve) -> ReserveResult:
        return drive(self._reserve(op), self.inner)

    async def areserve(self, op: Reserve) -> ReserveResult:
        return await adrive(self._reserve(op), self.inner)

    def settle(self, op: Settle) -> bool:
        return drive(self._settle(op), self.inner)

    async def asettle(self, op: Settle) -> bool:
        return await adrive(self._settle(op), self.inner)

    def peek(self, op: Peek) -> tuple[CounterState, ...]:
        return drive(self._peek(op), self.inner)

    async def apeek(self, op: Peek) -> tuple[CounterState, ...]:
        return await adrive(self._peek(op), self.inner)

    def record(self, op: Record) -> tuple[int, ...] | None:
        return drive(self._call(op, op.counters), self.inner)

    async def arecord(self, op: Record) -> tuple[int, ...] | None:
        return await adrive(self._call(op, op.counters), self.inner)

    # Customer records: reads go through the breaker (plangate.customers answers from the
    # record seen last when they fail); writes go straight to the backend.

    def get_customer(self, customer: str) -> CustomerRecord | None:
        return drive(self._call(LoadCustomer(customer)), self.inner)

    async def aget_customer(self, customer: str) -> CustomerRecord | None:
        return await adrive(self._call(LoadCustomer(customer)), self.inner)

    def put_customer(self, record: CustomerRecord, *, expected_version: int | None = None) -> int:
        version = self.inner.put_customer(record, expected_version=expected_version)
        self.refusals.clear()  # a new plan may have new limits
        return version

    async def aput_customer(
        self, record: CustomerRecord, *, expected_version: int | None = None
    ) -> int:
        version = await self.inner.aput_customer(record, expected_version=expected_version)
        self.refusals.clear()
        return version

    def put_customers(
        self, writes: Sequence[tuple[CustomerRecord, int | None]]
    ) -> list[int | VersionConflict]:
        results = self.inner.put_customers(writes)
        self.refusals.clear()
        return results

    async def aput_customers(
        self, writes: Sequence[tuple[CustomerRecord, int | None]]
    ) -> list[int | VersionConflict]:
        results = await self.inner.aput_customers(writes)
        self.refusals.clear()
        return results

    def delete_customer(self, customer: str, *, expected_version: int | None = None) -> int:
        version = self.inner.delete_customer(customer, expected_version=expected_version)
        self.refusals.clear()
        return version

    async def adelete_customer(self, customer: str, *, expected_version: int | None = None) -> int:
        version = await self.inner.adelete_customer(customer, expected_version=expected_version)
        self.refusals.clear()
        return version

    def list_customers(
        self, *, plan: str | None = None, limit: int = 100, cursor: str | None = None
    ) -> CustomerPage:
        return self.inner.list_customers(plan=plan, limit=limit, cursor=cursor)

    async def alist_customers(
        self, *, plan: str | None = None, limit: int = 100, cursor: str | None = None
    ) -> CustomerPage:
        return await self.inner.alist_customers(plan=plan, limit=limit, cursor=cursor)

    # Usage aggregates and their export are the exporter's: straight to the backend (a
    # failure is the exporter's to see and retry), never answered from this process.

    def usage_hours(self, customer: str, since: int, until: int) -> dict[int, dict[str, int]]:
        return self.inner.usage_hours(customer, since, until)

    def usage_customers(self, since: int, until: int) -> Iterator[str]:
        return self.inner.usage_customers(since, until)

    def mark_usage(self, customer: str, marks: Mapping[int, Mapping[str, int]]) -> None:
        self.inner.mark_usage(customer, marks)

    def export_lock(self, name: str, ttl: float, *, force: bool = False) -> ExportLock | None:
        return self.inner.export_lock(name, ttl, force=force)

    def pending_export(self, name: str) -> tuple[str, frozenset[str]] | None:
        return self.inner.pending_export(name)

    def begin_export(self, name: str, batch: str) -> None:
        self.inner.begin_export(name, batch)

    def confirm_export(self, name: str, identifiers: Sequence[str]) -> None:
        self.inner.confirm_export(name, identifiers)

    def end_export(self, name: str) -> None:
        self.inner.end_export(name)

    # Billing's counts of unmapped prices: straight to the backend, like the admin side's.

    def count_unmapped(self, provider: str, names: Sequence[str]) -> None:
        self.inner.count_unmapped(provider, names)

    async def acount_unmapped(self, provider: str, names: Sequence[str]) -> None:
        await self.inner.acount_unmapped(provider, names)

    def unmapped(self, providers: Sequence[str]) -> dict[str, dict[str, int]]:
        return self.inner.unmapped(providers)

    async def aunmapped(self, providers: Sequence[str]) -> dict[str, dict[str, int]]:
        return await self.inner.aunmapped(providers)

    # Credit grants, revocations and reads are the admin side's: straight to the backend
    # (a failure is the caller's to see), never answered from this process.

    def grant_credits(self, op: GrantCredits) -> GrantResult:
        return self.inner.grant_credits(op)

    async def agrant_credits(self, op: GrantCredits) -> GrantResult:
        return await self.inner.agrant_credits(op)

    def revoke_credits(self, op: RevokeCredits) -> int | None:
        return self.inner.revoke_credits(op)

    async def arevoke_credits(self, op: RevokeCredits) -> int | None:
        return await self.inner.arevoke_credits(op)

    def read_credits(self, op: ReadCredits) -> CreditView:
        return self.inner.read_credits(op)

    async def aread_credits(self, op: ReadCredits) -> CreditView:
        return await self.inner.aread_credits(op)

    def watch_customers(self, listener: CustomerListener) -> None:
        self.inner.watch_customers(listener)

    def revoke_session(self, session: str, ttl: float) -> None:
        self.inner.revoke_session(session, ttl)

    def session_revoked(self, session: str) -> bool:
        return self.inner.session_revoked(session)

    def publish_config(self, data: bytes, version: str, mac: str = "") -> None:
        self.inner.publish_config(data, version, mac)

    def published_config(self) -> PublishedConfig | None:
        return self.inner.published_config()

    def watch_config(self, listener: ConfigListener) -> None:
        self.inner.watch_config(listener)

    def check_connection(self) -> str | None:
        return self.inner.check_connection()

    async def acheck_connection(self) -> str | None:
        return await self.inner.acheck_connection()

    # what leases left unused goes back ------------------------------------------------------

    def _give_back(self, everything: bool) -> Flow[None]:
        leases = self.leases
        if leases is None:
            return
        now = leases.clock()
        settles = list(leases.ended(now, everything=everything))
        for i, settle in enumerate(settles):
            if too_late(settle, now):
                logger.warning(_TOO_LATE)
                continue
            try:
                yield from self._settle_on_backend(settle)
            except BaseException:  # cancelled, interrupted: the rest go with the next flush
                leases.requeue(settles[i:])
                raise

    def flush_leases(self, *, everything: bool = False) -> None:
        """Give back what ended leases (``everything``: all leases) left unused."""
        drive(self._give_back(everything), self.inner)

    async def aflush_leases(self, *, everything: bool = False) -> None:
        await adrive(self._give_back(everything), self.inner)

    def _stop_flusher(self) -> None:
        """Stop the background flush, and wait for one under way (it would reopen what
        ``close`` closes)."""
        flusher = self._flusher
        if flusher is not None and flusher.is_alive() and flusher is not threading.current_thread():
            flusher.stop.set()
            flusher.join(FLUSH_JOIN)

    def close(self) -> None:
        self._stop_flusher()
        self.flush_leases(everything=True)
        self.inner.close()

    async def aclose(self) -> None:
        if self._flusher is not None and self._flusher.is_alive():
            await asyncio.to_thread(self._stop_flusher)
        await self.aflush_leases(everything=True)
        await self.inner.aclose()


def _give_back_at_exit(ref: weakref.ReferenceType[ResilientStorage]) -> None:
    """At interpreter exit (a WSGI worker, a gateway that never closes its store): give back
    every lease still held, as ``close`` does."""
    storage = ref()
    if storage is None or storage.leases is None or not storage.leases.holding:
        return
    try:
        storage.flush_leases(everything=True)
    except Exception:  # leaving anyway: the units stay counted until their window ends
        logger.exception("giving back lease units at exit failed")


class _Flusher(threading.Thread):
    """Gives back, every ``interval`` seconds, what ended leases left unused: a customer
    that stops sending requests gets its units back within two lease lifetimes. Holds its
    store weakly and ends with it (or its ``close``)."""

    def __init__(self, storage: ResilientStorage, interval: float) -> None:
        super().__init__(name="plangate-leases", daemon=True)
        self._storage = weakref.ref(storage)
        self.interval = interval
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            storage = self._storage()
            if storage is None:
                return
            try:
                storage.flush_leases()
            except Exception:  # never let the thread die: the next round tries again
                logger.exception("giving back unused lease units failed")
            del storage
