"""What the engine asks of a store: operations as data, their answers, and how keys are named.

The engine yields these ``Op``s and receives their results; it never runs one. A driver
(``plangate._drivers``) runs each against a backend: any object with the methods of
``Backend``, which every ``plangate.storage.Storage`` has.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, Protocol, TypeVar
from urllib.parse import quote, unquote

if TYPE_CHECKING:
    from ._credits import Grant, LedgerEntry

T = TypeVar("T")
R = TypeVar("R")

Flow = Generator["Op[Any]", Any, R]

#: A sliding window whose limit is at most this many units is kept as an exact log: the time
#: and units of each reservation in it (at most ``limit`` entries). A unit used at ``t`` counts
#: while ``now < t + window`` and not a moment longer.
EXACT_WINDOW_LIMIT = 1000

#: A larger sliding window is kept as this many buckets. A unit consumed at ``t`` stops
#: counting between ``t + window`` and ``t + window * (1 + 1/SLIDING_BUCKETS)``: never early,
#: so no trailing window ever holds more than the limit.
SLIDING_BUCKETS = 20


#: printable ASCII that stands for itself in a key; anything else is percent-encoded
_KEY_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in "{}%:")


def customer_prefix(customer: str) -> str:
    """What every key of one customer starts with. The braces are a Redis Cluster hash tag:
    all of a customer's keys live in one slot, so one script can change them together.

    The id is percent-encoded (its UTF-8) except for printable ASCII other than ``{}%:``, so
    any id makes one well-formed, non-empty tag (``}x@example.com`` would close it early),
    and different ids make different tags; ``acme`` and ``a@b.co`` stay as they are. The
    empty id is ``%``, which no other id encodes to.
    """
    if not customer:
        return "plangate:{%}:"
    return f"plangate:{{{quote(customer.encode('utf-8', 'surrogatepass'), _KEY_SAFE)}}}:"


def customer_key(customer: str) -> str:
    """Where a customer's record is kept."""
    return f"{customer_prefix(customer)}customer"


def credits_key(customer: str, feature: str) -> str:
    """Where a customer's balance of one credits feature is kept (its ledger: ``:ledger``)."""
    return f"{customer_prefix(customer)}credits:{feature}"


#: the seconds of one hour of usage aggregates
USAGE_HOUR = 3600


def usage_key(prefix: str, hour: int) -> str:
    """Where the usage of the customer whose keys start with ``prefix`` (``customer_prefix``)
    in the hour starting at ``hour`` (epoch seconds) is kept: a hash, meter → units used,
    and ``exported:<destination>:<meter>`` → the units of it exported (plangate.billing)."""
    return f"{prefix}usage:{hour}"


