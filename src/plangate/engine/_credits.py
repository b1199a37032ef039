"""Credit balances: grants burned in one fixed order, refunds returned where they came from,
and a ledger whose sum is the balance.

Pure logic, no I/O, no clock: amounts are whole numbers of the feature's smallest unit (the
store keeps micro-credits where a rate is fractional), times are whole microseconds since
the epoch. ``CreditAccount`` is one customer's balance of one credits feature; the memory
store keeps one per customer and feature, and the Redis script follows the same rules.

The rules (SPEC §6, issue 13):

- A grant is usable on ``[effective_at, expires_at)`` while it has units left.
- **Burn order**: lower ``priority`` first, then the soonest expiry (none: last), then
  promotional before paid, then the oldest. One charge may span several grants.
- A charge is admitted only if the balance covers it, and then taken whole.
- A charge of units already used (the actual exceeding what was reserved) is never refused:
  what the grants cannot cover becomes **debt**, which the next grant pays first; while the
  balance is not positive, new charges are refused.
- A refund returns units to the grants they were taken from, the last taken first; a unit
  whose grant has expired or been revoked meanwhile is not returned (a revoked grant
  expires when it is revoked).
- Every change is a ledger entry; the sum of the entries' amounts is what the grants hold
  less the debt (the balance, once grants not yet effective are counted).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import NamedTuple

from ._protocol import Burns, Counter, CreditCharge

CATEGORIES = ("promotional", "paid")  # the order they burn in, at equal priority and expiry
SOURCES = ("plan", "topup", "admin", "billing")
MAX_PRIORITY = 255
DEFAULT_PRIORITY = 100
#: the most sub-units a balance may hold (a double in Lua holds every whole number up to 2^53)
MAX_UNITS = 2**53 - 1
#: ledger entries kept per balance, and how many more it may hold before the oldest are
#: summed into ``ledger_base`` and dropped in one go
LEDGER_CAP = 1000
LEDGER_SLACK = 100
#: a grant with nothing left is forgotten this long (µs) after its last change
PRUNE_AFTER = 86_400_000_000


@dataclass(slots=True)
class Grant:
    """One grant. A ``CreditAccount`` changes ``remaining`` and ``touched_at`` in place (a
    charge is on the request path); what leaves a store is a copy."""

    id: str
    amount: int
    remaining: int
    category: str = "paid"
    priority: int = DEFAULT_PRIORITY
    effective_at: int = 0  # microseconds since the epoch
    expires_at: int | None = None
    source: str = "admin"
    created_at: int = 0
    idempotency_key: str | None = None
    touched_at: int = 0  # the last change of ``remaining``

    def usable(self, now: int) -> bool:
        return (
            self.remaining > 0
            and self.effective_at <= now
            and (self.expires_at is None or now < self.expires_at)
        )

    def expired(self, now: int) -> bool:
        return self.expires_at is not None and now >= self.expires_at


def burn_key(grant: Grant) -> tuple[int, float, int, int, str]:
    """Where a grant stands in the burn order (smallest first)."""
    return (
        grant.priority,
        math.inf if grant.expires_at is None else grant.expires_at,
        0 if grant.category == "promotional" else 1,
        grant.created_at,
        grant.id,
    )


class LedgerEntry(NamedTuple):
    """One change of a balance. ``amount`` is signed: what the balance moved by."""

    kind: str  # grant, burn, refund, excess, expiry, revoke
    amount: int
    at: int
    grant: str | None = None
    ref: str = ""  # the reservation or idempotency key it belongs to
    id: str = ""  # its place in the ledger (newer entries sort after older ones)


_NEVER = math.inf
_LEDGER_MAX = LEDGER_CAP + LEDGER_SLACK


@dataclass
class CreditAccount:
    """One customer's balance of one credits feature."""

    grants: dict[str, Grant] = field(default_factory=dict)
    debt: int = 0
    #: the ledger as plain tuples (kind, amount, at, grant, ref, number): a charge appends
    #: one on the request path; ``ledger`` reads them as ``LedgerEntry``s
    entries: list[tuple[str, int, int, str | None, str, int]] = field(default_factory=list)
    #: the sum of the entries dropped from the front of the ledger (it keeps ``LEDGER_CAP``)
    ledger_base: int = 0
    #: the start (µs) of the last period whose plan grant was issued
    plan_at: int = -1
    next_entry: int = 0
    #: the first moment a grant may expire or be forgotten: ``tidy`` has nothing to do before
    due: float = _NEVER
    #: the last reservation that took from this balance, and what it took: sent again (its
    #: reply lost), it is answered from here and takes nothing twice
    last: tuple[str, Burns] = ("", ())

    # reading ---------------------------------------------------------------------------------

    def balance(self, now: int) -> int:
        """Usable units less debt (negative while there is debt and nothing to pay it)."""
        return sum(g.remaining for g in self.grants.values() if g.usable(now)) - self.debt

    def usable(self, now: int) -> list[Grant]:
        """The grants usable at ``now``, in no order."""
        return self.held(now)[0]

    def held(self, now: int) -> tuple[list[Grant], int]:
        """The grants usable at ``now`` (in no order) and what they hold, in one pass."""
        usable: list[Grant] = []
        total = 0
        for g in self.grants.values():
            if (
                g.remaining > 0
                and g.effective_at <= now
                and (g.expires_at is None or now < g.expires_at)
            ):
                usable.append(g)
                total += g.remaining
        return usable, total

    def order(self, now: int) -> list[Grant]:
        """The usable grants, in burn order."""
        return sorted((g for g in self.grants.values() if g.usable(now)), key=burn_key)

    @property
    def ledger(self) -> list[LedgerEntry]:
        """The entries kept, oldest first."""
        return [LedgerEntry(k, a, at, g, r, f"{n:016d}") for k, a, at, g, r, n in self.entries]

    def ledger_sum(self) -> int:
        """What the ledger adds up to: the grants' remaining units less the debt, once
        ``expire`` has run (a property test holds it)."""
        return self.ledger_base + sum(entry[1] for entry in self.entries)

    # changing --------------------------------------------------------------------------------

    def log(self, kind: str, amount: int, at: int, grant: str | None = None, ref: str = "") -> None:
        self.next_entry += 1
        entries = self.entries
        entries.append((kind, amount, at, grant, ref, self.next_entry))
        if len(entries) > _LEDGER_MAX:
            gone = len(entries) - LEDGER_CAP
            self.ledger_base += sum(entry[1] for entry in entries[:gone])
            del entries[:gone]

    def _set(self, grant: Grant, remaining: int, now: int) -> None:
        grant.remaining = remaining
        grant.touched_at = now
        if remaining == 0:
            self.due = min(self.due, now + PRUNE_AFTER)

    def tidy(self, now: int) -> None:
        """Write off what expired grants hold and forget grants that have held nothing for
        ``PRUNE_AFTER`` (``expire`` then ``prune``), when one may be due."""
        if now < self.due:
            return
        self.expire(now)
        self.prune(now)
        due = _NEVER
        for grant in self.grants.values():
            if grant.remaining == 0:
                due = min(due, grant.touched_at + PRUNE_AFTER)
            elif grant.expires_at is not None:
                due = min(due, grant.expires_at)
        self.due = due

    def issue_plan(self, amount: int, start: int, end: int, now: int) -> Grant | None:
        """The plan's grant for the period ``[start, end)``, once per period (on its first use)."""
        if self.plan_at >= start:
            return None
        self.plan_at = start
        if amount <= 0:
            return None
        grant = Grant(
            f"plan-{start // 1_000_000}",
            amount,
            amount,
            category="paid",
            effective_at=start,
            expires_at=end,
            source="plan",
            created_at=start,
            touched_at=now,
        )
        return self.add(grant, now)

    def prune(self, now: int) -> None:
        """Forget grants that hold nothing and have not changed for ``PRUNE_AFTER``."""
        for grant in list(self.grants.values()):
            if grant.remaining == 0 and grant.touched_at + PRUNE_AFTER <= now:
                del self.grants[grant.id]

    def add(self, grant: Grant, now: int) -> Grant:
        """Add a grant (kept as a copy); debt is paid from it first. Returns it as stored."""
        if grant.id in self.grants:
            raise ValueError(f"grant {grant.id!r} exists")
        self.log("grant", grant.amount, now, grant.id, grant.idempotency_key or "")
        paid = min(self.debt, grant.remaining) if grant.usable(now) else 0
        grant = replace(grant)
        self._set(grant, grant.remaining - paid, now)
        self.debt -= paid
        self.grants[grant.id] = grant
        if grant.expires_at is not None:
            self.due = min(self.due, grant.expires_at)
        return grant

    def expire(self, now: int) -> int:
        """Write off what expired grants still held; the units written off."""
        gone = 0
        for grant in self.grants.values():
            if grant.expired(now) and grant.remaining:
                self.log("expiry", -grant.remaining, now, grant.id)
                gone += grant.remaining
                self._set(grant, 0, now)
        return gone

    def take(self, cost: int, now: int, ref: str = "") -> Burns | None:
        """Take ``cost`` units if the balance covers them (in burn order); None, and nothing
        taken, if it does not."""
        if cost < 0:
            raise ValueError("a cost is not negative")
        self.tidy(now)
        usable, held = self.held(now)
        if held - self.debt < cost:
            return None
        return self.burn(usable, cost, now, ref)

    def take_excess(self, units: int, now: int, ref: str = "") -> Burns:
        """Take units already used: what the grants cannot cover becomes debt."""
        self.tidy(now)
        burns = self.burn(self.usable(now), units, now, ref)
        short = min(units - sum(n for _, n in burns), MAX_UNITS - self.debt)
        if short > 0:
            self.debt += short
            self.log("excess", -short, now, None, ref)
        return burns

    def burn(self, usable: list[Grant], units: int, now: int, ref: str) -> Burns:
        """Take ``units`` from ``usable`` (this account's usable grants, as ``usable``
        answered) in burn order, as far as they go; the caller checked the balance."""
        if len(usable) > 1:
            usable.sort(key=burn_key)
        burns: list[tuple[str, int]] = []
        left = units
        for grant in usable:
            if not left:
                break
            n = min(left, grant.remaining)
            grant.remaining -= n
            grant.touched_at = now
            if not grant.remaining:
                self.due = min(self.due, now + PRUNE_AFTER)
            self.log("burn", -n, now, grant.id, ref)
            burns.append((grant.id, n))
            left -= n
        return tuple(burns)

    def refund(self, burns: Burns, units: int, now: int, ref: str = "") -> int:
        """Return up to ``units`` of what ``burns`` took, the last taken first, each to its
        grant (unless that grant has expired or been revoked: then it is not returned).
        Debt is paid first. The units returned."""
        returned = 0
        left = units
        for grant_id, taken in reversed(burns):
            if left <= 0:
                break
            n = min(left, taken)
            left -= n
            grant = self.grants.get(grant_id)
            if grant is None or grant.expired(now) or grant.remaining + n > grant.amount:
                continue
            paid = min(self.debt, n)
            self.debt -= paid
            self._set(grant, grant.remaining + n - paid, now)
            self.log("refund", n, now, grant_id, ref)
            returned += n
        return returned

    def revoke(self, grant_id: str, now: int) -> int:
        """Take away what a grant still holds; the units revoked."""
        grant = self.grants[grant_id]
        left = grant.remaining
        if left:
            self.log("revoke", -left, now, grant_id)
        self._set(grant, 0, now)
        # revoked: it expires now, so a refund of an earlier charge does not come back to it
        if grant.expires_at is None or grant.expires_at > now:
            grant.expires_at = now
        return left


