"""Prometheus metrics (the ``metrics`` extra: ``pip install 'plangate[metrics]'``).

``instrument(gate)`` counts a gate's decisions and times its storage calls into a
``prometheus_client`` registry (the default one unless given); ``plangate gateway`` does it
for its own gate and serves ``/metrics``. An app serves them by mounting
``prometheus_client.make_asgi_app()`` (or ``make_wsgi_app()``); under gunicorn with
``PROMETHEUS_MULTIPROC_DIR`` set, ``metrics_app()`` answers for every worker. No metric has
a customer label: their number would grow with the customers. See docs/operations.md.

Besides the decisions, it counts the config's reloads (a listener of ``gate.reload``), the
credits granted, burned and refunded (read off the storage calls that move them: the
grants, and the reservations and settles of the request path, so a request that spends no
credits costs nothing more), and how late each customer change published by another
process was heard (the customer store's ``on_lag``).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from ._gate import _Gate
    from ._reload import ReloadOutcome
    from .engine import Decision, GrantCredits, GrantResult, Reserve, ReserveResult, Settle

#: seconds: a storage call takes about a millisecond on a LAN; the request path's timeout
#: is 50 ms by default
STORAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
#: the operations timed (the storage's methods a request runs)
TIMED = ("reserve", "settle", "peek", "record", "get_customer")
#: seconds between a customer change published by a process and another hearing it (Redis
#: pub/sub: about a millisecond; a subscriber that lagged or reconnected, seconds)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """plangate's metrics in one registry; any number of gates feed them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        registry = REGISTRY if registry is None else registry
        self.registry = registry
        self.decisions = Counter(
            "plangate_decisions",
            "Decisions, by route rule, feature, plan, outcome (allow, deny, shadow-deny) "
            "and reason (the problem type; empty when allowed)",
            ["rule", "feature", "plan", "outcome", "reason"],
            registry=registry,
        )
        self.shadow = Counter(
            "plangate_shadow_refusals",
            "Requests a shadow limit would have refused, by route rule, plan and limit",
            ["rule", "plan", "policy"],
            registry=registry,
        )
        self.storage = Histogram(
            "plangate_storage_call_duration_seconds",
            "Storage calls of the request path, by operation, in seconds (failures included)",
            ["operation"],
            buckets=STORAGE_BUCKETS,
            registry=registry,
        )
        self.cache = Counter(
            "plangate_customer_cache_reads",
            "Customer records read by requests, by where from: the process's cache (hit) or "
            "the store (miss)",
            ["result"],
            registry=registry,
        )
        self.reloads = Counter(
            "plangate_config_reloads",
            "Config reloads, by result: ok (a new version serves) or error (the config did "
            "not load: the version before it still serves); a reload that finds the version "
            "serving is not counted",
            ["result"],
            registry=registry,
        )
        self._reloaded_ok = self.reloads.labels("ok")
        self._reload_failed = self.reloads.labels("error")
        self.granted = Counter(
            "plangate_credits_granted",
            "Credits granted by this process, by credits feature: the admin API, billing "
            "webhooks, gate.customers.grant_credits (an idempotent replay is not counted "
            "again; the plan's grant of each period is not counted)",
            ["feature"],
            registry=registry,
        )
        self.burned = Counter(
            "plangate_credits_burned",
            "Credits requests took, by credits feature: what reservations took, plus what "
            "settles charged beyond it (usage reported above the estimate, debt included)",
            ["feature"],
            registry=registry,
        )
        self.refunded = Counter(
            "plangate_credits_refunded",
            "Credits settles gave back to balances, by credits feature (usage below the "
            "estimate, a handler that failed); credits spent = burned - refunded",
            ["feature"],
            registry=registry,
        )
        self.replayed = Counter(
            "plangate_outbox_replayed_units",
            "Units of usage admitted during a storage outage and replayed to the store once "
            "it answered again",
            registry=registry,
        )
        self.lag = Histogram(
            "plangate_customer_change_lag_seconds",
            "Seconds between a customer change being published (by any process) and this "
            "process hearing it, which drops its cached record",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.gates: weakref.WeakSet[Any] = weakref.WeakSet()
        #: each credits counter's child by feature (labels() takes a lock: once per feature)
        self._credits: dict[tuple[int, str], Any] = {}
        #: the gates whose last reload failed, and the config version each gate serves
        self._failing: weakref.WeakSet[Any] = weakref.WeakSet()
        self._versions: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self._reload_lock = threading.Lock()
        #: the decisions counter's child of each label set (the series are few: rules x
        #: plans x outcomes)
        self._children: dict[tuple[str, ...], Any] = {}
        # gauges read when scraped; in multiprocess mode each worker's value is kept apart
        breaker = Gauge(
            "plangate_storage_breaker_open",
            "Gates whose storage circuit breaker is open (requests follow on_storage_error)",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        if not self.multiprocess:  # read at each scrape
            breaker.set_function(lambda: self._sum(_breaker_open))
        outbox = Gauge(
            "plangate_outbox_records",
            "Usage records kept during a storage outage, waiting to be replayed",
            registry=registry,
            multiprocess_mode="livesum",
        )
        if not self.multiprocess:
            outbox.set_function(lambda: self._sum(_pending))
        self.breaker, self.outbox = breaker, outbox
        # 1 in a worker whose last reload failed: the most of the live workers
        self.reload_error = Gauge(
            "plangate_config_last_reload_error",
            "1 while the last config reload failed (the version before it still serves), else 0",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.config_info = Gauge(
            "plangate_config_info",
            "1 for the config version serving (the first 12 hex digits of the SHA-256 of "
            "its file; empty for a config given as an object)",
            ["version"],
            registry=registry,
            multiprocess_mode="livemax",
        )

    def _sum(self, read: Callable[[Any], float]) -> float:
        return float(sum(read(gate.storage) for gate in list(self.gates)))

    def observe(self, method: str, path: str, decision: Decision) -> None:
        """Count one decision (``Gate`` calls it for every request it decides)."""
        rule = decision.rule
        problem = decision.problem
        if problem is None:
            outcome, reason = "allow", ""
        else:
            outcome = "shadow-deny" if decision.shadowed else "deny"
            reason = problem.name
        match = rule.match if rule is not None else "(unmatched)"
        feature = (rule.feature or "") if rule is not None else ""
        plan = decision.plan or ""
        key = (match, feature, plan, outcome, reason)
        child = self._children.get(key)
        if child is None:  # labels() takes a lock and builds its key: once per series
            child = self._children[key] = self.decisions.labels(*key)
        child.inc()
        if self.multiprocess:  # a worker's gauges are its own files: set as it goes
            self.breaker.set(self._sum(_breaker_open))
            self.outbox.set(self._sum(_pending))
        for policy in decision.shadow_refused:
            self.shadow.labels(match, plan, policy).inc()
        if outcome == "shadow-deny" and problem is not None:
            for policy in problem.members.get("violated-policies", ()):
                self.shadow.labels(match, plan, policy).inc()

    # credits: told by the storage calls that move them (``_time_storage``) ---------------

    def _credit(self, counter: Any, feature: str) -> Any:
        key = (id(counter), feature)
        child = self._credits.get(key)
        if child is None:
            child = self._credits[key] = counter.labels(feature)
        return child

    def count_reserved(self, op: Reserve, result: ReserveResult) -> None:
        """A reservation that spends credits: what it took of each balance."""
        # strict=False: a refusal answered from memory may carry no balances
        for charge, state in zip(op.credits, result.credits, strict=False):
            if state.charged:
                self._credit(self.burned, charge.feature).inc(state.charged / charge.scale)

    def count_settled(self, op: Settle, settled: bool) -> None:
        """A settle that moves credits: charged beyond the reservation, or given back. The
        change asked is counted (a store answers only whether it settled): a unit whose
        grant expired or was revoked since the reservation is counted as given back,
        though the store keeps it."""
        if not settled:  # settled before: nothing moved
            return
        for charge, delta in zip(op.credits, op.credit_deltas, strict=True):
            if delta > 0:
                self._credit(self.burned, charge.feature).inc(delta / charge.scale)
            elif delta < 0:
                self._credit(self.refunded, charge.feature).inc(-delta / charge.scale)

    def count_granted(self, op: GrantCredits, result: GrantResult) -> None:
        """A grant added (not one its idempotency key made before)."""
        if result.created:
            self._credit(self.granted, op.charge.feature).inc(op.grant.amount / op.charge.scale)

    # reloads: told by the gate (``gate.reload_listeners``) -------------------------------

    def follow_reloads(self, gate: _Gate) -> None:
        """Count ``gate``'s reloads and show the version it serves."""
        ref = weakref.ref(gate)

        def reloaded(outcome: ReloadOutcome) -> None:
            found = ref()
            if found is not None:
                self.reloaded(found, outcome)

        gate.reload_listeners.append(reloaded)
        with self._reload_lock:
            self._serve(gate, gate.loaded.version)
        self._balances(gate)

    def _balances(self, gate: _Gate) -> None:
        """The series of each credits feature of ``gate``'s config, from 0."""
        for feature, kind in gate.engine.kinds.items():
            if kind == "credits":
                for counter in (self.granted, self.burned, self.refunded):
                    self._credit(counter, feature)

    def reloaded(self, gate: _Gate, outcome: ReloadOutcome) -> None:
        """Count one reload of ``gate``."""
        if outcome.error is not None:
            self._reload_failed.inc()
        elif outcome.changed:
            self._reloaded_ok.inc()
        with self._reload_lock:
            if outcome.error is not None:
                self._failing.add(gate)
            else:  # loaded, or the same version as serving: nothing is wrong now
                self._failing.discard(gate)
            self.reload_error.set(1.0 if len(self._failing) else 0.0)
            if outcome.changed:
                self._serve(gate, outcome.version)
        if outcome.changed:
            self._balances(gate)

    def _serve(self, gate: _Gate, version: str) -> None:
        """``version`` serves in ``gate``: its series is 1; the one it replaced goes (unless
        another gate still serves it). In multiprocess mode a series cannot be removed
        (each worker's file keeps it): it reads 0 until the workers restart."""
        previous = self._versions.get(gate)
        self._versions[gate] = version
        self.config_info.labels(version).set(1.0)
        if previous is None or previous == version or previous in self._versions.values():
            return
        self.config_info.labels(previous).set(0.0)
        if not self.multiprocess:
            self.config_info.remove(previous)


def _breaker_open(storage: Any) -> float:
    breaker = getattr(storage, "breaker", None)
    return 1.0 if breaker is not None and breaker.state == "open" else 0.0


def _pending(storage: Any) -> float:
    return float(getattr(storage, "pending", 0) or 0)


_BY_REGISTRY: dict[int, Metrics] = {}


def _after_fork_in_child() -> None:
    """A lock a parent's thread held at the fork would stay held in the child."""
    for metrics in list(_BY_REGISTRY.values()):
        metrics._reload_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def metrics_for(registry: CollectorRegistry | None = None) -> Metrics:
    """The one ``Metrics`` of a registry (a metric is registered once per registry)."""
    from prometheus_client import REGISTRY

    registry = REGISTRY if registry is None else registry
    found = _BY_REGISTRY.get(id(registry))
    if found is None or found.registry is not registry:
        found = _BY_REGISTRY[id(registry)] = Metrics(registry)
    return found


def instrument(gate: _Gate, registry: CollectorRegistry | None = None) -> Metrics:
    """Count ``gate``'s decisions, reloads and credits, time its storage calls and its
    customer changes' lag; the metrics it feeds."""
    metrics = metrics_for(registry)
    if gate not in metrics.gates:
        metrics.gates.add(gate)
        gate.observers.append(metrics.observe)
        _time_storage(gate.storage, metrics)
        _count_grants(gate.storage, metrics)
        gate.customers.on_hit = metrics.cache.labels("hit").inc
        gate.customers.on_miss = metrics.cache.labels("miss").inc
        gate.customers.on_lag = metrics.lag.observe
        if hasattr(gate.storage, "on_replayed"):  # a store behind the outage fallback
            gate.storage.on_replayed = metrics.replayed.inc
        metrics.follow_reloads(gate)
    return metrics


def _own(storage: Any, method_name: str, is_async: bool) -> Callable[..., Any] | None:
    """The storage's method to wrap; None if there is none, it is wrapped already, or it is
    ``Storage``'s async one (which calls the blocking one: it would be counted twice)."""
    from .storage import Storage

    method = getattr(storage, method_name, None)
    if method is None or getattr(method, "__plangate_timed__", False):
        return None
    inherited = getattr(Storage, method_name, None)
    if is_async and getattr(type(storage), method_name, None) is inherited:
        return None
    return method  # type: ignore[no-any-return]


def _time_storage(storage: Any, metrics: Metrics) -> None:
    """Wrap the storage's request-path methods (on this instance) to time them; a
    reservation or settle that moves credits is counted too."""
    counts: dict[str, Callable[[Any, Any], None]] = {
        "reserve": metrics.count_reserved,
        "settle": metrics.count_settled,
    }
    for name in TIMED:
        for method_name, is_async in ((name, False), (f"a{name}", True)):
            method = _own(storage, method_name, is_async)
            if method is None:
                continue
            observe = metrics.storage.labels(name).observe
            count = counts.get(name)
            wrap = _timed_async if is_async else _timed
            setattr(storage, method_name, wrap(method, observe, count))


def _count_grants(storage: Any, metrics: Metrics) -> None:
    """Wrap the storage's grant methods (on this instance) to count the credits granted:
    every grant goes through them (admin API, Python API, CLI, billing webhooks), whichever
    config the customer store has been given since."""
    for method_name, is_async in (("grant_credits", False), ("agrant_credits", True)):
        method = _own(storage, method_name, is_async)
        if method is not None:
            wrap = _counted_async if is_async else _counted
            setattr(storage, method_name, wrap(method, metrics.count_granted))


def _timed(
    method: Callable[..., Any],
    observe: Callable[[float], None],
    count: Callable[[Any, Any], None] | None = None,
) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            observe(time.perf_counter() - start)

    def counting(op: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            result = method(op, *args, **kwargs)
        finally:
            observe(time.perf_counter() - start)
        if op.credits:  # a Reserve or a Settle: empty unless credits move
            count(op, result)  # type: ignore[misc]
        return result

    wrapper: Callable[..., Any] = timed if count is None else counting
    wrapper.__plangate_timed__ = True  # type: ignore[attr-defined]
    return wrapper


def _timed_async(
    method: Callable[..., Any],
    observe: Callable[[float], None],
    count: Callable[[Any, Any], None] | None = None,
) -> Callable[..., Any]:
    async def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return await method(*args, **kwargs)
        finally:
            observe(time.perf_counter() - start)

    async def counting(op: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            result = await method(op, *args, **kwargs)
        finally:
            observe(time.perf_counter() - start)
        if op.credits:
            count(op, result)  # type: ignore[misc]
        return result

    wrapper: Callable[..., Any] = timed if count is None else counting
    wrapper.__plangate_timed__ = True  # type: ignore[attr-defined]
    return wrapper


def _counted(method: Callable[..., Any], count: Callable[[Any, Any], None]) -> Callable[..., Any]:
    def counted(op: Any, *args: Any, **kwargs: Any) -> Any:
        result = method(op, *args, **kwargs)
        count(op, result)
        return result

    counted.__plangate_timed__ = True  # type: ignore[attr-defined]
    return counted


def _counted_async(
    method: Callable[..., Any], count: Callable[[Any, Any], None]
) -> Callable[..., Any]:
    async def counted(op: Any, *args: Any, **kwargs: Any) -> Any:
        result = await method(op, *args, **kwargs)
        count(op, result)
        return result

    counted.__plangate_timed__ = True  # type: ignore[attr-defined]
    return counted


class _App:
    """An ASGI app as an object (Starlette routes a function as a request handler)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def metrics_app() -> Any:
    """An ASGI app that serves the metrics: of this process, or of every worker of a
    gunicorn-style server when ``PROMETHEUS_MULTIPROC_DIR`` is set. Mount it with
    ``Route("/metrics", metrics_app())`` (a ``Mount`` redirects ``/metrics`` to
    ``/metrics/``)."""
    from prometheus_client import CollectorRegistry, make_asgi_app, multiprocess

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return _App(make_asgi_app(registry))
    return _App(make_asgi_app())
