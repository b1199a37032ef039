from __future__ import annotations

import re

_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

PERIODS = ("hour", "day", "week", "month", "year")


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``30s``, ``5m``, ``1h``, ``1d`` or ``1w``."""
    match = _DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None or int(match.group(1)) == 0:
        raise ValueError(
            f"invalid duration {text!r}: use a whole number above 0 followed by "
            "ms, s, m, h, d or w, such as 30s, 1d or 1w"
        )
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
