"""What goes to Redis and what comes back: script arguments built from the engine's ops,
replies read into its answers, customer records as hash fields.

The same for the blocking client (WSGI) and the asyncio one (ASGI), and for every topology.
``benchmarks/compare.py`` runs ``script_source`` and ``reserve_call`` for its floor (the same
script and arguments, without plangate's client); tests/test_benchmarks.py checks its imports.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from importlib import resources
from typing import Any

from ..engine import MADE_THERE, Subscription
from ..engine._credits import LEDGER_CAP, LEDGER_SLACK, MAX_UNITS, PRUNE_AFTER, Grant, LedgerEntry
from ..errors import VersionConflict
from ._base import (
    SLIDING_BUCKETS,
    USAGE_HOUR,
    Counter,
    CounterState,
    CreditCharge,
    CreditState,
    CreditView,
    CustomerRecord,
    GrantCredits,
    GrantResult,
    Lease,
    Peek,
    ReadCredits,
    Record,
    Reserve,
    ReserveResult,
    RevokeCredits,
    Settle,
    customer_prefix,
    idempotency_key_of,
    prefix_of_key,
    usage_hour,
    usage_key,
)

SCRIPTS = (
    "reserve",
    "reserve_plain",
    "settle",
    "peek",
    "record",
    "customer_put",
    "customer_delete",
    "credit_grant",
    "credit_revoke",
    "credit_read",
    "usage_mark",
)
#: seconds a deleted record's tombstone (its last version) is kept
TOMBSTONE_TTL = 30 * 86400  # lua/<name>.lua, after lua/window.lua
SETTLED_TTL = 600  # seconds a settled reservation id is remembered


def script_source(name: str) -> str:
    """The Lua source of one of ``SCRIPTS``: the sliding windows' and the credit balances'
    functions, then its own. ``reserve_plain`` is ``reserve`` without the credit balances'
    functions, for a reservation that takes no credits: defining them costs every call
    about 5 µs inside Redis."""
    lua = resources.files(__package__) / "lua"
    parts = ("window", "reserve") if name == "reserve_plain" else ("window", "credits", name)
    text = "\n".join((lua / f"{part}.lua").read_text(encoding="utf-8") for part in parts)
    for name_, value in (
        ("__SLIDING_BUCKETS__", SLIDING_BUCKETS),
        ("__LEDGER_CAP__", LEDGER_CAP),
        ("__LEDGER_SLACK__", LEDGER_SLACK),
        ("__PRUNE_AFTER__", PRUNE_AFTER),
        ("__MAX_UNITS__", MAX_UNITS),
        ("__SETTLED_TTL__", SETTLED_TTL),
    ):
        text = text.replace(name_, str(value))
    return text


def _bound(counter: Counter) -> int:
    """The entries an exact log may hold (its limit, at least 1); 0: the window is buckets."""
    return max(counter.limit or 0, 1) if counter.exact else 0


#: counters tuple (by identity) → its keys and specs, and where its usage goes (the
#: customer's key prefix and the aggregates' retention; "": none); the engine reuses one
#: tuple per rule and customer for as long as its charge is valid, so each is formatted once
_CALLS: dict[int, tuple[tuple[Counter, ...], list[str], list[str], str, int]] = {}
_CREDIT_CALLS: dict[int, tuple[tuple[CreditCharge, ...], list[str], list[str]]] = {}


def reserve_script(op: Reserve) -> str:
    """Which of ``SCRIPTS`` reserves ``op``."""
    return "reserve" if op.credits else "reserve_plain"


def _usage_of(counters: Sequence[Counter]) -> tuple[str, int]:
    """Where the usage of ``counters`` goes: the customer's key prefix ("": nowhere) and how
    long the hourly aggregates are kept after their hour."""
    for c in counters:
        if c.usage:
            return prefix_of_key(c.key), c.usage_ttl
    return "", 0


def _usage_target(prefix: str, retention: int, now: float, at: float = 0.0) -> tuple[str, int]:
    """The aggregates of the hour of ``at`` (0: of ``now``) and the seconds from ``now`` they
    expire in."""
    hour = usage_hour(at or now)
    return usage_key(prefix, hour), max(1, math.ceil(hour + USAGE_HOUR + retention - now))


def reserve_call(op: Reserve) -> tuple[list[str], list[Any]]:
    counters = op.counters
    cached = _CALLS.get(id(counters))
    if cached is None or cached[0] is not counters:
        specs = [
            f"{-1 if c.limit is None else c.limit} {c.cost} {c.window!r} {c.resets_at!r}"
            f" {_bound(c)} {c.usage}".rstrip()
            for c in counters
        ]
        cached = (counters, [c.key for c in counters], specs, *_usage_of(counters))
        if len(_CALLS) >= 50_000:
            _CALLS.clear()
        _CALLS[id(counters)] = cached
    credits = op.credits
    flag = "1" if op.enforce else "0"
    lease = op.lease
    if lease is not None:  # never with credits (storage/_leases.py)
        keys = [*cached[1], f"{counters[0].key}:settled:{lease.id}"]
        ttl = 0
        if cached[3]:
            usage, ttl = _usage_target(cached[3], cached[4], op.now)
            keys.append(usage)
        head = f"{flag} 0 {op.reservation_id or '-'} {ttl} L"
        return keys, [repr(op.now), head, *cached[2], _lease_spec(lease)]
    if not credits and not cached[3]:
        return cached[1], [repr(op.now), flag, *cached[2]]
    keys = cached[1]
    args = cached[2]
    if credits:
        # the engine reuses its charges' credits tuple as it does the counters: formatted once
        spent = _CREDIT_CALLS.get(id(credits))
        if spent is None or spent[0] is not credits:
            spent = (credits, _credit_keys(credits), [_credit_spec(c) for c in credits])
            if len(_CREDIT_CALLS) >= 50_000:
                _CREDIT_CALLS.clear()
            _CREDIT_CALLS[id(credits)] = spent
        keys = [*keys, *spent[1]]
        args = [*args, *spent[2]]
    flag = f"{flag} {len(credits)} {op.reservation_id or '-'}"
    if cached[3]:
        usage, ttl = _usage_target(cached[3], cached[4], op.now)
        keys = [*keys, usage]
        flag = f"{flag} {ttl}"
    return keys, [repr(op.now), flag, *args]


def _lease_spec(lease: Lease) -> str:
    held = "".join(f" {units} {slot}" for units, slot in lease.held)
    return f"{lease.want} {lease.fraction!r} {lease.near!r}{held}"


def _credit_keys(charges: Sequence[CreditCharge]) -> list[str]:
    return [key for c in charges for key in (c.key, c.ledger_key)]


def _credit_spec(charge: CreditCharge) -> str:
    head = (
        f"{charge.cost} {1 if charge.direct else 0} {charge.grant} "
        f"{charge.period_start} {charge.period_end}"
    )
    return head + "".join(f" {i} {rate} {group}" for i, rate, group in charge.overage)


def _period(charge: CreditCharge) -> str:
    return f"{charge.grant} {charge.period_start} {charge.period_end}"


def reserve_result(reply: Any, op: Reserve) -> ReserveResult:
    """The reserve script's one string (see lua/reserve.lua)."""
    text = _text(reply)
    if op.lease is not None:
        text, _, granted = text.partition("|")
        return reserve_result(text, replace(op, lease=None))._replace(leased=int(granted or 0))
    head, *balances = text.split(";")
    parts = head.split(" ")
    nviolated = int(parts[2])
    if nviolated == 0 and len(parts) == 6 and parts[0] == "1" and not balances:
        # the usual case: one counter, admitted
        return ReserveResult(
            True, (CounterState(int(parts[3]), int(parts[4]) / 1000),), (int(parts[5]),)
        )
    numbers = [int(p) for p in parts]
    violated = tuple(i - 1 for i in numbers[3 : 3 + nviolated])
    rest = numbers[3 + nviolated :]
    count = len(op.counters)
    states = tuple(CounterState(rest[3 * i], rest[3 * i + 1] / 1000) for i in range(count))
    credits: tuple[CreditState, ...] = ()
    short: tuple[int, ...] = ()
    if balances:
        credits, short = _credit_states(balances)
    if (violated or short) and op.enforce:
        waits = tuple(rest[3 * i + 2] / 1000 for i in range(count))
        return ReserveResult(False, states, (), violated, numbers[1] / 1000, waits, credits, short)
    slots = tuple(rest[3 * i + 2] for i in range(count))
    admitted = not violated and not short
    return ReserveResult(admitted, states, slots, violated, credits=credits, short=short)


