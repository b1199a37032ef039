"""What a provider's event changes for one customer, whichever provider sent it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..engine import Subscription


class Rejected(Exception):
    """A webhook refused before anything was read from it: ``problem`` (an admin problem
    type) and why."""

    def __init__(self, problem: str, detail: str) -> None:
        super().__init__(detail)
        self.problem = problem
        self.detail = detail


@dataclass(frozen=True)
class Change:
    """What one event changes for one customer (``customer`` None: it names none)."""

    event: str
    kind: str
    customer: str | None
    provider: str = "stripe"
    subscription: Subscription | None = None
    #: (feature, credits, idempotency key) per grant
    grants: tuple[tuple[str, int, str], ...] = ()
    #: prices (Stripe) or rate plans (Zuora) the config does not map
    unmapped: tuple[str, ...] = ()
    #: a paid Stripe Checkout session whose line items are to be read from Stripe's API
    session: str | None = None
    #: a Stripe invoice whose lines after the given one are to be read from Stripe's API
    more_lines: tuple[str, str] | None = None


#: the earliest event time taken (2000-01-01 UTC), and how far ahead of this machine's clock
#: one may be: a time outside would order every later event of its subscription wrongly
EARLIEST = 946_684_800
AHEAD = 86_400


def plausible(at: float, now: float) -> bool:
    """Whether ``at`` (epoch seconds) can be the time of an event sent at ``now``."""
    return EARLIEST <= at <= now + AHEAD


class ProviderUnavailable(Exception):
    """The provider's API could not be asked what an event needs (HTTP 503: the provider
    sends the event again later)."""


def dotted(obj: Mapping[str, Any], path: str) -> str | None:
    """The value at the dotted ``path`` in ``obj`` (``customer_from``), if it is a
    non-empty string."""
    value: Any = obj
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value if isinstance(value, str) and value else None


class ProviderRefused(Exception):
    """The provider's API answered that what an event needs does not exist or may not be
    read: retrying cannot help (the event is acknowledged, and logged)."""
