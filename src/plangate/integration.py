"""What a front end of plangate is built from: for the adapters shipped in ``adapters/`` and
for anyone writing one for another framework (docs: "Writing an adapter").

A front end translates its framework's request and response into an ``Exchange`` and lets a
gate decide and settle it::

    exchange = Exchange(method, path)
    loaded = gate.loaded                           # the config of the whole request
    token = loaded.token_source.read(values)       # the values of its token_source.header
    answer = begin(gate, exchange, token, loaded)  # await abegin(...) with an AsyncGate
    if answer is not None:
        ...                                        # send answer.status/.headers/.body
    headers = exchange.response_started(status, headers) + exchange.quota_headers()
    exchange.body_sent()                           # the last byte is leaving
    exchange.finished(raised=..., cut=...)         # the app returned, raised, or lost its client
    settle(gate, exchange)                         # await asettle(...)

A changed config is swapped in whole (``Gate.reload``); reading ``gate.loaded`` once per
request keeps a request on one config from start to end. Call ``gate.start()`` when the app
starts (config reloads are followed from then) and ``gate.stop()`` when it stops.

Requirements declared on views (``Requirement``) are decided with ``Pending(gate,
exchange).require(requirement)`` and settled with the request.
"""

from __future__ import annotations

from ._exchange import (
    ENTITLEMENTS_PATH,
    Answer,
    Exchange,
    Settlement,
    encoded,
    is_preflight,
    json_answer,
    problem_answer,
    route_path,
    take_usage,
)
from ._gate import AsyncGate, Clock, Gate
from ._lifecycle import (
    PENDING_KEY,
    Pending,
    abegin,
    asettle,
    astream_settling,
    begin,
    settle,
    stream_settling,
)
from ._reload import Loaded, ReloadOutcome
from ._requirements import Requirement

__all__ = [
    "ENTITLEMENTS_PATH",
    "PENDING_KEY",
    "Answer",
    "AsyncGate",
    "Clock",
    "Exchange",
    "Gate",
    "Loaded",
    "Pending",
    "ReloadOutcome",
    "Requirement",
    "Settlement",
    "abegin",
    "asettle",
    "astream_settling",
    "begin",
    "encoded",
    "is_preflight",
    "json_answer",
    "problem_answer",
    "route_path",
    "settle",
    "stream_settling",
    "take_usage",
]