def _credit_states(balances: Sequence[str]) -> tuple[tuple[CreditState, ...], tuple[int, ...]]:
    states: list[CreditState] = []
    short: list[int] = []
    for j, text in enumerate(balances):
        is_short, balance, required, charged, *flat = text.split(" ")
        if not flat:
            burns: tuple[tuple[str, int], ...] = ()
        elif len(flat) == 2:  # one grant: the usual burn
            burns = ((flat[0], int(flat[1])),)
        else:
            burns = tuple((flat[k], int(flat[k + 1])) for k in range(0, len(flat), 2))
        if is_short == "1":
            short.append(j)
        states.append(CreditState(int(balance), int(charged), burns, int(required)))
    return tuple(states), tuple(short)


def _first_key(counters: Sequence[Counter], credits: Sequence[CreditCharge]) -> str:
    """A key of the customer's, for the markers (one slot with the rest)."""
    return counters[0].key if counters else credits[0].key


def settle_call(op: Settle) -> tuple[list[str], list[Any]]:
    marker = f"{_first_key(op.counters, op.credits)}:settled:{op.reservation_id}"
    keys = [c.key for c in op.counters] + [marker] + _credit_keys(op.credits)
    ttl: Any = f"{SETTLED_TTL} {len(op.credits)}" if op.credits else SETTLED_TTL
    prefix, retention = _usage_of(op.counters)
    if prefix and any(op.deltas):
        usage, seconds = _usage_target(prefix, retention, op.now, op.usage_at)
        keys.append(usage)
        ttl = f"{SETTLED_TTL} {len(op.credits)} {seconds}"
    args: list[Any] = [repr(op.now), ttl]
    for c, slot, delta in zip(op.counters, op.slots, op.deltas, strict=True):
        args += [repr(c.window), repr(c.resets_at), slot, delta, _bound(c), c.usage]
    for charge, delta, burns in zip(op.credits, op.credit_deltas, op.burns, strict=True):
        spent = "".join(f" {grant} {units}" for grant, units in burns)
        args.append(f"{delta} {_period(charge)}{spent}")
    return keys, args


