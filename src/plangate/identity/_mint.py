"""Tokens signed with the config's own HS secret: for development and tests only."""

from __future__ import annotations

import time
from typing import Any

import jwt

from ..config._models import JwtConfig


def mint_token(
    settings: JwtConfig, customer: str, plan: str | None = None, ttl: float = 3600
) -> str:
    """A token that ``settings`` (``identity.jwt``) accepts, for ``customer`` and ``plan``.

    ``ValueError`` if there is no secret to sign with, or a ``plan`` but no ``plan_claim``.
    """
    if settings.secret is None:
        raise ValueError(
            "the config verifies tokens with a public key; it has no secret to sign with"
        )
    now = int(time.time())
    claims: dict[str, Any] = {"iat": now, "exp": now + int(ttl)}
    _put(claims, settings.customer_claim, customer)
    if plan is not None:
        if settings.plan_claim is None:
            raise ValueError("a plan claim needs identity.jwt.plan_claim in the config")
        _put(claims, settings.plan_claim, plan)
    if settings.issuer:
        claims["iss"] = settings.issuer
    if settings.audience:
        claims["aud"] = settings.audience
    return jwt.encode(claims, settings.secret, algorithm=settings.algorithms[0])


def _put(claims: dict[str, Any], dotted: str, value: str) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        claims = claims.setdefault(part, {})
    claims[last] = value
