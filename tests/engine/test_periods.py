from __future__ import annotations

from datetime import datetime, timezone

import pytest

from plangate.engine import period_bounds

UTC = timezone.utc


def ts(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("period", "now", "start", "end"),
    [
        ("hour", ts(2026, 3, 10, 12, 30), ts(2026, 3, 10, 12), ts(2026, 3, 10, 13)),
        ("day", ts(2026, 3, 10, 12, 30), ts(2026, 3, 10), ts(2026, 3, 11)),
        ("week", ts(2026, 3, 12, 8), ts(2026, 3, 9), ts(2026, 3, 16)),  # Monday to Monday
        ("month", ts(2026, 3, 10, 12), ts(2026, 3, 1), ts(2026, 4, 1)),
        ("month", ts(2026, 12, 31, 23, 59), ts(2026, 12, 1), ts(2027, 1, 1)),
        ("year", ts(2026, 3, 10), ts(2026, 1, 1), ts(2027, 1, 1)),
    ],
)
def test_calendar_periods_default_to_utc_boundaries(period, now, start, end):
    assert period_bounds(period, now) == (start, end)


def test_month_turns_on_the_billing_anchor():
    anchor = datetime(2025, 11, 15, 9, 30, tzinfo=UTC)
    assert period_bounds("month", ts(2026, 3, 20), anchor) == (
        ts(2026, 3, 15, 9, 30),
        ts(2026, 4, 15, 9, 30),
    )
    assert period_bounds("month", ts(2026, 3, 15, 9, 29), anchor) == (
        ts(2026, 2, 15, 9, 30),
        ts(2026, 3, 15, 9, 30),
    )


def test_anchor_on_the_31st_uses_the_last_day_of_short_months():
    anchor = datetime(2026, 1, 31, tzinfo=UTC)
    assert period_bounds("month", ts(2026, 2, 28, 1), anchor) == (ts(2026, 2, 28), ts(2026, 3, 31))
    assert period_bounds("month", ts(2026, 4, 5), anchor) == (ts(2026, 3, 31), ts(2026, 4, 30))


def test_year_turns_on_the_anniversary_of_the_anchor():
    anchor = datetime(2024, 6, 15, tzinfo=UTC)
    assert period_bounds("year", ts(2026, 3, 1), anchor) == (ts(2025, 6, 15), ts(2026, 6, 15))
