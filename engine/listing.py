"""What ``list`` shows: every backup of the destination, its state and what keeps it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from .destination import complete, scan
from .retention import plan_retention

if TYPE_CHECKING:
    from .config import Config


class Listed(msgspec.Struct, frozen=True):
    name: str
    state: str
    time: str
    kept_by: list[str]


def list_backups(config: Config) -> list[Listed]:
    """The destination's backups, newest first, each with the retention rules that keep it.

    A complete backup with an empty ``kept_by`` goes at the next prune; in-progress
    and deleting entries never have rules. Raises OSError if the destination
    cannot be read (not mounted, say).
    """
    entries = scan(config.destination)
    plan = plan_retention([e.name for e in complete(entries)], config.retention)
    return [
        Listed(
            name=e.name,
            state=e.state,
            time=e.time.isoformat(),
            kept_by=list(plan.kept.get(e.name, [])) if e.state == "complete" else [],
        )
        for e in entries
    ]
