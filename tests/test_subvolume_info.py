"""The one ioctl that replaces ``btrfs subvolume show`` here says what the command says."""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING

import pytest
from btrfskit import Btrfs, needs_btrfs, subvolume_show
from pibackup_async.engine.filesystems import subvolume_info

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

pytestmark = [needs_btrfs, pytest.mark.root]

FIELDS = ("UUID", "Received UUID", "Flags")


def test_subvolume_info_agrees_with_btrfs_subvolume_show(
        tmp_path: Path, btrfs_fs: Callable[..., Btrfs]) -> None:
    src, dest = btrfs_fs(tmp_path / "src"), btrfs_fs(tmp_path / "dest")
    live = src.subvolume("data")
    (live / "file").write_text("x")
    (src.mount / "snaps").mkdir()
    snapshot = src.mount / "snaps" / "data"
    subprocess.run(["btrfs", "subvolume", "snapshot", "-r", str(live), str(snapshot)],
                   check=True, capture_output=True)
    with subprocess.Popen(["btrfs", "send", "-q", str(snapshot)],
                          stdout=subprocess.PIPE) as send:
        subprocess.run(["btrfs", "receive", str(dest.mount)], stdin=send.stdout, check=True,
                       capture_output=True)
    assert send.returncode == 0
    received = dest.mount / "data"
    for path in (live, snapshot, received):
        shown = subvolume_show(path)
        assert subvolume_info(str(path)) == {k: shown[k] for k in FIELDS}, path
    # The received copy is read-only and names the snapshot it came from.
    info = subvolume_info(str(received))
    assert info is not None
    assert info["Flags"] == "readonly"
    assert info["Received UUID"] == subvolume_show(snapshot)["UUID"]
    # A plain folder, or a path outside btrfs: not answered; the command decides.
    (live / "folder").mkdir()
    assert subvolume_info(str(live / "folder")) is None
    assert subvolume_info(str(tmp_path)) is None