def usage_hour(now: float) -> int:
    """The start (epoch seconds) of the hour ``now`` falls in."""
    return int(now // USAGE_HOUR) * USAGE_HOUR


def prefix_of_key(key: str) -> str:
    """The ``customer_prefix`` a key of a customer starts with."""
    return key[: key.index("}:") + 2]


def customer_of_prefix(prefix: str) -> str | None:
    """The customer whose keys start with ``prefix`` (``customer_prefix``); None if it is
    not one."""
    head = "plangate:{"
    if not (prefix.startswith(head) and prefix.endswith("}:")) or len(prefix) <= len(head) + 2:
        return None
    tag = prefix[len(head) : -2]
    if tag == "%":
        return ""
    return unquote(tag, "utf-8", "surrogatepass")


def idempotency_key_of(key: str) -> str:
    """Where the idempotency keys of the grants of the customer of balance ``key`` are kept."""
    return f"{key[: key.rindex('}:') + 2]}credits:idempotency"


def customer_of_key(key: str) -> str | None:
    """The customer whose record ``customer_key`` keeps at ``key``; None for another key."""
    if not key.endswith("}:customer"):
        return None
    return customer_of_prefix(key[: -len("customer")])


@dataclass(frozen=True, slots=True)
class Counter:
    """One limit of one meter of one customer, and what this request costs it.

    ``window > 0``: a sliding window of that many seconds (an exact log or buckets, see
    ``exact``). Otherwise a calendar period whose ``key`` names the period and which ends at
    ``resets_at`` (epoch seconds).
    ``limit=None``: counted, never refused.
    """

    key: str
    limit: int | None
    cost: int
    window: float = 0.0
    resets_at: float = 0.0
    #: what to do when the store cannot be reached: "local" (count in this process),
    #: "allow" (count, never refuse) or "deny" (503)
    on_error: str = "local"
    #: the meter whose hourly usage this counter's units also add to (``usage_key``), on
    #: the first counter of each meter of a charge ("": none); kept ``usage_ttl`` seconds
    #: after its hour ends (``billing.retention``)
    usage: str = ""
    usage_ttl: int = 0

    @property
    def exact(self) -> bool:
        """A sliding window kept as an exact log (limit at most ``EXACT_WINDOW_LIMIT``)."""
        return self.window > 0 and self.limit is not None and self.limit <= EXACT_WINDOW_LIMIT


# Results are named tuples, not dataclasses: one is built per counter per request, and a
# tuple is built several times faster than a frozen dataclass.


class CounterState(NamedTuple):
    used: int  # units counted now (after the reservation, for ``Reserve``)
    reset_after: float  # seconds until capacity next returns


#: units taken from each grant by one charge: (grant id, units), in burn order
Burns = tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class CreditCharge:
    """One credits feature of one customer, and what a request takes from its balance.

    Amounts are in the feature's sub-units (``scale`` of them make one credit: 1, or up to
    10^6 where a fractional overage rate charges it), times in microseconds since the epoch.
    ``cost``: taken outright (a route's ``meters: {ai_credits: 5}``). ``overage``: the units
    of a counter over its limit are charged here (at a rate) instead of being refused. ``grant``: the plan's grant for the period
    ``[period_start, period_end)``, issued on first use of the period (0: none).
    """

    key: str  # the balance's hash; its ledger is ``key + ":ledger"``
    feature: str
    cost: int = 0
    #: the route spends this feature itself (``meters: {ai_credits: N}``): a balance in debt
    #: refuses it even when ``cost`` is 0; overage alone asks only past a limit
    direct: bool = False
    #: (counter index, sub-units per unit over its limit, group): the most units over any
    #: limit of one group (one meter) are charged
    overage: tuple[tuple[int, int, int], ...] = ()
    grant: int = 0
    period_start: int = 0
    period_end: int = 0
    scale: int = 1
    #: when the store cannot be reached: "deny" (503, the default for credits), "allow"
    #: (admit, charged once the store is back), "local" (admit up to the balance last seen)
    on_error: str = "deny"

    @property
    def ledger_key(self) -> str:
        return f"{self.key}:ledger"


class CreditState(NamedTuple):
    balance: int  # sub-units usable after the reservation (before it, when refused)
    charged: int  # sub-units this reservation took
    burns: Burns = ()  # where they came from; handed back to ``Settle``
    required: int = 0  # sub-units the reservation needed from this balance


class ReserveResult(NamedTuple):
    admitted: bool
    states: tuple[CounterState, ...]
    slots: tuple[int, ...] = ()  # where each cost was placed; handed back to ``Settle``
    violated: tuple[int, ...] = ()  # indices of the counters that refused
    retry_after: float = 0.0  # seconds until every violated counter could take its cost
    waits: tuple[float, ...] = ()  # refused: seconds until each counter could take its cost
    credits: tuple[CreditState, ...] = ()  # one per credit charge of the reservation
    short: tuple[int, ...] = ()  # indices of the credit charges the balance could not cover
    #: a lease (``Reserve.lease``): how many more of the request's costs were counted with it
    leased: int = 0


def _frozen(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


class FrozenMap(Mapping[str, Any]):
    """A read-only mapping that can be hashed (nested dicts and lists included), so a
    record's add-ons and overrides can key the engine's cache of resolved plans."""

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        self._data: dict[str, Any] = dict(data or {})
        self._hash: int | None = None

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(_frozen(self._data))
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, Mapping) and self._data == dict(other))

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"


