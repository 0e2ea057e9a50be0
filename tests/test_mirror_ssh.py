"""``mirror`` of an origin over SSH (SPEC §10): through the test sshd, the client key restricted
to ``pibackup-async serve --read-only PATH`` as the README's ``authorized_keys`` line does.

The origin is real backups made by real runs (tests/mirrorkit.py); the mirror
copies them through the restricted key, ``check --connect`` tells a restricted
key from one that can write, and ``bwlimit`` holds the transfer down. After
each, the origin is unchanged inode for inode and byte for byte.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import TYPE_CHECKING

import anyio.to_thread
import pytest
from conftest import needs_rsync
from mirrorkit import Bench, tree_bytes, tree_stats
from sshkit import needs_sshd

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from btrfskit import Btrfs
    from conftest import Workspace
    from sshkit import Sshd

pytestmark = [needs_rsync, needs_sshd]

HOST = "piserver"


def ino(path: Path) -> int:
    return os.lstat(path).st_ino


def over_ssh(bench: Bench, sshd: Sshd, **origin: object) -> None:
    """The mirror's configuration: ``[origin]`` on the test sshd's host."""
    bench.write_mirror_config(origin={"host": HOST, **origin}, extra=sshd.host_toml(HOST))


def test_a_mirror_through_the_restricted_key_copies_every_backup_and_never_writes_the_origin(
        ws: Workspace, sshd: Sshd) -> None:
    bench = Bench(ws)
    names = bench.backups(3)
    sshd.serve_only(bench.origin)
    over_ssh(bench, sshd)
    stats, content = tree_stats(bench.origin), tree_bytes(bench.origin)

    result = bench.mirror()

    assert result.returncode == 0, result.stderr
    assert tree_stats(bench.origin) == stats
    assert tree_bytes(bench.origin) == content
    assert bench.mirror_backups() == names
    for name in names:
        assert tree_bytes(ws.dest / name) == tree_bytes(bench.origin / name)
    first, second, third = (ws.dest / n / "data" for n in names)
    assert ino(first / "same.txt") == ino(second / "same.txt") == ino(third / "same.txt")
    assert ino(first / "edit.txt") != ino(second / "edit.txt")
    report = bench.mirror_report()
    assert report["status"] == "ok"
    assert report["origin"] == f"{HOST}:{bench.origin}"
    assert [(c["name"], c["status"]) for c in report["copied"]] == [(n, "ok") for n in names]
    assert all(c["received_bytes"] > 0 for c in report["copied"])
    # Everything rode on one SSH connection (the run's master).
    assert sshd.logins() == 1
    # serve refused nothing the mirror asked for.
    assert "refused" not in sshd.log_text()

    newer = bench.backup(lambda data: (data / "new.txt").write_text("one more\n"))
    stats = tree_stats(bench.origin)
    again = bench.mirror()
    assert again.returncode == 0, again.stderr
    assert [c["name"] for c in bench.mirror_report()["copied"]] == [newer]
    assert tree_bytes(ws.dest / newer) == tree_bytes(bench.origin / newer)
    assert ino(ws.dest / newer / "data" / "same.txt") == ino(third / "same.txt")
    assert tree_stats(bench.origin) == stats


def test_the_origins_backups_are_only_its_complete_folders(ws: Workspace, sshd: Sshd) -> None:
    """Over SSH as locally: an in-progress or deleting folder, a link named like a backup and
    a stray folder are not copied."""
    bench = Bench(ws)
    [name] = bench.backups(1)
    os.mkdir(bench.origin / "2030-01-01t00-00-00+0000.in-progress")
    os.mkdir(bench.origin / "2020-01-01t00-00-00+0000.deleting")
    os.mkdir(bench.origin / "lost+found")
    os.symlink(bench.origin / name, bench.origin / "2029-01-01t00-00-00+0000")
    sshd.serve_only(bench.origin)
    over_ssh(bench, sshd)
    stats = tree_stats(bench.origin)

    result = bench.mirror()

    assert result.returncode == 0, result.stderr
    assert bench.mirror_backups() == [name]
    assert tree_stats(bench.origin) == stats


def test_dry_run_over_ssh_lists_the_copies_and_leaves_no_connection(ws: Workspace,
                                                                    sshd: Sshd) -> None:
    bench = Bench(ws)
    names = bench.backups(2)
    sshd.serve_only(bench.origin)
    over_ssh(bench, sshd)

    result = bench.mirror("--dry-run")

    assert result.returncode == 0, result.stderr
    copies = [line for line in result.stdout.splitlines() if line.startswith("would copy")]
    assert [line.split()[2] for line in copies] == names
    assert f"{HOST}:{bench.origin}" in result.stdout
    assert os.listdir(ws.dest) == []
    from test_remote import wait_disconnected

    wait_disconnected(sshd)


# --- check --connect -----------------------------------------------------------------


def test_check_connect_passes_with_the_restricted_key(ws: Workspace, sshd: Sshd) -> None:
    bench = Bench(ws)
    bench.backups(1)
    sshd.serve_only(bench.origin)
    over_ssh(bench, sshd)
    stats = tree_stats(bench.origin)

    result = ws.run("check", "--connect")

    assert result.returncode == 0, result.stderr
    assert f"origin {HOST}:{bench.origin}: ok" in result.stderr
    assert tree_stats(bench.origin) == stats


def test_check_connect_fails_when_the_key_can_write_the_origin(ws: Workspace, sshd: Sshd
                                                               ) -> None:
    bench = Bench(ws)
    bench.backups(1)
    sshd.unrestricted()
    over_ssh(bench, sshd)
    stats = tree_stats(bench.origin)

    result = ws.run("check", "--connect")

    assert result.returncode == 1, result.stderr
    [line] = [line for line in result.stderr.splitlines() if "can write" in line]
    assert f"origin {HOST}:{bench.origin}" in line
    assert "serve --read-only" in line
    assert "Traceback" not in result.stderr
    # The probe was a dry run: nothing was written there.
    assert tree_stats(bench.origin) == stats


def test_check_connect_fails_when_the_origin_cannot_be_read(ws: Workspace, sshd: Sshd) -> None:
    bench = Bench(ws)
    missing = ws.root / "not-mounted"
    sshd.serve_only(missing)
    over_ssh(bench, sshd, path=str(missing))

    result = ws.run("check", "--connect")

    assert result.returncode == 1, result.stderr
    said = [line for line in result.stderr.splitlines() if line.startswith("error: origin")]
    assert len(said) == 1, result.stderr
    assert f"{HOST}:{missing}" in said[0] and "Traceback" not in result.stderr


def test_check_connect_fails_when_the_host_is_unreachable(ws: Workspace, sshd: Sshd) -> None:
    bench = Bench(ws)
    sshd.serve_only(bench.origin)
    bench.write_mirror_config(origin={"host": HOST},
                              extra=sshd.host_toml(HOST, known_hosts=sshd.wrong_known_hosts()))

    result = ws.run("check", "--connect")

    assert result.returncode == 1, result.stderr
    assert any(line.startswith("error: origin") and "cannot be read" in line
               for line in result.stderr.splitlines()), result.stderr


# --- bwlimit -------------------------------------------------------------------------


def test_bwlimit_caps_the_transfer(ws: Workspace, sshd: Sshd) -> None:
    """4 MiB of incompressible data at 512 KiB/s cannot take less than 8 s."""
    bench = Bench(ws)
    size, rate = 4 << 20, 512 << 10
    name = bench.backup(lambda data: (data / "random.bin").write_bytes(os.urandom(size)))
    sshd.serve_only(bench.origin)
    over_ssh(bench, sshd, bwlimit="512KiB")

    started = time.monotonic()
    result = bench.mirror(timeout=120)
    took = time.monotonic() - started

    assert result.returncode == 0, result.stderr
    assert bench.mirror_backups() == [name]
    report = bench.mirror_report()
    [copied] = report["copied"]
    assert copied["received_bytes"] >= size
    assert took >= size / rate, f"{size} bytes at {rate} B/s took only {took:.2f} s"
    assert copied["duration_s"] >= size / rate, json.dumps(copied)


@pytest.mark.parametrize("limit", ["2MiB"])
def test_bwlimit_is_what_rsync_is_given_in_its_own_units(ws: Workspace, sshd: Sshd,
                                                         limit: str) -> None:
    """rsync's --bwlimit counts KiB per second: 2 MiB/s is --bwlimit=2048."""
    bench = Bench(ws)
    bench.backups(1)
    sshd.serve_only(bench.origin)
    over_ssh(bench, sshd, bwlimit=limit)

    result = bench.mirror("--dry-run")

    assert result.returncode == 0, result.stderr
    assert "--bwlimit=2048 " in result.stdout, result.stdout


