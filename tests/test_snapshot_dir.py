"""A btrfs source's ``snapshot_dir``: private, never followed through a link, one folder per
destination (SPEC §1 and §2 step 3), on real loop-mounted btrfs.

Each destination's snapshots live in ``<snapshot_dir>/<id>/<name>/<source>``; the
tests compute ``<id>`` on their own (``blkid``'s UUID of the destination's image
and the destination's path in that filesystem) rather than asking the engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from btrfskit import (
    SNAPSHOTS,
    Btrfs,
    assert_received,
    btrfs_source,
    is_subvolume,
    needs_btrfs,
    parent_of,
    save_command,
    snapshot_names,
)
from conftest import CLI
from datakit import assert_same_tree, complete_backups

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from conftest import Workspace

pytestmark = [needs_btrfs, pytest.mark.root]

MiB = 1024 * 1024
OLD = "2020-01-01t00-00-00+0000"
OTHER = "2020-01-02t00-00-00+0000"


def expected_id(fs: Btrfs, destination: Path) -> str:
    """SPEC §2 step 3's ``<id>``: a digest of the filesystem's UUID and the destination's
    path inside it, computed here without the engine."""
    uuid = subprocess.run(["blkid", "-o", "value", "-s", "UUID", str(fs.image)],
                          capture_output=True, text=True, check=True).stdout.strip()
    inner = "/" + os.path.relpath(destination, fs.mount) if destination != fs.mount else "/"
    return hashlib.sha256(f"{uuid}\0{os.path.normpath(inner)}".encode()).hexdigest()[:12]


@dataclass
class Configuration:
    """One configuration file of its own: its destination and its state_dir."""

    path: Path
    destination: Path
    state: Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, *args, "-c", str(self.path)], capture_output=True,
                              text=True, timeout=120)

    def backup(self) -> tuple[str, dict[str, Any], str]:
        """One successful run: its backup's name, its report, its log."""
        result = self.run("run")
        assert result.returncode == 0, result.stderr
        reports = sorted((self.state / "reports").glob("*.json"))
        report = json.loads(reports[-1].read_text())
        assert report["status"] == "ok", report
        return report["name"], report, result.stderr


def configure(ws: Workspace, label: str, destination: Path, source: Path) -> Configuration:
    destination.mkdir(exist_ok=True)
    path = ws.root / f"{label}.toml"
    state = ws.root / f"state-{label}"
    path.write_text(f'destination = "{destination}"\nstate_dir = "{state}"\n\n'
                    + btrfs_source("data", source))
    return Configuration(path, destination, state)


@dataclass
class Disks:
    src: Btrfs
    dest: Btrfs
    source: Path  # the subvolume "data"
    root: Path    # the default snapshot_dir

    def space(self, destination: Path) -> Path:
        return self.root / expected_id(self.dest, destination)


def disks(ws: Workspace, btrfs_fs: Callable[..., Btrfs]) -> Disks:
    src = btrfs_fs(ws.src / "vol")
    dest = btrfs_fs(ws.root / "disk")
    source = src.subvolume("data")
    (source / "blob.bin").write_bytes(os.urandom(4 * MiB))
    (source / "note.txt").write_text("first\n")
    return Disks(src, dest, source, src.mount / SNAPSHOTS)


def tree_bytes(root: Path) -> dict[str, bytes]:
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = f.read()
    return found


def old_layout_backup(d: Disks, destination: Path, name: str) -> Path:
    """What an earlier version left: the snapshot ``<snapshot_dir>/<name>/data`` and its
    received copy, the backup ``<destination>/<name>/data``."""
    snapshot = d.root / name / "data"
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["btrfs", "subvolume", "snapshot", "-r", str(d.source), str(snapshot)],
                   check=True, capture_output=True)
    (destination / name).mkdir(parents=True)
    subprocess.run(f"btrfs send -q {snapshot} | btrfs receive {destination / name}",
                   shell=True, check=True, capture_output=True, timeout=60)
    return snapshot


# --- 1: a planted link is never followed --------------------------------------------------


def test_a_link_named_like_a_snapshot_makes_nothing_outside_snapshot_dir_go(
        ws: Workspace, btrfs_fs: Callable[..., Btrfs]) -> None:
    d = disks(ws, btrfs_fs)
    a = configure(ws, "a", d.dest.mount, d.source)
    victim = ws.root / "victim"
    (victim / "data").mkdir(parents=True)
    (victim / "data" / "precious.txt").write_bytes(b"not the engine's\n" * 100)
    os.chmod(victim / "data", 0o555)  # read-only: deleting it needs root's chmod first
    before = tree_bytes(victim)
    # Links named like snapshots where earlier versions kept them, and in this
    # destination's own folder.
    d.root.mkdir()
    (d.root / OLD).symlink_to(victim)
    space = d.space(d.dest.mount)
    space.mkdir(mode=0o700)
    (space / OTHER).symlink_to(victim)

    first, _, _ = a.backup()
    second, report, _ = a.backup()

    assert tree_bytes(victim) == before, "nothing outside snapshot_dir is touched"
    assert stat.S_IMODE(os.lstat(victim / "data").st_mode) == 0o555
    assert os.readlink(d.root / OLD) == str(victim), "another's link is left as it is"
    assert not os.path.lexists(space / OTHER), "a link in the destination's own folder goes"
    assert snapshot_names(space) == [second]
    assert parent_of(save_command(report)) == str(space / first / "data")