EMPTY = FrozenMap()


@dataclass(frozen=True, slots=True)
class Subscription:
    """A customer's subscription in one billing provider, as the last event applied to it
    left it (SPEC §7; see plangate.billing). ``plan`` and ``addons`` are what its prices map
    to in the catalog; ``live``: whether it gives them now (Stripe: ``active``, ``trialing``,
    ``past_due``). ``account`` is the provider's customer (Stripe ``cus_…``), for usage
    export. ``event_at`` (epoch seconds) and ``event_id`` name the event applied last: an
    older one is outdated, the same one a duplicate."""

    provider: str
    id: str
    status: str
    live: bool
    plan: str | None = None
    addons: Mapping[str, int] = field(default=EMPTY)
    account: str = ""
    event_at: float = 0.0
    event_id: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.addons, FrozenMap):
            object.__setattr__(self, "addons", FrozenMap(self.addons))


@dataclass(frozen=True, slots=True)
class CustomerRecord:
    """What the store knows of a customer (SPEC §6). The engine resolves its entitlements:
    override > add-ons (each times its quantity) > plan > ``default_plan``.

    ``addons``: add-on name → quantity (0: none). ``overrides``: feature → a value of its
    kind, as in a plan (``false`` takes the feature away). While ``trial_ends_at`` has not
    passed the customer is on ``plan``; after it, on ``previous_plan`` (else the config's
    ``default_plan``), with nothing written at that moment.

    ``version`` is the store's: raised by one on every write of the record (0: never
    written). A write may require it (compare-and-set), and every process hears it with
    each change.

    ``subscriptions``: the customer's subscriptions in billing providers; plangate.billing
    keeps them and writes the plan and add-ons they give into ``plan`` and ``addons``.
    """

    customer: str
    plan: str | None = None
    billing_anchor: datetime | None = None
    addons: Mapping[str, int] = field(default=EMPTY)
    overrides: Mapping[str, Any] = field(default=EMPTY)
    trial_ends_at: datetime | None = None
    previous_plan: str | None = None
    version: int = 0
    subscriptions: tuple[Subscription, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.addons, FrozenMap):
            object.__setattr__(self, "addons", FrozenMap(self.addons))
        if not isinstance(self.overrides, FrozenMap):
            object.__setattr__(self, "overrides", FrozenMap(self.overrides))


class CustomerPage(NamedTuple):
    """One page of a listing of customer records; ``cursor`` asks for the next (None: done)."""

    records: tuple[CustomerRecord, ...]
    cursor: str | None


class GrantResult(NamedTuple):
    """What ``GrantCredits`` did: ``created`` a grant, or found the one its idempotency key
    made before (``created=False``); ``grant`` is None when the key was used for another
    body (``conflict``)."""

    created: bool
    grant: Grant | None
    conflict: bool = False


class CreditView(NamedTuple):
    """A balance as the admin side reads it: sub-units, the grants, a page of the ledger
    (newest first) and the cursor of the next page (None: no more)."""

    balance: int
    debt: int
    grants: tuple[Grant, ...]
    ledger: tuple[LedgerEntry, ...]
    cursor: str | None
    ledger_sum: int | None  # what the whole ledger adds up to (None: not read, ``limit=0``)


