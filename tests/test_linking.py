"""Unchanged files are hard-linked against the newest complete backup that holds the source.

Also: the destination and state_dir are left out of a source that contains
them, user excludes work, and the report counts the bytes a run wrote.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from conftest import needs_rsync, wait_for
from datakit import (
    cli_ok,
    complete_backups,
    listing,
    rsync_source,
    write_raw_config,
)

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Workspace

pytestmark = needs_rsync

NAME_FORMAT = "%Y-%m-%dt%H-%M-%S%z"


def ino(path: Path) -> int:
    return os.lstat(path).st_ino


def test_unchanged_files_share_inodes_changed_ones_do_not(ws: Workspace) -> None:
    a = ws.make_source("a", {"same.txt": "never changes\n", "edit.txt": "version 1\n"})
    ws.write_config(rsync_source("a", a))
    cli_ok(ws, "run")
    [first] = complete_backups(ws.dest)

    (a / "edit.txt").write_text("version 2, longer\n")
    os.utime(a / "edit.txt", (1_700_000_000, 1_700_000_000))
    c = ws.make_source("c", {"new.txt": "a source added later\n"})
    ws.write_config(rsync_source("a", a) + rsync_source("c", c))
    cli_ok(ws, "run")

    first_b, second = complete_backups(ws.dest)
    assert first_b == first
    one, two = ws.dest / first, ws.dest / second
    assert ino(one / "a" / "same.txt") == ino(two / "a" / "same.txt")
    assert os.lstat(two / "a" / "same.txt").st_nlink == 2
    assert ino(one / "a" / "edit.txt") != ino(two / "a" / "edit.txt")
    assert (one / "a" / "edit.txt").read_text() == "version 1\n"
    assert (two / "a" / "edit.txt").read_text() == "version 2, longer\n"
    # The new source had nothing to link against and was still copied.
    assert (two / "c" / "new.txt").read_text() == "a source added later\n"
    assert os.lstat(two / "c" / "new.txt").st_nlink == 1
    assert ws.report()["status"] == "ok"


def test_link_dest_is_the_newest_complete_backup_holding_the_source(ws: Workspace) -> None:
    a = ws.make_source("a", {"f": "a v1\n"})
    b = ws.make_source("b", {"f": "b only\n"})
    # Run 1 holds a and b.
    ws.write_config(rsync_source("a", a) + rsync_source("b", b))
    cli_ok(ws, "run")
    # Run 2 holds only a, with a changed file.
    (a / "f").write_text("a version 2, longer\n")
    os.utime(a / "f", (1_700_000_000, 1_700_000_000))
    ws.write_config(rsync_source("a", a))
    cli_ok(ws, "run")
    first, second = complete_backups(ws.dest)

    # Decoys that a careless "newest folder" pick would use: each holds a file
    # identical to b/f (same size and mtime) hard-linked to one we keep, so any
    # link against them shows as that inode in the new backup.
    keeper = ws.root / "keeper"
    keeper.write_bytes((b / "f").read_bytes())
    st = os.stat(b / "f")
    os.utime(keeper, ns=(st.st_atime_ns, st.st_mtime_ns))
    newest = datetime.strptime(second, NAME_FORMAT)
    stale_time = newest + timedelta(seconds=1)
    stale = stale_time.strftime(NAME_FORMAT) + ".in-progress"
    decoys = [stale, "lost+found", "notes", "zzz-other-tool"]
    for decoy in decoys:
        (ws.dest / decoy / "b").mkdir(parents=True)
        os.link(keeper, ws.dest / decoy / "b" / "f")
        os.link(keeper, ws.dest / decoy / "f")
    (ws.dest / "README-notes.txt").write_text("mine\n")
    foreign_before = {d: listing(ws.dest / d) for d in decoys[1:]}

    # Run 3 holds a and b again; it starts after the "crashed run" began.
    wait_for(lambda: datetime.now().astimezone() > stale_time, 3, "the clock to pass it")
    ws.write_config(rsync_source("a", a) + rsync_source("b", b))
    cli_ok(ws, "run")

    backups = complete_backups(ws.dest)
    assert backups[:2] == [first, second] and len(backups) == 3
    third = ws.dest / backups[2]
    # a links against run 2 (newest holding a), b against run 1 (run 2 lacks b).
    assert ino(third / "a" / "f") == ino(ws.dest / second / "a" / "f")
    assert ino(third / "a" / "f") != ino(ws.dest / first / "a" / "f")
    assert ino(third / "b" / "f") == ino(ws.dest / first / "b" / "f")
    assert ino(third / "b" / "f") != ino(keeper)
    # The stale in-progress folder of a "crashed run" is cleaned up, not used.
    assert not (ws.dest / stale).exists()
    # Foreign folders and files are never touched.
    for decoy in decoys[1:]:
        assert listing(ws.dest / decoy) == foreign_before[decoy], decoy
    assert (ws.dest / "README-notes.txt").read_text() == "mine\n"
    assert os.stat(keeper).st_nlink == 1 + 2 * len(decoys[1:])


def test_destination_and_state_inside_a_source_are_excluded(ws: Workspace) -> None:
    (ws.root / "src" / "keep.txt").write_text("keep\n")
    (ws.root / "src" / "junk.tmp").write_text("temporary\n")
    (ws.root / "src" / "cache").mkdir()
    (ws.root / "src" / "cache" / "blob").write_text("cached\n")
    (ws.root / "src" / "deep" / "cache").mkdir(parents=True)
    (ws.root / "src" / "deep" / "cache" / "blob").write_text("cached\n")
    (ws.root / "src" / "deep" / "cache.txt").write_text("not a folder named cache\n")
    (ws.root / "top.tmp").write_text("temporary\n")
    # The source is the parent of both the destination and state_dir.
    text = (
        f'destination = "{ws.dest}"\n'
        f'state_dir = "{ws.state}"\n'
        + rsync_source("everything", ws.root, exclude=["*.tmp", "cache/"])
    )
    write_raw_config(ws, text)

    cli_ok(ws, "run")
    cli_ok(ws, "run")  # the first backup and a report now exist under dest/ and state/

    latest = ws.dest / complete_backups(ws.dest)[-1] / "everything"
    assert (latest / "src" / "keep.txt").read_text() == "keep\n"
    assert (latest / "src" / "deep" / "cache.txt").exists()
    assert (latest / "config.toml").exists()
    for excluded in ("dest", "state"):
        inside = latest / excluded
        assert not inside.exists() or list(inside.iterdir()) == [], (
            f"{excluded}/ was backed up: {sorted(map(str, inside.rglob('*')))}"
        )
    assert not (latest / "src" / "junk.tmp").exists()
    assert not (latest / "top.tmp").exists()
    assert not (latest / "src" / "cache").exists()
    assert not (latest / "src" / "deep" / "cache").exists()


def test_report_bytes_count_what_the_run_wrote(ws: Workspace) -> None:
    size = 0
    src = ws.src / "data"
    src.mkdir()
    for i in range(8):
        blob = os.urandom(128 * 1024 + i)
        (src / f"blob{i}").write_bytes(blob)
        size += len(blob)
    ws.write_config(rsync_source("data", src))

    cli_ok(ws, "run")
    first = ws.report()["sources"]["data"]["bytes"]
    cli_ok(ws, "run")
    second = ws.report()["sources"]["data"]["bytes"]

    assert len(complete_backups(ws.dest)) == 2
    assert 0.9 * size <= first <= 1.2 * size + 64 * 1024, (first, size)
    assert 0 <= second <= 16 * 1024, second


def test_an_unchanged_second_run_links_every_file(ws: Workspace) -> None:
    src = ws.src / "data"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}").write_bytes(os.urandom(64 * 1024))
    ws.write_config(rsync_source("data", src))
    cli_ok(ws, "run")
    cli_ok(ws, "run")
    first, second = complete_backups(ws.dest)
    for i in range(20):
        assert ino(ws.dest / first / "data" / f"f{i}") == ino(ws.dest / second / "data" / f"f{i}")
