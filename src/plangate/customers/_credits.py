"""Credit balances on the admin side: grants (idempotent), revocations, balances, ledgers.

Written once as flows of store operations, like provisioning: ``CustomerStore`` runs them
with blocking calls, ``AsyncCustomerStore`` awaits them; the admin API, the CLI and the
Python API all go through them. What is asked is checked against the config first (an
unknown feature, a feature that is not ``kind: credits``, an amount that is not a whole
number from 1 to the feature's bound, an expiry in the past, a priority outside 0-255, an
unknown category): ``InvalidRecord`` naming the field, and nothing written.

Amounts travel in credits, as the config counts them; the store keeps sub-units (see
``plangate.engine._credits``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

from ..config import max_credits
from ..engine import (
    CreditCharge,
    CreditView,
    Engine,
    Flow,
    GrantCredits,
    LoadCustomer,
    ReadCredits,
    RevokeCredits,
)
from ..engine._credits import (
    CATEGORIES,
    DEFAULT_PRIORITY,
    MAX_PRIORITY,
    SOURCES,
    Grant,
    LedgerEntry,
    as_credits,
    micros,
)
from ..engine._decision import Decision
from ..errors import PlanGateError
from ..identity import Identity
from ._provisioning import InvalidRecord, _moment

#: ledger entries a page holds at most
MAX_PAGE = 500
#: the longest idempotency key kept
MAX_KEY = 255
#: the first moment past the year 9999 (UTC): an expiry is before it
_LAST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp() + 1


class IdempotencyConflict(PlanGateError):
    """The idempotency key was used before for another grant (HTTP 422)."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(
            f"the idempotency key {key!r} was used for another grant: use a new key for a new grant"
        )


class GrantNotFound(PlanGateError):
    """No grant with that id in any credit balance of the customer (HTTP 404)."""

    def __init__(self, customer: str, grant_id: str) -> None:
        self.customer = customer
        self.grant_id = grant_id
        super().__init__(f"customer {customer!r} has no grant {grant_id!r}")


def _iso(us: int | None) -> str | None:
    if us is None:
        return None
    return datetime.fromtimestamp(us / 1_000_000, timezone.utc).isoformat()


