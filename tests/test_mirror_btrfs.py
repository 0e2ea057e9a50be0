"""A mirror of a btrfs origin (SPEC §10): received subvolumes sent with ``btrfs send [-p] |
btrfs receive``, onto a btrfs mirror; copied by rsync onto any other.

Real parts: a btrfs source on a loop btrfs (``<ws>/src/vol``, subvolume
``data``) is backed up by real ``run``s into a btrfs origin (``ws.dest``, a
second loop btrfs: each backup's ``data`` a received subvolume); ``mirror``
copies that origin onto a third loop btrfs (or a plain folder, not btrfs).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from btrfskit import (
    SETTLED,
    Btrfs,
    assert_received,
    btrfs_source,
    change,
    fill_random,
    is_subvolume,
    needs_btrfs,
    subvolume_show,
    sync,
)
from conftest import CLI, needs_rsync, wait_for
from datakit import assert_same_tree, cli_ok, complete_backups, settle_times

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from conftest import Workspace
    from sshkit import Sshd

pytestmark = [needs_btrfs, needs_rsync, pytest.mark.root]

MiB = 1024 * 1024


class Mirrored:
    """The origin's runs and the mirror's, with the configurations of both."""

    def __init__(self, ws: Workspace, btrfs_fs: Callable[..., Btrfs], *, mirror_btrfs: bool,
                 size_mb: int = 320) -> None:
        self.ws = ws
        self.src_fs = btrfs_fs(ws.src / "vol", size_mb)
        self.origin_fs = btrfs_fs(ws.dest, size_mb)
        self.source = self.src_fs.subvolume("data")
        self.mirror = ws.root / "mirror"
        self.mirror_fs = btrfs_fs(self.mirror, size_mb) if mirror_btrfs else None
        self.mirror.mkdir(exist_ok=True)
        self.mirror_state = ws.root / "mirror-state"
        self.mirror_config = ws.root / "mirror.toml"
        ws.write_config(btrfs_source("data", self.source))
        self.configure_mirror()

    def configure_mirror(self, extra: str = "", **origin: str) -> None:
        keys = {"path": str(self.ws.dest), **origin}
        self.mirror_config.write_text(
            f"destination = {json.dumps(str(self.mirror))}\n"
            f"state_dir = {json.dumps(str(self.mirror_state))}\n\n[origin]\n"
            + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items()) + "\n" + extra)

    def backup(self) -> str:
        """One run of the origin; the new backup's name (a second later than the last)."""
        before = complete_backups(self.ws.dest)
        sync(self.src_fs)
        cli_ok(self.ws, "run")
        [name] = sorted(set(complete_backups(self.ws.dest)) - set(before))
        return name

    def mirror_argv(self) -> list[str]:
        return [*CLI, "mirror", "--no-progress", "-c", str(self.mirror_config)]

    def run_mirror(self, expect: int = 0) -> dict[str, Any]:
        result = subprocess.run(self.mirror_argv(), capture_output=True, text=True,
                                timeout=180)
        assert result.returncode == expect, (
            f"mirror exited {result.returncode}\n{result.stdout}\n{result.stderr}")
        return self.report()

    def report(self) -> dict[str, Any]:
        reports = sorted((self.mirror_state / "reports").glob("mirror-*.json"))
        assert reports, "mirror wrote no report"
        return dict(json.loads(reports[-1].read_text()))


