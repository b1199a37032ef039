"""The two drivers of the engine: ``Enforcer`` (blocking storage) and ``AsyncEnforcer``.

Both run the same flows (generators that yield storage ``Op``s); only how an ``Op`` is run
differs. The middlewares sit on them; so do the CLI and, later, the gateway.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from .config import Config, load_config
from .engine import Decision, Engine, Problem
from .errors import AuthenticationError
from .identity import Identity, TokenSource, TokenVerifier
from .storage import Flow, Storage, adrive, drive, open_storage

Clock = Callable[[], float]


class _Gate:
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
        self.engine = Engine(self.config)
        identity = self.config.model.identity
        self.verifier = TokenVerifier(identity.jwt, clock=clock)
        self.token_source = TokenSource(identity.token_from)
        self.clock = clock

    def identify(self, token: str | None) -> Identity | AuthenticationError:
        try:
            return self.verifier.verify(token)
        except AuthenticationError as exc:
            return exc

    def _check(self, method: str, path: str, token: str | None, consume: bool) -> Flow[Decision]:
        decision = self.engine.route(method, path, explain=not consume)
        rule = decision.rule
        if rule is None or rule.public:
            return decision
        identity = self.identify(token)
        return (yield from self.engine.decide(decision, identity, self.clock(), consume=consume))

    def _entitlements(self, token: str | None) -> Flow[dict[str, Any] | Problem]:
        identity = self.identify(token)
        if isinstance(identity, AuthenticationError):
            headers = (
                (("www-authenticate", 'Bearer error="invalid_token"'),)
                if identity.token_given
                else ()
            )
            return Problem("unauthenticated", identity.detail, headers=headers)
        return (yield from self.engine.entitlements(identity, self.clock()))


class Enforcer(_Gate):
    """Decides and settles requests with blocking storage calls (WSGI, CLI)."""

    def check(self, method: str, path: str, token: str | None, *, consume: bool = True) -> Decision:
        """The decision for a request; reserves its meters unless ``consume=False``."""
        return drive(self._check(method, path, token, consume), self.storage)

    def settle(
        self,
        decision: Decision,
        status: int,
        reported: Mapping[str, int] | None = None,
        *,
        refund: bool = False,
    ) -> None:
        """Commit, adjust or refund what ``decision`` reserved, once the status is known."""
        op = self.engine.settle(decision, status, reported or {}, self.clock, refund=refund)
        if op is not None:
            op.run(self.storage)

    def entitlements(self, token: str | None) -> dict[str, Any] | Problem:
        return drive(self._entitlements(token), self.storage)


class AsyncEnforcer(_Gate):
    """The same as ``Enforcer``, with awaited storage calls (ASGI)."""

    async def check(
        self, method: str, path: str, token: str | None, *, consume: bool = True
    ) -> Decision:
        return await adrive(self._check(method, path, token, consume), self.storage)

    async def settle(
        self,
        decision: Decision,
        status: int,
        reported: Mapping[str, int] | None = None,
        *,
        refund: bool = False,
    ) -> None:
        op = self.engine.settle(decision, status, reported or {}, self.clock, refund=refund)
        if op is not None:
            await op.arun(self.storage)

    async def entitlements(self, token: str | None) -> dict[str, Any] | Problem:
        return await adrive(self._entitlements(token), self.storage)
