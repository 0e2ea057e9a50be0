"""A source that is not there is a failure, not an empty backup (SPEC §2 Failures, §4).

The issue's reproduction: a source path that is a mount point, its disk not
mounted. rsync copies the empty folder, the run says ok, and retention then
deletes the only backups that held the files. Here the disk is a real
loop-mounted ext4 and every run goes through the CLI.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest
from conftest import needs_root, needs_rsync
from datakit import cli_ok, complete_backups, rsync_source
from diskkit import ext4_filesystems, needs_loop

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from conftest import Workspace
    from diskkit import Ext4
    from sshkit import Sshd

pytestmark = needs_rsync

EMPTY = 'is empty, its last backup holds 20 files: is its disk mounted?'
KEEP_3 = "[retention]\nkeep_last = 3\n"


@pytest.fixture
def ext4_fs(tmp_path: Path) -> Iterator[Callable[..., Ext4]]:
    yield from ext4_filesystems(tmp_path)


def twenty_files(folder: Path) -> None:
    for i in range(20):
        sub = folder / f"d{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i}.txt").write_text(f"file {i}\n")


def failed_run(ws: Workspace) -> tuple[str, dict[str, object]]:
    result = ws.run("run")
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    report = ws.report()
    assert report["status"] == "failed" and report["saved"] is False, report
    return result.stderr, report


@needs_root
@needs_loop
def test_an_unmounted_source_disk_fails_every_run_and_retention_deletes_nothing(
        ws: Workspace, ext4_fs: Callable[..., Ext4]) -> None:
    disk = ext4_fs(ws.src / "disk")
    twenty_files(disk.mount)
    ws.write_config(rsync_source("data", disk.mount) + KEEP_3)
    cli_ok(ws, "run")
    [first] = complete_backups(ws.dest)
    disk.unmount()
    assert os.listdir(disk.mount) == []

    for _ in range(3):
        stderr, report = failed_run(ws)
        failure = str(report["failure"])
        assert 'source "data"' in failure and EMPTY in failure, failure
        assert EMPTY in stderr

    assert complete_backups(ws.dest) == [first]
    assert len(list((ws.dest / first / "data").rglob("*.txt"))) == 20

    # Mounted again, the run goes on as before.
    disk.mount_now()
    cli_ok(ws, "run")
    assert len(complete_backups(ws.dest)) == 2


def test_allow_empty_lets_a_source_become_empty(ws: Workspace) -> None:
    src = ws.src / "data"
    src.mkdir()
    twenty_files(src)
    ws.write_config(rsync_source("data", src))
    cli_ok(ws, "run")
    for entry in list(src.iterdir()):
        for child in entry.iterdir():
            child.unlink()
        entry.rmdir()

    _, report = failed_run(ws)
    assert EMPTY in str(report["failure"])
    assert len(complete_backups(ws.dest)) == 1

    ws.write_config(rsync_source("data", src, allow_empty=True))
    cli_ok(ws, "run")
    newest = complete_backups(ws.dest)[-1]
    assert os.listdir(ws.dest / newest / "data") == []


def test_with_a_precopy_an_empty_source_fails_all_the_same(ws: Workspace) -> None:
    src = ws.src / "data"
    src.mkdir()
    twenty_files(src)
    hook = '[[snapshot_hooks]]\nname = "window"\npre = "true"\n'
    ws.write_config(rsync_source("data", src) + hook + KEEP_3)
    cli_ok(ws, "run")
    for path in sorted(src.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()

    _, report = failed_run(ws)

    assert EMPTY in str(report["failure"]), report
    assert len(complete_backups(ws.dest)) == 1


def test_a_source_that_was_empty_or_had_no_files_stays_fine(ws: Workspace) -> None:
    src = ws.src / "data"
    src.mkdir()
    ws.write_config(rsync_source("data", src))
    cli_ok(ws, "run")  # empty, no earlier backup
    cli_ok(ws, "run")  # empty, and so was its last backup
    (src / "folder-only").mkdir()
    cli_ok(ws, "run")
    (src / "folder-only").rmdir()
    cli_ok(ws, "run")  # its last backup held a folder, but no file
    assert len(complete_backups(ws.dest)) == 4


def test_an_optional_empty_source_costs_only_its_folder(ws: Workspace) -> None:
    src = ws.src / "data"
    src.mkdir()
    twenty_files(src)
    other = ws.make_source("other")
    ws.write_config(rsync_source("data", src, optional=True) + rsync_source("other", other))
    cli_ok(ws, "run")
    for path in sorted(src.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()

    result = ws.run("run")

    assert result.returncode == 1, result.stderr
    report = ws.report()
    assert report["saved"] is True and EMPTY in str(report["failure"]), report
    newest = complete_backups(ws.dest)[-1]
    assert [n for n in sorted(os.listdir(ws.dest / newest)) if n != ".pibackup"] == ["other"]


def test_an_empty_remote_source_fails_too(ws: Workspace, sshd: Sshd) -> None:
    src = ws.src / "data"
    src.mkdir()
    twenty_files(src)
    ws.write_config(sshd.host_toml("h1") + rsync_source("data", src, host="h1"))
    cli_ok(ws, "run")
    for path in sorted(src.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()

    _, report = failed_run(ws)

    assert EMPTY in str(report["failure"]), report
    assert len(complete_backups(ws.dest)) == 1


# --- require_mountpoint -------------------------------------------------------------------


NOT_MOUNTED = "is not on a mounted filesystem other than the root one"


@needs_root
@needs_loop
def test_require_mountpoint_refuses_a_source_whose_disk_is_not_mounted(
        ws: Workspace, ext4_fs: Callable[..., Ext4]) -> None:
    disk = ext4_fs(ws.src / "disk", mounted=False)
    ws.write_config(rsync_source("data", disk.mount, require_mountpoint=True))

    checked = ws.run("check")
    assert "sources[0].path" in checked.stdout + checked.stderr
    assert NOT_MOUNTED in checked.stdout + checked.stderr
    _, report = failed_run(ws)

    failure = str(report["failure"])
    assert 'source "data"' in failure and NOT_MOUNTED in failure, failure
    # Refused before the copy: no rsync ran.
    sources = report["sources"]
    assert isinstance(sources, dict)
    assert sources["data"]["snapshot"]["command"] is None, sources
    assert complete_backups(ws.dest) == []

    disk.mount_now()
    (disk.mount / "f.txt").write_text("on the disk\n")
    checked = ws.run("check")
    assert NOT_MOUNTED not in checked.stdout + checked.stderr
    cli_ok(ws, "run")
    newest = complete_backups(ws.dest)[-1]
    assert (ws.dest / newest / "data" / "f.txt").read_text() == "on the disk\n"


# --- refused at load ----------------------------------------------------------------------


def assert_refused(ws: Workspace, key: str) -> None:
    for command in ("check", "run"):
        result = ws.run(command)
        assert result.returncode == 2, (command, result.returncode, result.stderr)
        assert "Traceback" not in result.stderr
        assert key in result.stderr, result.stderr
    assert complete_backups(ws.dest) == []


@pytest.mark.parametrize("key", ["require_mountpoint", "allow_empty"])
def test_btrfs_sources_refuse_the_keys(ws: Workspace, key: str) -> None:
    from btrfskit import btrfs_source

    ws.write_config(rsync_source("data", ws.make_source("data"))
                    + btrfs_source("vol", ws.src / "vol", **{key: True}))
    assert_refused(ws, f"sources[1].{key}")


def test_a_remote_source_refuses_require_mountpoint(ws: Workspace) -> None:
    ws.write_config('[hosts.nas]\naddress = "nas.lan"\n'
                    + rsync_source("data", "/srv/data", host="nas", require_mountpoint=True))
    assert_refused(ws, "sources[0].require_mountpoint")
