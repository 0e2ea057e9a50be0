"""btrfs sources on real (loop-mounted) btrfs, end to end through the CLI (SPEC §2 steps 3 and 5).

Every test makes its own filesystems with ``btrfs_fs`` (tests/btrfskit.py): the
source filesystem is mounted on ``<ws>/src/vol`` and holds the subvolume
``data``; where the destination is btrfs, a second filesystem is mounted on
``ws.dest`` itself. The snapshot_dir is the default, ``<ws>/src/vol/.pibackup-snapshots``;
its folder for the destination, ``<id>``, is ``Setup.snapshots``.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pytest
from btrfskit import (
    SETTLED,
    SNAPSHOTS,
    Btrfs,
    assert_received,
    btrfs_source,
    change,
    fill_random,
    is_subvolume,
    needs_btrfs,
    parent_of,
    receive_running,
    save_command,
    snapshot_names,
    snapshot_space,
    sync,
)
from conftest import needs_rsync, wait_for
from datakit import (
    BACKUP_NAME,
    assert_same_tree,
    cli_ok,
    complete_backups,
    describe_tree,
    diff_trees,
    settle_times,
)
from hookkit import (
    HookSpec,
    hook_toml,
    in_progress,
    release_marker,
    start,
    started_marker,
    wait_marker,
    wait_no_processes,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from conftest import Workspace

pytestmark = [needs_btrfs, needs_rsync, pytest.mark.root]



@dataclass
class Setup:
    ws: Workspace
    src_fs: Btrfs
    dest_fs: Btrfs | None
    source: Path      # the subvolume backed up, named "data"
    snapshots: Path   # the destination's folder in the default snapshot_dir
    stderr: str = ""  # the last run's log

    def snapshot(self, name: str) -> Path:
        return self.snapshots / name / "data"

    def relative(self, name: str) -> str:
        """The snapshot as ``btrfs subvolume list`` names it."""
        return os.path.relpath(self.snapshot(name), self.src_fs.mount)

    def configure(self, extra: str = "", header: str = "", **source_keys: Any) -> None:
        self.ws.write_config(btrfs_source("data", self.source, **source_keys) + extra,
                             header=header)

    def run(self) -> tuple[str, dict[str, Any]]:
        """One successful run: the new backup's name and its report."""
        before = set(complete_backups(self.ws.dest))
        self.stderr = cli_ok(self.ws, "run").stderr
        [name] = set(complete_backups(self.ws.dest)) - before
        report = self.ws.report()
        assert report["name"] == name and report["status"] == "ok", report
        return name, report


def make_setup(ws: Workspace, btrfs_fs: Callable[..., Btrfs], *, dest_btrfs: bool = True,
               size_mb: int = 320) -> Setup:
    src_fs = btrfs_fs(ws.src / "vol", size_mb)
    dest_fs = btrfs_fs(ws.dest, size_mb) if dest_btrfs else None
    source = src_fs.subvolume("data")
    return Setup(ws, src_fs, dest_fs, source, snapshot_space(src_fs.mount / SNAPSHOTS, ws.dest))


