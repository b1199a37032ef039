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
  whose grant has expired meanwhile is not returned (the ledger says so).
- Every change is a ledger entry; the sum of the entries' amounts is what the grants hold
  less the debt (the balance, once grants not yet effective are counted).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal

from ._protocol import Burns, Counter, CreditCharge

CATEGORIES = ("promotional", "paid")  # the order they burn in, at equal priority and expiry
SOURCES = ("plan", "topup", "admin", "billing")
MAX_PRIORITY = 255
DEFAULT_PRIORITY = 100
#: the most sub-units a balance may hold (a double in Lua holds every whole number up to 2^53)
MAX_UNITS = 2**53 - 1
#: ledger entries kept per balance; older ones are summed into ``ledger_base``
LEDGER_CAP = 1000
#: a grant with nothing left is forgotten this long (µs) after its last change
PRUNE_AFTER = 86_400_000_000


@dataclass(frozen=True, slots=True)
class Grant:
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
        float("inf") if grant.expires_at is None else grant.expires_at,
        CATEGORIES.index(grant.category),
        grant.created_at,
        grant.id,
    )


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One change of a balance. ``amount`` is signed: what the balance moved by."""

    kind: str  # grant, burn, refund, excess, expiry, revoke
    amount: int
    at: int
    grant: str | None = None
    ref: str = ""  # the reservation or idempotency key it belongs to
    id: str = ""  # its place in the ledger (newer entries sort after older ones)


@dataclass
class CreditAccount:
    """One customer's balance of one credits feature."""

    grants: dict[str, Grant] = field(default_factory=dict)
    debt: int = 0
    ledger: list[LedgerEntry] = field(default_factory=list)
    #: the sum of the entries dropped from the front of the ledger (it keeps ``LEDGER_CAP``)
    ledger_base: int = 0
    #: the start (µs) of the last period whose plan grant was issued
    plan_at: int = -1
    next_entry: int = 0

    # reading ---------------------------------------------------------------------------------

    def balance(self, now: int) -> int:
        """Usable units less debt (negative while there is debt and nothing to pay it)."""
        return sum(g.remaining for g in self.grants.values() if g.usable(now)) - self.debt

    def order(self, now: int) -> list[Grant]:
        """The usable grants, in burn order."""
        return sorted((g for g in self.grants.values() if g.usable(now)), key=burn_key)

    def ledger_sum(self) -> int:
        """What the ledger adds up to: the grants' remaining units less the debt, once
        ``expire`` has run (a property test holds it)."""
        return self.ledger_base + sum(e.amount for e in self.ledger)

    # changing --------------------------------------------------------------------------------

    def log(self, kind: str, amount: int, at: int, grant: str | None = None, ref: str = "") -> None:
        self.next_entry += 1
        self.ledger.append(LedgerEntry(kind, amount, at, grant, ref, f"{self.next_entry:016d}"))
        if len(self.ledger) > LEDGER_CAP:
            self.ledger_base += self.ledger.pop(0).amount

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
        """Add a grant; debt is paid from it first. Returns the grant as stored."""
        if grant.id in self.grants:
            raise ValueError(f"grant {grant.id!r} exists")
        self.log("grant", grant.amount, now, grant.id, grant.idempotency_key or "")
        paid = min(self.debt, grant.remaining) if grant.usable(now) else 0
        grant = replace(grant, remaining=grant.remaining - paid, touched_at=now)
        self.debt -= paid
        self.grants[grant.id] = grant
        return grant

    def expire(self, now: int) -> int:
        """Write off what expired grants still held; the units written off."""
        gone = 0
        for grant in list(self.grants.values()):
            if grant.expired(now) and grant.remaining:
                self.log("expiry", -grant.remaining, now, grant.id)
                gone += grant.remaining
                self.grants[grant.id] = replace(grant, remaining=0, touched_at=now)
        return gone

    def take(self, cost: int, now: int, ref: str = "") -> Burns | None:
        """Take ``cost`` units if the balance covers them (in burn order); None, and nothing
        taken, if it does not."""
        if cost < 0:
            raise ValueError("a cost is not negative")
        self.expire(now)
        if self.balance(now) < cost:
            return None
        return self._burn(cost, now, ref, "burn")

    def take_excess(self, units: int, now: int, ref: str = "") -> Burns:
        """Take units already used: what the grants cannot cover becomes debt."""
        self.expire(now)
        burns = self._burn(units, now, ref, "burn")
        short = units - sum(n for _, n in burns)
        if short:
            self.debt += short
            self.log("excess", -short, now, None, ref)
        return burns

    def _burn(self, units: int, now: int, ref: str, kind: str) -> Burns:
        burns: list[tuple[str, int]] = []
        left = units
        for grant in self.order(now):
            if not left:
                break
            n = min(left, grant.remaining)
            self.grants[grant.id] = replace(grant, remaining=grant.remaining - n, touched_at=now)
            self.log(kind, -n, now, grant.id, ref)
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
            self.grants[grant_id] = replace(
                grant, remaining=grant.remaining + n - paid, touched_at=now
            )
            self.log("refund", n, now, grant_id, ref)
            returned += n
        return returned

    def revoke(self, grant_id: str, now: int) -> int:
        """Take away what a grant still holds; the units revoked."""
        grant = self.grants[grant_id]
        left = grant.remaining
        if left:
            self.log("revoke", -left, now, grant_id)
            self.grants[grant_id] = replace(grant, remaining=0, touched_at=now)
        return left


def micros(now: float) -> int:
    """Seconds since the epoch as whole microseconds, rounded as the Redis scripts round."""
    return math.floor(now * 1_000_000 + 0.5)


def required_of(charge: CreditCharge, counters: Sequence[Counter], totals: Sequence[int]) -> int:
    """The sub-units a reservation needs from ``charge``'s balance: its own cost, plus each
    overage group's units over its limit (the most over any limit of the meter) times its
    rate. ``totals``: each counter's units before this reservation."""
    over: dict[int, tuple[int, int]] = {}
    for index, rate, group in charge.overage:
        counter = counters[index]
        if counter.limit is None:
            continue
        units = min(counter.cost, totals[index] + counter.cost - counter.limit)
        if units > over.get(group, (0, 0))[0]:
            over[group] = (units, rate)
    return charge.cost + sum(units * rate for units, rate in over.values())


def checked(charge: CreditCharge, required: int) -> bool:
    """Whether the balance must cover ``required``: a route that spends the credits itself
    always asks (a balance in debt refuses it); overage asks only once a limit is passed."""
    return charge.direct or required > 0


def as_credits(units: int, scale: int) -> int | float:
    """Sub-units as the config counts credits: whole where they are whole (99.5, 100)."""
    if scale == 1 or units % scale == 0:
        return units // scale
    return float(Decimal(units) / scale)