class Backend(Protocol):
    """What runs the operations: every ``plangate.storage.Storage`` is one."""

    def reserve(self, op: Reserve, /) -> ReserveResult: ...
    def settle(self, op: Settle, /) -> bool: ...
    def peek(self, op: Peek, /) -> tuple[CounterState, ...]: ...
    def record(self, op: Record, /) -> tuple[int, ...] | None: ...
    def get_customer(self, customer: str, /) -> CustomerRecord | None: ...
    def put_customer(
        self, record: CustomerRecord, /, *, expected_version: int | None = None
    ) -> int: ...
    def put_customers(
        self, writes: Sequence[tuple[CustomerRecord, int | None]], /
    ) -> list[Any]: ...
    def delete_customer(self, customer: str, /, *, expected_version: int | None = None) -> int: ...
    def list_customers(
        self, *, plan: str | None = None, limit: int = 100, cursor: str | None = None
    ) -> CustomerPage: ...
    def grant_credits(self, op: GrantCredits, /) -> GrantResult: ...
    def revoke_credits(self, op: RevokeCredits, /) -> int | None: ...
    def read_credits(self, op: ReadCredits, /) -> CreditView: ...
    def count_unmapped(self, provider: str, names: Sequence[str], /) -> None: ...
    def unmapped(self, providers: Sequence[str], /) -> dict[str, dict[str, int]]: ...
    async def acount_unmapped(self, provider: str, names: Sequence[str], /) -> None: ...
    async def aunmapped(self, providers: Sequence[str], /) -> dict[str, dict[str, int]]: ...
    async def agrant_credits(self, op: GrantCredits, /) -> GrantResult: ...
    async def arevoke_credits(self, op: RevokeCredits, /) -> int | None: ...
    async def aread_credits(self, op: ReadCredits, /) -> CreditView: ...
    async def areserve(self, op: Reserve, /) -> ReserveResult: ...
    async def asettle(self, op: Settle, /) -> bool: ...
    async def apeek(self, op: Peek, /) -> tuple[CounterState, ...]: ...
    async def arecord(self, op: Record, /) -> tuple[int, ...] | None: ...
    async def aget_customer(self, customer: str, /) -> CustomerRecord | None: ...
    async def aput_customer(
        self, record: CustomerRecord, /, *, expected_version: int | None = None
    ) -> int: ...
    async def aput_customers(
        self, writes: Sequence[tuple[CustomerRecord, int | None]], /
    ) -> list[Any]: ...
    async def adelete_customer(
        self, customer: str, /, *, expected_version: int | None = None
    ) -> int: ...
    async def alist_customers(
        self, *, plan: str | None = None, limit: int = 100, cursor: str | None = None
    ) -> CustomerPage: ...


class Op(ABC, Generic[T]):
    """One storage operation, run by a sync or an async driver."""

    @abstractmethod
    def run(self, backend: Backend) -> T: ...

    @abstractmethod
    async def arun(self, backend: Backend) -> T: ...


@dataclass(frozen=True, slots=True)
class Lease:
    """What a reservation asks for beyond its request (plangate.storage's local leases):
    up to ``want`` more of its costs, counted with it, at most ``fraction`` of what each
    limit has left and none once a counter is at ``near`` of its limit; and, per counter,
    the units (and their slot) this process holds and gives back first."""

    want: int
    fraction: float
    near: float
    held: tuple[tuple[int, int], ...]  # per counter: (units, slot)
    #: names the call: its reply is kept under this id (a settled marker, as ``Settle``'s),
    #: so the same call again — a client that lost the reply — changes nothing and answers
    #: the same, and a ``Settle`` with this id giving the same units back changes nothing
    #: if the call was made
    id: str = ""


@dataclass(frozen=True, slots=True)
class Reserve(Op[ReserveResult]):
    """All counters take their cost, or none does. ``enforce=False`` takes it regardless."""

    counters: tuple[Counter, ...]
    now: float
    enforce: bool = True
    #: names the reservation; the ``Settle`` that commits or refunds it carries the same id
    reservation_id: str = ""
    #: credit balances taken from in the same atomic step (a route's credits and overage)
    credits: tuple[CreditCharge, ...] = ()
    #: a lease asked for with it (a store that keeps none answers ``leased=0``)
    lease: Lease | None = None

    def run(self, backend: Backend) -> ReserveResult:
        return backend.reserve(self)

    async def arun(self, backend: Backend) -> ReserveResult:
        return await backend.areserve(self)


@dataclass(frozen=True, slots=True)
class Settle(Op[bool]):
    """Adjust a reservation by ``deltas`` (actual - reserved, per counter); once per id."""

    reservation_id: str
    counters: tuple[Counter, ...]
    slots: tuple[int, ...]
    deltas: tuple[int, ...]
    now: float
    #: per credit charge: sub-units to add (a charge past the balance becomes debt) or, when
    #: negative, to refund to the grants ``burns`` took them from
    credits: tuple[CreditCharge, ...] = ()
    credit_deltas: tuple[int, ...] = ()
    burns: tuple[Burns, ...] = ()
    #: the time whose hour of usage aggregates the deltas change (0: ``now``'s): a lease's
    #: units given back after its hour ended belong to the hour they were leased in
    usage_at: float = 0.0

    def run(self, backend: Backend) -> bool:
        return backend.settle(self)

    async def arun(self, backend: Backend) -> bool:
        return await backend.asettle(self)


