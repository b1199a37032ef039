"""The views every front end serves, written once; ``apps.py`` translates them per framework.

A view sees a ``Seen`` (what it learns of its request) and answers a ``Reply`` (or raises).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

USAGE_HEADER = "X-Usage-Tokens"


@dataclass
class Seen:
    params: dict[str, str]
    query: list[tuple[str, str]]
    headers: list[tuple[str, str]]
    #: the decision's customer, as the framework hands it to views (None without one)
    customer: str | None


@dataclass
class Reply:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    stream: Iterator[bytes] | None = None


def ok(seen: Seen) -> Reply:
    """200: the customer and every X-Plangate-* request header the view saw."""
    plangate = {n.lower(): v for n, v in seen.headers if n.lower().startswith("x-plangate-")}
    body = {"customer": seen.customer, "plangate_headers": plangate}
    return Reply(headers=[("Content-Type", "application/json")], body=json.dumps(body).encode())


def fail(seen: Seen) -> Reply:
    raise RuntimeError("the view failed")


def usage(seen: Seen) -> Reply:
    """200 with one X-Usage-Tokens field per ``?value=``; none without."""
    values = [v for k, v in seen.query if k == "value"]
    return Reply(headers=[(USAGE_HEADER, v) for v in values], body=b"used")


def stream(seen: Seen) -> Reply:
    """A streamed 200 that used 42 tokens; ``?fail=1``: its body raises after the first chunk."""
    failing = ("fail", "1") in seen.query

    def chunks() -> Iterator[bytes]:
        yield b"first "
        if failing:
            raise RuntimeError("the stream failed")
        yield b"second "
        yield b"last"

    return Reply(headers=[(USAGE_HEADER, "42")], stream=chunks())


def status(seen: Seen) -> Reply:
    return Reply(status=int(seen.params["code"]), body=b"status")


#: (path template, view): the same URLs on every front
ROUTES: list[tuple[str, Callable[[Seen], Reply]]] = [
    ("/public", ok),
    ("/elsewhere", ok),
    ("/v1/ok", ok),
    ("/v1/reports", ok),
    ("/v1/raise", fail),
    ("/v1/usage", usage),
    ("/v1/stream", stream),
    ("/v1/status/{code}", status),
]
