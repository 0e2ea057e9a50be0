"""End to end: btrfs sources on a remote host, over a real OpenSSH sshd (SPEC §2 steps 3 and 5).

The "remote" host is this machine, reached through a test sshd on 127.0.0.1
(tests/sshkit.py); its btrfs is a loop filesystem (tests/btrfskit.py). The
sshd runs in a private mount namespace (sshkit, ``unshare --mount``), which is
used to make the source filesystem truly remote: it is mounted on
``<ws>/src/vol`` *before* the server starts (so the server's namespace has it),
then bind-mounted on ``<ws>/view`` and unmounted from ``<ws>/src/vol`` here.
From then on the engine can reach the source and its snapshots only over SSH
(a command run locally by mistake finds an empty folder), while the test
reads them through ``<ws>/view``. The destination filesystem is mounted after
the server started, so the "remote" side never sees it. Where the server does
not get a namespace of its own, both sides see the same mounts and the view is
``<ws>/src/vol`` itself.

Processes on the "remote" side (``btrfs send``) are ordinary processes of this
machine, descendants of the test sshd, so the /proc scan finds them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from btrfskit import (
    LATER,
    SETTLED,
    SNAPSHOTS,
    Btrfs,
    assert_received,
    btrfs_source,
    change,
    fill_random,
    is_subvolume,
    mount_points,
    needs_btrfs,
    parent_of,
    save_command,
    snapshot_names,
    snapshot_space,
    subvolume_list,
    subvolume_show,
)
from conftest import kill_mentioning, needs_rsync, processes_mentioning, wait_for
from datakit import (
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
    source_toml,
    start,
    started_marker,
    tail_text,
    wait_marker,
    wait_no_processes,
)
from sshkit import SSHD, ClientKey, Sshd, descendants, established_to, free_port, sshd_servers

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from conftest import Workspace

pytestmark = [
    needs_btrfs,
    needs_rsync,
    pytest.mark.root,
    pytest.mark.skipif(not os.path.exists(SSHD), reason="OpenSSH sshd is not installed"),
    pytest.mark.skipif(shutil.which("ssh") is None, reason="the OpenSSH client is not installed"),
]

HOST = "h1"
MiB = 1024 * 1024


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture
def new_sshd(btrfs_fs: Callable[..., Btrfs], tmp_path_factory: pytest.TempPathFactory,
             client_key: ClientKey) -> Iterator[Callable[[], Sshd]]:
    """Test sshd instances on demand, stopped (by PID) at teardown.

    Depends on ``btrfs_fs`` so that the servers, whose mount namespaces hold
    the source filesystem, are gone before the loop devices are detached.
    """
    yield from sshd_servers(tmp_path_factory, client_key)


@dataclass
class Setup:
    ws: Workspace
    sshd: Sshd
    remote: Path          # the source filesystem's mount point as the host sees it
    view: Path            # the same filesystem as this test sees it
    dest_fs: Btrfs | None
    hidden: bool          # the source filesystem is not mounted at ``remote`` here
    stderr: str = ""

    @property
    def source(self) -> Path:
        """The source subvolume's path on the host (what the config says)."""
        return self.remote / "data"

    @property
    def local_source(self) -> Path:
        return self.view / "data"

    @property
    def local_snapshots(self) -> Path:
        """The destination's folder in the default snapshot_dir (SPEC §2 step 3)."""
        return snapshot_space(self.view / SNAPSHOTS, self.ws.dest)

    def snapshot(self, name: str) -> Path:
        """A snapshot's path on the host (as commands and reports name it)."""
        return self.remote / SNAPSHOTS / self.local_snapshots.name / name / "data"

    def local_snapshot(self, name: str) -> Path:
        return self.local_snapshots / name / "data"

    def source_subvolumes(self) -> list[str]:
        return subvolume_list(self.view)

    def configure(self, extra: str = "", **source_keys: Any) -> None:
        self.ws.write_config(
            self.sshd.host_toml(HOST)
            + btrfs_source("data", self.source, host=HOST, **source_keys) + extra)

    def run(self) -> tuple[str, dict[str, Any]]:
        """One successful run: the new backup's name and its report."""
        before = set(complete_backups(self.ws.dest))
        self.stderr = cli_ok(self.ws, "run", timeout=60).stderr
        [name] = set(complete_backups(self.ws.dest)) - before
        report = self.ws.report()
        assert report["name"] == name and report["status"] == "ok", report
        return name, report


