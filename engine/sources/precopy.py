"""The precopy's two safeguards (SPEC §2 step 3): what step 3 may trust of the first pass.

A precopy copies an rsync source into its folder of the backup while the
services still run; step 3, in the snapshot window, copies only what changed
since. Two things of that first pass cannot be trusted by rsync's quick check
(size and mtime) or left where rsync would touch them:

- A file written again within the same timestamp tick after the precopy read
  it keeps its size and mtime (a database rewriting pages in place; NOTES
  pitfall 21). So every file whose mtime is not at least ``SAFE_AGE_S`` older
  than the precopy's start, by the source's own clock, is removed from the
  precopied folder before step 3 (``drop_recent``): step 3 then transfers it
  again, whatever the quick check would say.
- Step 3 never changes a file that it did not create: after a precopy that
  linked against an earlier backup, most of the folder's files are that
  backup's inodes, and rsync updates a file's mode, owner, ACLs and xattrs in
  place. Such a folder is set aside (``set_aside``) and step 3 copies into a
  fresh one, linking from it.
"""

from __future__ import annotations

import os
import stat
import time
from typing import TYPE_CHECKING

from ..remote import CONNECT_TIMEOUT_S
from .errors import SourceError

if TYPE_CHECKING:
    from collections.abc import Callable

    from .kind import Run, SourceConfig

# How much older than the precopy's start a file's mtime must be for the
# quick check to be trusted: far beyond any filesystem's timestamp tick (ext4's
# coarse clock, FAT's 2 s).
SAFE_AGE_S = 2.0
_CHECK_EVERY = 512
# Reading a host's clock is one short exchange.
_CLOCK_BOUND_S = CONNECT_TIMEOUT_S + 5


def aside_path(in_progress_dir: str, source: str) -> str:
    """Where a precopied folder waits, set aside, until the window is over.

    A dot: no source is named so, and nothing of the engine reads it as a backup.
    """
    return os.path.join(in_progress_dir, f".{source}.precopied")


async def source_clock(run: Run, source: SourceConfig) -> float:
    """The source's own clock now, in seconds since the epoch: the host's for a ``host`` source.

    File times there are written by that clock, so the precopy's start is read
    by it too. Raises SourceError (RemoteError when the host cannot be reached).
    """
    if source.host is None:
        return time.time()
    finished = await run.remotes[source.host].run("date +%s.%N", {}, stdout_lines=2,
                                                   bound_s=_CLOCK_BOUND_S)
    text = finished.stdout.text().strip()
    try:
        # A date without %N (busybox) prints it as it is: the whole seconds,
        # read down, only make the safe age longer.
        whole, _, fraction = text.partition(".")
        return float(whole) + (float(f"0.{fraction}") if fraction.isdigit() else 0.0)
    except ValueError:
        raise SourceError(f"cannot read the clock of host {source.host}: "
                          f"'date +%s.%N' printed {text[:80]!r}") from None


def drop_recent(folder: str, since: float, check: Callable[[], None]) -> int:
    """Unlink every file below ``folder`` whose mtime is not ``SAFE_AGE_S`` older than ``since``.

    Regular files only: a symbolic link's target is compared by rsync, and
    folders are not trusted anyway. Nothing is followed. Returns how many
    were unlinked; a ``folder`` that does not exist (the precopy failed
    early) holds none. ``check`` lands a cancel between entries.
    """
    limit = since - SAFE_AGE_S
    dropped = 0
    seen = 0
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            entries = list(os.scandir(current))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            seen += 1
            if seen % _CHECK_EVERY == 0:
                check()
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                pending.append(entry.path)
            elif stat.S_ISREG(st.st_mode) and st.st_mtime > limit:
                os.unlink(entry.path)
                dropped += 1
    return dropped


def set_aside(folder: str, aside: str) -> bool:
    """Rename the precopied ``folder`` to ``aside``; False if there is none (nothing copied)."""
    try:
        os.rename(folder, aside)
    except FileNotFoundError:
        return False
    return True