def record_call(op: Record) -> tuple[list[str], list[Any]]:
    first = _first_key(op.counters, op.credits)
    marker = f"{first}:recorded:{op.record_id}"
    keys = [c.key for c in op.counters] + [marker] + _credit_keys(op.credits)
    ttl: Any = SETTLED_TTL
    if op.credits:
        ttl = f"{SETTLED_TTL} {len(op.credits)} {op.reservation_id}".rstrip()
    prefix, retention = _usage_of(op.counters)
    if prefix:
        usage, seconds = _usage_target(prefix, retention, op.now)
        keys.append(usage)
        ttl = f"{SETTLED_TTL} {len(op.credits)} {op.reservation_id or '-'} {seconds}"
    args: list[Any] = [repr(op.now), ttl, SLIDING_BUCKETS]
    for c, cost in zip(op.counters, op.costs, strict=True):
        args += [repr(c.window), repr(c.resets_at), cost, _bound(c), c.usage]
    for charge, units in zip(op.credits, op.credit_costs, strict=True):
        args.append(f"{units} {_period(charge)}")
    return keys, args


# credit balances: the admin side ----------------------------------------------------------


def pack_grant(grant: Grant) -> str:
    """A grant as credits.lua keeps it (``g:<id>``): what a charge changes first."""
    expires = -1 if grant.expires_at is None else grant.expires_at
    return (
        f"{grant.remaining} {grant.touched_at} {grant.effective_at} {expires} {grant.amount} "
        f"{grant.priority} {grant.category} {grant.created_at} {grant.source} "
        f"{grant.idempotency_key or ''}"
    )


