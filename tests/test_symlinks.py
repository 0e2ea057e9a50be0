"""End to end: symbolic links in the destination are never backups and never followed (SPEC §1).

A link named like a backup is not one: `list` does not show it, retention never
renames or deletes it, nothing is deleted through it, and it never stops a run
(not even one named after a time later than now, which the clock guard would
see). A link named like an in-progress or deleting folder is removed as a
link; what it points at survives. The links point outside the destination at
a real btrfs subvolume holding another subvolume (what `btrfs subvolume
delete` would have taken through the link) and at a plain folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
from conftest import needs_rsync, processes_mentioning
from pibackup_async.engine.destination import delete_backup, remove_tree
from prunekit import (
    SOURCE,
    clock_at,
    event_hooks,
    list_json,
    make_backup,
    needs_faketime,
    retention_table,
    rsync_source,
    tree,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from btrfskit import Btrfs
    from conftest import Workspace

pytestmark = needs_rsync

NEWER, MIDDLE = "2025-11-02t03-00-00+0100", "2025-11-01t03-00-00+0100"
OLD_REAL = "2025-10-15t03-00-00+0200"        # a real backup retention deletes (no clock jump)
LINK_SUBVOLUME = "2025-10-01t03-00-00+0200"  # older than NEWER and MIDDLE: keep_last drops it
LINK_FOLDER = "2025-09-01t03-00-00+0200"
LINK_FUTURE = "2099-01-01t00-00-00+0000"     # newer than any clock: the clock guard's bait
BACKUP_LINKS = (LINK_SUBVOLUME, LINK_FOLDER, LINK_FUTURE)
STALE_IN_PROGRESS = "2025-11-03t03-00-00+0100.in-progress"
STALE_DELETING = "2025-07-01t03-00-00+0200.deleting"


@dataclass
class Outside:
    """What the links point at, outside the destination, and how it looked before."""

    fs: Btrfs
    subvolume: Path  # holds a file and a nested subvolume
    folder: Path

    def snapshot(self) -> tuple[list[str], dict[str, tuple[int, int, int]],
                                dict[str, tuple[int, int, int]]]:
        return self.fs.subvolumes(), tree(self.subvolume), tree(self.folder)


def _outside(ws: Workspace, btrfs_fs: Callable[..., Btrfs]) -> Outside:
    fs = btrfs_fs(ws.root / "outside-btrfs")
    subvolume = fs.subvolume("precious")
    (subvolume / "data.txt").write_text("must survive\n")
    inner = fs.subvolume("precious/inner")
    (inner / "inner.txt").write_text("must survive too\n")
    folder = ws.root / "outside-folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "file.txt").write_text("must survive\n")
    return Outside(fs, subvolume, folder)


def _link(ws: Workspace, name: str, target: Path) -> Path:
    link = ws.dest / name
    link.symlink_to(target, target_is_directory=True)
    return link


def _backup_links(ws: Workspace, outside: Outside) -> None:
    _link(ws, LINK_SUBVOLUME, outside.subvolume)
    _link(ws, LINK_FOLDER, outside.folder)
    _link(ws, LINK_FUTURE, outside.folder)


def _assert_links_intact(ws: Workspace, outside: Outside, names: tuple[str, ...]) -> None:
    targets = {LINK_SUBVOLUME: outside.subvolume, LINK_FOLDER: outside.folder,
               LINK_FUTURE: outside.folder}
    for name in names:
        link = ws.dest / name
        assert link.is_symlink(), f"the link {name} was renamed or removed"
        assert os.readlink(link) == str(targets[name])
        assert not os.path.lexists(ws.dest / f"{name}.deleting"), f"{name} was renamed"


def _config(ws: Workspace, rules: dict[str, int]) -> None:
    source = ws.make_source(SOURCE, {"new.txt": "made by this run\n"})
    ws.write_config(rsync_source(source) + event_hooks(ws, ["b1"]) + "\n"
                    + retention_table(rules))


def _fabricate(ws: Workspace) -> None:
    for name in (NEWER, MIDDLE, OLD_REAL):
        make_backup(ws.dest, name)


@pytest.mark.slow
def test_list_shows_no_link_named_like_a_backup(ws: Workspace,
                                                btrfs_fs: Callable[..., Btrfs]) -> None:
    outside = _outside(ws, btrfs_fs)
    _fabricate(ws)
    _backup_links(ws, outside)
    _link(ws, STALE_IN_PROGRESS, outside.folder)
    _link(ws, STALE_DELETING, outside.subvolume)
    _config(ws, {"keep_last": 2})

    rows = list_json(ws)
    table = ws.run("list")

    assert [(r["name"], r["state"]) for r in rows] == [
        (NEWER, "complete"), (MIDDLE, "complete"), (OLD_REAL, "complete")]
    assert table.returncode == 0, table.stderr
    for name in (*BACKUP_LINKS, STALE_IN_PROGRESS, STALE_DELETING):
        assert name.split(".")[0] not in table.stdout, f"list shows the link {name}"


@pytest.mark.slow
def test_prune_never_renames_deletes_or_follows_a_link_named_like_a_backup(
        ws: Workspace, btrfs_fs: Callable[..., Btrfs]) -> None:
    outside = _outside(ws, btrfs_fs)
    _fabricate(ws)
    _backup_links(ws, outside)
    _config(ws, {"keep_last": 2})
    before = outside.snapshot()

    result = ws.run("prune")

    assert outside.snapshot() == before, "prune changed something outside the destination"
    assert result.returncode == 0, result.stderr
    _assert_links_intact(ws, outside, BACKUP_LINKS)
    assert not os.path.lexists(ws.dest / OLD_REAL), "the real old backup was not deleted"
    assert sorted(os.listdir(ws.dest)) == sorted([NEWER, MIDDLE, *BACKUP_LINKS])
    assert [line.split()[:2] for line in ws.event_lines()] == [["b1.pre", "-"],
                                                               ["b1.post", "ok"]]
    assert [r["name"] for r in list_json(ws)] == [NEWER, MIDDLE]

    again = ws.run("prune")
    assert again.returncode == 0, again.stderr
    assert outside.snapshot() == before


@pytest.mark.slow
@needs_faketime
def test_run_is_not_stopped_by_links_and_retention_leaves_them(
        ws: Workspace, btrfs_fs: Callable[..., Btrfs]) -> None:
    outside = _outside(ws, btrfs_fs)
    _fabricate(ws)
    _backup_links(ws, outside)
    # The newest backup's source folder is a link out: never a --link-dest.
    (ws.dest / NEWER / SOURCE / "file0.txt").unlink()
    (ws.dest / NEWER / SOURCE).rmdir()
    (ws.dest / NEWER / SOURCE).symlink_to(outside.folder, target_is_directory=True)
    _config(ws, {"keep_last": 2})
    before = outside.snapshot()

    # Within 30 days of NEWER: a later run would be a clock jump, and delete nothing.
    result = ws.run("run", env=clock_at("2025-11-20 12:00:00"))

    assert result.returncode == 0, result.stderr
    report = ws.report()
    new = report["name"]
    assert report["status"] == "ok" and report["saved"] is True
    assert (ws.dest / new / SOURCE / "new.txt").read_text() == "made by this run\n"
    command = report["sources"][SOURCE]["snapshot"]["command"]
    assert f"--link-dest={ws.dest / MIDDLE / SOURCE}" in command, command
    assert outside.snapshot() == before, "the run changed something outside the destination"
    _assert_links_intact(ws, outside, BACKUP_LINKS)
    # keep_last = 2 keeps the new backup and NEWER; the links are not backups.
    assert sorted(report["retention"]["deleted"]) == sorted([MIDDLE, OLD_REAL])
    assert set(report["retention"]["kept"]) == {new, NEWER}
    assert sorted(os.listdir(ws.dest)) == sorted([new, NEWER, *BACKUP_LINKS])
    assert [line.split()[:2] for line in ws.event_lines()] == [["b1.pre", "-"],
                                                               ["b1.post", "ok"]]

    second = ws.run("run")
    assert second.returncode == 0, second.stderr
    assert outside.snapshot() == before
    assert processes_mentioning(str(ws.root)) == []


@pytest.mark.slow
@pytest.mark.parametrize("command", ["run", "prune"])
def test_links_named_like_in_progress_or_deleting_are_removed_as_links(
        ws: Workspace, btrfs_fs: Callable[..., Btrfs], command: str) -> None:
    outside = _outside(ws, btrfs_fs)
    _fabricate(ws)
    in_progress = _link(ws, STALE_IN_PROGRESS, outside.folder)
    deleting = _link(ws, STALE_DELETING, outside.subvolume)
    _config(ws, {"keep_last": 3})
    before = outside.snapshot()

    result = ws.run(command)

    assert outside.snapshot() == before, f"{command} followed a link out of the destination"
    assert result.returncode == 0, result.stderr
    assert not os.path.lexists(deleting), "the .deleting link was not removed"
    if command == "run":
        assert not os.path.lexists(in_progress), "the .in-progress link was not removed"
        assert ws.report()["status"] == "ok"
    else:
        # prune finishes interrupted deletions only; the in-progress link stays a link.
        assert in_progress.is_symlink()
    assert [line.split()[:2] for line in ws.event_lines()] == [["b1.pre", "-"],
                                                               ["b1.post", "ok"]]

    following = ws.run("run")
    assert following.returncode == 0, following.stderr
    assert json.loads(ws.reports()[-1].read_text())["status"] == "ok"
    assert outside.snapshot() == before
    assert not os.path.lexists(in_progress)


# --- the removal itself, in-process ----------------------------------------------------------


@pytest.mark.slow
async def test_remove_tree_and_delete_backup_never_go_through_a_link(
        ws: Workspace, btrfs_fs: Callable[..., Btrfs]) -> None:
    outside = _outside(ws, btrfs_fs)
    before = outside.snapshot()
    # A folder holding links out, at its top and deeper, as a crafted backup might.
    crafted = make_backup(ws.dest, "2025-06-01t03-00-00+0200.deleting")
    (crafted / "to-subvolume").symlink_to(outside.subvolume, target_is_directory=True)
    (crafted / SOURCE / "to-folder").symlink_to(outside.folder, target_is_directory=True)
    (crafted / SOURCE / "to-file").symlink_to(outside.folder / "sub" / "file.txt")
    top_link = _link(ws, "2025-05-01t03-00-00+0200.deleting", outside.subvolume)
    backup_link = _link(ws, LINK_FOLDER, outside.folder)

    await remove_tree(str(crafted))
    await remove_tree(str(top_link))
    with pytest.raises(OSError, match="not a folder"):
        await delete_backup(str(ws.dest), LINK_FOLDER)

    assert outside.snapshot() == before
    assert not os.path.lexists(crafted) and not os.path.lexists(top_link)  # noqa: ASYNC240
    assert backup_link.is_symlink(), "delete_backup renamed or removed a link"
    assert sorted(os.listdir(ws.dest)) == [LINK_FOLDER]
