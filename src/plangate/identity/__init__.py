"""Who is calling: a verified JWT becomes an ``Identity`` (customer, plan claim, claims)."""

from __future__ import annotations

from ..errors import AuthenticationError, KeysUnavailableError
from ._jwt import Identity, TokenVerifier
from ._mint import mint_token
from ._source import TokenRead, TokenSource

#: what identifying a request gives: the caller, or why there is none
IdentityResult = Identity | AuthenticationError | KeysUnavailableError

__all__ = ["Identity", "IdentityResult", "TokenRead", "TokenSource", "TokenVerifier", "mint_token"]
