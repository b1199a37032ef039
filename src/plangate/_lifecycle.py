"""The exchange driven by a gate: the few calls every front end makes, sync or async.

``begin`` decides a request (or answers the entitlements endpoint), ``Pending.require``
decides a requirement declared on a view, ``settle`` commits, adjusts or refunds what the
request reserved once ``Exchange.settlements`` knows. Each has an ``a``-prefixed twin for
an ``AsyncGate``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

from ._exchange import Answer, Exchange
from ._gate import AsyncGate, Gate
from ._reload import Loaded
from ._requirements import Requirement
from .engine import Decision
from .errors import ConfigError
from .identity import TokenRead

#: where the front ends keep a request's ``Pending`` (ASGI scope state, WSGI environ, Django
#: request attribute) for the requirements declared on views
PENDING_KEY = "plangate.pending"


def begin(
    gate: Gate, exchange: Exchange, token: TokenRead, loaded: Loaded | None = None
) -> Answer | None:
    """Decide the request: an ``Answer`` to send instead of calling the app, or None.
    ``loaded``: the config the token was read with (``gate.loaded`` when the front end read
    it); the whole request is decided with it, whatever a reload swaps in meanwhile."""
    exchange.token = token
    loaded = exchange.loaded = loaded or gate.loaded
    if exchange.wants_entitlements:
        return exchange.answer_entitlements(gate.entitlements(token, loaded))
    if exchange.preflight and loaded.pass_preflights:
        return None  # no decision: the app (its CORS middleware) answers
    return exchange.decided(gate.check(exchange.method, exchange.path, token, loaded=loaded))


async def abegin(
    gate: AsyncGate, exchange: Exchange, token: TokenRead, loaded: Loaded | None = None
) -> Answer | None:
    exchange.token = token
    loaded = exchange.loaded = loaded or gate.loaded
    if exchange.wants_entitlements:
        return exchange.answer_entitlements(await gate.entitlements(token, loaded))
    if exchange.preflight and loaded.pass_preflights:
        return None
    return exchange.decided(await gate.check(exchange.method, exchange.path, token, loaded=loaded))


def settle(gate: Gate, exchange: Exchange) -> None:
    """Commit, adjust or refund every decision of the request; once."""
    for s in exchange.settlements():
        gate.settle(s.decision, s.status, s.reported, refund=s.refund)


async def asettle(gate: AsyncGate, exchange: Exchange) -> None:
    for s in exchange.settlements():
        await gate.settle(s.decision, s.status, s.reported, refund=s.refund)


def stream_settling(
    body: Iterator[bytes], exchange: Exchange, settle_now: Callable[[], None]
) -> Iterator[bytes]:
    """``body``, settling ``exchange`` once it has been sent, failed (the handler raised) or
    was closed early by the server (the client went away)."""
    try:
        yield from body
    except BaseException as exc:
        _ended(exchange, exc)
        settle_now()
        raise
    exchange.body_sent()
    settle_now()


async def astream_settling(
    body: AsyncIterator[bytes], exchange: Exchange, asettle_now: Callable[[], Awaitable[None]]
) -> AsyncIterator[bytes]:
    """``stream_settling`` for an async body."""
    try:
        async for chunk in body:
            yield chunk
    except BaseException as exc:
        _ended(exchange, exc)
        await asettle_now()
        raise
    exchange.body_sent()
    await asettle_now()


def _ended(exchange: Exchange, exc: BaseException) -> None:
    closed = isinstance(exc, GeneratorExit)
    exchange.finished(cut=closed, raised=not closed)


class Pending:
    """A request on its way through the app: where a view's requirement is decided."""

    __slots__ = ("exchange", "gate")

    def __init__(self, gate: Gate | AsyncGate, exchange: Exchange) -> None:
        self.gate = gate
        self.exchange = exchange

    def require(self, requirement: Requirement) -> Decision:
        """Decide ``requirement`` for this request (a blocking gate: WSGI, Django sync)."""
        gate, exchange = self.gate, self.exchange
        assert isinstance(gate, Gate), "use arequire() with an AsyncGate"
        loaded = exchange.loaded or gate.loaded
        try:
            rule = requirement.rule(loaded.config)
        except ConfigError:  # declared for a config this one is not: the failure policy
            return exchange.add(gate._fallback("(view)", requirement.name, None, loaded))
        return exchange.add(gate.check_declared(rule, exchange.token, loaded))

    async def arequire(self, requirement: Requirement) -> Decision:
        """Decide ``requirement`` for this request (an asyncio gate: ASGI, Django async)."""
        gate, exchange = self.gate, self.exchange
        assert isinstance(gate, AsyncGate), "use require() with a Gate"
        loaded = exchange.loaded or gate.loaded
        try:
            rule = requirement.rule(loaded.config)
        except ConfigError:
            return exchange.add(gate._fallback("(view)", requirement.name, None, loaded))
        return exchange.add(await gate.check_declared(rule, exchange.token, loaded))