def test_a_link_in_place_of_the_destinations_folder_is_never_followed(
        ws: Workspace, btrfs_fs: Callable[..., Btrfs]) -> None:
    d = disks(ws, btrfs_fs)
    a = configure(ws, "a", d.dest.mount, d.source)
    victim = ws.root / "victim"
    (victim / OLD / "data").mkdir(parents=True)
    (victim / OLD / "data" / "precious.txt").write_text("kept\n")
    before = tree_bytes(victim)
    d.root.mkdir()
    d.space(d.dest.mount).symlink_to(victim)

    result = a.run("run")
    assert result.returncode == 1, result.stderr
    assert "symbolic link" in result.stderr and "Traceback" not in result.stderr
    assert tree_bytes(victim) == before
    assert sorted(os.listdir(victim)) == [OLD], "no snapshot is made through the link"
    assert os.path.islink(d.space(d.dest.mount))


# --- 2: two configurations, one subvolume, two destinations --------------------------------


def test_two_configurations_of_one_subvolume_keep_their_own_parents(
        ws: Workspace, btrfs_fs: Callable[..., Btrfs]) -> None:
    d = disks(ws, btrfs_fs)
    # One filesystem, two folders: the id holds the path inside the filesystem.
    a = configure(ws, "a", d.dest.mount / "a", d.source)
    b = configure(ws, "b", d.dest.mount / "b", d.source)
    assert d.space(a.destination) != d.space(b.destination)

    kept: dict[str, str] = {}
    for turn, config in enumerate([a, b, a, b, a, b]):
        (d.source / "note.txt").write_text(f"turn {turn}\n")
        label = "a" if config is a else "b"
        name, report, log = config.backup()
        space = d.space(config.destination)
        parent = parent_of(save_command(report))
        stream = report["sources"]["data"]["bytes"]
        if label in kept:
            assert parent == str(space / kept[label] / "data"), (turn, parent, log)
            assert stream < MiB, f"turn {turn}: an incremental send, not {stream} bytes"
        else:
            assert parent is None and stream > 4 * MiB
        assert_same_tree(d.source, config.destination / name / "data")
        assert_received(config.destination / name / "data", space / name / "data")
        kept[label] = name
        # Each keeps its own newest parent, whatever the other did.
        for other, folder in (("a", a.destination), ("b", b.destination)):
            if other in kept:
                assert snapshot_names(d.space(folder)) == [kept[other]], (turn, other)
    assert sorted(os.listdir(d.root)) == sorted(
        [d.space(a.destination).name, d.space(b.destination).name])


# --- 3: the layout of earlier versions ----------------------------------------------------


def test_an_old_layout_parent_is_used_once_then_deleted_and_another_is_left(
        ws: Workspace, btrfs_fs: Callable[..., Btrfs]) -> None:
    d = disks(ws, btrfs_fs)
    a = configure(ws, "a", d.dest.mount, d.source)
    mine = old_layout_backup(d, d.dest.mount, OLD)
    # Another configuration's parent in the old layout: a name this destination lacks.
    theirs = d.root / OTHER / "data"
    theirs.parent.mkdir()
    subprocess.run(["btrfs", "subvolume", "snapshot", "-r", str(d.source), str(theirs)],
                   check=True, capture_output=True)
    theirs_uuid = subprocess.run(["btrfs", "subvolume", "show", str(theirs)],
                                 capture_output=True, text=True, check=True).stdout

    (d.source / "note.txt").write_text("after the upgrade\n")
    first, report, _ = a.backup()
    assert parent_of(save_command(report)) == str(mine), "no full send after an upgrade"
    assert report["sources"]["data"]["bytes"] < MiB
    assert not os.path.lexists(mine.parent), "used once, then deleted"
    assert is_subvolume(theirs), "another configuration's parent is never touched"
    assert subprocess.run(["btrfs", "subvolume", "show", str(theirs)], capture_output=True,
                          text=True, check=True).stdout == theirs_uuid
    space = d.space(d.dest.mount)
    assert snapshot_names(space) == [first]

    second, report, _ = a.backup()
    assert parent_of(save_command(report)) == str(space / first / "data")
    assert is_subvolume(theirs)
    assert complete_backups(d.dest.mount) == [OLD, first, second]


# --- 4: private, and named where check -v says ----------------------------------------------


def test_snapshot_dir_is_made_private_and_check_verbose_names_its_folder(
        ws: Workspace, btrfs_fs: Callable[..., Btrfs]) -> None:
    d = disks(ws, btrfs_fs)
    a = configure(ws, "a", d.dest.mount / "sub", d.source)
    space = d.space(a.destination)

    result = a.run("check", "-v")
    assert result.returncode == 0, result.stderr
    [line] = [x for x in result.stderr.splitlines() if space.name in x]
    assert str(space) in line and "sources[0]" in line, line
    plan = a.run("run", "--dry-run")
    assert f" {space}/" in plan.stdout, plan.stdout

    name, _, _ = a.backup()
    for folder in (d.root, space, space / name):
        assert stat.S_IMODE(os.lstat(folder).st_mode) == 0o700, folder
    assert is_subvolume(space / name / "data")


def test_dry_run_says_the_id_is_decided_at_run_time_when_the_disk_is_not_there(
        ws: Workspace, btrfs_fs: Callable[..., Btrfs]) -> None:
    d = disks(ws, btrfs_fs)
    a = configure(ws, "a", d.dest.mount, d.source)
    a.path.write_text(a.path.read_text().replace(str(d.dest.mount), str(ws.root / "absent")))
    plan = a.run("run", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert f"{d.root}/<id>/" in plan.stdout and "run time" in plan.stdout, plan.stdout
