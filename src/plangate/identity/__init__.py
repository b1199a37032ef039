"""Who is calling: a verified JWT becomes an ``Identity`` (customer, plan claim, claims)."""

from __future__ import annotations

from ._jwt import Identity, TokenVerifier
from ._source import TokenSource

__all__ = ["Identity", "TokenSource", "TokenVerifier"]
