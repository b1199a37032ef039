"""What goes to Redis and what comes back: script arguments built from the engine's ops,
replies read into its answers, customer records as hash fields.

The same for the blocking client (WSGI) and the asyncio one (ASGI), and for every topology.
``benchmarks/compare.py`` runs ``script_source`` and ``reserve_call`` for its floor (the same
script and arguments, without plangate's client); tests/test_benchmarks.py checks its imports.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from importlib import resources
from typing import Any

from ..errors import VersionConflict
from ._base import (
    SLIDING_BUCKETS,
    Counter,
    CounterState,
    CustomerRecord,
    Peek,
    Record,
    Reserve,
    ReserveResult,
    Settle,
)

SCRIPTS = ("reserve", "settle", "peek", "record", "customer_put", "customer_delete")
#: seconds a deleted record's tombstone (its last version) is kept
TOMBSTONE_TTL = 30 * 86400  # lua/<name>.lua, after lua/window.lua
SETTLED_TTL = 600  # seconds a settled reservation id is remembered


def script_source(name: str) -> str:
    """The Lua source of one of ``SCRIPTS``: the sliding windows' functions, then its own."""
    lua = resources.files(__package__) / "lua"
    text = "\n".join((lua / f"{part}.lua").read_text(encoding="utf-8") for part in ("window", name))
    return text.replace("__SLIDING_BUCKETS__", str(SLIDING_BUCKETS))


def _bound(counter: Counter) -> int:
    """The entries an exact log may hold (its limit, at least 1); 0: the window is buckets."""
    return max(counter.limit or 0, 1) if counter.exact else 0


#: counters tuple (by identity) → its keys and specs; the engine reuses one tuple per rule and
#: customer for as long as its charge is valid, so each is formatted once
_CALLS: dict[int, tuple[tuple[Counter, ...], list[str], list[str]]] = {}


def reserve_call(op: Reserve) -> tuple[list[str], list[Any]]:
    counters = op.counters
    cached = _CALLS.get(id(counters))
    if cached is None or cached[0] is not counters:
        specs = [
            f"{-1 if c.limit is None else c.limit} {c.cost} {c.window!r} {c.resets_at!r}"
            f" {_bound(c)}"
            for c in counters
        ]
        cached = (counters, [c.key for c in counters], specs)
        if len(_CALLS) >= 50_000:
            _CALLS.clear()
        _CALLS[id(counters)] = cached
    return cached[1], [repr(op.now), "1" if op.enforce else "0", *cached[2]]


def reserve_result(reply: Sequence[int], op: Reserve) -> ReserveResult:
    nviolated = reply[2]
    if nviolated == 0 and len(reply) == 6:  # the usual case: one counter, admitted
        return ReserveResult(True, (CounterState(reply[3], reply[4] / 1000),), (reply[5],))
    violated = tuple(i - 1 for i in reply[3 : 3 + nviolated])
    rest = reply[3 + nviolated :]
    count = len(op.counters)
    states = tuple(CounterState(rest[3 * i], rest[3 * i + 1] / 1000) for i in range(count))
    if violated and op.enforce:
        waits = tuple(rest[3 * i + 2] / 1000 for i in range(count))
        return ReserveResult(False, states, (), violated, reply[1] / 1000, waits)
    slots = tuple(rest[3 * i + 2] for i in range(count))
    return ReserveResult(not violated, states, slots, violated)


def settle_call(op: Settle) -> tuple[list[str], list[Any]]:
    marker = f"{op.counters[0].key}:settled:{op.reservation_id}"
    keys = [c.key for c in op.counters] + [marker]
    args: list[Any] = [repr(op.now), SETTLED_TTL]
    for c, slot, delta in zip(op.counters, op.slots, op.deltas, strict=True):
        args += [repr(c.window), repr(c.resets_at), slot, delta, _bound(c)]
    return keys, args


def record_call(op: Record) -> tuple[list[str], list[Any]]:
    marker = f"{op.counters[0].key}:recorded:{op.record_id}"
    args: list[Any] = [repr(op.now), SETTLED_TTL, SLIDING_BUCKETS]
    for c, cost in zip(op.counters, op.costs, strict=True):
        args += [repr(c.window), repr(c.resets_at), cost, _bound(c)]
    return [c.key for c in op.counters] + [marker], args


def record_result(reply: Sequence[int]) -> tuple[int, ...] | None:
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
    ]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
