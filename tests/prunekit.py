"""Helpers for the end-to-end tests of retention, `list` and `prune` (SPEC §3, §5).

The destinations here are fabricated: folders named as backups, each holding
one source folder with a small file, written straight into the workspace's
destination, next to things that are not ours (`lost+found`, notes, another
tool's folder, names that only look like backups).

The expectations are worked out by hand from SPEC §3 (restic's `forget`
walk, calendar fields in each name's own offset, "newest" by instant), never
by calling the engine's policy; the walk is written next to each table.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import stat
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from pathlib import Path

    from conftest import Workspace

SOURCE = "data"

NEWEST, LAST, DAILY, WEEKLY = "newest", "keep_last", "keep_daily", "keep_weekly"
MONTHLY, YEARLY, ALL = "keep_monthly", "keep_yearly", "keep_all"

# --- the fabricated history ------------------------------------------------------------

# 62 backups over 400 days (2024-09-29 .. 2025-11-02), irregular, in the
# offsets of a Central European clock: +0200 in summer, +0100 in winter.
# Newest instant first. Three pairs are there to catch shortcuts:
# - 2025-10-26 (end of summer time): 02-10+0100 is 01:10 UTC, 02-30+0200 is
#   00:30 UTC: the smaller name is the newer backup.
# - 2025-01-01t00-30-00+0100 is 2024-12-31 23:30 UTC: its calendar year (read
#   in its own offset) is 2025, so 2024's newest is 2024-12-31t23-30-00+0100.
# - 2025-09-01t00-30-00+0200 is 2025-08-31 22:30 UTC: it is September's.
HISTORY = [
    "2025-11-02t03-00-00+0100",  # Sun, ISO 2025-W44
    "2025-11-01t21-15-00+0100",
    "2025-11-01t03-00-00+0100",
    "2025-10-31t03-00-00+0100",
    "2025-10-30t12-00-00+0100",
    "2025-10-29t03-00-00+0100",
    "2025-10-28t03-00-00+0100",
    "2025-10-27t03-00-00+0100",  # Mon, W44
    "2025-10-26t02-10-00+0100",  # Sun, W43, 01:10 UTC
    "2025-10-26t02-30-00+0200",  # Sun, W43, 00:30 UTC: older than the one above
    "2025-10-25t03-00-00+0200",
    "2025-10-22t03-00-00+0200",
    "2025-10-19t03-00-00+0200",  # Sun, W42
    "2025-10-15t03-00-00+0200",  # W42
    "2025-10-12t03-00-00+0200",  # Sun, W41
    "2025-10-05t03-00-00+0200",  # Sun, W40
    "2025-10-01t03-00-00+0200",
    "2025-09-28t03-00-00+0200",
    "2025-09-21t03-00-00+0200",
    "2025-09-14t03-00-00+0200",
    "2025-09-07t03-00-00+0200",
    "2025-09-01t00-30-00+0200",  # 2025-08-31 22:30 UTC
    "2025-08-31t03-00-00+0200",
    "2025-08-24t03-00-00+0200",
    "2025-08-17t03-00-00+0200",
    "2025-08-03t03-00-00+0200",
    "2025-07-27t03-00-00+0200",
    "2025-07-13t03-00-00+0200",
    "2025-07-06t03-00-00+0200",
    "2025-06-29t03-00-00+0200",
    "2025-06-15t03-00-00+0200",
    "2025-06-08t03-00-00+0200",
    "2025-05-31t23-30-00+0200",
    "2025-05-18t03-00-00+0200",
    "2025-05-11t03-00-00+0200",
    "2025-04-27t03-00-00+0200",
    "2025-04-13t03-00-00+0200",
    "2025-04-06t03-00-00+0200",
    "2025-03-30t03-00-00+0200",  # start of summer time: 01:00 UTC
    "2025-03-30t01-30-00+0100",  # 00:30 UTC
    "2025-03-16t03-00-00+0100",
    "2025-03-02t03-00-00+0100",
    "2025-02-23t03-00-00+0100",
    "2025-02-09t03-00-00+0100",
    "2025-02-02t03-00-00+0100",
    "2025-01-26t03-00-00+0100",
    "2025-01-05t03-00-00+0100",
    "2025-01-01t00-30-00+0100",  # 2024-12-31 23:30 UTC, calendar year 2025
    "2024-12-31t23-30-00+0100",  # 22:30 UTC
    "2024-12-22t03-00-00+0100",
    "2024-12-08t03-00-00+0100",
    "2024-12-01t03-00-00+0100",
    "2024-11-24t03-00-00+0100",
    "2024-11-17t03-00-00+0100",
    "2024-11-10t03-00-00+0100",
    "2024-11-03t03-00-00+0100",
    "2024-10-27t02-10-00+0100",
    "2024-10-27t02-30-00+0200",
    "2024-10-20t03-00-00+0200",
    "2024-10-13t03-00-00+0200",
    "2024-10-06t03-00-00+0200",
    "2024-09-29t03-00-00+0200",
]

# A crashed run's leftover, newer than every backup.
STALE_IN_PROGRESS = "2025-11-02t04-00-00+0100.in-progress"

RULES_PRUNE = {"keep_last": 3, "keep_daily": 7, "keep_weekly": 4, "keep_monthly": 6,
               "keep_yearly": 2}

# The walk for RULES_PRUNE over HISTORY, newest first:
# keep_last 3:    11-02t03, 11-01t21-15, 11-01t03.
# keep_daily 7:   days 11-02 (t03), 11-01 (t21-15), 10-31, 10-30, 10-29, 10-28, 10-27.
# keep_weekly 4:  W44 11-02t03; W43 10-26t02-10+0100 (the newest instant of
#                 W43, not the greatest name); W42 10-19; W41 10-12.
# keep_monthly 6: 2025-11 11-02t03; 2025-10 10-31; 2025-09 09-28; 2025-08 08-31
#                 (09-01t00-30+0200 is September's); 2025-07 07-27; 2025-06 06-29.
# keep_yearly 2:  2025 11-02t03; 2024 12-31t23-30 (01-01t00-30+0100 is 2025's).
EXPECTED_PRUNE_KEPT = {
    "2025-11-02t03-00-00+0100": [NEWEST, LAST, DAILY, WEEKLY, MONTHLY, YEARLY],
    "2025-11-01t21-15-00+0100": [LAST, DAILY],
    "2025-11-01t03-00-00+0100": [LAST],
    "2025-10-31t03-00-00+0100": [DAILY, MONTHLY],
    "2025-10-30t12-00-00+0100": [DAILY],
    "2025-10-29t03-00-00+0100": [DAILY],
    "2025-10-28t03-00-00+0100": [DAILY],
    "2025-10-27t03-00-00+0100": [DAILY],
    "2025-10-26t02-10-00+0100": [WEEKLY],
    "2025-10-19t03-00-00+0200": [WEEKLY],
    "2025-10-12t03-00-00+0200": [WEEKLY],
    "2025-09-28t03-00-00+0200": [MONTHLY],
    "2025-08-31t03-00-00+0200": [MONTHLY],
    "2025-07-27t03-00-00+0200": [MONTHLY],
    "2025-06-29t03-00-00+0200": [MONTHLY],
    "2024-12-31t23-30-00+0100": [YEARLY],
}
EXPECTED_PRUNE_DELETED = [n for n in HISTORY if n not in EXPECTED_PRUNE_KEPT]

RULES_RUN = {"keep_last": 3, "keep_monthly": 4, "keep_yearly": 2}

# The run's clock (UTC): within 30 days of HISTORY's newest, else N would be a clock
# jump and retention would pause (SPEC §3); alone in its month, not in its year.
RUN_CLOCK = "2025-12-01 12:00:00"

# The walk for RULES_RUN once a backup N is made at RUN_CLOCK:
# keep_last 3:    N, 11-02t03, 11-01t21-15.
# keep_monthly 4: 2025-12 N; 2025-11 11-02t03; 2025-10 10-31; 2025-09 09-28.
# keep_yearly 2:  2025 N; 2024 12-31t23-30 (01-01t00-30+0100 is 2025's).
# N itself is the newest: [newest, keep_last, keep_monthly, keep_yearly].
EXPECTED_RUN_KEPT_OLD = {
    "2025-11-02t03-00-00+0100": [LAST, MONTHLY],
    "2025-11-01t21-15-00+0100": [LAST],
    "2025-10-31t03-00-00+0100": [MONTHLY],
    "2025-09-28t03-00-00+0200": [MONTHLY],
    "2024-12-31t23-30-00+0100": [YEARLY],
}
EXPECTED_RUN_NEW_RULES = [NEWEST, LAST, MONTHLY, YEARLY]
EXPECTED_RUN_DELETED = [n for n in HISTORY if n not in EXPECTED_RUN_KEPT_OLD]

# Things in the destination that are not ours, with what each one is.
FOREIGN_DIRS = [
    "lost+found",
    "other-tool",
    "2025-13-45t99-00-00+0200",      # the shape of a name, but no such date
    "2025-01-01t00-00-00+0100.bak",  # a backup name plus a suffix that is not ours
]
FOREIGN_FILES = [
    "notes.txt",
    "2025-02-16t03-00-00+0100",      # a file, not a folder, with a backup name
]
FOREIGN = FOREIGN_DIRS + FOREIGN_FILES


# --- fabricating a destination -----------------------------------------------------------


def make_backup(dest: Path, folder: str, *, files: int = 1) -> Path:
    """A backup folder ``folder`` with one source folder holding ``files`` small files."""
    source = dest / folder / SOURCE
    source.mkdir(parents=True)
    for i in range(files):
        (source / f"file{i}.txt").write_text(f"{folder} {i}\n")
    return dest / folder


def make_big_backup(dest: Path, folder: str, files: int = 20_000) -> Path:
    """A backup with ``files`` entries, in folders of 1,000, so removing it takes a while.

    The entries are hard links to one file, as rsync's ``--link-dest`` makes
    them: removing each is still one unlink, but making them allocates no
    inode, which keeps the set-up fast on a busy disk.
    """
    source = dest / folder / SOURCE
    first = source / "d000" / "f00000"
    for i in range(files):
        sub = source / f"d{i // 1000:03d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True)
        if i == 0:
            first.write_text(f"{folder}\n")
        else:
            os.link(first, sub / f"f{i:05d}")
    return dest / folder


def make_foreign(dest: Path) -> None:
    for name in FOREIGN_DIRS:
        (dest / name).mkdir()
        (dest / name / "keep-me").write_text(f"not a backup: {name}\n")
    for name in FOREIGN_FILES:
        (dest / name).write_text(f"not a backup: {name}\n")


def fabricate(dest: Path, names: Iterable[str] = HISTORY, *, foreign: bool = True,
              stale: bool = True) -> None:
    for name in names:
        make_backup(dest, name)
    if foreign:
        make_foreign(dest)
    if stale:
        make_backup(dest, STALE_IN_PROGRESS)


def tree(path: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under ``path`` (itself included): (mode, mtime_ns, size), by relative path."""
    found = {}
    for root, dirs, files in os.walk(path):
        for entry in [".", *dirs, *files] if root == str(path) else [*dirs, *files]:
            full = os.path.join(root, entry)
            st = os.lstat(full)
            size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
            found[os.path.relpath(full, path)] = (st.st_mode, st.st_mtime_ns, size)
    return found


