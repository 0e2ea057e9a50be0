"""Durations as the configuration writes them: ``"90s"``, ``"10m"``, ``"1h30m"``, ``"2w"``."""

from __future__ import annotations

import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"(\d+)([smhdw])")
_WHOLE = re.compile(r"(?:\d+[smhdw])+")

DURATION_HINT = 'a duration such as "90s", "10m", "36h", "14d", "2w" or "1h30m"'


def parse_duration(text: str) -> float:
    """Return the duration in seconds; raise ValueError naming what was expected.

    Months and years are refused on purpose: their length varies, and
    retention has ``keep_monthly`` / ``keep_yearly`` for calendar rules.
    """
    if not _WHOLE.fullmatch(text):
        raise ValueError(f"expected {DURATION_HINT}, got {text!r}")
    return float(sum(int(n) * _UNITS[unit] for n, unit in _PART.findall(text)))


def format_duration(seconds: float) -> str:
    """Render seconds compactly for people: ``3m12s``, ``1h05m``, ``0.4s``."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
