"""The two drivers of the engine's flows: blocking storage calls (``drive``) or awaited ones
(``adrive``). The flow is written once, as a generator of ``Op``s; only how an ``Op`` runs
differs (the pattern of httpx's auth flows).

A storage failure is thrown into the flow at the point that asked, so the flow's own failure
policy decides what it means. ``LoadCustomer`` goes to the customer store when one is given
(its cache, and the last record seen when the store fails), else to the backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .engine import Backend, Flow, LoadCustomer, Op

if TYPE_CHECKING:
    from .customers import AsyncCustomerStore, CustomerStore

R = TypeVar("R")


#: told of each op a flow ran and its result (the customer store remembers its writes)
Done = Callable[[Op[Any], Any], None]


def drive(
    flow: Flow[R],
    backend: Backend,
    customers: CustomerStore | None = None,
    done: Done | None = None,
) -> R:
    """Run a flow (a generator yielding ``Op``s) with blocking calls."""
    try:
        op = next(flow)
        while True:
            try:
                if customers is not None and type(op) is LoadCustomer:
                    result = customers.load(op.customer)
                else:
                    result = op.run(backend)
                    if done is not None:
                        done(op, result)
            except Exception as exc:
                op = flow.throw(exc)
            else:
                op = flow.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def adrive(
    flow: Flow[R],
    backend: Backend,
    customers: AsyncCustomerStore | None = None,
    done: Done | None = None,
) -> R:
    """Run the same flow with awaited calls."""
    try:
        op = next(flow)
        while True:
            try:
                if customers is not None and type(op) is LoadCustomer:
                    result = await customers.load(op.customer)
                else:
                    result = await op.arun(backend)
                    if done is not None:
                        done(op, result)
            except Exception as exc:
                op = flow.throw(exc)
            else:
                op = flow.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
