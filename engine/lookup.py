"""Which backup a command reads: a name, or ``latest`` (SPEC §7)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .destination import complete, holds, scan
from .errors import PibackupError
from .names import parse_name

if TYPE_CHECKING:
    from .destination import Destination

LATEST = "latest"


class UsageProblem(PibackupError):
    """A malformed argument (exit 2): a backup name that is not one, a refused path."""


class NotHeld(PibackupError):
    """The destination does not hold what was asked for (exit 1); the message says what does."""


def check_backup_arg(arg: str) -> None:
    """Raise UsageProblem unless ``arg`` is ``latest`` or has the form of a backup name."""
    if arg != LATEST and parse_name(arg) is None:
        raise UsageProblem(f"{arg!r} is not a backup name (like 2021-04-02t07-00-12+0200) "
                           "nor 'latest'")


def find_backup(destination: str, arg: str, source: str | None = None,
                inner: bytes | None = None) -> str:
    """The complete backup ``arg`` names (``latest``: the newest holding ``source`` and
    ``inner``, a path inside it). Raises NotHeld naming the newest backup that does hold
    them, if any; OSError if the destination cannot be read. Reads the disk: run it in
    a worker thread (``find`` is the same for async code)."""
    backups = [e.name for e in complete(scan(destination))]
    holding = [n for n in backups if holds(destination, n, source, inner)]
    return _choose(destination, arg, source, inner, backups, holding)


async def find(dest: Destination, arg: str, source: str | None = None,
               inner: bytes | None = None) -> str:
    """``find_backup`` through ``dest``: off the event loop, bounded."""
    backups = [e.name for e in complete(await dest.scan())]
    holding = await dest.holding(backups, source, inner)
    return _choose(dest.path, arg, source, inner, backups, holding)


def _choose(destination: str, arg: str, source: str | None, inner: bytes | None,
            backups: list[str], holding: list[str]) -> str:
    what = source if source is not None else "anything"
    if inner:
        what += "/" + os.fsdecode(inner)
    if arg == LATEST:
        if not backups:
            raise NotHeld(f"the destination {destination} holds no complete backup")
        if not holding:
            raise NotHeld(f"no complete backup holds {what}")
        return holding[0]
    if arg not in backups:
        raise NotHeld(f"the destination {destination} holds no complete backup {arg}")
    if arg not in holding:
        newest = f"; the newest backup that holds it is {holding[0]}" if holding else ""
        raise NotHeld(f"backup {arg} does not hold {what}{newest}")
    return arg
