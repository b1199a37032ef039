"""The admin API's errors as RFC 9457 problem details: its own types, beside the engine's."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from starlette.responses import Response

from ..engine import PROBLEM_BASE
from ..engine._problems import CONTENT_TYPE

TITLES = {
    "malformed-request": (400, "Malformed request"),
    "bad-signature": (400, "Bad signature"),
    "admin-token-required": (401, "Admin token required"),
    "webhook-unauthorized": (401, "Webhook unauthorized"),
    "not-found": (404, "Not found"),
    "customer-not-found": (404, "Customer not found"),
    "grant-not-found": (404, "Grant not found"),
    "method-not-allowed": (405, "Method not allowed"),
    "legacy-plan": (409, "Legacy plan"),
    "write-contention": (409, "Write contention"),
    "version-conflict": (412, "Version conflict"),
    "body-too-large": (413, "Body too large"),
    "unsupported-media-type": (415, "Unsupported media type"),
    "invalid-record": (422, "Invalid record"),
    "idempotency-conflict": (422, "Idempotency conflict"),
    "invalid-config": (422, "Invalid config"),
    "storage-unavailable": (503, "Storage unavailable"),
    "billing-provider-unavailable": (503, "Billing provider unavailable"),
}


class AdminError(Exception):
    """A request the admin API refuses: answered as the problem ``name``."""

    def __init__(
        self,
        name: str,
        detail: str,
        members: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.name = name
        self.detail = detail
        self.members = dict(members or {})
        self.headers = dict(headers or {})

    @property
    def status(self) -> int:
        return TITLES[self.name][0]

    def body(self) -> dict[str, Any]:
        status, title = TITLES[self.name]
        return {
            "type": PROBLEM_BASE + self.name,
            "title": title,
            "status": status,
            "detail": self.detail,
            **self.members,
        }

    def response(self) -> Response:
        return Response(
            json.dumps(self.body(), separators=(",", ":")),
            self.status,
            headers={"cache-control": "no-store", **self.headers},
            media_type=CONTENT_TYPE,
        )