class Credits:
    """The flows of credit balances, for one config (the engine's) and clock."""

    def __init__(self, engine: Engine, clock: Callable[[], float]) -> None:
        self.engine = engine
        self.clock = clock
        self.features = [
            name for name, kind in engine.kinds.items() if kind == "credits"
        ]  # in config order

    # the balance of one customer and feature -------------------------------------------

    def _charge(self, customer: str, feature: str, now: float) -> Flow[CreditCharge]:
        """The balance, with the plan's grant of the period if the customer's plan lists it."""
        record = yield LoadCustomer(customer)
        if record is None or not record.plan:
            # The plan comes from the customer's token (or default_plan): only a request
            # knows it, and issues its grant; here, nothing is issued.
            charge, _ = self.engine.credit_charge(customer, feature, None, None, now)
            return charge
        probe = Decision(None, {}, self.engine.kinds)
        plan = self.engine._plan(probe, Identity(customer, None, {}), record, now)
        charge, _ = self.engine.credit_charge(customer, feature, plan, record.billing_anchor, now)
        return charge

    def _feature(self, value: Any, errors: list[tuple[str, str]]) -> str | None:
        if not isinstance(value, str) or value not in self.engine.kinds:
            known = ", ".join(self.features) or "none"
            errors.append(("feature", f"unknown credits feature {value!r} (credits: {known})"))
            return None
        kind = self.engine.kinds[value]
        if kind != "credits":
            errors.append(("feature", f"{value} is a {kind} feature, not credits"))
            return None
        return value

    def grant_json(self, feature: str, grant: Grant) -> dict[str, Any]:
        scale = self.engine.scales.get(feature, 1)
        return {
            "id": grant.id,
            "feature": feature,
            "amount": as_credits(grant.amount, scale),
            "remaining": as_credits(grant.remaining, scale),
            "category": grant.category,
            "priority": grant.priority,
            "source": grant.source,
            "effective_at": _iso(grant.effective_at),
            "expires_at": _iso(grant.expires_at),
            "created_at": _iso(grant.created_at),
            "idempotency_key": grant.idempotency_key,
        }

    def entry_json(self, feature: str, entry: LedgerEntry) -> dict[str, Any]:
        return {
            "id": entry.id,
            "kind": entry.kind,
            "amount": as_credits(entry.amount, self.engine.scales.get(feature, 1)),
            "grant": entry.grant,
            "ref": entry.ref or None,
            "at": _iso(entry.at),
        }

    # changing ----------------------------------------------------------------------------

    def grant(
        self,
        customer: str,
        body: Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
        source: str = "admin",
    ) -> Flow[tuple[bool, dict[str, Any]]]:
        """Add a grant: ``body`` has ``feature``, ``amount`` (whole credits) and optionally
        ``expires_at`` (ISO 8601, in the future), ``priority`` (0-255, lower burns first)
        and ``category`` (paid, promotional). Returns (created, the grant): ``created`` is
        False when ``idempotency_key`` made this grant before (nothing is added again)."""
        errors: list[tuple[str, str]] = []
        if not isinstance(body, Mapping):
            raise InvalidRecord([("body", "a JSON object with feature and amount")])
        unknown = sorted(set(body) - {"feature", "amount", "expires_at", "priority", "category"})
        for name in unknown:
            errors.append(
                (str(name), "unknown member (feature, amount, expires_at, priority, category)")
            )
        feature = self._feature(body.get("feature"), errors)
        now = self.clock()
        amount = body.get("amount")
        scale = self.engine.scales.get(feature, 1) if feature else 1
        most = max_credits(scale)
        if isinstance(amount, bool) or not isinstance(amount, int):
            errors.append(("amount", f"a whole number of credits from 1 to {most}, not {amount!r}"))
        elif not 1 <= amount <= most:
            errors.append(("amount", f"{amount} is out of range: 1 to {most} credits"))
        expires = _moment("expires_at", body.get("expires_at"), errors)
        if expires is not None and expires.timestamp() <= now:
            errors.append(("expires_at", f"{expires.isoformat()} is in the past"))
        elif expires is not None and expires.timestamp() >= _LAST:
            errors.append(("expires_at", f"{expires.isoformat()} is past the year 9999"))
        priority = body.get("priority", DEFAULT_PRIORITY)
        if isinstance(priority, bool) or not isinstance(priority, int):
            errors.append(
                ("priority", f"a whole number from 0 to {MAX_PRIORITY}, not {priority!r}")
            )
        elif not 0 <= priority <= MAX_PRIORITY:
            errors.append(("priority", f"{priority} is out of range: 0 to {MAX_PRIORITY}"))
        category = body.get("category", "paid")
        if category not in CATEGORIES:
            errors.append(("category", f"paid or promotional, not {category!r}"))
        if source not in SOURCES:
            errors.append(("source", f"one of {', '.join(SOURCES)}, not {source!r}"))
        if idempotency_key is not None and not (
            0 < len(idempotency_key) <= MAX_KEY and idempotency_key.isprintable()
        ):
            errors.append(
                ("Idempotency-Key", f"1 to {MAX_KEY} printable characters, not {idempotency_key!r}")
            )
        if errors:
            raise InvalidRecord(errors)
        assert feature is not None
        assert isinstance(amount, int)
        assert isinstance(priority, int)
        asked = {
            "feature": feature,
            "amount": amount,
            "expires_at": None if expires is None else micros(expires.timestamp()),
            "priority": priority,
            "category": category,
            "source": source,
        }
        fingerprint = hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()[:32]
        at = micros(now)
        grant = Grant(
            os.urandom(8).hex(),
            amount * scale,
            amount * scale,
            category=str(category),
            priority=priority,
            effective_at=at,
            expires_at=asked["expires_at"],
            source=source,
            created_at=at,
            idempotency_key=idempotency_key,
        )
        charge = yield from self._charge(customer, feature, now)
        result = yield GrantCredits(charge, grant, fingerprint, at)
        if result.conflict or result.grant is None:
            raise IdempotencyConflict(idempotency_key or "")
        return result.created, self.grant_json(feature, result.grant)

    def revoke(self, customer: str, grant_id: str) -> Flow[dict[str, Any]]:
        """Take away what a grant still holds: ``{"feature", "grant", "revoked"}``;
        ``GrantNotFound`` if no balance of the customer has it."""
        now = self.clock()
        for feature in self.features:
            charge = yield from self._charge(customer, feature, now)
            revoked = yield RevokeCredits(charge, grant_id, micros(now))
            if revoked is not None:
                scale = self.engine.scales.get(feature, 1)
                return {
                    "feature": feature,
                    "grant": grant_id,
                    "revoked": as_credits(revoked, scale),
                }
        raise GrantNotFound(customer, grant_id)

    # reading -----------------------------------------------------------------------------

    def view(
        self, customer: str, feature: str, *, limit: int = 50, cursor: str | None = None
    ) -> Flow[tuple[CreditView, int]]:
        """The balance of one feature as the store keeps it, and its scale."""
        errors: list[tuple[str, str]] = []
        if self._feature(feature, errors) is None:
            raise InvalidRecord(errors)
        now = self.clock()
        charge = yield from self._charge(customer, feature, now)
        view = yield ReadCredits(charge, micros(now), max(0, min(limit, MAX_PAGE)), cursor)
        return view, charge.scale

    def balance(self, customer: str, feature: str) -> Flow[int | float]:
        """The usable balance in credits (negative while in debt)."""
        view, scale = yield from self.view(customer, feature, limit=0)
        return as_credits(view.balance, scale)

    def show(
        self,
        customer: str,
        *,
        feature: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Flow[dict[str, Any]]:
        """Per credits feature (or the one given): ``{"balance", "debt", "grants", "ledger"
        (newest first), "next_cursor"}``; the cursor pages the ledger of ``feature``."""
        if cursor is not None and feature is None:
            raise InvalidRecord([("cursor", "a cursor pages one feature's ledger: give feature")])
        answer: dict[str, Any] = {}
        for name in [feature] if feature is not None else self.features:
            view, scale = yield from self.view(customer, name, limit=limit, cursor=cursor)
            grants = sorted(view.grants, key=lambda g: (g.created_at, g.id))
            answer[name] = {
                "balance": as_credits(view.balance, scale),
                "debt": as_credits(view.debt, scale),
                "grants": [self.grant_json(name, g) for g in grants],
                "ledger": [self.entry_json(name, e) for e in view.ledger],
                "next_cursor": view.cursor,
            }
        return answer
