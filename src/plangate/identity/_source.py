from __future__ import annotations

from collections.abc import Callable


class TokenSource:
    """Where the token is: ``header:Authorization`` (a Bearer token), another header, a cookie."""

    __slots__ = ("_bearer", "_cookie", "_parse_cookie", "header")

    def __init__(self, spec: str = "header:Authorization") -> None:
        kind, _, name = spec.partition(":")
        self._cookie = name if kind == "cookie" else None
        self._parse_cookie: Callable[[str], dict[str, str]] | None = None
        if self._cookie is not None:
            from werkzeug.http import parse_cookie  # only configs that read cookies need it

            self._parse_cookie = parse_cookie
        #: the lower-case request header to read
        self.header = "cookie" if kind == "cookie" else name.lower()
        self._bearer = self.header == "authorization"

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
