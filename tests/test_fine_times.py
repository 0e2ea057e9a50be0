"""rsync's quick check at the destination's own precision (``--modify-window=-1``).

rsync compares mtimes in whole seconds by default: a file rewritten with the
same size within the second in which the previous backup copied it was
linked to its old content by the next run (found with the mirror's test
bench: its origin backed up ``edit.txt`` rewritten between two runs a second
apart, and the second backup held the first version). Where the destination
keeps sub-second times the engine has rsync compare nanoseconds; where it
truncates them, it must not, or no file would ever be linked again.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import pytest
from conftest import needs_root, needs_rsync
from datakit import cli_ok, rsync_source
from diskkit import ext4_filesystems, needs_loop

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from conftest import Workspace
    from diskkit import Ext4

pytestmark = needs_rsync

HOOK = '[[snapshot_hooks]]\nname = "db"\npre = "true"\npost = "true"\n'


@pytest.fixture
def ext4_fs(tmp_path: Path) -> Iterator[Callable[..., Ext4]]:
    yield from ext4_filesystems(tmp_path)


def ino(path: Path) -> int:
    return os.lstat(path).st_ino


def _backups(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir() if p.name != "lost+found")


def _an_hour_ago() -> int:
    """An mtime in nanoseconds an hour back, 0.123456789 s into its second (a fraction a
    coarse filesystem would not keep: the engine looks for one)."""
    past = time.time_ns() - 3600 * 10**9
    return past - past % 10**9 + 123_456_789


@pytest.mark.parametrize("precopy", [False, True], ids=["without precopy", "with precopy"])
def test_a_same_size_rewrite_within_the_second_of_the_copy_is_not_linked(
        ws: Workspace, precopy: bool) -> None:
    data = ws.make_source("data", {"state.txt": "version 0\n", "same.txt": "never changes\n"})
    first_ns = _an_hour_ago()
    for name in ("state.txt", "same.txt"):
        # In the past: a file changed within 2 s of a precopy goes again in step 3.
        os.utime(data / name, ns=(first_ns, first_ns))
    ws.write_config(rsync_source("data", data) + (HOOK if precopy else ""))
    cli_ok(ws, "run")
    # Rewritten within the same second as the copy's mtime, with the same size: what
    # rsync's default quick check takes for unchanged.
    (data / "state.txt").write_text("version 1\n")
    os.utime(data / "state.txt", ns=(first_ns + 1000, first_ns + 1000))

    cli_ok(ws, "run")

    first, second = (ws.dest / name / "data" for name in _backups(ws.dest))
    assert (second / "state.txt").read_bytes() == b"version 1\n"
    assert ino(second / "state.txt") != ino(first / "state.txt")
    assert (first / "state.txt").read_bytes() == b"version 0\n"
    assert ino(second / "same.txt") == ino(first / "same.txt")


def test_the_dry_run_shows_the_fine_comparison(ws: Workspace) -> None:
    data = ws.make_source("data")
    ws.write_config(rsync_source("data", data))
    first = ws.run("run", "--dry-run")
    assert first.returncode == 0, first.stderr
    assert "--modify-window" not in first.stdout  # nothing to compare with yet
    cli_ok(ws, "run")
    again = ws.run("run", "--dry-run")
    assert again.returncode == 0, again.stderr
    assert "--modify-window=-1" in again.stdout


@needs_root
@needs_loop
def test_on_a_destination_that_keeps_whole_seconds_unchanged_files_are_still_linked(
        ws: Workspace, ext4_fs: Callable[..., Ext4]) -> None:
    """ext4 with 128-byte inodes keeps no fraction of a second: compared to the
    nanosecond, every file would differ from its copy every night."""
    ext4_fs(ws.dest, 16, mkfs_options=("-I", "128"))
    data = ws.make_source("data", {f"f{i}.txt": f"{i}\n" for i in range(20)})
    ws.write_config(rsync_source("data", data))
    cli_ok(ws, "run")
    cli_ok(ws, "run")

    first, second = (ws.dest / name / "data" for name in _backups(ws.dest))
    assert os.lstat(first / "f0.txt").st_mtime_ns % 10**9 == 0  # whole seconds here
    assert [ino(second / f"f{i}.txt") for i in range(20)] == [
        ino(first / f"f{i}.txt") for i in range(20)]
