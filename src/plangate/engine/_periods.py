"""Calendar periods in UTC; ``month`` and ``year`` turn on the customer's billing anchor."""

from __future__ import annotations

import calendar
from datetime import datetime, timezone

UTC = timezone.utc
EPOCH_ANCHOR = datetime(1970, 1, 1, tzinfo=UTC)  # the 1st of the month, midnight UTC


def _on(year: int, month: int, anchor: datetime) -> datetime:
    """The anchor's day and time in the given month; the 31st becomes the month's last day."""
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return anchor.replace(year=year, month=month, day=day)


def _add_months(year: int, month: int, count: int) -> tuple[int, int]:
    total = year * 12 + (month - 1) + count
    return total // 12, total % 12 + 1


def period_bounds(period: str, now: float, anchor: datetime | None = None) -> tuple[float, float]:
    """Start and end (epoch seconds) of the ``period`` that contains ``now``."""
    if period == "hour":
        start = now - now % 3600
        return start, start + 3600
    if period == "day":
        start = now - now % 86400
        return start, start + 86400
    if period == "week":  # ISO weeks: Monday 00:00 UTC; 1970-01-01 was a Thursday
        start = now - (now + 3 * 86400) % 604800
        return start, start + 604800
    anchor = (anchor or EPOCH_ANCHOR).astimezone(UTC)
    moment = datetime.fromtimestamp(now, UTC)
    step = 1 if period == "month" else 12
    if period == "month":
        year, month = moment.year, moment.month
    elif period == "year":
        year, month = moment.year, anchor.month
    else:
        raise ValueError(f"unknown period {period!r}")
    begins = _on(year, month, anchor)
    if begins > moment:
        year, month = _add_months(year, month, -step)
        begins = _on(year, month, anchor)
    ends = _on(*_add_months(year, month, step), anchor)
    return begins.timestamp(), ends.timestamp()


def period_seconds(period: str, now: float, anchor: datetime | None = None) -> float:
    start, end = period_bounds(period, now, anchor)
    return end - start


__all__ = ["EPOCH_ANCHOR", "period_bounds", "period_seconds"]
