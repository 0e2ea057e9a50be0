"""Which backup a command reads: a name, or ``latest`` (SPEC §7)."""

from __future__ import annotations

import os

from .destination import complete, scan
from .errors import PibackupError
from .names import parse_name

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


def _holds(destination: str, name: str, source: str | None, inner: bytes | None) -> bool:
    if source is None:
        return True
    path = os.path.join(os.fsencode(destination), name.encode(), source.encode())
    if inner:
        path = os.path.join(path, inner)
    return os.path.lexists(path) and (inner is not None or os.path.isdir(path))


def find_backup(destination: str, arg: str, source: str | None = None,
                inner: bytes | None = None) -> str:
    """The complete backup ``arg`` names (``latest``: the newest holding ``source`` and
    ``inner``, a path inside it). Raises NotHeld naming the newest backup that does hold
    them, if any; OSError if the destination cannot be read. Reads the disk: call it off
    the event loop where a signal must be heard."""
    backups = [e.name for e in complete(scan(destination))]
    holding = [n for n in backups if _holds(destination, n, source, inner)]
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
