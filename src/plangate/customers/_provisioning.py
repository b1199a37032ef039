"""Provisioning: customer records shown, assigned, changed, listed and migrated.

Everything here is checked against the config before it is stored: a plan, an add-on or a
feature the config does not have, or a value of the wrong kind, is refused naming the field
(``InvalidRecord``, an HTTP 422); a legacy plan is assigned only when asked to
(``LegacyPlanRefused``, 409). The logic is written once, as flows of store operations (the
engine's pattern): ``CustomerStore`` runs them with blocking calls, ``AsyncCustomerStore``
awaits them; the admin API, the CLI and the Python API all go through them.

Concurrent writers never lose each other's fields: every write names the version it read and
the store refuses it if another write came first (``VersionConflict``); a patch then reads
the record again and applies itself to it. A write given ``if_version`` (HTTP ``If-Match``)
is refused instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from ..config import compile_entitlement
from ..engine import (
    Backend,
    CustomerPage,
    CustomerRecord,
    Engine,
    Flow,
    LoadCustomer,
    Op,
    Problem,
    Subscription,
)
from ..errors import ConfigError, PlanGateError, VersionConflict
from ..identity import Identity

#: the members of a record a client writes; the others (customer, version, entitlements)
#: are derived, and ignored when a body carries them back
WRITABLE = ("plan", "addons", "overrides", "trial_ends_at", "billing_anchor", "previous_plan")
#: members shown but not written by a client (billing keeps ``subscriptions``)
DERIVED = ("customer", "version", "entitlements", "subscriptions")
#: how many times a patch is applied again when another write came between its read and
#: its write (each retry means someone else's write succeeded)
PATCH_ATTEMPTS = 20
MAX_QUANTITY = 1_000_000
MIGRATION_BATCH = 500


class InvalidRecord(PlanGateError):
    """A customer record the config does not allow. ``errors``: (field, message) pairs,
    the field dotted (``addons.token_pack``)."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        self.field = errors[0][0]
        super().__init__("; ".join(f"{where}: {message}" for where, message in errors))


class LegacyPlanRefused(PlanGateError):
    """A legacy plan is kept for the customers who have it; assigning it needs
    ``allow_legacy``."""

    def __init__(self, plan: str) -> None:
        self.plan = plan
        super().__init__(
            f"plan {plan!r} is a legacy plan: it stays with the customers who have it, and is "
            "assigned only with allow_legacy"
        )


class WriteContention(VersionConflict):
    """Every attempt of a write lost the race to another writer (the record is being
    written continuously): retry later."""

    def __init__(self, customer: str, attempts: int) -> None:
        PlanGateError.__init__(
            self, f"customer {customer!r} changed {attempts} times while being written: retry"
        )
        self.customer = customer
        self.expected = self.current = -1


class CustomerNotFound(PlanGateError):
    """No record for the customer."""

    def __init__(self, customer: str) -> None:
        self.customer = customer
        super().__init__(f"no customer {customer!r} in the store")


# The store operations provisioning needs, beyond the engine's: raw reads (never the
# cache: a write names the version it read), compare-and-set writes, deletes and listings.


@dataclass(frozen=True, slots=True)
class ReadCustomer(Op["CustomerRecord | None"]):
    customer: str

    def run(self, backend: Backend) -> CustomerRecord | None:
        return backend.get_customer(self.customer)

    async def arun(self, backend: Backend) -> CustomerRecord | None:
        return await backend.aget_customer(self.customer)


@dataclass(frozen=True, slots=True)
class WriteCustomer(Op[int]):
    record: CustomerRecord
    expected: int | None

    def run(self, backend: Backend) -> int:
        return backend.put_customer(self.record, expected_version=self.expected)

    async def arun(self, backend: Backend) -> int:
        return await backend.aput_customer(self.record, expected_version=self.expected)


@dataclass(frozen=True, slots=True)
class WriteCustomers(Op["list[int | VersionConflict]"]):
    """Many compare-and-set writes, sent together; per write its version or conflict."""

    writes: tuple[tuple[CustomerRecord, int | None], ...]

    def run(self, backend: Backend) -> list[int | VersionConflict]:
        return backend.put_customers(self.writes)

    async def arun(self, backend: Backend) -> list[int | VersionConflict]:
        return await backend.aput_customers(self.writes)