def unpack_grant(grant_id: str, packed: str) -> Grant:
    parts = packed.split(" ", 9)
    expires = int(parts[3])
    return Grant(
        grant_id,
        amount=int(parts[4]),
        remaining=int(parts[0]),
        priority=int(parts[5]),
        category=parts[6],
        effective_at=int(parts[2]),
        expires_at=None if expires < 0 else expires,
        created_at=int(parts[7]),
        touched_at=int(parts[1]),
        source=parts[8],
        idempotency_key=(parts[9] if len(parts) > 9 else "") or None,
    )


def grant_call(op: GrantCredits) -> tuple[list[str], list[Any]]:
    charge, grant = op.charge, op.grant
    keys = [charge.key, charge.ledger_key, idempotency_key_of(charge.key)]
    args = [op.now, grant.id, pack_grant(grant), grant.idempotency_key or "", op.fingerprint]
    return keys, [*args, f"0 {_period(charge)}"]


def grant_result(reply: Sequence[Any], op: GrantCredits) -> GrantResult:
    status = int(reply[0])
    if status == 0:
        return GrantResult(False, None, True)
    grant_id, packed = _text(reply[1]), _text(reply[2])
    if not packed:  # made before, and forgotten since (it held nothing for a day)
        return GrantResult(False, replace(op.grant, id=grant_id, remaining=0))
    return GrantResult(status == 1, unpack_grant(grant_id, packed))


def revoke_call(op: RevokeCredits) -> tuple[list[str], list[Any]]:
    return [op.charge.key, op.charge.ledger_key], [op.now, op.grant_id, f"0 {_period(op.charge)}"]


def read_call(op: ReadCredits) -> tuple[list[str], list[Any]]:
    period = f"0 {_period(op.charge)}"
    return [op.charge.key, op.charge.ledger_key], [op.now, period, op.limit, op.before or ""]


def read_result(reply: Sequence[Any]) -> CreditView:
    balance, debt, total, flat, entries, cursor = reply
    grants = tuple(unpack_grant(_text(flat[k]), _text(flat[k + 1])) for k in range(0, len(flat), 2))
    ledger = tuple(
        LedgerEntry(
            _text(e[1]),
            int(e[2]),
            int(e[5]),
            _text(e[3]) or None,
            _text(e[4]),
            _text(e[0]),
        )
        for e in entries
    )
    ledger_sum = None if total == b"" or total == "" else int(total)
    return CreditView(int(balance), int(debt), grants, ledger, _text(cursor) or None, ledger_sum)


def record_result(reply: Sequence[int]) -> tuple[int, ...] | None:
    if reply[0] == 2:
        return MADE_THERE
    return tuple(reply[1:]) if reply[0] else None


def peek_call(op: Peek) -> tuple[list[str], list[Any]]:
    args: list[Any] = [repr(op.now), SLIDING_BUCKETS]
    for c in op.counters:
        args += [repr(c.window), repr(c.resets_at)]
    return [c.key for c in op.counters], args


def peek_result(reply: Sequence[int]) -> tuple[CounterState, ...]:
    return tuple(CounterState(reply[i], reply[i + 1] / 1000) for i in range(0, len(reply), 2))


def customer_record(customer: str, fields: Any) -> CustomerRecord | None:
    """From an HGETALL reply: a map (RESP3, or the client's) or a flat list (RESP2).

    A record written before a field existed reads as that field unset."""
    if not fields:
        return None
    pairs = (
        fields.items() if isinstance(fields, dict) else zip(fields[::2], fields[1::2], strict=True)
    )
    text = {_text(k): _text(v) for k, v in pairs}
    if text.get("deleted"):  # a tombstone: the record was deleted
        return None
    anchor = text.get("billing_anchor")
    trial = text.get("trial_ends_at")
    addons = text.get("addons")
    overrides = text.get("overrides")
    return CustomerRecord(
        customer,
        plan=text.get("plan") or None,
        billing_anchor=datetime.fromisoformat(anchor) if anchor else None,
        addons=json.loads(addons) if addons else {},
        overrides=json.loads(overrides) if overrides else {},
        trial_ends_at=datetime.fromisoformat(trial) if trial else None,
        previous_plan=text.get("previous_plan") or None,
        version=int(text.get("version") or 0),
        subscriptions=subscriptions_from_json(text.get("subscriptions") or ""),
    )