# --- btrfs over SSH ------------------------------------------------------------------


FIRST, SECOND = "2024-05-01t03-00-00+0000", "2024-05-02t03-00-00+0000"


def btrfs_origin(fs: Btrfs) -> Path:
    """Two backups, each with a received-like read-only subvolume ``db``, a folder, an empty
    folder; the second also an empty subvolume."""
    origin = fs.mount / "origin"
    origin.mkdir()
    for name, content in ((FIRST, "one\n"), (SECOND, "two\n")):
        (origin / name / "plain" / "sub").mkdir(parents=True)
        (origin / name / "empty").mkdir()
        (origin / name / ".pibackup").mkdir()
        work = fs.subvolume(f"work-{name}")
        (work / "file.txt").write_text(content)
        subprocess.run(["btrfs", "subvolume", "snapshot", "-r", str(work),
                        str(origin / name / "db")], check=True, capture_output=True)
    subprocess.run(["btrfs", "subvolume", "create", str(origin / SECOND / "new-vol")],
                   check=True, capture_output=True)
    return origin


def send_into(send: list[str], into: Path) -> None:
    """``send`` (an ssh running btrfs send there) piped into ``btrfs receive into``."""
    into.mkdir()
    sender = subprocess.Popen(send, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert sender.stdout is not None
    receiver = subprocess.run(["btrfs", "receive", str(into)], stdin=sender.stdout,
                              capture_output=True, timeout=60)
    sender.stdout.close()
    _, said = sender.communicate(timeout=60)
    assert sender.returncode == 0, said
    assert receiver.returncode == 0, receiver.stderr


async def test_subvolumes_are_found_and_sent_through_the_restricted_key(
        tmp_path: Path, btrfs_fs: Callable[..., Btrfs], new_sshd: Callable[[], Sshd]) -> None:
    """SshOrigin tells a received subvolume from a folder with rsync alone (-xx leaves out
    what is on another device, an empty subvolume too), and its btrfs send, full and
    incremental, passes serve."""
    from pibackup_async.engine.config import Host
    from pibackup_async.engine.mirror_ssh import SshOrigin

    fs = btrfs_fs(tmp_path / "btrfs")
    origin = btrfs_origin(fs)
    sshd = new_sshd()
    sshd.serve_only(origin)
    host = Host(address=sshd.address, port=sshd.port, user="root",
                identity_file=str(sshd.client.path), known_hosts=str(sshd.known_hosts))
    stats = tree_stats(origin)
    mirror = SshOrigin(HOST, host, str(origin))
    received = fs.mount / "received"
    received.mkdir()
    try:
        await mirror.open()
        assert [e.name for e in await mirror.backups()] == [SECOND, FIRST]
        folders = {f.name: f.subvolume for f in await mirror.folders(SECOND)}
        assert folders == {"db": True, "empty": False, "new-vol": True, "plain": False}
        with pytest.raises(FileNotFoundError):
            await mirror.folders("2020-01-01t00-00-00+0000")
        for name, parent in ((FIRST, None), (SECOND, FIRST)):
            send = await mirror.btrfs_send_argv(name, "db", parent)
            assert send is not None
            await anyio.to_thread.run_sync(send_into, send, received / name)
    finally:
        await mirror.close()
    assert (received / SECOND / "db" / "file.txt").read_text() == "two\n"
    assert tree_stats(origin) == stats
    assert "refused" not in sshd.log_text()


# --- what crosses the wire ----------------------------------------------------------------


def test_a_nightly_copy_sends_the_manifest_as_a_delta_on_the_previous_copys(
        ws: Workspace, sshd: Sshd) -> None:
    """Issue 21's wire goal: the second backup's manifest differs from the first's by one
    line, so it must cross as a delta on the mirror's previous copy, not whole."""
    bench = Bench(ws)

    def many(data: Path) -> None:
        for i in range(4000):
            (data / f"f{i:05d}.txt").write_text(f"file {i}\n")
    first = bench.backup(many)
    sshd.serve_only(bench.origin)
    over_ssh(bench, sshd)
    assert bench.mirror().returncode == 0
    # The basis is only read: the previous copy's manifests stay as they were.
    basis = ws.dest / first / ".pibackup"
    before = tree_stats(basis), tree_bytes(basis)
    second = bench.backup(lambda data: (data / "f00007.txt").write_text("changed\n"))
    manifest = bench.origin / second / ".pibackup" / "data.sha256"
    assert manifest.stat().st_size > 300_000

    result = bench.mirror()

    assert result.returncode == 0, result.stderr
    assert (tree_stats(basis), tree_bytes(basis)) == before
    assert bench.mirror_backups() == [first, second]
    assert tree_bytes(ws.dest / second) == tree_bytes(bench.origin / second)
    [copied] = bench.mirror_report()["copied"]
    # The file list of 4,000 names and the manifest's delta, far below the manifest's size.
    assert copied["received_bytes"] < manifest.stat().st_size / 3, json.dumps(copied)

