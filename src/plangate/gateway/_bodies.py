"""What the service reads from a request: bounded in size, JSON bounded in depth.

Every body the service reads goes through ``read_json`` (or ``read_body``): the size is
checked against ``Content-Length`` before anything is read and again while reading, so a body
past the limit is never held in memory (413); JSON is refused past a nesting depth before the
parser sees it (``json`` recurses once per level: 100 000 ``[`` would end in a
``RecursionError``). Anything malformed is a ``BadRequest`` saying why, never a 500.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.requests import ClientDisconnect, Request

#: bytes of a body the service reads (a commit record is a few hundred)
MAX_BODY = 64 * 1024
#: levels of JSON nesting (a commit record has two)
MAX_DEPTH = 32

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


class BadRequest(Exception):
    """A request the service cannot read: ``status`` 400 or 413, ``detail`` says why."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    """The request's body, at most ``limit`` bytes; past it, ``BadRequest(413)``."""
    too_large = BadRequest(413, f"the body is larger than {limit} bytes")
    declared = request.headers.get("content-length")
    if declared is not None:  # refused before a byte is read
        declared = declared.strip()
        if not (declared.isascii() and declared.isdigit()):
            raise BadRequest(400, "Content-Length is not a number")
        digits = declared.lstrip("0")
        if len(digits) > len(str(limit)) or int(digits or "0") > limit:
            raise too_large
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large  # the rest is never read
            chunks.append(chunk)
    except ClientDisconnect:
        raise BadRequest(400, "the client went away before the body ended") from None
    return b"".join(chunks)


def nesting(text: str) -> int:
    """How deeply the JSON in ``text`` nests arrays and objects (brackets in strings aside)."""
    depth = deepest = 0
    for bracket in _BRACKET.findall(_STRING.sub("", text)):
        if bracket in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def load_json(data: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON value in ``data`` (UTF-8), nested at most ``max_depth`` levels."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError:
        raise BadRequest(400, "the body is not UTF-8") from None
    if nesting(text) > max_depth:
        raise BadRequest(400, f"the JSON nests deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise BadRequest(400, "the body is not JSON") from None


async def read_json(request: Request, limit: int = MAX_BODY, max_depth: int = MAX_DEPTH) -> Any:
    """The request's body as JSON: ``read_body`` then ``load_json``."""
    return load_json(await read_body(request, limit), max_depth)
