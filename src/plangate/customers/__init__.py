"""Customer records: read through one in-process cache, written through to the store, and
provisioned (shown, assigned, patched, listed, migrated) against the config; credit
balances granted, revoked and read (``grant_credits``, ``revoke_credits``, ``balance``,
``credits``, ``ledger``).

``CustomerStore`` (blocking) and ``AsyncCustomerStore`` (asyncio) have the same methods;
the gate keeps one as ``gate.customers`` and answers the engine's ``LoadCustomer`` from it.
"""

from __future__ import annotations

from ..engine import CustomerRecord
from ..errors import VersionConflict
from ._credits import GrantNotFound, IdempotencyConflict
from ._provisioning import CustomerNotFound, InvalidRecord, LegacyPlanRefused, merge_patch
from ._store import AsyncCustomerStore, CustomerStore

__all__ = [
    "AsyncCustomerStore",
    "CustomerNotFound",
    "CustomerRecord",
    "CustomerStore",
    "GrantNotFound",
    "IdempotencyConflict",
    "InvalidRecord",
    "LegacyPlanRefused",
    "VersionConflict",
    "merge_patch",
]