@dataclass(frozen=True, slots=True)
class RemoveCustomer(Op[int]):
    customer: str
    expected: int | None

    def run(self, backend: Backend) -> int:
        return backend.delete_customer(self.customer, expected_version=self.expected)

    async def arun(self, backend: Backend) -> int:
        return await backend.adelete_customer(self.customer, expected_version=self.expected)


@dataclass(frozen=True, slots=True)
class ListCustomers(Op[CustomerPage]):
    plan: str | None
    limit: int
    cursor: str | None

    def run(self, backend: Backend) -> CustomerPage:
        return backend.list_customers(plan=self.plan, limit=self.limit, cursor=self.cursor)

    async def arun(self, backend: Backend) -> CustomerPage:
        return await backend.alist_customers(plan=self.plan, limit=self.limit, cursor=self.cursor)


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


class Provisioning:
    """The flows of provisioning, for one config (the engine's) and clock."""

    def __init__(self, engine: Engine, clock: Callable[[], float]) -> None:
        self.engine = engine
        self.model = engine.config.model
        self.plans = engine.config.catalog.plans
        self.addons = engine.config.catalog.addons
        self.clock = clock

    # reading -----------------------------------------------------------------------------

    def show(self, customer: str) -> Flow[dict[str, Any]]:
        """The customer's record with its resolved entitlements; ``CustomerNotFound``."""
        record = yield ReadCustomer(customer)
        if record is None:
            raise CustomerNotFound(customer)
        return (yield from self.body(record))

    def body(self, record: CustomerRecord) -> Flow[dict[str, Any]]:
        """What the admin API answers for ``record``: its members, version, entitlements."""
        entitlements = yield from self._entitlements(record)
        return {**record_json(record), "entitlements": entitlements}

    def _entitlements(self, record: CustomerRecord) -> Flow[dict[str, Any] | None]:
        """The engine's entitlements of ``record`` (as the entitlements endpoint answers
        them, for a token without a plan claim); None when it has no plan at all."""
        flow = self.engine.entitlements(Identity(record.customer, None, {}), self.clock())
        try:
            op = next(flow)
            while True:
                if type(op) is LoadCustomer:  # the record in hand, not another read
                    op = flow.send(record)
                    continue
                try:
                    result = yield op
                except Exception as exc:
                    op = flow.throw(exc)
                else:
                    op = flow.send(result)
        except StopIteration as stop:
            answer = stop.value
        if isinstance(answer, Problem):
            return None
        answer.pop("customer", None)
        return dict(answer)

    def listing(
        self, *, plan: str | None = None, limit: int = 100, cursor: str | None = None
    ) -> Flow[dict[str, Any]]:
        """A page of records (without entitlements), and the cursor of the next."""
        page = yield ListCustomers(plan, limit, cursor)
        return {
            "customers": [record_json(r) for r in page.records],
            "next_cursor": page.cursor,
        }

    # writing -----------------------------------------------------------------------------

    def put(
        self,
        customer: str,
        body: Mapping[str, Any],
        *,
        if_version: int | None = None,
        allow_legacy: bool = False,
    ) -> Flow[dict[str, Any]]:
        """Replace the whole record with ``body`` (what is missing is unset). Without
        ``if_version`` the last write wins: one that came between is written over."""
        if not isinstance(body, Mapping):
            raise InvalidRecord([("", "the body must be a JSON object")])
        return (
            yield from self._change(
                customer, lambda _: body, if_version=if_version, allow_legacy=allow_legacy
            )
        )

    def patch(
        self,
        customer: str,
        patch: Mapping[str, Any],
        *,
        if_version: int | None = None,
        allow_legacy: bool = False,
    ) -> Flow[dict[str, Any]]:
        """Apply a JSON merge patch (RFC 7396) to the record (an empty one if there is
        none). Without ``if_version``, a write that came between is read and patched again."""
        if not isinstance(patch, Mapping):
            raise InvalidRecord([("", "a merge patch of a record must be a JSON object")])
        return (
            yield from self._change(
                customer,
                lambda body: merge_patch(body, patch),
                if_version=if_version,
                allow_legacy=allow_legacy,
            )
        )

    def assign(
        self,
        customer: str,
        *,
        plan: str | None = UNSET,
        trial: bool = False,
        addons: Mapping[str, int] | None = None,
        overrides: Mapping[str, Any] | None = None,
        billing_anchor: datetime | None = UNSET,
        allow_legacy: bool = False,
    ) -> Flow[dict[str, Any]]:
        """Change what is given and keep the rest. A plan given without ``trial`` is the
        customer's for good (a trial under way ends); ``trial=True`` starts the plan's
        trial. ``addons``/``overrides`` are merged in (a quantity of 0, an override of
        None: removed)."""
        patch: dict[str, Any] = {}
        if plan is not UNSET:
            patch["plan"] = plan
            if not trial:
                patch["trial_ends_at"] = None
                patch["previous_plan"] = None
        if trial:
            patch["trial"] = True
        if addons:
            patch["addons"] = {name: (qty if qty != 0 else None) for name, qty in addons.items()}
        if overrides:
            patch["overrides"] = dict(overrides)
        if billing_anchor is not UNSET:
            patch["billing_anchor"] = None if billing_anchor is None else billing_anchor.isoformat()
        return (
            yield from self._change(
                customer, lambda body: merge_patch(body, patch), allow_legacy=allow_legacy
            )
        )

    def _change(
        self,
        customer: str,
        change: Callable[[dict[str, Any]], Any],
        *,
        if_version: int | None = None,
        allow_legacy: bool = False,
    ) -> Flow[dict[str, Any]]:
        for _attempt in range(PATCH_ATTEMPTS):
            current = yield ReadCustomer(customer)
            body = editable_json(current) if current is not None else {}
            changed = change(body)
            if not isinstance(changed, Mapping):
                raise InvalidRecord([("", "the patched record must be a JSON object")])
            record = self.record(customer, changed, current, allow_legacy=allow_legacy)
            try:
                version = yield WriteCustomer(record, _expected(current, if_version))
            except VersionConflict:
                if if_version is not None:
                    raise
                continue
            return (yield from self.body(replace(record, version=version)))
        raise WriteContention(customer, PATCH_ATTEMPTS)

    def delete(self, customer: str, *, if_version: int | None = None) -> Flow[None]:
        """Remove the record; ``CustomerNotFound`` if there is none."""
        current = yield ReadCustomer(customer)
        if current is None:
            raise CustomerNotFound(customer)
        yield RemoveCustomer(customer, if_version)  # the store compares the version

    def migrate(
        self,
        from_plan: str,
        to_plan: str,
        *,
        dry_run: bool = False,
        allow_legacy: bool = False,
        batch: int = MIGRATION_BATCH,
    ) -> Flow[dict[str, Any]]:
        """Move every customer on ``from_plan`` to ``to_plan`` (a trial that would fall back
        to ``from_plan`` falls back to ``to_plan``), page by page, each record by
        compare-and-set: safe while requests and other writes flow. Idempotent, and
        resumable: run again, it moves whoever is still on ``from_plan``."""
        problems = []
        if not isinstance(from_plan, str) or not from_plan:
            problems.append(("from", "the plan to move customers from (a name)"))
        if not isinstance(to_plan, str) or to_plan not in self.plans:
            problems.append(("to", f"unknown plan {to_plan!r}; {self._known(self.plans)}"))
        elif to_plan == from_plan:
            problems.append(("to", "the plan customers are moved from: nothing to migrate"))
        if problems:
            raise InvalidRecord(problems)
        if self.plans[to_plan].legacy and not allow_legacy:
            raise LegacyPlanRefused(to_plan)
        matched = migrated = 0
        cursor: str | None = None
        while True:
            page = yield ListCustomers(None, batch, cursor)
            found = [record for record in page.records if _on(record, from_plan)]
            matched += len(found)
            if found and not dry_run:
                # the page in one batch of writes; a record changed since it was listed
                # is read again and written alone
                moved = tuple((_moved(r, from_plan, to_plan), r.version) for r in found)
                results = yield WriteCustomers(moved)
                migrated += sum(isinstance(result, int) for result in results)
                for record, result in zip(found, results, strict=True):
                    if isinstance(result, int):
                        continue
                    again: CustomerRecord | None = record
                    while again is not None and _on(again, from_plan):
                        try:
                            yield WriteCustomer(_moved(again, from_plan, to_plan), again.version)
                        except VersionConflict:
                            again = yield ReadCustomer(again.customer)
                            continue
                        migrated += 1
                        break
            cursor = page.cursor
            if cursor is None:
                break
        return {"from": from_plan, "to": to_plan, "matched": matched, "migrated": migrated}

    # checking ------------------------------------------------------------------------------

    def record(
        self,
        customer: str,
        body: Mapping[str, Any],
        current: CustomerRecord | None,
        *,
        allow_legacy: bool = False,
    ) -> CustomerRecord:
        """The record ``body`` describes, checked against the config."""
        errors: list[tuple[str, str]] = []
        for key in body:
            if key not in WRITABLE and key not in DERIVED and key != "trial":
                errors.append((str(key), f"unknown member; a record has {', '.join(WRITABLE)}"))
        if "customer" in body and body["customer"] != customer:
            errors.append(("customer", f"is {customer!r} (the id in the path)"))
        plan = self._plan("plan", body.get("plan"), errors)
        previous = self._plan("previous_plan", body.get("previous_plan"), errors)
        addons = self._addons(body.get("addons"), errors)
        overrides = self._overrides(body.get("overrides"), errors)
        trial_ends_at = _moment("trial_ends_at", body.get("trial_ends_at"), errors)
        anchor = _moment("billing_anchor", body.get("billing_anchor"), errors)
        trial = body.get("trial", False)
        if not isinstance(trial, bool):
            errors.append(("trial", "true (start the plan's trial now) or false"))
        elif trial and not errors:
            if plan is None:
                errors.append(("trial", "a trial needs a plan"))
            elif self.plans[plan].trial_days is None:
                errors.append(("trial", f"plan {plan!r} has no trial_days"))
            else:
                days = self.plans[plan].trial_days or 0
                start = datetime.fromtimestamp(self.clock(), timezone.utc)
                trial_ends_at = start + timedelta(days=days)
                given = body.get("previous_plan")
                if given in (None, plan) or (
                    current is not None and given == current.previous_plan
                ):
                    previous = _plan_before(current, plan, start)
        if errors:
            raise InvalidRecord(errors)
        # a legacy plan stays with whoever has it; nobody new is given it unless asked (as
        # the plan, or as the plan a trial falls back to)
        held = () if current is None else (current.plan, current.previous_plan)
        for name in (plan, previous):
            legacy = name is not None and self.plans[name].legacy
            if legacy and not allow_legacy and name not in held:
                raise LegacyPlanRefused(str(name))
        return CustomerRecord(
            customer,
            plan=plan,
            billing_anchor=anchor,
            addons=addons,
            overrides=overrides,
            trial_ends_at=trial_ends_at,
            previous_plan=previous,
            subscriptions=current.subscriptions if current is not None else (),
        )

    @staticmethod
    def _known(names: Mapping[str, Any]) -> str:
        return f"known: {', '.join(sorted(names))}" if names else "the config has none"

    def _plan(self, where: str, value: Any, errors: list[tuple[str, str]]) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or value not in self.plans:
            errors.append((where, f"unknown plan {value!r}; {self._known(self.plans)}"))
            return None
        return value

    def _addons(self, value: Any, errors: list[tuple[str, str]]) -> dict[str, int]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            errors.append(("addons", "an object of add-on name → quantity"))
            return {}
        addons = {}
        for name, quantity in value.items():
            where = f"addons.{name}"
            if name not in self.addons:
                errors.append((where, f"unknown add-on; {self._known(self.addons)}"))
            elif quantity is None:
                continue
            elif isinstance(quantity, bool) or not isinstance(quantity, int):
                errors.append((where, f"a quantity is a whole number, not {quantity!r}"))
            elif not 0 <= quantity <= MAX_QUANTITY:
                errors.append((where, f"a quantity is 0 to {MAX_QUANTITY}, not {quantity}"))
            elif quantity:
                addons[name] = quantity
        return addons

    def _overrides(self, value: Any, errors: list[tuple[str, str]]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            errors.append(("overrides", "an object of feature → value"))
            return {}
        overrides = {}
        for feature, granted in value.items():
            where = f"overrides.{feature}"
            if feature not in self.model.features:
                errors.append((where, f"unknown feature; {self._known(self.model.features)}"))
                continue
            if granted is None:
                continue
            try:
                compile_entitlement(self.model, feature, granted)
            except ConfigError as exc:
                errors += [(where, issue.message) for issue in exc.issues]
                continue
            overrides[feature] = granted
        return overrides


def _on(record: CustomerRecord, plan: str) -> bool:
    return record.plan == plan or record.previous_plan == plan


def _moved(record: CustomerRecord, from_plan: str, to_plan: str) -> CustomerRecord:
    """``record`` with ``from_plan`` replaced by ``to_plan`` (a trial's fallback too)."""
    return replace(
        record,
        plan=to_plan if record.plan == from_plan else record.plan,
        previous_plan=to_plan if record.previous_plan == from_plan else record.previous_plan,
    )


def _expected(current: CustomerRecord | None, if_version: int | None) -> int:
    """The version a write names: the caller's (``If-Match``), else the one just read."""
    if if_version is not None:
        return if_version
    return 0 if current is None else current.version


def _plan_before(current: CustomerRecord | None, plan: str, now: datetime) -> str | None:
    """The plan a trial of ``plan`` falls back to: the one the customer is on now."""
    if current is None:
        return None
    ends = current.trial_ends_at
    if ends is not None and ends <= now:  # its own trial is over: on the plan before it
        return current.previous_plan
    if current.plan == plan:  # a trial of the plan it is on: back to where that one goes
        return current.previous_plan
    return current.plan


def _moment(where: str, value: Any, errors: list[tuple[str, str]]) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            errors.append((where, f"an ISO 8601 time such as 2027-01-31T00:00:00Z, not {value!r}"))
            return None
    else:
        errors.append((where, f"an ISO 8601 time (a string), not {value!r}"))
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def _when(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def editable_json(record: CustomerRecord) -> dict[str, Any]:
    """The members of ``record`` a client writes, as JSON."""
    return {
        "plan": record.plan,
        "addons": dict(record.addons),
        "overrides": {k: _json_value(v) for k, v in record.overrides.items()},
        "trial_ends_at": _when(record.trial_ends_at),
        "billing_anchor": _when(record.billing_anchor),
        "previous_plan": record.previous_plan,
    }


def record_json(record: CustomerRecord) -> dict[str, Any]:
    """``record`` as the admin API shows it (without entitlements)."""
    return {
        "customer": record.customer,
        **editable_json(record),
        "subscriptions": [subscription_json(s) for s in record.subscriptions],
        "version": record.version,
    }


def subscription_json(subscription: Subscription) -> dict[str, Any]:
    """A billing provider's subscription as the admin API shows it."""
    return {
        "provider": subscription.provider,
        "id": subscription.id,
        "status": subscription.status,
        "live": subscription.live,
        "plan": subscription.plan,
        "addons": dict(subscription.addons),
        "account": subscription.account,
        "event_at": _epoch_iso(subscription.event_at),
        "event_id": subscription.event_id,
    }


def _epoch_iso(at: float) -> str | None:
    try:
        return datetime.fromtimestamp(at, timezone.utc).isoformat()
    except (OverflowError, OSError, ValueError):  # a time no datetime holds
        return None


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "unlimited"
    if isinstance(value, Mapping):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch: ``patch`` applied to ``target`` (neither is changed).
    Written here because it is the RFC's ten-line algorithm (§2) and the packages that
    offer it are unmaintained."""
    if not isinstance(patch, Mapping):
        return patch
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def iter_errors(error: InvalidRecord) -> Iterator[dict[str, str]]:
    """The errors of ``error`` as JSON objects (the 422's ``errors`` member)."""
    for where, message in error.errors:
        yield {"field": where, "detail": message}
