"""JWT verification with PyJWT, and a bounded cache of tokens already verified."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from ..config._models import JwtConfig
from ..errors import AuthenticationError, KeysUnavailableError

logger = logging.getLogger("plangate.identity")

_MAX_CUSTOMER_ID = 256
_CACHE_TTL_CAP = 3600.0  # a cached token is verified again at least this often


@dataclass(frozen=True, slots=True)
class Identity:
    """The caller, from a verified token: customer id, plan claim (if any) and every claim."""

    customer: str
    plan: str | None
    claims: Mapping[str, Any]


def _claim(claims: Mapping[str, Any], dotted: str) -> Any:
    value: Any = claims
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


class TokenVerifier:
    """Verifies tokens against one key source and turns them into identities.

    A verified token is kept (up to ``cache_size`` of them, until its ``exp``) so that a
    repeated token costs a dict lookup instead of a signature check.
    """

    def __init__(
        self,
        config: JwtConfig,
        *,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._algorithms = list(config.algorithms)
        self._clock = clock
        self._cache: dict[str, tuple[Identity, float]] = {}
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()  # threaded WSGI servers share one verifier
        self._jwks: jwt.PyJWKClient | None = None
        self._key: Any = None
        if config.secret is not None:
            self._key = config.secret
        elif config.public_key is not None:
            pem = config.public_key
            self._key = Path(pem[5:]).read_text() if pem.startswith("file:") else pem
        else:
            assert config.jwks_url is not None
            self._jwks = jwt.PyJWKClient(
                config.jwks_url, cache_keys=True, lifespan=int(config.jwks_cache_seconds), timeout=2
            )
        self._options: Any = {"require": list(config.required_claims)}
        if config.audience is None:
            self._options["verify_aud"] = False

    @property
    def fetches_keys(self) -> bool:
        """Whether verifying a new token may wait on the network (a JWKS fetch)."""
        return self._jwks is not None

    def cached(self, token: str | None) -> Identity | None:
        """The identity of a token verified before and not expired since; no cryptography."""
        if not token:
            return None
        hit = self._cache.get(token)
        if hit is not None and self._clock() < hit[1]:
            return hit[0]
        return None

    def verify(self, token: str | None) -> Identity:
        """The identity in ``token``.

        Raises ``AuthenticationError`` if it is missing or not valid, ``KeysUnavailableError``
        if the JWKS endpoint could not be reached to verify it.
        """
        if not token:
            raise AuthenticationError("a bearer token is required", token_given=False)
        now = self._clock()
        hit = self._cache.get(token)
        if hit is not None and now < hit[1]:
            return hit[0]
        if len(token) > self._config.max_token_bytes:
            raise AuthenticationError("the token is too large", token_given=True)
        claims = self._decode(token)
        identity = self._identity(claims)
        self._remember(token, identity, claims, now)
        return identity

    def _decode(self, token: str) -> dict[str, Any]:
        c = self._config
        try:
            key = self._key
            if self._jwks is not None:
                key = self._jwks.get_signing_key_from_jwt(token).key
        except jwt.PyJWKClientConnectionError as exc:
            # Not the client's fault: PyJWT keeps the last key set for jwks_cache_seconds and
            # lets an unknown kid force at most one fetch per cooldown.
            logger.warning("JWKS endpoint unreachable: %s", exc)
            raise KeysUnavailableError("the token's signing keys could not be fetched") from exc
        except jwt.PyJWKClientError:
            raise AuthenticationError(
                "the token's key id is not one of the issuer's keys", token_given=True
            ) from None
        except Exception as exc:  # malformed input must never become a 500
            logger.debug("token refused: %r", exc)
            raise AuthenticationError("the token is malformed", token_given=True) from None
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=self._algorithms,
                audience=c.audience,
                issuer=c.issuer,
                leeway=c.leeway,
                options=self._options,
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("the token has expired", token_given=True) from None
        except jwt.ImmatureSignatureError:
            raise AuthenticationError("the token is not valid yet", token_given=True) from None
        except jwt.InvalidAudienceError:
            raise AuthenticationError(
                "the token is for another audience", token_given=True
            ) from None
        except jwt.InvalidIssuerError:
            raise AuthenticationError(
                "the token is from another issuer", token_given=True
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            detail = f"the token has no {exc.claim!r} claim"
            raise AuthenticationError(detail, token_given=True) from None
        except jwt.InvalidAlgorithmError:
            detail = f"the token's algorithm is not one of {', '.join(self._algorithms)}"
            raise AuthenticationError(detail, token_given=True) from None
        except jwt.InvalidSignatureError:
            raise AuthenticationError(
                "the token's signature is not valid", token_given=True
            ) from None
        except Exception as exc:  # malformed input must never become a 500
            logger.debug("token refused: %r", exc)
            raise AuthenticationError("the token is malformed", token_given=True) from None
        if not isinstance(claims, dict):  # pragma: no cover - PyJWT always returns a dict
            raise AuthenticationError("the token is malformed", token_given=True)
        return claims

    def _identity(self, claims: dict[str, Any]) -> Identity:
        c = self._config
        customer = _claim(claims, c.customer_claim)
        if isinstance(customer, int) and not isinstance(customer, bool):
            customer = str(customer)
        if (
            not isinstance(customer, str)
            or not customer.strip()  # "" or only whitespace: nobody in particular
            or len(customer) > _MAX_CUSTOMER_ID
            or not customer.isprintable()
        ):
            detail = f"the token has no usable {c.customer_claim!r} claim"
            raise AuthenticationError(detail, token_given=True)
        plan = _claim(claims, c.plan_claim) if c.plan_claim else None
        return Identity(customer, plan if isinstance(plan, str) else None, claims)

    def _remember(self, token: str, identity: Identity, claims: dict[str, Any], now: float) -> None:
        until = now + _CACHE_TTL_CAP
        exp = claims.get("exp")
        if isinstance(exp, (int, float)):
            until = min(until, exp + self._config.leeway)
        with self._cache_lock:
            if len(self._cache) >= self._cache_size:
                self._cache.pop(next(iter(self._cache)), None)  # the oldest entry
            self._cache[token] = (identity, until)
