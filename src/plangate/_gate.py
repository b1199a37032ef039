"""The gate: the engine driven with blocking storage calls (``Gate``) or awaited ones (``AsyncGate``).

Both run the same flows (generators that yield storage ``Op``s); only how an ``Op`` is run
differs. The middlewares sit on them; so do the CLI and, later, the gateway.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import anyio.to_thread

from ._decisions import DecisionLog
from ._drivers import adrive, drive
from ._reload import (
    SECRET_ENV,
    Loaded,
    ReloadError,
    Reloading,
    ReloadOutcome,
    read_error,
    signature,
    status,
    version_of,
)
from ._requirements import check_requirements
from .config import Config, Rule, load_config, load_config_bytes
from .customers import AsyncCustomerStore, CustomerStore
from .engine import Decision, Engine, Flow, Problem, identity_problem
from .errors import (
    AuthenticationError,
    ConfigError,
    ConfigIssue,
    KeysUnavailableError,
    StorageError,
)
from .identity import Identity, IdentityResult, TokenRead, TokenSource, TokenVerifier
from .storage import PublishedConfig, Storage, open_storage

Clock = Callable[[], float]
logger = logging.getLogger("plangate")
storage_logger = logging.getLogger("plangate.storage")
reload_logger = logging.getLogger("plangate.reload")


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise ConfigError([ConfigIssue("", f"cannot read: {exc.strerror}", path)]) from None


def _verified(published: PublishedConfig) -> bytes:
    """A published config's bytes, once its signature is checked when this process holds
    ``PLANGATE_RELOAD_SECRET``."""
    secret = os.environ.get(SECRET_ENV)
    if secret and not hmac.compare_digest(published.mac, signature(published.data, secret)):
        raise ConfigError(
            [
                ConfigIssue(
                    "",
                    f"the config published on the store (version {published.version}) is not "
                    f"signed with {SECRET_ENV}: refused",
                )
            ]
        )
    return published.data


def _is_log(observer: Callable[..., Any], log: DecisionLog | None) -> bool:
    return log is not None and getattr(observer, "__self__", None) is log


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
        self.clock = clock
        #: the file the config came from (reloaded from there); None for an object
        self.config_path: str | None = None
        #: the file as named (its messages say it as ``plangate check`` would)
        self._config_name = "<config>"
        if isinstance(config, (str, os.PathLike)):
            self._config_name = os.fspath(config)
            # absolute now: a reload reads the same file after the process changes directory
            self.config_path = os.path.abspath(self._config_name)
            data = _read(self.config_path)
            first = load_config_bytes(data, self._config_name, source=self._config_name)
            version, origin = version_of(data), "file"
        else:  # a mapping or a Config: reloaded only with what ``reload`` is given
            first, version, origin = load_config(config), "", "object"
        #: told of every decision made for a request (the decision log, metrics):
        #: ``observer(method, path, decision)``
        self.observers: list[Callable[[str, str, Decision], None]] = []
        #: what the gate decides with; every request reads it once (see ``plangate._reload``)
        self.loaded = self._build(first, version, origin, None)
        if self.loaded.decision_log is not None:
            self.observers.append(self.loaded.decision_log.write)
        if isinstance(storage, Storage):
            self.storage = storage
        else:
            self.storage = open_storage(storage or first.model.storage)
        self._open_customers()
        #: a store this gate opened is checked once, at start-up (``check_storage``)
        self.storage_unchecked = not isinstance(storage, Storage)
        #: reloads: the file watch, SIGHUP, the store (started with the app: ``start``)
        self.reloading = Reloading(self)
        self._reload_lock = threading.RLock()
        self.reloads = 0
        self.reload_errors = 0
        self.last_reload_error: ReloadError | None = None
        #: what served before the last reload (a /check issued just before it is rendered)
        self.previous: Loaded | None = None
        #: told of every reload attempt (metrics), in order: ``listener(outcome)``
        self.reload_listeners: list[Callable[[ReloadOutcome], None]] = []

    # what a request reads of the config: ``loaded``, once; these read it each time

    @property
    def config(self) -> Config:
        return self.loaded.config

    @property
    def engine(self) -> Engine:
        return self.loaded.engine

    @property
    def verifier(self) -> TokenVerifier:
        return self.loaded.verifier

    @property
    def token_source(self) -> TokenSource:
        return self.loaded.token_source

    @property
    def pass_preflights(self) -> bool:
        return self.loaded.pass_preflights

    def _build(self, config: Config, version: str, origin: str, previous: Loaded | None) -> Loaded:
        """Everything a gate builds from ``config``; what did not change is kept (the keys
        fetched from a JWKS, the decision log's open file)."""
        model = config.model
        identity = model.identity
        reusable = previous is not None and previous.config.model.identity == identity
        key = identity.jwt.public_key
        if reusable and key is not None and key.startswith("file:"):
            reusable = False  # the same name, perhaps a rotated key: read it again
        if reusable and previous is not None:
            verifier, token_source = previous.verifier, previous.token_source
        else:
            verifier = TokenVerifier(identity.jwt, clock=self.clock)
            token_source = TokenSource(identity.token_from)
        log = None
        if model.decision_log is not None:
            if previous is not None and previous.config.model.decision_log == model.decision_log:
                log = previous.decision_log
            if log is None:
                log = DecisionLog(model.decision_log, self.clock)
        return Loaded(
            config=config,
            engine=Engine(config, new_id=new_reservation_id),
            verifier=verifier,
            token_source=token_source,
            pass_preflights=model.cors_preflight == "pass",
            decision_log=log,
            version=version,
            loaded_at=time.time(),
            origin=origin,
        )

    def start(self) -> None:
        """Follow config changes (file, SIGHUP, store) as ``reload:`` says, starting with a
        reload: the file as it is now, or the store's published config. The middlewares and
        the gateway call it at start-up (and in a forked worker, at its first request).
        Idempotent; never raises."""
        if not self.reloading.started:
            self.reloading.start()

    def stop(self) -> None:
        """Stop following config changes (the app shuts down)."""
        self.reloading.stop()

    def reload(
        self,
        data: bytes | None = None,
        *,
        origin: str | None = None,
        force: bool = False,
        following: bool = False,
    ) -> ReloadOutcome:
        """Load the config again — ``data`` if given, else the store's published config
        (``reload.store``; the file while nothing is published) or the file — check it
        entirely, and swap it in at once: requests in flight finish on the config they
        started with. A config that does not load changes nothing: the errors are logged as
        ``plangate check`` prints them and kept (``last_reload_error``, ``GET /admin/config``,
        metrics). ``force``: build it again even if its bytes did not change (SIGHUP and
        ``POST /admin/config/reload`` do: a key file it names may have been rotated).
        ``following``: asked by the watch, SIGHUP or the store: nothing once the gate has
        stopped following (``stop``). Blocking (it reads a file, or the store): from async
        code, run it in a thread. Never raises."""
        with self._reload_lock:
            if following and not self.reloading.following:
                return ReloadOutcome(False, self.loaded.version)
            try:
                outcome = self._reload(data, origin, force)
            except Exception as exc:  # a bug: logged, the config serving stays
                logger.exception("plangate: reloading the config failed")
                outcome = self._failed(read_error(exc, origin or "file", time.time()))
            for listener in list(self.reload_listeners):  # in order: under the lock
                try:
                    listener(outcome)
                except Exception:
                    logger.exception("plangate: a reload listener failed")
        return outcome

    def _reload(self, data: bytes | None, origin: str | None, force: bool) -> ReloadOutcome:
        current = self.loaded
        if origin is None:
            origin = "store" if current.config.model.reload.store else "file"
        name = self._config_name
        try:
            if data is None and origin == "store":
                published = self.storage.published_config()
                if published is not None:
                    data = _verified(published)
                    name = f"{name} (published on the store, version {published.version})"
                elif self.config_path is not None:
                    origin = "file"  # nothing published yet: the file is what there is
                else:
                    return self._unchanged(current)
            if data is None:
                if self.config_path is None:
                    raise ConfigError(
                        [ConfigIssue("", "this gate's config was not read from a file")]
                    )
                data = _read(self.config_path)
            version = version_of(data)
            if version == current.version and not force:
                return self._unchanged(current)
            config = load_config_bytes(data, name, source=self._config_name)
            refused = check_requirements(current.config, config)
            if refused:  # a view would require what the new config no longer has
                raise ConfigError(refused)
            loaded = self._build(config, version, origin, current)
        except Exception as exc:
            return self._failed(read_error(exc, origin, time.time()))
        self._swap(loaded)
        return ReloadOutcome(True, version)

    def _unchanged(self, current: Loaded) -> ReloadOutcome:
        self.last_reload_error = None  # the version serving is what the source holds
        return ReloadOutcome(False, current.version)

    def _failed(self, error: ReloadError) -> ReloadOutcome:
        self.last_reload_error = error
        self.reload_errors += 1
        serving = self.loaded.version or "(object)"
        reload_logger.error(
            "plangate: the config was not reloaded (%s); version %s still serves:\n%s",
            error.origin,
            serving,
            error.message,
        )
        return ReloadOutcome(False, self.loaded.version, error)

    def _swap(self, loaded: Loaded) -> None:
        previous = self.loaded
        if loaded.config.model.storage != previous.config.model.storage:
            reload_logger.warning(
                "plangate: storage changed in the config: it takes effect at the next restart"
            )
        self.previous = previous
        self.loaded = loaded  # one assignment: each request reads one or the other
        self.customers.use_engine(loaded.engine)
        observers = [o for o in self.observers if not _is_log(o, previous.decision_log)]
        if loaded.decision_log is not None:
            observers.insert(0, loaded.decision_log.write)
        self.observers = observers  # the old log's file closes once no request holds it
        self.reloads += 1
        self.last_reload_error = None
        reload_logger.info(
            "plangate: config reloaded (%s): version %s -> %s",
            loaded.origin,
            previous.version or "(object)",
            loaded.version,
        )

    def config_status(self) -> dict[str, Any]:
        """The config serving: version, origin, when it was loaded, the last reload error."""
        return status(self.loaded, self.last_reload_error, self.reloads, self.reload_errors)

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

    def identify(self, token: TokenRead, loaded: Loaded | None = None) -> IdentityResult:
        """The caller, or why there is none. Never raises for bad input."""
        if isinstance(token, AuthenticationError):  # the request's token could not be read
            return token
        try:
            return (loaded or self.loaded).verifier.verify(token)
        except (AuthenticationError, KeysUnavailableError) as exc:
            return exc

    def _fallback(
        self, method: str, path: str, rule: Rule | None = None, loaded: Loaded | None = None
    ) -> Decision:
        """The decision when deciding failed unexpectedly (a bug, not a storage outage, which
        the store handles): let the request through without a customer, or — when the
        failure policy is ``deny`` — answer 503."""
        loaded = loaded or self.loaded
        policy = loaded.config.model.on_storage_error
        logger.exception(
            "plangate failed to decide %s %s; applying on_storage_error=%s", method, path, policy
        )
        if rule is None:
            try:  # the handler still gets a decision (without a customer) if routing works
                rule = loaded.engine.route(method, path).rule
            except Exception:
                rule = None
        decision = Decision(rule, {}, loaded.engine.kinds)
        if policy == "deny":
            decision.problem = _UNAVAILABLE
        return decision

    def _entitlements(
        self, identity: IdentityResult, engine: Engine
    ) -> Flow[dict[str, Any] | Problem]:
        if not isinstance(identity, Identity):
            return identity_problem(identity)
        return (yield from engine.entitlements(identity, self.clock()))


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

    def check(
        self,
        method: str,
        path: str,
        token: TokenRead,
        *,
        consume: bool = True,
        loaded: Loaded | None = None,
    ) -> Decision:
        """The decision for a request; reserves its meters unless ``consume=False``.
        ``loaded``: the config the request started with (default: the one serving now).

        Never raises: an unexpected error is logged and decided by the failure policy.
        """
        if self.storage_unchecked:  # a gate not built by the WSGI middleware
            self.check_storage()
        loaded = loaded or self.loaded
        try:
            engine = loaded.engine
            decision = engine.route(method, path, explain=not consume)
            if _needs_identity(decision):
                decision = drive(
                    engine.decide(
                        decision, self.identify(token, loaded), self.clock(), consume=consume
                    ),
                    self.storage,
                    self.customers,
                )
        except Exception:
            return self._fallback(method, path, None, loaded)
        if self.observers and consume:  # explaining is not deciding
            self._observed(method, path, decision)
        return decision

    def check_declared(
        self, rule: Rule, token: TokenRead, loaded: Loaded | None = None
    ) -> Decision:
        """The decision for a rule declared on a view (``Requirement``), for this token."""
        loaded = loaded or self.loaded
        try:
            engine = loaded.engine
            decision = Decision(rule, {}, engine.kinds)
            identity = self.identify(token, loaded)
            decision = drive(
                engine.decide(decision, identity, self.clock(), consume=True),
                self.storage,
                self.customers,
            )
        except Exception:
            return self._fallback("(view)", rule.match, rule, loaded)
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

    def entitlements(
        self, token: TokenRead, loaded: Loaded | None = None
    ) -> dict[str, Any] | Problem:
        loaded = loaded or self.loaded
        try:
            flow = self._entitlements(self.identify(token, loaded), loaded.engine)
            return drive(flow, self.storage, self.customers)
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

    async def aidentify(self, token: TokenRead, loaded: Loaded | None = None) -> IdentityResult:
        """``identify``, without blocking the event loop on a JWKS fetch."""
        loaded = loaded or self.loaded
        verifier = loaded.verifier
        if verifier.fetches_keys and not isinstance(token, AuthenticationError):
            hit = verifier.cached(token)
            if hit is not None:
                return hit
            return await anyio.to_thread.run_sync(self.identify, token, loaded)
        return self.identify(token, loaded)

    async def check(
        self,
        method: str,
        path: str,
        token: TokenRead,
        *,
        consume: bool = True,
        loaded: Loaded | None = None,
    ) -> Decision:
        if self.storage_unchecked:  # no lifespan startup ran the check
            await self.check_storage()
        loaded = loaded or self.loaded
        try:
            engine = loaded.engine
            decision = engine.route(method, path, explain=not consume)
            if _needs_identity(decision):
                identity = await self.aidentify(token, loaded)
                decision = await adrive(
                    engine.decide(decision, identity, self.clock(), consume=consume),
                    self.storage,
                    self.customers,
                )
        except Exception:
            return self._fallback(method, path, None, loaded)
        if self.observers and consume:  # explaining is not deciding
            self._observed(method, path, decision)
        return decision

    async def check_declared(
        self, rule: Rule, token: TokenRead, loaded: Loaded | None = None
    ) -> Decision:
        loaded = loaded or self.loaded
        try:
            engine = loaded.engine
            decision = Decision(rule, {}, engine.kinds)
            identity = await self.aidentify(token, loaded)
            decision = await adrive(
                engine.decide(decision, identity, self.clock(), consume=True),
                self.storage,
                self.customers,
            )
        except Exception:
            return self._fallback("(view)", rule.match, rule, loaded)
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

    async def entitlements(
        self, token: TokenRead, loaded: Loaded | None = None
    ) -> dict[str, Any] | Problem:
        loaded = loaded or self.loaded
        try:
            identity = await self.aidentify(token, loaded)
            flow = self._entitlements(identity, loaded.engine)
            return await adrive(flow, self.storage, self.customers)
        except Exception:
            logger.exception("plangate could not answer the entitlements endpoint")
            return _UNAVAILABLE