def subtree(snapshot: dict[str, tuple[int, int, int]], top: str
            ) -> dict[str, tuple[int, int, int]]:
    """The entries of a ``tree`` snapshot at or under the top-level entry ``top``."""
    return {k: v for k, v in snapshot.items() if k == top or k.startswith(top + "/")}


# --- configuration ---------------------------------------------------------------------------


def retention_table(rules: dict[str, int]) -> str:
    return "[retention]\n" + "".join(f"{k} = {v}\n" for k, v in rules.items())


def event_hooks(ws: Workspace, names: Iterable[str] = ("b1", "b2")) -> str:
    """Backup hooks that log `<hook>.<phase> <status or -> <entries in the destination>`."""
    blocks = []
    for name in names:
        count = f'$(ls -A "{ws.dest}" | wc -l)'
        blocks.append(
            f'[[backup_hooks]]\nname = "{name}"\n'
            f"pre = 'echo \"{name}.pre - {count}\" >> \"{ws.events}\"'\n"
            f"post = 'echo \"{name}.post $PIBACKUP_STATUS {count}\" >> \"{ws.events}\"'\n"
        )
    return "\n".join(blocks)


def rsync_source(path: Path | str) -> str:
    return f'[[sources]]\nname = "{SOURCE}"\ntype = "rsync"\npath = "{path}"\n'


