"""`list`, `list --json` and `prune --dry-run` on a destination that is not visible (SPEC §5).

They read the destination as it is. When it is missing, or not on a mounted
filesystem while `require_mountpoint` is set, they say so on stderr and exit
1: never "no backups", `[]` or "0 would be deleted" for a disk that is not
there. The disk here is a real ext4 image, loop-mounted and unmounted by the
test; its mount point is an empty folder of the root filesystem while it is
not mounted, as on a Pi whose USB disk is unplugged.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest
from diskkit import ext4_filesystems
from prunekit import SOURCE, event_hooks, make_backup, retention_table, rsync_source

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from conftest import Workspace
    from diskkit import Ext4

# Less than 30 days apart: no clock jump pauses retention (SPEC §3).
NAMES = ["2025-11-02t03-00-00+0100", "2025-11-01t03-00-00+0100", "2025-10-05t03-00-00+0200"]
COMMANDS = [("list",), ("list", "--json"), ("prune", "--dry-run")]


@pytest.fixture
def ext4_fs(tmp_path: Path) -> Iterator[Callable[..., Ext4]]:
    yield from ext4_filesystems(tmp_path)


@pytest.fixture
def disk(tmp_path: Path, ext4_fs: Callable[..., Ext4]) -> Ext4:
    """The backup disk, not mounted: its mount point is an empty folder."""
    return ext4_fs(tmp_path / "mnt", mounted=False)


def _config(ws: Workspace, dest: Path, *, require_mountpoint: bool) -> None:
    source = ws.make_source(SOURCE)
    ws.config_path.write_text(
        f'destination = "{dest}"\nstate_dir = "{ws.state}"\n'
        f"require_mountpoint = {'true' if require_mountpoint else 'false'}\n"
        + rsync_source(source) + event_hooks(ws, ["b1"]) + "\n"
        + retention_table({"keep_last": 2}))


def _assert_not_visible(ws: Workspace, dest: Path, why: str) -> None:
    for command in COMMANDS:
        result = ws.run(*command)
        shown = " ".join(command)
        assert result.returncode == 1, f"{shown}: {result.returncode}\n{result.stdout}"
        assert result.stdout == "", f"{shown} answered for a disk that is not there"
        assert str(dest) in result.stderr and why in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr
    assert not ws.events.exists(), "a hook ran"


def _assert_visible(ws: Workspace, dest: Path) -> None:
    rows = json.loads(ws.run("list", "--json").stdout)
    assert [r["name"] for r in rows] == NAMES
    table = ws.run("list")
    assert table.returncode == 0, table.stderr
    assert all(name in table.stdout for name in NAMES)
    dry = ws.run("prune", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would delete {dest / NAMES[2]}" in dry.stdout
    assert "1 backups would be deleted" in dry.stdout


@pytest.mark.slow
@pytest.mark.parametrize("below", ["", "pibackup"], ids=["mount-point", "below-it"])
def test_an_unmounted_disk_is_not_visible_with_require_mountpoint(
        ws: Workspace, disk: Ext4, below: str) -> None:
    dest = disk.mount / below if below else disk.mount
    # Unmounted, the folder exists on the root filesystem (created there by
    # mistake, say), looking like an empty destination.
    dest.mkdir(exist_ok=True)
    _config(ws, dest, require_mountpoint=True)

    _assert_not_visible(ws, dest, "not on a mounted filesystem")

    disk.mount_now()
    dest.mkdir(exist_ok=True)
    for name in NAMES:
        make_backup(dest, name)
    _assert_visible(ws, dest)

    disk.unmount()
    _assert_not_visible(ws, dest, "not on a mounted filesystem")
    assert not ws.events.exists()


@pytest.mark.parametrize("require_mountpoint", [False, True])
def test_a_missing_destination_is_not_visible(ws: Workspace, require_mountpoint: bool) -> None:
    missing = ws.root / "not-mounted"
    _config(ws, missing, require_mountpoint=require_mountpoint)

    _assert_not_visible(ws, missing, "does not exist")
    assert not missing.exists(), "a read-only command created the destination"


def test_a_destination_that_is_a_file_is_not_visible(ws: Workspace) -> None:
    not_a_folder = ws.root / "backup-disk"
    not_a_folder.write_text("not a folder\n")
    _config(ws, not_a_folder, require_mountpoint=False)

    _assert_not_visible(ws, not_a_folder, "is not a folder")


@pytest.mark.slow
def test_prune_and_run_refuse_an_unmounted_disk_with_require_mountpoint(
        ws: Workspace, disk: Ext4) -> None:
    _config(ws, disk.mount, require_mountpoint=True)

    for command in ("prune", "run"):
        result = ws.run(command)
        assert result.returncode == 1, result.stderr
        assert str(disk.mount) in result.stderr
        assert "Traceback" not in result.stderr
    assert list(disk.mount.iterdir()) == [], "something was written to the root disk"

    disk.mount_now()
    result = ws.run("run")
    assert result.returncode == 0, result.stderr
    assert ws.report()["status"] == "ok"
    assert (disk.mount / ws.report()["name"] / SOURCE).is_dir()
