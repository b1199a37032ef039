"""Prometheus metrics (the ``metrics`` extra: ``pip install 'plangate[metrics]'``).

``instrument(gate)`` counts a gate's decisions and times its storage calls into a
``prometheus_client`` registry (the default one unless given); ``plangate gateway`` does it
for its own gate and serves ``/metrics``. An app serves them by mounting
``prometheus_client.make_asgi_app()`` (or ``make_wsgi_app()``); under gunicorn with
``PROMETHEUS_MULTIPROC_DIR`` set, ``metrics_app()`` answers for every worker. No metric has
a customer label: their number would grow with the customers. See docs/operations.md.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from ._gate import _Gate
    from .engine import Decision

#: seconds: a storage call takes about a millisecond on a LAN; the request path's timeout
#: is 50 ms by default
STORAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
#: the operations timed (the storage's methods a request runs)
TIMED = ("reserve", "settle", "peek", "record", "get_customer")


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
        self.gates: weakref.WeakSet[Any] = weakref.WeakSet()
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


def _breaker_open(storage: Any) -> float:
    breaker = getattr(storage, "breaker", None)
    return 1.0 if breaker is not None and breaker.state == "open" else 0.0


def _pending(storage: Any) -> float:
    return float(getattr(storage, "pending", 0) or 0)


_BY_REGISTRY: dict[int, Metrics] = {}


def metrics_for(registry: CollectorRegistry | None = None) -> Metrics:
    """The one ``Metrics`` of a registry (a metric is registered once per registry)."""
    from prometheus_client import REGISTRY

    registry = REGISTRY if registry is None else registry
    found = _BY_REGISTRY.get(id(registry))
    if found is None or found.registry is not registry:
        found = _BY_REGISTRY[id(registry)] = Metrics(registry)
    return found


def instrument(gate: _Gate, registry: CollectorRegistry | None = None) -> Metrics:
    """Count ``gate``'s decisions and time its storage calls; the metrics it feeds."""
    metrics = metrics_for(registry)
    if gate not in metrics.gates:
        metrics.gates.add(gate)
        gate.observers.append(metrics.observe)
        _time_storage(gate.storage, metrics)
        gate.customers.on_hit = metrics.cache.labels("hit").inc
        gate.customers.on_miss = metrics.cache.labels("miss").inc
    return metrics


def _time_storage(storage: Any, metrics: Metrics) -> None:
    """Wrap the storage's request-path methods (on this instance) to time them. An async
    method the store does not define itself (``Storage``'s calls the blocking one) is not
    wrapped: its call would be timed twice."""
    from .storage import Storage

    for name in TIMED:
        for method_name, is_async in ((name, False), (f"a{name}", True)):
            method = getattr(storage, method_name, None)
            if method is None or getattr(method, "__plangate_timed__", False):
                continue
            inherited = getattr(Storage, method_name, None)
            if is_async and getattr(type(storage), method_name, None) is inherited:
                continue
            observe = metrics.storage.labels(name).observe
            setattr(
                storage,
                method_name,
                _timed_async(method, observe) if is_async else _timed(method, observe),
            )


def _timed(method: Callable[..., Any], observe: Callable[[float], None]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            observe(time.perf_counter() - start)

    timed.__plangate_timed__ = True  # type: ignore[attr-defined]
    return timed


def _timed_async(
    method: Callable[..., Any], observe: Callable[[float], None]
) -> Callable[..., Any]:
    async def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return await method(*args, **kwargs)
        finally:
            observe(time.perf_counter() - start)

    timed.__plangate_timed__ = True  # type: ignore[attr-defined]
    return timed


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