# --- running -----------------------------------------------------------------------------------

# libfaketime (Debian: faketime): a command, and every child it starts, reads a clock
# set by the test.
FAKETIME = next(iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))), None)
needs_faketime = pytest.mark.skipif(FAKETIME is None,
                                    reason="libfaketime is not installed (Debian: faketime)")


def clock_at(moment: str) -> dict[str, str]:
    """The environment of a command whose clock starts at ``moment`` ("YYYY-MM-DD hh:mm:ss"),
    in UTC, and runs on from there."""
    assert FAKETIME is not None
    return {"LD_PRELOAD": FAKETIME, "FAKETIME": f"@{moment}", "TZ": "UTC",
            "FAKETIME_DONT_RESET": "1"}


def clock_ahead(offset: str) -> dict[str, str]:
    """The environment of a command whose clock is ``offset`` ("+10y") ahead of this one's."""
    assert FAKETIME is not None
    return {"LD_PRELOAD": FAKETIME, "FAKETIME": offset, "FAKETIME_DONT_RESET": "1"}



@contextmanager
def holding_lock(ws: Workspace) -> Iterator[Path]:
    """Hold the flock on the default lock file (`<state_dir>/lock`) in this process."""
    ws.state.mkdir(exist_ok=True)
    lock = ws.state / "lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield lock
    finally:
        os.close(fd)


def list_json(ws: Workspace) -> list[dict[str, Any]]:
    result = ws.run("list", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    return rows


def complete_backups(ws: Workspace) -> set[str]:
    """Folders of the destination named exactly as one of HISTORY (or any fabricated name)."""
    return {p.name for p in ws.dest.iterdir() if p.is_dir() and p.name in set(HISTORY)}

