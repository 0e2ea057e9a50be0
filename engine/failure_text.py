"""What to tell the user about a failure: the most telling line of a child's output, and a hint.

A failing child often says what went wrong first and then what followed
from it: rsync's "No space left on device (28)" comes before the "Broken
pipe (32)" of its other half and the closing "rsync error: ... (code 11)";
mount's own message comes before its "dmesg(1) may have more information"
hint. The last line is the least telling one, so we pick the line that
names a root cause, and fall back to the last line that is not noise.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

# Lines that close a failure without saying what it was.
_CLOSING = re.compile(
    "|".join((
        r"^rsync error: ",                      # repeats the exit code
        r"^rsync warning: ",                    # its milder twin (code 24)
        r"dmesg(\(1\))? may have more information",
        r"^\[\d+ earlier lines cut\]$",         # the mark of a cut tail (processes.Tail)
    ))
)
# Where a child got to, not what went wrong: `btrfs receive` names each
# subvolume it starts on, before the error that ends it.
_CHATTER = re.compile(r"^At (subvol|snapshot) ")
# Lines that follow from a failure told elsewhere: better than a closing
# line, worse than anything else.
_FALLOUT = re.compile(
    r"^rsync: \[\w+\] write error: Broken pipe|^rsync: connection unexpectedly closed"
)

# Root causes, most telling first: what the destination or the system says
# about itself outranks what one file says.
CAUSES = (
    "No space left on device",
    "Disk quota exceeded",
    "Input/output error",
    "Read-only file system",
    "Structure needs cleaning",
    "Stale file handle",
    "Transport endpoint is not connected",
    "No such device",
    "Permission denied",
    "Operation not permitted",
    "No such file or directory",
    "Too many levels of symbolic links",
    "Connection refused",
    "Connection timed out",
    "No route to host",
    "Host key verification failed",
    "Could not resolve hostname",
)
_RANK = {cause.lower(): rank for rank, cause in enumerate(CAUSES)}
_CAUSE = re.compile("|".join(re.escape(c) for c in CAUSES), re.IGNORECASE)

_FULL = ("retention deletes old backups only after a successful backup, so a full "
         "destination stays full: run `pibackup-async prune` or tighten [retention]")
_HINTS = (
    (re.compile(r"No space left on device|Disk quota exceeded", re.IGNORECASE), _FULL),
    (re.compile(r"Read-only file system", re.IGNORECASE),
     "a filesystem that turns read-only after errors is failing: see the kernel log "
     "(dmesg) and check the disk"),
    (re.compile(r"special device \S+ does not exist|can't find (UUID|LABEL)=", re.IGNORECASE),
     "is the backup disk plugged in?"),
)
# Between a problem and its hint; one line, as the report's `failure` is.
HINT_SEPARATOR = " — "
# The longest failure line (its hint aside), read in a report or a mail on a
# phone; longer ones keep their start and their end, where the cause is.
FAILURE_CAP = 400
_FAILURE_HEAD = 120


def root_cause(text: str) -> str | None:
    """The most telling root-cause phrase in ``text`` (``"No space left on device"``), if any."""
    found = [m.group(0) for m in _CAUSE.finditer(text)]
    if not found:
        return None
    return min(found, key=lambda cause: _RANK[cause.lower()])


def telling_line(lines: Sequence[str]) -> str | None:
    """The most telling line of a failing child's output, stripped; None if it printed nothing.

    A line naming a root cause (``CAUSES``) wins, the most telling cause
    first and, among equals, the earliest (what follows is its fallout).
    Otherwise the last line of the child's own words; else the last line of
    fallout (a broken pipe); else the last closing line ("rsync error: …") or
    line of chatter ("At subvol …").
    """
    meaningful = [line.strip() for line in lines if line.strip()]
    if not meaningful:
        return None
    said = [line for line in meaningful
            if not _CLOSING.search(line) and not _CHATTER.search(line)]
    best: tuple[int, str] | None = None
    for line in said:
        cause = root_cause(line)
        if cause is not None and (best is None or _RANK[cause.lower()] < best[0]):
            best = (_RANK[cause.lower()], line)
    if best is not None:
        return best[1]
    own = [line for line in said if not _FALLOUT.search(line)]
    return (own or said or meaningful)[-1]


def hint_for(problem: str) -> str | None:
    """What the user can do about ``problem``, when we know; None otherwise.

    A full destination (ENOSPC, quota) gets the reminder that retention
    deletes only after a successful backup, and what to run instead.
    """
    for pattern, hint in _HINTS:
        if pattern.search(problem):
            return hint
    return None


def one_line(text: str) -> str:
    """``text`` on one line, as the report's ``failure`` is (SPEC §6).

    A message built around a child's whole output (``btrfs receive exited 1:
    At subvol vol`` and the lines after it) keeps its first line, which says
    who failed, and the most telling of the rest after `` … `` when that is
    another line.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else text.strip()
    telling = telling_line(lines)
    return lines[0] if telling in (None, lines[0]) else f"{lines[0]} … {telling}"


def shorten(line: str, cap: int = FAILURE_CAP) -> str:
    """``line`` cut in the middle to at most ``cap`` characters: its start says who failed,
    its end why (rsync names a path, then the error: ``opendir "/a/b/…/y/z" failed:
    Input/output error (5)``)."""
    if len(line) <= cap:
        return line
    tail = cap - _FAILURE_HEAD - 1
    return f"{line[:_FAILURE_HEAD]}…{line[-tail:]}"


def with_hint(problem: str) -> str:
    """``problem`` on one line (``one_line``) of at most FAILURE_CAP characters (``shorten``),
    followed by its hint when one applies and is not there yet (idempotent)."""
    # The hint is taken off first: a line already given one stays as it is.
    problem = one_line(without_hint(problem))
    hint = hint_for(problem)
    problem = shorten(problem)
    if hint is None or hint in problem:
        return problem
    return f"{problem}{HINT_SEPARATOR}{hint}"


def without_hint(text: str) -> str:
    """``text`` with a hint added by ``with_hint`` taken off again (for a short subject)."""
    for _, hint in _HINTS:
        text = text.replace(f"{HINT_SEPARATOR}{hint}", "")
    return text
