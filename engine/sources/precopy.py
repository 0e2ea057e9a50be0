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
  fresh one.

How step 3 uses the folder set aside, once the precopy finished: as rsync's
``--compare-dest`` (``compare_options``). A file identical to its precopied
copy — by the quick check, and by mode, owner, group, ACLs and xattrs
(rsync's ``unchanged_attrs``; an attribute-only difference makes rsync copy
the precopied file locally into the fresh folder, a new inode) — is not
created at all: the window costs the scan and what changed since the
precopy, nothing per unchanged file. rsync's log (``-ii``: every name it
saw, unchanged ones included) tells which names it left out, and once the
window is over ``link_skipped`` hard-links each from the precopied copy,
which is exactly the file step 3 compared (the folder set aside is the
only basis, and nothing writes into it meanwhile). Measured against the
alternative, a second ``--link-dest`` to the folder set aside: that links
every unchanged file inside the window, as much as a run without precopy
(benchmarks/RESULTS.md, "Precopy"). Only one basis: with the previous
backup as a second ``--compare-dest``, a file matching there rather than
in the precopied copy could not be told apart in rsync's log (it does not
name the basis), and rsync refuses ``--compare-dest`` beside
``--link-dest``. A precopy that did not finish leaves the old way
(``--link-dest`` to both): what it never reached is still linked against
the previous backup.
"""

from __future__ import annotations

import os
import re
import stat
import time
from typing import TYPE_CHECKING

from ..pathtext import rsync_unescape
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


# What step 3 logs of each name it saw (rsync's --log-file-format): the
# itemized change and the name, escaped (\\#ooo for a byte it does not print).
LOG_FORMAT = "%i %n"
# The log file's own prefix, "2026/01/31 03:00:00 [1234] ", then a name left
# out as unchanged: "." (no update), its type (file, link, device,
# special), the 9 attribute columns (blank: identical).
_SKIPPED = re.compile(rb"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[\d+\] \.[fLDS].{9} (.+)$")
_TOTAL = re.compile(rb"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[\d+\] Number of files: ([\d,.]+)")


def listing_path(in_progress_dir: str, source: str) -> str:
    """Where step 3's rsync logs every name it saw, until ``link_skipped`` has read it."""
    return os.path.join(in_progress_dir, f".{source}.seen")


def compare_options(aside: str, listing: str) -> list[str]:
    """Step 3's own options after a finished precopy: compare with its copy, log every name."""
    # --no-inc-recursive: with incremental recursion, rsync's --compare-dest and -H
    # hang or stop with "protocol incompatibility" when a hard-linked group is partly
    # unchanged (RsyncProject/rsync#126; seen with rsync 3.5.0 here).
    return [f"--compare-dest={aside}", "--no-inc-recursive", "-ii", f"--log-file={listing}",
            f"--log-file-format={LOG_FORMAT}"]


def skipped_names(listing: str) -> tuple[list[bytes], int | None]:
    """The names (relative, as bytes) step 3 left out as identical to the precopied copy,
    and how many entries its file list held (``--stats``' "Number of files"), if it says."""
    names: list[bytes] = []
    total = None
    with open(listing, "rb") as f:
        for line in f:
            found = _SKIPPED.match(line.rstrip(b"\n"))
            if found is not None:
                names.append(rsync_unescape(found.group(1)))
                continue
            counted = _TOTAL.match(line)
            if counted is not None:
                total = int(re.sub(rb"[,.]", b"", counted.group(1)))
    return names, total


def saw_all(folder: str, skipped: list[bytes], total: int | None,
            check: Callable[[], None]) -> bool:
    """Whether the names in ``folder`` and those step 3 left out are every entry it listed.

    rsync's ``--compare-dest`` with ``-H`` may leave out a name without a
    word (a new hard link to files the precopied copy holds unchanged; see
    also RsyncProject/rsync#126): counted here, in the window, so that step 3
    can still copy it. Walks ``folder``, which holds only what step 3 created.
    """
    if total is None:
        return False
    seen = set(skipped)
    seen.add(b".")
    top = os.fsencode(folder)
    pending = [b""]
    while pending:
        rel = pending.pop()
        check()
        with os.scandir(os.path.join(top, rel) if rel else top) as entries:
            for entry in entries:
                name = os.path.join(rel, entry.name) if rel else entry.name
                seen.add(name)
                if entry.is_dir(follow_symlinks=False):
                    pending.append(name)
    return len(seen) == total


def link_skipped(skipped: list[bytes], aside: str, folder: str,
                 check: Callable[[], None]) -> int:
    """Hard-link into ``folder`` every name step 3 left out (``skipped``), from the precopied
    ``aside``; return how many were linked.

    A name ``folder`` already holds is step 3's own (a hard link it made to a
    file it copied): left alone. Each folder's times are put back as step 3
    left them (a link changes its folder's mtime). What they take on disk is
    counted with the rest of the copy by the manifest's walk. Raises OSError
    if a name cannot be linked.
    """
    count = 0
    times: dict[bytes, tuple[int, int]] = {}
    base, top = os.fsencode(aside), os.fsencode(folder)
    for rel in skipped:
        count += 1
        if count % _CHECK_EVERY == 0:
            check()
        source, target = os.path.join(base, rel), os.path.join(top, rel)
        parent = os.path.dirname(target)
        if parent not in times:
            st = os.lstat(parent)
            times[parent] = (st.st_atime_ns, st.st_mtime_ns)
        try:
            os.link(source, target, follow_symlinks=False)
        except FileExistsError:
            count -= 1
    for parent, (atime, mtime) in times.items():
        os.utime(parent, ns=(atime, mtime), follow_symlinks=False)
    return count


def set_aside(folder: str, aside: str) -> bool:
    """Rename the precopied ``folder`` to ``aside``; False if there is none (nothing copied)."""
    try:
        os.rename(folder, aside)
    except FileNotFoundError:
        return False
    return True