def _mount_ns(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/mnt")


def _umount(path: Path) -> None:
    deadline = time.monotonic() + 10
    while str(path) in mount_points():
        if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
            return
        if time.monotonic() > deadline:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
            return
        time.sleep(0.1)


@pytest.fixture
def remote_btrfs(ws: Workspace, btrfs_fs: Callable[..., Btrfs],
                 new_sshd: Callable[[], Sshd]) -> Iterator[Callable[..., Setup]]:
    """``make(dest_btrfs=True, size_mb=320)``: a btrfs source on the "remote" host.

    Torn down before the sshd and the filesystems: the local view is
    unmounted here, the rest by their own fixtures.
    """
    views: list[Path] = []

    def make(*, dest_btrfs: bool = True, size_mb: int = 320) -> Setup:
        remote = ws.src / "vol"
        btrfs_fs(remote, size_mb).subvolume("data")
        sshd = new_sshd()
        assert sshd.proc is not None
        view = remote
        hidden = _mount_ns(sshd.proc.pid) != _mount_ns(os.getpid())
        if hidden:
            view = ws.root / "view"
            view.mkdir()
            subprocess.run(["mount", "--bind", str(remote), str(view)], check=True,
                           capture_output=True)
            views.append(view)
            subprocess.run(["umount", str(remote)], check=True, capture_output=True)
        # The host sees its btrfs: the whole setup rests on that.
        seen = subprocess.run([*sshd.ssh_argv(), "root@127.0.0.1", "stat", "-f", "-c", "%T",
                               str(remote / "data")], capture_output=True, text=True, timeout=30)
        assert seen.stdout.strip() == "btrfs", (seen.returncode, seen.stdout, seen.stderr)
        dest_fs = btrfs_fs(ws.dest, size_mb) if dest_btrfs else None
        return Setup(ws, sshd, remote, view, dest_fs, hidden)

    yield make
    kill_mentioning(str(ws.root))
    for view in views:
        _umount(view)


# --- helpers --------------------------------------------------------------------------


def populate(root: Path) -> None:
    """Modes, owners, a hard link, symlinks, xattrs and 4 MiB the incremental send skips."""
    (root / "readme.txt").write_text("hello from a remote btrfs source\n")
    os.setxattr(root / "readme.txt", "user.pibackup", b"kept across ssh")
    os.link(root / "readme.txt", root / "readme.hardlink")
    (root / "secret.key").write_bytes(os.urandom(3000))
    (root / "secret.key").chmod(0o600)
    (root / "bin").mkdir()
    (root / "bin" / "tool.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "bin" / "tool.sh").chmod(0o751)
    (root / "owned.txt").write_text("owned by someone else\n")
    os.chown(root / "owned.txt", 1234, 5678)
    (root / "link").symlink_to("readme.txt")
    (root / "dangling").symlink_to("no/such/file")
    (root / "blob.bin").write_bytes(os.urandom(4 * MiB))
    settle_times(root, SETTLED)


def descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def sends(ws: Workspace) -> list[tuple[int, str]]:
    """Live ``btrfs send`` processes of this test (their snapshot lies under the workspace)."""
    return [(pid, cmd) for pid, cmd in processes_mentioning(str(ws.root))
            if cmd.startswith("btrfs send ")]


def wait_disconnected(server: Sshd, timeout: float = 10) -> None:
    wait_for(lambda: established_to(server.port) == 0, timeout,
             f"the connections to the test sshd (port {server.port}) to close")


# --- a: into a btrfs destination ----------------------------------------------------------


def test_remote_send_is_full_then_incremental_and_keeps_only_the_newest_parent(
        ws: Workspace, remote_btrfs: Callable[..., Setup]) -> None:
    s = remote_btrfs()
    populate(s.local_source)
    s.configure()

    first, report = s.run()
    copy = ws.dest / first / "data"
    assert_same_tree(s.local_source, copy)
    assert_received(copy, s.local_snapshot(first))
    data = report["sources"]["data"]
    assert data["type"] == "btrfs" and data["status"] == "ok"
    assert data["snapshot"]["command"] == [
        "btrfs", "subvolume", "snapshot", "-r", str(s.source), str(s.snapshot(first))]
    command = save_command(report)
    assert command[:2] == ["btrfs", "send"] and parent_of(command) is None, command
    assert command[command.index("|") - 1] == str(s.snapshot(first)), command
    assert command[-3:] == ["btrfs", "receive", str(ws.dest / f"{first}.in-progress")]
    assert data["bytes"] > 4 * MiB, "bytes is the size of the full send stream"
    assert snapshot_names(s.local_snapshots) == [first]
    assert s.sshd.logins() >= 1, "nothing went through the test sshd"
    first_uuid = subvolume_show(s.local_snapshot(first))["UUID"]

    as_first = describe_tree(s.local_source)
    change(s.local_source, remove="dangling")
    second, report = s.run()

    command = save_command(report)
    assert parent_of(command) == str(s.snapshot(first)), command
    stream = report["sources"]["data"]["bytes"]
    assert 0 < stream < MiB, f"an incremental stream repeats nothing unchanged: {stream} bytes"
    two = ws.dest / second / "data"
    assert_same_tree(s.local_source, two)
    assert diff_trees(as_first, describe_tree(copy)) == [], "the first backup changed"
    # The first copy is untouched, still made from the first snapshot (now deleted).
    assert is_subvolume(copy) and "readonly" in subvolume_show(copy).get("Flags", "")
    assert subvolume_show(copy)["Received UUID"] == first_uuid
    assert_received(two, s.local_snapshot(second))
    assert snapshot_names(s.local_snapshots) == [second], "only the newest parent is kept"
    assert s.source_subvolumes() == sorted(
        ["data", os.path.relpath(s.local_snapshot(second), s.view)])
    assert s.dest_fs is not None
    assert s.dest_fs.subvolumes() == sorted([f"{first}/data", f"{second}/data"])
    wait_disconnected(s.sshd)
    wait_no_processes(ws, 10)


# --- b: into a plain folder ---------------------------------------------------------------


def test_remote_snapshot_into_a_plain_folder_is_rsynced_linked_and_not_kept(
        ws: Workspace, remote_btrfs: Callable[..., Setup]) -> None:
    s = remote_btrfs(dest_btrfs=False)
    populate(s.local_source)
    s.configure()

    first, report = s.run()
    one = ws.dest / first / "data"
    assert_same_tree(s.local_source, one)
    assert not is_subvolume(one)
    command = save_command(report)
    assert command[0] == "rsync", command
    assert f"root@127.0.0.1:{s.snapshot(first)}/" in command, (
        "rsync pulls from the snapshot on the host", command)
    assert snapshot_names(s.local_snapshots) == [], "no snapshot is kept on the host"
    assert s.source_subvolumes() == ["data"]

    change(s.local_source, remove="dangling")
    second, report = s.run()
    two = ws.dest / second / "data"
    assert_same_tree(s.local_source, two)
    command = save_command(report)
    assert f"--link-dest={one}" in command, command
    assert f"root@127.0.0.1:{s.snapshot(second)}/" in command, command
    for unchanged in ("readme.txt", "readme.hardlink", "blob.bin", "secret.key", "owned.txt"):
        assert os.lstat(one / unchanged).st_ino == os.lstat(two / unchanged).st_ino, (
            f"{unchanged} was not hard-linked against the previous backup")
    assert os.lstat(one / "bin/tool.sh").st_ino != os.lstat(two / "bin/tool.sh").st_ino
    assert (one / "bin/tool.sh").read_text() == "#!/bin/sh\necho hi\n"
    assert snapshot_names(s.local_snapshots) == []
    assert s.source_subvolumes() == ["data"]
    wait_disconnected(s.sshd)  # the OpenSSH master of the rsync pulls too
    wait_no_processes(ws, 10)


# --- c: SIGINT during the remote send -------------------------------------------------------


@pytest.mark.slow
def test_sigint_during_a_remote_send_ends_it_there_and_keeps_the_parent(
        ws: Workspace, remote_btrfs: Callable[..., Setup]) -> None:
    s = remote_btrfs(size_mb=600)
    populate(s.local_source)
    s.configure()
    first, _ = s.run()
    assert s.dest_fs is not None

    # 200 MiB new: the incremental send takes long enough to be caught.
    fill_random(s.local_source / "bulk", 200)
    subprocess.run(["btrfs", "filesystem", "sync", str(s.view)], check=True,
                   capture_output=True)
    found: list[tuple[int, str]] = []
    with start(ws) as running:
        def sending() -> bool:
            if running.proc.poll() is not None:
                raise AssertionError(f"the CLI exited early:\n{running.stderr}")
            found[:] = sends(ws)
            return bool(found)

        wait_for(sending, 30, "btrfs send of the second run on the host")
        [(pid, cmd)] = found
        assert descends_from(pid, s.sshd.proc.pid if s.sshd.proc else -1), (
            f"btrfs send does not run under the test sshd: {cmd}")
        assert f"-p {s.snapshot(first)} " in cmd + " ", cmd
        running.send(signal.SIGINT)
        assert running.wait(60) == 130, running.stderr
    wait_for(lambda: not sends(ws), 15, "the remote btrfs send to end")
    wait_no_processes(ws, 15)
    wait_disconnected(s.sshd)

    report = ws.report()
    assert report["status"] == "interrupted" and report["saved"] is False, report
    interrupted = report["name"]
    assert interrupted != first
    assert report["sources"]["data"]["save"]["status"] == "cancelled", report["sources"]
    assert ws.backups() == [first], "no in-progress folder is left"
    assert s.dest_fs.subvolumes() == [f"{first}/data"], "no partial subvolume is left"
    assert snapshot_names(s.local_snapshots) == [first], (
        "this run's snapshot is deleted on the host, the parent kept")
    assert s.source_subvolumes() == sorted(
        ["data", os.path.relpath(s.local_snapshot(first), s.view)])

    # The next run is incremental from the kept parent (smaller, so it is quick).
    shutil.rmtree(s.local_source / "bulk")
    (s.local_source / "after.txt").write_text("written after the interrupted run\n")
    settle_times(s.local_source / "after.txt", LATER)
    os.utime(s.local_source, ns=(LATER, LATER))
    third, report = s.run()
    assert parent_of(save_command(report)) == str(s.snapshot(first)), save_command(report)
    assert_same_tree(s.local_source, ws.dest / third / "data")
    assert_received(ws.dest / third / "data", s.local_snapshot(third))
    assert snapshot_names(s.local_snapshots) == [third]
    assert s.dest_fs.subvolumes() == sorted([f"{first}/data", f"{third}/data"])


# --- d: the host is off ---------------------------------------------------------------------


def test_an_optional_remote_btrfs_source_on_an_unreachable_host_costs_only_its_folder(
        ws: Workspace, btrfs_fs: Callable[..., Btrfs], client_key: ClientKey,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    # A real subvolume at the configured path, here: had the engine snapshotted
    # it locally instead of on the host, it would have succeeded.
    vol = btrfs_fs(ws.src / "vol")
    source = vol.subvolume("data")
    (source / "file.txt").write_text("must not be backed up from here\n")
    offline = Sshd(tmp_path_factory.mktemp("sshd-offline"), client_key)  # never started
    local = ws.make_source("local", {"file.txt": "from the local source\n"})
    ws.write_config(
        offline.host_toml("laptop", port=free_port())
        + btrfs_source("data", source, host="laptop", optional=True)
        + source_toml("local", local))

    began = time.monotonic()
    result = ws.run("run", timeout=60)
    took = time.monotonic() - began

    assert result.returncode == 1, result.stderr
    assert took < 20, f"an unreachable host held the run for {took:.1f}s"
    [name] = complete_backups(ws.dest)
    assert in_progress(ws) == []
    backup = ws.dest / name
    # .pibackup: the manifest of the rsync source (SPEC §9).
    assert sorted(p.name for p in backup.iterdir()) == [".pibackup", "local"]
    assert (backup / "local" / "file.txt").read_text() == "from the local source\n"
    report = ws.report()
    assert report["status"] == "failed"
    assert report["saved"] is True
    assert report["sources"]["data"]["status"] == "failed"
    assert report["sources"]["local"]["status"] == "ok"
    assert 'source "data"' in report["failure"], report["failure"]
    said = "\n".join([report["failure"], result.stderr,
                      tail_text(report["sources"]["data"]["snapshot"].get("stderr_tail"))])
    assert "laptop" in said, said
    assert snapshot_names(vol.mount / SNAPSHOTS) == [], "a snapshot was taken locally"
    assert vol.subvolumes() == ["data"]


# --- e: the host stops answering during step 1's listing of its snapshots -----------------


def _freeze_sessions(server: Sshd) -> list[int]:
    """SIGSTOP the server's per-connection sshd processes (not the listener): their
    connections stay open and silent, as to a host that froze."""
    assert server.proc is not None
    frozen = []
    for pid in descendants(server.proc.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if not f.read().startswith(b"sshd"):
                    continue
            os.kill(pid, signal.SIGSTOP)
        except (OSError, ProcessLookupError):
            continue
        frozen.append(pid)
    return frozen


def test_a_host_that_stops_answering_fails_the_snapshot_listing_within_its_bound(
        ws: Workspace, remote_btrfs: Callable[..., Setup]) -> None:
    s = remote_btrfs()
    (s.local_source / "file.txt").write_text("made after the host froze once\n")
    # A remote pre opens the run's connection to the host; the local one holds the run
    # (before step 1) while the test freezes that connection's sshd.
    s.configure(extra=f'[[backup_hooks]]\nname = "connect"\nhost = "{HOST}"\npre = "true"\n'
                + hook_toml(ws, HookSpec("gate", phases=("pre",), block=("pre",))))
    frozen: list[int] = []
    try:
        with start(ws) as running:
            wait_marker(started_marker(ws, "gate", "pre"), running)
            frozen = _freeze_sessions(s.sshd)
            assert frozen, "no sshd session to freeze: the remote pre left no connection"
            release_marker(ws, "gate", "pre").touch()
            # Unbounded, the listing waited for asyncssh's keepalives to give up (60 s and
            # more); bounded, it fails after 20 s and the run goes on over a new connection.
            code = running.wait(45)
            stderr = running.stderr
    finally:
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    [line] = [x for x in stderr.splitlines() if "stale snapshots not checked" in x]
    assert f"host {HOST}" in line and "no answer within 20 s" in line, line
    assert code == 0, stderr
    [name] = complete_backups(ws.dest)
    assert (ws.dest / name / "data" / "file.txt").read_text() == (
        "made after the host froze once\n")
    assert snapshot_names(s.local_snapshots) == [name]
    wait_disconnected(s.sshd)
    wait_no_processes(ws, 10)
