"""The gate: the engine driven with blocking storage calls (``Gate``) or awaited ones (``AsyncGate``).

Both run the same flows (generators that yield storage ``Op``s); only how an ``Op`` is run
differs. The middlewares sit on them; so do the CLI and, later, the gateway.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import anyio.to_thread

from ._decisions import DecisionLog
from ._drivers import adrive, drive
from .config import Config, Rule, load_config
from .customers import AsyncCustomerStore, CustomerStore
from .engine import Decision, Engine, Flow, Problem, identity_problem
from .errors import AuthenticationError, KeysUnavailableError, StorageError
from .identity import Identity, IdentityResult, TokenRead, TokenSource, TokenVerifier
from .storage import Storage, open_storage

Clock = Callable[[], float]
logger = logging.getLogger("plangate")
storage_logger = logging.getLogger("plangate.storage")


def new_reservation_id() -> str:
    """An unguessable id (128 random bits): commits and refunds name it, once each."""
    return os.urandom(16).hex()  # what secrets.token_hex(16) does, in one call


class _Gate:
    #: the customer records this gate decides with (its cache in front of the store)
    customers: CustomerStore | AsyncCustomerStore

    def __init__(
        self,
        config: str | os.PathLike[str] | Mapping[str, Any] | Config,
        *,
        storage: str | Storage | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.config = load_config(config)
        if isinstance(storage, Storage):
            self.storage = storage
        else:
            self.storage = open_storage(storage or self.config.model.storage)
        self.engine = Engine(self.config, new_id=new_reservation_id)
        self.clock = clock
        self._open_customers()
        #: a store this gate opened is checked once, at start-up (``check_storage``)
        self.storage_unchecked = not isinstance(storage, Storage)
        identity = self.config.model.identity
        self.verifier = TokenVerifier(identity.jwt, clock=clock)
        self.token_source = TokenSource(identity.token_from)
        #: CORS preflights pass unauthenticated and unmetered (they carry no credentials)
        self.pass_preflights = self.config.model.cors_preflight == "pass"
        self.clock = clock
        #: told of every decision made for a request (the decision log, metrics):
        #: ``observer(method, path, decision)``
        self.observers: list[Callable[[str, str, Decision], None]] = []
        if self.config.model.decision_log is not None:
            self.observers.append(DecisionLog(self.config.model.decision_log, clock).write)

    def _open_customers(self) -> None:
        raise NotImplementedError

    def _observed(self, method: str, path: str, decision: Decision) -> None:
        for observe in self.observers:
            try:
                observe(method, path, decision)
            except Exception:  # an observer never decides a request
                logger.exception("plangate: a decision observer failed")

    def _checked(self, answered: str | None, error: StorageError | None) -> bool:
        if error is not None:
            storage_logger.error(
                "storage check failed: %s; until it succeeds, every request follows its "
                "on_storage_error policy",
                error,
            )
            return False
        if answered is not None:
            storage_logger.info("storage check: connected to %s", answered)
        return True

    def identify(self, token: TokenRead) -> IdentityResult:
        """The caller, or why there is none. Never raises for bad input."""
        if isinstance(token, AuthenticationError):  # the request's token could not be read
            return token
        try:
            return self.verifier.verify(token)
        except (AuthenticationError, KeysUnavailableError) as exc:
            return exc

    def _route(self, method: str, path: str, consume: bool) -> Decision:
        return self.engine.route(method, path, explain=not consume)

    def _declared(self, rule: Rule) -> Decision:
        return Decision(rule, {}, self.engine.kinds)

    def _decide(
        self, decision: Decision, identity: IdentityResult, consume: bool
    ) -> Flow[Decision]:
        return self.engine.decide(decision, identity, self.clock(), consume=consume)

    def _fallback(self, method: str, path: str, rule: Rule | None = None) -> Decision:
        """The decision when deciding failed unexpectedly (a bug, not a storage outage, which
        the store handles): let the request through without a customer, or — when the
        failure policy is ``deny`` — answer 503."""
        logger.exception(
            "plangate failed to decide %s %s; applying on_storage_error=%s",
            method,
            path,
            self.config.model.on_storage_error,
        )
        if rule is None:
            try:  # the handler still gets a decision (without a customer) if routing works
                rule = self.engine.route(method, path).rule
            except Exception:
                rule = None
        decision = Decision(rule, {}, self.engine.kinds)
        if self.config.model.on_storage_error == "deny":
            decision.problem = _UNAVAILABLE
        return decision

    def _entitlements(self, identity: IdentityResult) -> Flow[dict[str, Any] | Problem]:
        if not isinstance(identity, Identity):
            return identity_problem(identity)
        return (yield from self.engine.entitlements(identity, self.clock()))


_UNAVAILABLE = Problem(
    "entitlements-unavailable",
    "entitlements cannot be read right now",
    headers=(("retry-after", "1"),),
)


def _needs_identity(decision: Decision) -> bool:
    rule = decision.rule
    return rule is not None and not rule.public


class Gate(_Gate):
    """Decides and settles requests with blocking storage calls (WSGI, CLI)."""

    customers: CustomerStore

    def _open_customers(self) -> None:
        self.customers = CustomerStore(self.storage, engine=self.engine, now=self.clock)

    def check_storage(self) -> bool:
        """Connect to the store now (Redis: connect, authenticate, ask its version) and log
        the outcome: an ERROR naming the URI (password masked) and the cause if the store
        cannot be used. The WSGI middleware calls it when it is built; otherwise the first
        request does."""
        self.storage_unchecked = False
        try:
            return self._checked(self.storage.check_connection(), None)
        except StorageError as exc:
            return self._checked(None, exc)

    def check(self, method: str, path: str, token: TokenRead, *, consume: bool = True) -> Decision:
        """The decision for a request; reserves its meters unless ``consume=False``.

        Never raises: an unexpected error is logged and decided by the failure policy.
        """
        if self.storage_unchecked:  # a gate not built by the WSGI middleware
            self.check_storage()
        try:
            decision = self._route(method, path, consume)
            if _needs_identity(decision):
                decision = drive(
                    self._decide(decision, self.identify(token), consume),
                    self.storage,
                    self.customers,
                )
        except Exception:
            return self._fallback(method, path)
        if self.observers and consume:  # explaining is not deciding
            self._observed(method, path, decision)
        return decision

    def check_declared(self, rule: Rule, token: TokenRead) -> Decision:
        """The decision for a rule declared on a view (``Requirement``), for this token."""
        try:
            decision = self._declared(rule)
            decision = drive(
                self._decide(decision, self.identify(token), True), self.storage, self.customers
            )
        except Exception:
            return self._fallback("(view)", rule.match, rule)
        if self.observers:
            self._observed("(view)", rule.match, decision)
        return decision

    def settle(
        self,
        decision: Decision,
        status: int,
        reported: Mapping[str, int] | None = None,
        *,
        refund: bool = False,
    ) -> None:
        """Commit, adjust or refund what ``decision`` reserved, once the status is known."""
        try:
            op = self.engine.settle(decision, status, reported or {}, self.clock, refund=refund)
            if op is not None:
                op.run(self.storage)
        except Exception:
            logger.exception("plangate could not settle %r; its reservation stands", decision)

    def entitlements(self, token: TokenRead) -> dict[str, Any] | Problem:
        try:
            return drive(self._entitlements(self.identify(token)), self.storage, self.customers)
        except Exception:
            logger.exception("plangate could not answer the entitlements endpoint")
            return _UNAVAILABLE


class AsyncGate(_Gate):
    """The same as ``Gate``, with awaited storage calls (ASGI)."""

    customers: AsyncCustomerStore

    def _open_customers(self) -> None:
        self.customers = AsyncCustomerStore(self.storage, engine=self.engine, now=self.clock)

    async def check_storage(self) -> bool:
        """``Gate.check_storage``, without blocking the event loop. The ASGI middleware calls
        it at the lifespan startup; without one, the first request does."""
        self.storage_unchecked = False
        try:
            return self._checked(await self.storage.acheck_connection(), None)
        except StorageError as exc:
            return self._checked(None, exc)

    async def aidentify(self, token: TokenRead) -> IdentityResult:
        """``identify``, without blocking the event loop on a JWKS fetch."""
        verifier = self.verifier
        if verifier.fetches_keys and not isinstance(token, AuthenticationError):
            hit = verifier.cached(token)
            if hit is not None:
                return hit
            return await anyio.to_thread.run_sync(self.identify, token)
        return self.identify(token)

    async def check(
        self, method: str, path: str, token: TokenRead, *, consume: bool = True
    ) -> Decision:
        if self.storage_unchecked:  # no lifespan startup ran the check
            await self.check_storage()
        try:
            decision = self._route(method, path, consume)
            if _needs_identity(decision):
                identity = await self.aidentify(token)
                decision = await adrive(
                    self._decide(decision, identity, consume), self.storage, self.customers
                )
        except Exception:
            return self._fallback(method, path)
        if self.observers and consume:  # explaining is not deciding
            self._observed(method, path, decision)
        return decision

    async def check_declared(self, rule: Rule, token: TokenRead) -> Decision:
        try:
            decision = self._declared(rule)
            identity = await self.aidentify(token)
            decision = await adrive(
                self._decide(decision, identity, True), self.storage, self.customers
            )
        except Exception:
            return self._fallback("(view)", rule.match, rule)
        if self.observers:
            self._observed("(view)", rule.match, decision)
        return decision

    async def settle(
        self,
        decision: Decision,
        status: int,
        reported: Mapping[str, int] | None = None,
        *,
        refund: bool = False,
    ) -> None:
        try:
            op = self.engine.settle(decision, status, reported or {}, self.clock, refund=refund)
            if op is not None:
                await op.arun(self.storage)
        except Exception:
            logger.exception("plangate could not settle %r; its reservation stands", decision)

    async def entitlements(self, token: TokenRead) -> dict[str, Any] | Problem:
        try:
            identity = await self.aidentify(token)
            return await adrive(self._entitlements(identity), self.storage, self.customers)
        except Exception:
            logger.exception("plangate could not answer the entitlements endpoint")
            return _UNAVAILABLE
