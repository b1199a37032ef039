"""Helpers for testing your own app behind plangate: tokens for made-up customers.

``token(config, "acme", plan="pro")`` signs a token with the config's own HS secret, so the
app's real identity check accepts it; ``bearer(...)`` gives the header to send. To switch
enforcement off instead, load the config with ``PLANGATE_MODE=shadow`` (every rule decides
and logs, none refuses).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .config import Config, load_config
from .identity import mint_token

__all__ = ["bearer", "token"]


def token(
    config: str | os.PathLike[str] | Mapping[str, Any] | Config,
    customer: str,
    plan: str | None = None,
    *,
    ttl: float = 3600,
) -> str:
    """A token for ``customer`` (and a ``plan`` claim) that ``config`` accepts.

    Needs an HS* ``secret`` in ``identity.jwt`` — in tests, give the test config a secret of
    its own (``secret: ${PLANGATE_JWT_SECRET:-test-secret-…}``).
    """
    return mint_token(load_config(config).model.identity.jwt, customer, plan, ttl)


def bearer(
    config: str | os.PathLike[str] | Mapping[str, Any] | Config,
    customer: str,
    plan: str | None = None,
) -> dict[str, str]:
    """``{"Authorization": "Bearer …"}`` for ``customer``, to pass as a request's headers."""
    return {"Authorization": f"Bearer {token(config, customer, plan)}"}