def micros(now: float) -> int:
    """Seconds since the epoch as whole microseconds, rounded as the Redis scripts round."""
    return math.floor(now * 1_000_000 + 0.5)


def required_of(charge: CreditCharge, counters: Sequence[Counter], totals: Sequence[int]) -> int:
    """The sub-units a reservation needs from ``charge``'s balance: its own cost, plus each
    overage group's units over its limit (the most over any limit of the meter) times its
    rate. ``totals``: each counter's units before this reservation."""
    if len(charge.overage) == 1:  # one meter with one limit: the usual overage
        index, rate, _ = charge.overage[0]
        counter = counters[index]
        if counter.limit is None:
            return charge.cost
        units = min(counter.cost, totals[index] + counter.cost - counter.limit)
        return charge.cost + units * rate if units > 0 else charge.cost
    over: dict[int, tuple[int, int]] = {}
    for index, rate, group in charge.overage:
        counter = counters[index]
        if counter.limit is None:
            continue
        units = min(counter.cost, totals[index] + counter.cost - counter.limit)
        if units > 0 and units > over.get(group, (0, 0))[0]:
            over[group] = (units, rate)
    need = charge.cost
    for units, rate in over.values():
        need += units * rate
    return need


def as_credits(units: int, scale: int) -> int | float:
    """Sub-units as the config counts credits: whole where they are whole (99.5, 100)."""
    if scale == 1 or units % scale == 0:
        return units // scale
    return float(Decimal(units) / scale)
