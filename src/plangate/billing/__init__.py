"""Billing providers (SPEC §7): their webhooks drive customers' plans, add-ons and credits.

``Webhooks(gate)`` is the ASGI app (``POST /stripe``, ``POST /zuora``) that ``plangate
gateway`` serves under ``/webhooks``; ``UsageExport`` sends the usage of the store's hourly
aggregates to a ``Destination`` (``plangate usage export``); see docs/billing.md.
"""

from __future__ import annotations

from ._export import (
    Destination,
    ExportBusy,
    ExportInterrupted,
    ExportReport,
    JsonLines,
    PeriodicExport,
    StripeMeters,
    UsageEvent,
    UsageExport,
    ZuoraCsv,
    destination,
)
from ._subscriptions import given
from ._webhooks import MAX_BODY, Billing, Webhooks

__all__ = [
    "MAX_BODY",
    "Billing",
    "Destination",
    "ExportBusy",
    "ExportInterrupted",
    "ExportReport",
    "JsonLines",
    "PeriodicExport",
    "StripeMeters",
    "UsageEvent",
    "UsageExport",
    "Webhooks",
    "ZuoraCsv",
    "destination",
    "given",
]
