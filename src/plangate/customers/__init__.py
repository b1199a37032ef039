"""Customer records: read through one in-process cache, written through to the store.

``CustomerStore`` (blocking) and ``AsyncCustomerStore`` (asyncio) have the same methods;
the gate keeps one as ``gate.customers`` and answers the engine's ``LoadCustomer`` from it.
"""

from __future__ import annotations

from ..engine import CustomerRecord
from ._store import AsyncCustomerStore, CustomerStore

__all__ = ["AsyncCustomerStore", "CustomerRecord", "CustomerStore"]