def populate(root: Path) -> None:
    """A few files that a copy must keep exactly, and 8 MiB no incremental send repeats."""
    (root / "readme.txt").write_text("hello from a btrfs source\n")
    os.setxattr(root / "readme.txt", "user.pibackup", b"kept across send and receive")
    os.link(root / "readme.txt", root / "readme.hardlink")
    (root / "bin").mkdir()
    (root / "bin" / "tool.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "bin" / "tool.sh").chmod(0o751)
    (root / "gone.txt").write_text("removed after the first backup\n")
    (root / "link").symlink_to("readme.txt")
    (root / "blob.bin").write_bytes(os.urandom(8 * MiB))
    settle_times(root, SETTLED)


def received_uuid(path: Path) -> str:
    return subvolume_show(path)["Received UUID"]


# --- onto a btrfs mirror ---------------------------------------------------------------------


def test_first_backup_is_a_full_send_the_next_incremental_and_a_nightly_too(
        ws: Workspace, btrfs_fs: Callable[..., Btrfs]) -> None:
    m = Mirrored(ws, btrfs_fs, mirror_btrfs=True)
    populate(m.source)
    first = m.backup()
    change(m.source, remove="gone.txt")
    second = m.backup()
    dry = subprocess.run([*m.mirror_argv(), "--dry-run"], capture_output=True, text=True,
                         timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert f"btrfs send -p <{first}/…> {ws.dest}/{second}/data | btrfs receive" in dry.stdout, \
        dry.stdout
    assert not (m.mirror_state / "reports").exists() or not m.report().get("copied")

    report = m.run_mirror()
    assert report["status"] == "ok", report
    assert [c["name"] for c in report["copied"]] == [first, second]
    full, incremental = report["copied"]
    assert full["status"] == incremental["status"] == "ok", report["copied"]
    assert full["received_bytes"] > 8 * MiB, "the first backup is a full send"
    assert incremental["received_bytes"] < MiB, "the second is sent on the first"
    for name in (first, second):
        copy = m.mirror / name / "data"
        # Received, read-only, the origin's chain kept: the mirror's copy carries the
        # same received UUID as the origin's (btrfs send passes it on).
        assert_received(copy)
        assert received_uuid(copy) == received_uuid(ws.dest / name / "data")
        assert_same_tree(ws.dest / name / "data", copy)
    assert m.mirror_fs is not None
    assert m.mirror_fs.subvolumes() == sorted([f"{first}/data", f"{second}/data"])

    # A nightly: one more backup on the origin, sent on the mirror's newest copy.
    (m.source / "tonight.txt").write_text("one more file\n")
    third = m.backup()
    report = m.run_mirror()
    assert [c["name"] for c in report["copied"]] == [third]
    assert report["copied"][0]["received_bytes"] < MiB, report["copied"]
    assert_received(m.mirror / third / "data")
    assert_same_tree(ws.dest / third / "data", m.mirror / third / "data")


def test_over_ssh_through_serve_full_then_incremental_the_origin_untouched(
        ws: Workspace, btrfs_fs: Callable[..., Btrfs], new_sshd: Callable[[], Sshd]) -> None:
    """The origin's key restricted to ``serve --read-only``: the stream comes from its
    ``btrfs send``, the receive runs here."""
    m = Mirrored(ws, btrfs_fs, mirror_btrfs=True)
    populate(m.source)
    first = m.backup()
    change(m.source, remove="gone.txt")
    second = m.backup()
    origin_subvolumes = m.origin_fs.subvolumes()
    # Started after the mounts: the server's private mount namespace holds what was there.
    server = new_sshd()
    server.serve_only(ws.dest)
    m.configure_mirror(server.host_toml("origin"), host="origin")

    report = m.run_mirror()
    assert report["status"] == "ok", report
    full, incremental = report["copied"]
    assert (full["name"], incremental["name"]) == (first, second)
    assert full["received_bytes"] > 8 * MiB, "the first backup is a full send"
    assert incremental["received_bytes"] < MiB, "the second is sent on the first"
    for name in (first, second):
        copy = m.mirror / name / "data"
        assert_received(copy)
        assert received_uuid(copy) == received_uuid(ws.dest / name / "data")
        assert_same_tree(ws.dest / name / "data", copy)
    assert m.origin_fs.subvolumes() == origin_subvolumes
    assert complete_backups(ws.dest) == [first, second]


def test_a_parent_missing_on_the_mirror_gives_a_full_send(
        ws: Workspace, btrfs_fs: Callable[..., Btrfs]) -> None:
    """``btrfs receive`` cannot find the parent (the mirror's copy is not the one the origin
    sent: what an SSH origin cannot be asked beforehand): the subvolume goes again whole."""
    from pibackup_async.engine.mirror_btrfs import copy_subvolume
    from pibackup_async.engine.mirror_origin import LocalOrigin

    m = Mirrored(ws, btrfs_fs, mirror_btrfs=True)
    populate(m.source)
    first = m.backup()
    change(m.source, remove="gone.txt")
    second = m.backup()
    into = m.mirror / f"{second}.in-progress"
    into.mkdir()

    async def copy() -> int:
        result = await copy_subvolume(LocalOrigin(str(ws.dest)), second, "data", str(into),
                                      parent=first)
        return result.bytes

    size = anyio.run(copy, backend="asyncio")
    assert size > 8 * MiB, "sent again in full"
    assert_received(into / "data")
    assert_same_tree(ws.dest / second / "data", into / "data")


def test_a_receive_cut_short_is_deleted_and_sent_again_whole(
        ws: Workspace, btrfs_fs: Callable[..., Btrfs]) -> None:
    m = Mirrored(ws, btrfs_fs, mirror_btrfs=True)
    fill_random(m.source, 32)
    name = m.backup()
    # 4 MiB/s: the 32 MiB stream takes about 8 s, so the cut lands inside the receive.
    m.configure_mirror(bwlimit="4MiB")
    process = subprocess.Popen(m.mirror_argv(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    partial = m.mirror / f"{name}.in-progress" / "data"
    try:
        wait_for(lambda: partial.exists() and is_subvolume(partial)
                 and bool(os.listdir(partial)), timeout=60, what="the receive to begin")
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode != 0, stderr
    assert complete_backups(m.mirror) == []
    # What the cut left: a writable subvolume without a received UUID.
    assert partial.exists(), stderr
    assert "readonly" not in subvolume_show(partial)["Flags"]

    t0 = time.monotonic()
    report = m.run_mirror()
    took = time.monotonic() - t0
    [entry] = report["copied"]
    assert entry["name"] == name and entry["status"] == "ok" and entry["resumed"], entry
    assert entry["received_bytes"] > 32 * MiB, "sent again whole"
    # bwlimit holds the stream to 4 MiB/s (a lower bound: never faster).
    assert took > entry["received_bytes"] / (4 * MiB) * 0.9, (took, entry)
    assert complete_backups(m.mirror) == [name]
    assert_received(m.mirror / name / "data")
    assert_same_tree(ws.dest / name / "data", m.mirror / name / "data")


# --- onto a mirror that is not btrfs ---------------------------------------------------------


def test_onto_a_mirror_that_is_not_btrfs_the_subvolume_is_copied_by_rsync(
        ws: Workspace, btrfs_fs: Callable[..., Btrfs]) -> None:
    m = Mirrored(ws, btrfs_fs, mirror_btrfs=False)
    populate(m.source)
    first = m.backup()
    change(m.source, remove="gone.txt")
    second = m.backup()

    report = m.run_mirror()
    assert report["status"] == "ok", report
    assert [c["name"] for c in report["copied"]] == [first, second]
    for name in (first, second):
        copy = m.mirror / name / "data"
        assert not is_subvolume(copy)
        assert_same_tree(ws.dest / name / "data", copy)
    # Linked to the first copy where unchanged: the 8 MiB blob is not written twice.
    assert (os.stat(m.mirror / first / "data" / "blob.bin").st_ino
            == os.stat(m.mirror / second / "data" / "blob.bin").st_ino)
