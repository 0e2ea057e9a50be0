"""Sizes as people read them: the mail, the summary, live progress, ``du`` and ``verify``."""

from __future__ import annotations


def human_bytes(n: int) -> str:
    """``512 B``, ``1.5 KiB``, ``120 MiB``, ``3.4 GiB`` (binary units)."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
