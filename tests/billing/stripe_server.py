"""A local stand-in for Stripe's API that records what the official ``stripe`` client sends
(``billing.stripe.api_base`` points at it): real HTTP on a free loopback port."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

#: (method, path, query) -> (status, JSON body), or (status, JSON body, headers)
Answer = Callable[[str, str, dict[str, list[str]]], tuple[Any, ...]]


def meter_event(form: dict[str, list[str]]) -> dict[str, Any]:
    """What Stripe answers a meter event it took: the event, from the form it was sent."""
    return {
        "object": "billing.meter_event",
        "created": 1800000000,
        "event_name": form["event_name"][0],
        "identifier": form["identifier"][0],
        "livemode": False,
        "payload": {
            "stripe_customer_id": form["payload[stripe_customer_id]"][0],
            "value": form["payload[value]"][0],
        },
        "timestamp": int(form["timestamp"][0]),
    }


def line_items(*items: tuple[str, int]) -> dict[str, Any]:
    """A Checkout session's line items as Stripe lists them: each (price id, quantity)."""
    data = [
        {
            "id": f"li_test_{n}",
            "object": "item",
            "amount_total": 1000 * quantity,
            "currency": "usd",
            "description": "AI credits",
            "price": {"id": price, "object": "price", "lookup_key": None, "unit_amount": 1000},
            "quantity": quantity,
        }
        for n, (price, quantity) in enumerate(items)
    ]
    return {
        "object": "list",
        "data": data,
        "has_more": False,
        "url": "/v1/checkout/sessions/x/line_items",
    }


class Recorded:
    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[dict[str, Any]] = []
        self.url = ""


@contextmanager
def stripe_api(answer: Answer) -> Iterator[Recorded]:
    recorded = Recorded(answer)

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length).decode() if length else ""
            query = parse_qs(parts.query)
            recorded.requests.append(
                {
                    "method": self.command,
                    "path": parts.path,
                    "query": query,
                    "form": parse_qs(body),
                    "authorization": self.headers.get("authorization"),
                    "idempotency_key": self.headers.get("idempotency-key"),
                }
            )
            status, payload, *headers = recorded.answer(self.command, parts.path, query)
            data = json.dumps(payload).encode()
            self.send_response(status)
            for name, value in (headers[0] if headers else {}).items():
                self.send_header(name, value)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve

        def log_message(self, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # a client that went away (killed) before its answer: nothing to report

    server = Server(("127.0.0.1", 0), Handler)
    recorded.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield recorded
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