def populate(root: Path) -> None:
    """Files a restore must get back exactly: modes, owners, a hard link, symlinks, xattrs."""
    (root / "readme.txt").write_text("hello from a btrfs source\n")
    os.setxattr(root / "readme.txt", "user.pibackup", b"kept across send and receive")
    os.link(root / "readme.txt", root / "readme.hardlink")
    (root / "secret.key").write_bytes(os.urandom(3000))
    (root / "secret.key").chmod(0o600)
    (root / "empty").write_bytes(b"")
    (root / "bin").mkdir()
    (root / "bin" / "tool.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "bin" / "tool.sh").chmod(0o751)
    (root / "private").mkdir()
    (root / "private").chmod(0o700)
    os.setxattr(root / "private", "user.folder", b"an attribute on a folder")
    (root / "private" / "owned.txt").write_text("owned by someone else\n")
    os.chown(root / "private" / "owned.txt", 1234, 5678)
    (root / "link").symlink_to("readme.txt")
    (root / "dangling").symlink_to("no/such/file")
    # 8 MiB the incremental send must not repeat.
    (root / "blob.bin").write_bytes(os.urandom(8 * 1024 * 1024))
    settle_times(root, SETTLED)


# --- 1 and 2: btrfs into btrfs ------------------------------------------------------------


def test_full_send_gives_a_read_only_received_subvolume_with_equal_content(
        ws: Workspace, btrfs_fs: Callable[..., Btrfs]) -> None:
    s = make_setup(ws, btrfs_fs)
    populate(s.source)
    s.configure()
    name, report = s.run()

    copy = ws.dest / name / "data"
    assert_same_tree(s.source, copy)
    assert_received(copy, s.snapshot(name))
    assert s.dest_fs is not None and s.dest_fs.subvolumes() == [f"{name}/data"]
    # The snapshot whose copy is in the destination stays, as the next run's parent.
    assert snapshot_names(s.snapshots) == [name]
    assert s.src_fs.subvolumes() == sorted(["data", s.relative(name)])

    data = report["sources"]["data"]
    assert data["type"] == "btrfs" and data["status"] == "ok"
    assert data["snapshot"]["command"] == [
        "btrfs", "subvolume", "snapshot", "-r", str(s.source), str(s.snapshot(name))]
    command = save_command(report)
    assert command[:2] == ["btrfs", "send"] and parent_of(command) is None, command
    assert command[-3:] == ["btrfs", "receive", str(ws.dest / f"{name}.in-progress")]
    assert data["bytes"] > 8 * 1024 * 1024, "bytes is the size of the full send stream"


def test_second_run_sends_incrementally_and_rotates_the_parent(
        ws: Workspace, btrfs_fs: Callable[..., Btrfs]) -> None:
    s = make_setup(ws, btrfs_fs)
    populate(s.source)
    s.configure()
    first, first_report = s.run()
    as_first = describe_tree(s.source)

    change(s.source, remove="empty")
    second, report = s.run()

    command = save_command(report)
    assert parent_of(command) == str(s.snapshot(first)), command
    assert str(s.snapshot(first)) in s.stderr, "the log names the parent"
    stream = report["sources"]["data"]["bytes"]
    assert 0 < stream < 1024 * 1024 < first_report["sources"]["data"]["bytes"], (
        f"an incremental stream repeats nothing unchanged: {stream} bytes")

    assert_same_tree(s.source, ws.dest / second / "data")
    assert diff_trees(as_first, describe_tree(ws.dest / first / "data")) == []
    assert_received(ws.dest / first / "data")
    assert_received(ws.dest / second / "data", s.snapshot(second))
    assert snapshot_names(s.snapshots) == [second], "only the newest parent is kept"
    assert s.src_fs.subvolumes() == sorted(["data", s.relative(second)])
    assert s.dest_fs is not None
    assert s.dest_fs.subvolumes() == sorted([f"{first}/data", f"{second}/data"])


# --- 3: btrfs into another filesystem -----------------------------------------------------


def test_into_a_plain_folder_rsync_links_unchanged_files_and_keeps_no_snapshot(
        ws: Workspace, btrfs_fs: Callable[..., Btrfs]) -> None:
    s = make_setup(ws, btrfs_fs, dest_btrfs=False)
    populate(s.source)
    s.configure()
    first, report = s.run()
    one = ws.dest / first / "data"
    assert_same_tree(s.source, one)
    assert not is_subvolume(one)
    command = save_command(report)
    assert command[0] == "rsync" and f"{s.snapshot(first)}/" in command, command
    assert snapshot_names(s.snapshots) == [], "no local snapshot is kept"
    assert s.src_fs.subvolumes() == ["data"]

    change(s.source, remove="empty")
    second, report = s.run()
    two = ws.dest / second / "data"
    assert_same_tree(s.source, two)
    assert f"--link-dest={one}" in save_command(report)
    for unchanged in ("readme.txt", "readme.hardlink", "blob.bin", "secret.key",
                      "private/owned.txt"):
        assert os.lstat(one / unchanged).st_ino == os.lstat(two / unchanged).st_ino, unchanged
    assert os.lstat(one / "bin/tool.sh").st_ino != os.lstat(two / "bin/tool.sh").st_ino
    assert (one / "bin/tool.sh").read_text() == "#!/bin/sh\necho hi\n"
    assert snapshot_names(s.snapshots) == []
    assert s.src_fs.subvolumes() == ["data"]


# --- 4: the snapshot hooks' window --------------------------------------------------------


def _hook(report: dict[str, Any], name: str, phase: str) -> dict[str, Any]:
    [found] = [h for h in report["hooks"] if h["hook"] == name and h["phase"] == phase]
    assert found["status"] == "ok", found
    return dict(found)


@pytest.mark.slow
def test_snapshot_hooks_window_stays_short_while_the_save_takes_longer(
        ws: Workspace, btrfs_fs: Callable[..., Btrfs]) -> None:
    s = make_setup(ws, btrfs_fs, size_mb=600)
    fill_random(s.source, 200)
    # Freshly written data would be flushed by the snapshot's commit, inside the
    # window; a real source's data is at rest (written long before the run).
    sync(s.src_fs)
    stop_db = HookSpec("db", kind="snapshot")
    s.configure(hook_toml(ws, stop_db))
    _, report = s.run()

    at = datetime.fromisoformat
    pre, post = _hook(report, "db", "pre"), _hook(report, "db", "post")
    snap, save = report["sources"]["data"]["snapshot"], report["sources"]["data"]["save"]
    gap = (at(post["start"]) - at(pre["end"])).total_seconds()
    assert 0 <= gap < 1.0, f"the database was stopped {gap:.3f}s beyond its hooks"
    assert at(pre["end"]) <= at(snap["start"]) <= at(snap["end"]) <= at(post["start"])
    assert at(post["end"]) <= at(save["start"]), "the save runs after the window closed"
    assert save["duration_s"] > gap, (save["duration_s"], gap)
    assert report["snapshot_window_s"] < save["duration_s"]
    assert report["sources"]["data"]["bytes"] >= 200 * 1024 * 1024


# --- 5: SIGINT during send | receive ------------------------------------------------------


@pytest.mark.slow
def test_sigint_during_send_receive_leaves_no_partial_subvolume(
        ws: Workspace, btrfs_fs: Callable[..., Btrfs]) -> None:
    s = make_setup(ws, btrfs_fs, size_mb=600)
    populate(s.source)
    s.configure()
    first, _ = s.run()
    assert s.dest_fs is not None

    # 200 MiB new: the incremental send takes long enough to be caught.
    fill_random(s.source / "bulk", 200)
    with start(ws) as running:
        def receiving() -> bool:
            if running.proc.poll() is not None:
                raise AssertionError(f"the CLI exited early:\n{running.stderr}")
            return receive_running(ws.dest)

        wait_for(receiving, 30, "btrfs receive of the second run")
        running.send(signal.SIGINT)
        assert running.wait(60) == 130, running.stderr
    wait_no_processes(ws, 15)

    report = ws.report()
    assert report["status"] == "interrupted" and report["saved"] is False
    assert report["name"] != first
    assert report["sources"]["data"]["save"]["status"] == "cancelled"
    assert ws.backups() == [first], "no in-progress folder is left"
    assert s.dest_fs.subvolumes() == [f"{first}/data"], "no partial subvolume is left"
    assert snapshot_names(s.snapshots) == [first], "this run's snapshot is gone, the parent kept"
    assert s.src_fs.subvolumes() == sorted(["data", s.relative(first)])

    third, report = s.run()
    assert parent_of(save_command(report)) == str(s.snapshot(first))
    assert_same_tree(s.source, ws.dest / third / "data")
    assert_received(ws.dest / third / "data", s.snapshot(third))
    assert snapshot_names(s.snapshots) == [third]
    assert s.dest_fs.subvolumes() == sorted([f"{first}/data", f"{third}/data"])


# --- 6: check refuses what cannot be snapshotted ------------------------------------------


@pytest.mark.parametrize("where", ["plain folder on btrfs", "plain folder elsewhere"])
def test_check_refuses_a_source_that_is_not_a_subvolume(
        ws: Workspace, btrfs_fs: Callable[..., Btrfs], where: str) -> None:
    on_btrfs = where == "plain folder on btrfs"
    plain = (btrfs_fs(ws.src / "vol").mount if on_btrfs else ws.src) / "plain"
    plain.mkdir()
    (plain / "file.txt").write_text("not in a subvolume of its own\n")
    ws.write_config(btrfs_source("data", plain))

    result = ws.run("check")
    assert result.returncode == 2, result.stderr
    [line] = [x for x in result.stderr.splitlines() if "sources[0].path" in x]
    assert "subvolume" in line and str(plain) in line, line
    assert "Traceback" not in result.stderr
    assert not (plain.parent / SNAPSHOTS).exists(), "check creates no snapshot_dir"
    assert not ws.state.exists(), "check creates no state_dir"

    # A run fails at the snapshot, naming the source, and leaves nothing behind.
    result = ws.run("run")
    assert result.returncode == 1, result.stderr
    failure = ws.report()["failure"]
    assert 'source "data"' in failure and "subvolume" in failure, failure
    assert ws.backups() == []
    assert not (plain.parent / SNAPSHOTS).exists()


def test_check_refuses_a_snapshot_dir_on_another_filesystem(
        ws: Workspace, btrfs_fs: Callable[..., Btrfs]) -> None:
    source = btrfs_fs(ws.src / "vol").subvolume("data")
    elsewhere = ws.root / "snapshots"  # on the test's tmp filesystem, not the btrfs
    ws.write_config(btrfs_source("data", source, snapshot_dir=str(elsewhere)))

    result = ws.run("check")
    assert result.returncode == 2, result.stderr
    lines = [x for x in result.stderr.splitlines() if "sources[0]" in x]
    assert any("snapshot_dir" in x and str(elsewhere) in x for x in lines), result.stderr
    assert "Traceback" not in result.stderr
    assert not elsewhere.exists(), "check creates no snapshot_dir"
    assert not ws.state.exists(), "check creates no state_dir"


# --- 7: deleting backups that hold subvolumes ---------------------------------------------


def test_retention_deletes_received_subvolumes(
        ws: Workspace, btrfs_fs: Callable[..., Btrfs]) -> None:
    s = make_setup(ws, btrfs_fs)
    populate(s.source)
    s.configure(extra="[retention]\nkeep_last = 1\n")
    first, _ = s.run()
    change(s.source, remove="empty")
    second, report = s.run()
    assert report["retention"]["deleted"] == [first]
    assert ws.backups() == [second]
    assert s.dest_fs is not None and s.dest_fs.subvolumes() == [f"{second}/data"]

    # Once more: the subvolume deleted now is not the filesystem's first one
    # (its id is not 256, unlike the first backup's).
    (s.source / "third.txt").write_text("third run\n")
    third, report = s.run()
    retention = report["retention"]
    assert (retention["deleted"], retention["errors"]) == ([second], []), retention
    assert {k: set(v) for k, v in retention["kept"].items()} == {third: {"keep_last", "newest"}}
    assert ws.backups() == [third]
    assert s.dest_fs.subvolumes() == [f"{third}/data"]
    assert snapshot_names(s.snapshots) == [third]
    assert s.src_fs.subvolumes() == sorted(["data", s.relative(third)])
    assert_same_tree(s.source, ws.dest / third / "data")


def test_next_run_after_a_crash_removes_the_stale_received_subvolume_and_snapshot(
        ws: Workspace, btrfs_fs: Callable[..., Btrfs]) -> None:
    s = make_setup(ws, btrfs_fs)
    populate(s.source)
    s.configure()
    first, _ = s.run()
    assert s.dest_fs is not None

    # Crash a run in step 4 (its snapshot is taken), SIGKILL while a snapshot hook's
    # post blocks; then receive its snapshot into its in-progress folder, as the
    # crashed run would have done next.
    s.configure(hook_toml(ws, HookSpec("s1", kind="snapshot", block=("post",))))
    with start(ws) as running:
        wait_marker(started_marker(ws, "s1", "post"), running)
        running.proc.send_signal(signal.SIGKILL)
        assert running.wait(10) == -signal.SIGKILL
    release_marker(ws, "s1", "post").touch()  # the orphaned hook
    wait_no_processes(ws, 10)
    [stale] = in_progress(ws)
    crashed = stale.removesuffix(".in-progress")
    assert snapshot_names(s.snapshots) == sorted([first, crashed])
    q = shlex.quote
    subprocess.run(
        f"btrfs send -q -p {q(str(s.snapshot(first)))} {q(str(s.snapshot(crashed)))}"
        f" | btrfs receive {q(str(ws.dest / stale))}",
        shell=True, check=True, capture_output=True, timeout=60)
    assert s.dest_fs.subvolumes() == sorted([f"{first}/data", f"{stale}/data"])

    s.configure()
    third, report = s.run()
    assert ws.backups() == sorted([first, third])
    assert s.dest_fs.subvolumes() == sorted([f"{first}/data", f"{third}/data"])
    assert snapshot_names(s.snapshots) == [third]
    assert s.src_fs.subvolumes() == sorted(["data", s.relative(third)])
    assert parent_of(save_command(report)) == str(s.snapshot(first))
    assert_same_tree(s.source, ws.dest / third / "data")


# --- 8: the dry run -----------------------------------------------------------------------

SEND_LINE = re.compile(r"btrfs send (?:-p (\S+) )?(\S+) \| btrfs receive (\S+)")


def _send_line(plan: str) -> re.Match[str]:
    matches = [m for line in plan.splitlines() if (m := SEND_LINE.search(line))]
    assert len(matches) == 1, plan
    return matches[0]


def test_dry_run_shows_the_btrfs_commands_and_the_parent_it_would_use(
        ws: Workspace, btrfs_fs: Callable[..., Btrfs]) -> None:
    s = make_setup(ws, btrfs_fs)
    populate(s.source)
    s.configure()

    plan = cli_ok(ws, "run", "--dry-run").stdout
    assert f"btrfs subvolume snapshot -r {s.source} {s.snapshots}/" in plan, plan
    parent, snapshot, folder = _send_line(plan).groups()
    assert parent is None, "no parent before the first backup"
    assert not s.snapshots.exists() and ws.backups() == [] and not ws.state.exists()

    first, _ = s.run()
    plan = cli_ok(ws, "run", "--dry-run").stdout
    parent, snapshot, folder = _send_line(plan).groups()
    assert parent == str(s.snapshot(first)), plan
    name = os.path.basename(os.path.dirname(snapshot))
    assert BACKUP_NAME.fullmatch(name) and name != first, snapshot
    assert snapshot == str(s.snapshot(name))
    assert folder == str(ws.dest / f"{name}.in-progress")
    # Nothing changed.
    assert snapshot_names(s.snapshots) == [first]
    assert ws.backups() == [first]
    assert s.dest_fs is not None and s.dest_fs.subvolumes() == [f"{first}/data"]
    assert len(ws.reports()) == 1
