"""Commits from gateway access logs: JSON lines over UDP (syslog or raw), or a followed file.

Each line is turned into a commit record ``{"reservation", "status", "usage"?, "headers"?}``
by ``normalize_record``, which reads plangate's own format (nginx's ``log_format``), Caddy's
JSON access log and Traefik's JSON access log.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from ._bodies import BadRequest, load_json

logger = logging.getLogger("plangate.gateway")

RESERVATION_HEADER = "X-Plangate-Reservation"
_DENIALS = (401, 402, 403, 429)
_CHUNK = 1 << 20  # bytes read from a followed log at a time


def normalize_record(entry: Any) -> dict[str, Any] | None:
    """A commit record from one access-log entry, or None if it concerns no reservation."""
    if not isinstance(entry, dict):
        return None
    if "reservation" in entry:  # plangate's own format
        record = {k: entry[k] for k in ("reservation", "status", "usage", "headers") if k in entry}
        if isinstance(record.get("headers"), dict):  # nginx logs absent headers as ""
            record["headers"] = {k: v for k, v in record["headers"].items() if v not in ("", "-")}
        return record if record.get("reservation") not in ("", "-", None) else None
    request = entry.get("request")
    if isinstance(request, dict) and "resp_headers" in entry:  # Caddy
        reservation = _first(_header(request.get("headers"), RESERVATION_HEADER))
        if not reservation:
            return None
        response = entry.get("resp_headers") or {}
        headers = {name: _first(value) for name, value in response.items()}
        return {"reservation": reservation, "status": entry.get("status"), "headers": headers}
    if "DownstreamStatus" in entry:  # Traefik
        reservation = entry.get(f"request_{RESERVATION_HEADER}")
        if not reservation:
            return None
        if not entry.get("OriginStatus") and entry["DownstreamStatus"] in _DENIALS:
            # Refused before the upstream (ForwardAuth): the request's reservation header,
            # if any, did not come from plangate.
            return None
        headers = {
            name.removeprefix("downstream_"): value
            for name, value in entry.items()
            if name.startswith("downstream_") and isinstance(value, str)
        }
        status = entry.get("OriginStatus") or entry.get("DownstreamStatus")
        return {"reservation": reservation, "status": status, "headers": headers}
    return None


def _header(headers: Any, name: str) -> Any:
    if not isinstance(headers, dict):
        return None
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    return None


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value else value


def _entries(text: str) -> list[Any]:
    """The JSON objects in a datagram or a log chunk: one per line, after any syslog prefix."""
    entries = []
    for line in text.splitlines():
        start = line.find("{")
        if start < 0:
            continue
        try:
            entries.append(load_json(line[start:]))
        except BadRequest as exc:
            logger.warning("access log line refused (%s): %.200s", exc.detail, line)
    return entries


class Settles(Protocol):
    """What commits go to: the gateway service."""

    async def settle(self, record: Any) -> tuple[str, str]: ...


class LogCommitter(asyncio.DatagramProtocol):
    """Settles every reservation an access-log line reports (UDP datagrams, or fed lines)."""

    def __init__(self, service: Settles) -> None:
        self.service = service
        self._tasks: set[asyncio.Task[None]] = set()

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.feed(data.decode("utf-8", errors="replace"))

    def feed(self, text: str) -> None:
        for entry in _entries(text):
            record = normalize_record(entry)
            if record is not None:
                task = asyncio.create_task(self._settle(record))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _settle(self, record: dict[str, Any]) -> None:
        try:
            outcome, detail = await self.service.settle(record)
        except Exception:
            logger.exception("commit from the access log failed: %r", record)
            return
        if outcome == "invalid":
            logger.warning("access log record not usable (%s): %r", detail, record)

    async def drain(self) -> None:
        """Wait until every commit received so far is done (for tests and shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks))


async def follow_file(
    path: str,
    committer: LogCommitter,
    poll: float = 0.2,
    *,
    from_start: bool = False,
    opened: asyncio.Event | None = None,
) -> None:
    """Commit from a JSON access-log file as it grows, like ``tail -F``.

    Starts at the end of the file (what was logged before plangate started was settled by
    then, or its estimate stands). On rotation, the rest of the old file is read before the
    new one is followed from its start.
    """
    import os

    file = None
    buffer = ""
    at_start = not from_start  # a file there before plangate started: from its end
    try:
        while True:
            if file is None:
                try:
                    file = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
                except FileNotFoundError:
                    at_start = False  # a file that appears later is new: read all of it
                    await asyncio.sleep(poll)
                    continue
                if at_start:
                    file.seek(0, os.SEEK_END)
                at_start = False
                if opened is not None:
                    opened.set()
            while chunk := file.read(_CHUNK):
                buffer += chunk
                complete, _, buffer = buffer.rpartition("\n")
                if complete:
                    committer.feed(complete)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            followed = os.fstat(file.fileno())
            if (
                current is None
                or current.st_ino != followed.st_ino
                or current.st_size < file.tell()
            ):
                # rotated (or truncated): the old file was read to its end above
                file.close()
                file = None
                if current is not None:
                    file = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
                    buffer = ""
                    continue
            await asyncio.sleep(poll)
    finally:
        if file is not None:
            file.close()
