"""What ``list`` shows: every backup of the destination, its state and what keeps it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from .destination import complete, destination_problem, scan
from .errors import DestinationUnavailable
from .pruning import decide, held_by

if TYPE_CHECKING:
    from .config import Config


class Listed(msgspec.Struct, frozen=True):
    name: str
    state: str
    time: str
    kept_by: list[str]


def list_backups(config: Config) -> list[Listed]:
    """The destination's backups, newest first, each with the retention rules that keep it.

    What keeps a backup is what ``prune`` would decide now (``last_of_source``, and
    ``paused`` after a clock jump, included). A complete backup with an empty
    ``kept_by`` goes at the next prune; in-progress
    and deleting entries never have rules; symbolic links are not listed.
    Raises DestinationUnavailable, with one line naming the destination and
    why, when it is not visible (missing; not mounted while
    ``require_mountpoint`` is set; unreadable): "no backups" is never the
    answer for a disk that is not there.
    """
    problem = destination_problem(config)
    if problem is not None:
        raise DestinationUnavailable(problem)
    try:
        entries = [e for e in scan(config.destination) if not e.link]
        done = complete(entries)
        holders = held_by(config.destination, done, [s.name for s in config.sources])
    except OSError as e:
        raise DestinationUnavailable(
            f"destination {config.destination} cannot be read: {e.strerror}") from e
    plan = decide([e.name for e in done], config.retention, holders=holders)
    return [
        Listed(
            name=e.name,
            state=e.state,
            time=e.time.isoformat(),
            kept_by=list(plan.kept.get(e.name, [])) if e.state == "complete" else [],
        )
        for e in entries
    ]