def subscriptions_json(subscriptions: Sequence[Subscription]) -> str:
    """A record's subscriptions as its ``subscriptions`` field keeps them ("": none)."""
    if not subscriptions:
        return ""
    return json.dumps(
        [
            {
                "provider": s.provider,
                "id": s.id,
                "status": s.status,
                "live": s.live,
                "plan": s.plan,
                "addons": dict(s.addons),
                "account": s.account,
                "event_at": s.event_at,
                "event_id": s.event_id,
            }
            for s in subscriptions
        ],
        sort_keys=True,
    )


def subscriptions_from_json(text: str) -> tuple[Subscription, ...]:
    """A record's subscriptions from its field (members this release does not know are
    left out: a record written by a newer one still reads)."""
    if not text:
        return ()
    known = Subscription.__dataclass_fields__
    return tuple(
        Subscription(**{k: v for k, v in item.items() if k in known}) for item in json.loads(text)
    )


def customer_put_result(customer: str, expected: int | None, reply: Sequence[int]) -> int:
    """The new version from ``customer_put.lua``'s reply; ``VersionConflict`` if none."""
    written, version = int(reply[0]), int(reply[1])
    if not written:
        raise VersionConflict(customer, -1 if expected is None else expected, version)
    return version


def customer_delete_result(customer: str, expected: int | None, reply: Sequence[int]) -> int:
    """The tombstone's version (0: nothing was deleted) from ``customer_delete.lua``."""
    status, version = int(reply[0]), int(reply[1])
    if status == 0:
        raise VersionConflict(customer, -1 if expected is None else expected, version)
    return version if status == 1 else 0


def customer_fields(record: CustomerRecord) -> list[str]:
    """Every field but the version (the store keeps it), an empty one for what is unset.
    Add-ons and overrides are JSON objects."""
    anchor = record.billing_anchor.isoformat() if record.billing_anchor is not None else ""
    trial = record.trial_ends_at.isoformat() if record.trial_ends_at is not None else ""
    addons = json.dumps(dict(record.addons), sort_keys=True) if record.addons else ""
    overrides = json.dumps(dict(record.overrides), sort_keys=True) if record.overrides else ""
    return [
        "plan",
        record.plan or "",
        "billing_anchor",
        anchor,
        "addons",
        addons,
        "overrides",
        overrides,
        "trial_ends_at",
        trial,
        "previous_plan",
        record.previous_plan or "",
        "subscriptions",
        subscriptions_json(record.subscriptions),
    ]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def unmapped_key(provider: str) -> str:
    """Where billing counts a provider's prices the config maps to nothing."""
    return f"plangate:billing:unmapped:{provider}"


def unmapped_counts(fields: Any) -> dict[str, int]:
    """An HGETALL of ``unmapped_key``."""
    return {k: int(v) for k, v in hash_text(fields).items()}


# hourly usage aggregates and their export ------------------------------------------------


def hash_text(fields: Any) -> dict[str, str]:
    """An HGETALL reply as text: a map (RESP3) or a flat list (RESP2)."""
    pairs = (
        fields.items() if isinstance(fields, dict) else zip(fields[::2], fields[1::2], strict=True)
    )
    return {_text(k): _text(v) for k, v in pairs}


def usage_fields(fields: Any) -> dict[str, int]:
    """An HGETALL of a ``usage_key``: its units and marks (``#last``, the last reservation
    made, is the reserve and record scripts')."""
    return {k: int(v) for k, v in hash_text(fields).items() if not k.startswith("#")}


def mark_call(customer: str, marks: Mapping[int, Mapping[str, int]]) -> tuple[list[str], list[Any]]:
    prefix = customer_prefix(customer)
    keys, args = [], []
    for hour, fields in marks.items():
        keys.append(usage_key(prefix, hour))
        args.append(" ".join(f"{name} {value}" for name, value in fields.items()))
    return keys, args


def export_key(name: str) -> str:
    """Where usage export ``name`` records its batch (``batch``) and what of it was sent
    (``sent:<identifier>``)."""
    return f"plangate:export:{name}"