#: what ``Record`` answers for the usage of one reservation that the store had made after
#: all (its reply was lost on the way): nothing was added again
MADE_THERE: tuple[int, ...] = (-1,)


@dataclass(frozen=True, slots=True)
class Record(Op["tuple[int, ...] | None"]):
    """Add usage admitted elsewhere (replayed after an outage), no limit checked; once per id.

    Answers where each cost was placed (slots, as ``Reserve`` does), None if this id was
    recorded before, or ``MADE_THERE`` (see ``reservation_id``).
    """

    record_id: str
    counters: tuple[Counter, ...]
    costs: tuple[int, ...]
    now: float
    #: credits used meanwhile, taken whole (what the grants cannot cover becomes debt)
    credits: tuple[CreditCharge, ...] = ()
    credit_costs: tuple[int, ...] = ()
    #: the one reservation this usage is, if so: a reservation that timed out here may
    #: have been made there all the same, and then this record changes nothing
    reservation_id: str = ""

    def run(self, backend: Backend) -> tuple[int, ...] | None:
        return backend.record(self)

    async def arun(self, backend: Backend) -> tuple[int, ...] | None:
        return await backend.arecord(self)


@dataclass(frozen=True, slots=True)
class Peek(Op[tuple[CounterState, ...]]):
    counters: tuple[Counter, ...]
    now: float

    def run(self, backend: Backend) -> tuple[CounterState, ...]:
        return backend.peek(self)

    async def arun(self, backend: Backend) -> tuple[CounterState, ...]:
        return await backend.apeek(self)


@dataclass(frozen=True, slots=True)
class LoadCustomer(Op["CustomerRecord | None"]):
    """The customer's record. The gate's drivers answer it from the customer store (its
    cache); run on a backend, it is one raw read."""

    customer: str

    def run(self, backend: Backend) -> CustomerRecord | None:
        return backend.get_customer(self.customer)

    async def arun(self, backend: Backend) -> CustomerRecord | None:
        return await backend.aget_customer(self.customer)


@dataclass(frozen=True, slots=True)
class GrantCredits(Op[GrantResult]):
    """Add ``grant`` to the balance ``charge`` names (its debt paid first), once per
    ``grant.idempotency_key``: the same key again finds the first grant when
    ``fingerprint`` (what was asked) matches, and is a conflict when it does not."""

    charge: CreditCharge
    grant: Grant
    fingerprint: str
    now: int  # microseconds

    def run(self, backend: Backend) -> GrantResult:
        return backend.grant_credits(self)

    async def arun(self, backend: Backend) -> GrantResult:
        return await backend.agrant_credits(self)


@dataclass(frozen=True, slots=True)
class RevokeCredits(Op["int | None"]):
    """Take away what a grant still holds; the sub-units revoked (None: no such grant)."""

    charge: CreditCharge
    grant_id: str
    now: int

    def run(self, backend: Backend) -> int | None:
        return backend.revoke_credits(self)

    async def arun(self, backend: Backend) -> int | None:
        return await backend.arevoke_credits(self)


@dataclass(frozen=True, slots=True)
class ReadCredits(Op[CreditView]):
    """A balance, its grants and a page of its ledger (the period's plan grant is issued
    first if it was not: reading counts as a use). ``before``: the cursor of a page;
    ``limit=0``: no ledger at all (the balance alone)."""

    charge: CreditCharge
    now: int
    limit: int = 50
    before: str | None = None

    def run(self, backend: Backend) -> CreditView:
        return backend.read_credits(self)

    async def arun(self, backend: Backend) -> CreditView:
        return await backend.aread_credits(self)
