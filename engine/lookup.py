"""Which backup a command reads: a name, or ``latest`` (SPEC §7)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .destination import complete, holds, link_on_the_way, scan
from .errors import PibackupError
from .names import parse_name
from .pathtext import show_path

if TYPE_CHECKING:
    from .destination import Destination

LATEST = "latest"


class UsageProblem(PibackupError):
    """A malformed argument (exit 2): a backup name that is not one, a refused path."""


class LinkOnTheWay(UsageProblem):
    """A symbolic link stands on the way to the PATH asked for (exit 2, SPEC §7)."""


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
    suspects = _suspects(arg, source, inner, backups, holding)
    if suspects:
        _refuse_link(link_on_the_way(destination, suspects, source or "", inner or b""),
                     source, inner)
    return _choose(destination, arg, source, inner, backups, holding)


async def find(dest: Destination, arg: str, source: str | None = None,
               inner: bytes | None = None) -> str:
    """``find_backup`` through ``dest``: off the event loop, bounded."""
    backups = [e.name for e in complete(await dest.scan())]
    holding = await dest.holding(backups, source, inner)
    suspects = _suspects(arg, source, inner, backups, holding)
    if suspects:
        _refuse_link(await dest.link_on_the_way(suspects, source or "", inner or b""),
                     source, inner)
    return _choose(dest.path, arg, source, inner, backups, holding)


def _suspects(arg: str, source: str | None, inner: bytes | None, backups: list[str],
              holding: list[str]) -> list[str]:
    """Backups to search for a link on the way to ``inner``: the one named, if it does not
    hold it; for ``latest``, all of them when none holds it (the newest link is named).
    A link in one backup while an older one holds the path leaves ``latest`` to that one."""
    if source is None or not inner:
        return []
    if arg == LATEST:
        return [] if holding else backups
    return [arg] if arg in backups and arg not in holding else []


def _refuse_link(found: tuple[str, bytes] | None, source: str | None,
                 inner: bytes | None) -> None:
    if found is None:
        return
    backup, link = found
    raise LinkOnTheWay(
        f"{show_path(link)} in backup {backup} is a symbolic link: {source}/"
        f"{show_path(inner or b'')} is not looked up through it (nothing outside the "
        "backup is restored as if it came from it); refused")


def _choose(destination: str, arg: str, source: str | None, inner: bytes | None,
            backups: list[str], holding: list[str]) -> str:
    what = source if source is not None else "anything"
    if inner:
        what += "/" + show_path(inner)
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
