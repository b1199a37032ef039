from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..errors import AuthenticationError

#: what reading a request's token gives: the token, none, or why it cannot be told
TokenRead = str | None | AuthenticationError


class TokenSource:
    """Where the token is: ``header:Authorization`` (a Bearer token), another header, a cookie."""

    __slots__ = ("_bearer", "_cookie", "_parse_cookie", "header", "header_bytes")

    def __init__(self, spec: str = "header:Authorization") -> None:
        kind, _, name = spec.partition(":")
        self._cookie = name if kind == "cookie" else None
        self._parse_cookie: Callable[[str], Any] | None = None
        if self._cookie is not None:
            from werkzeug.http import parse_cookie  # only configs that read cookies need it

            self._parse_cookie = parse_cookie
        #: the lower-case request header to read
        self.header = "cookie" if kind == "cookie" else name.lower()
        #: the same, as an ASGI header name
        self.header_bytes = self.header.encode("latin-1")
        self._bearer = self.header == "authorization"

    def read(self, values: Sequence[str]) -> TokenRead:
        """The token in a request's fields of ``header`` (every one of them, in order).

        A token header sent twice, or the token cookie set twice (in one ``Cookie`` header or
        across several), is an ``AuthenticationError``: frameworks disagree on which one wins
        (Starlette and Django take the last cookie, werkzeug the first), so a request that
        could be read as two customers is read as none.
        """
        if not values:
            return None
        if self._parse_cookie is not None and self._cookie is not None:
            found = [v for value in values for v in self._parse_cookie(value).getlist(self._cookie)]
            if len(found) > 1:
                return AuthenticationError(
                    f"the {self._cookie} cookie is sent more than once", token_given=True
                )
            return found[0] or None if found else None
        if len(values) > 1:
            return AuthenticationError(
                f"the {self.header} header is sent more than once", token_given=True
            )
        return self.extract(values[0])

    def extract(self, value: str | None) -> str | None:
        """The token in the header's value, or None."""
        if not value:
            return None
        if self._parse_cookie is not None and self._cookie is not None:
            return self._parse_cookie(value).get(self._cookie) or None
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer":
            return token.strip() or None
        return None if self._bearer else value.strip()
