"""``btrfs send | btrfs receive`` when one side fails (issue 9 item 5, SPEC §2 "Failures").

A receive that fails (its destination full) must end its send: the engine
holds no end of the pipes once the relay between them stops, so the send gets
EPIPE instead of blocking forever on a full pipe with the lock held.
Real loop-mounted btrfs filesystems: a source with more incompressible data
than the destination can hold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from btrfskit import (
    Btrfs,
    btrfs_source,
    fill_random,
    needs_btrfs,
    sync,
)
from conftest import processes_mentioning
from hookkit import complete_backups, in_progress

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import Workspace

pytestmark = [needs_btrfs, pytest.mark.root]

# mkfs.btrfs accepts 114 MiB and up; 130 MiB leaves well under 250 MiB for data.
DEST_MB = 130
SOURCE_MB = 512
DATA_MIB = 250


def _btrfs_processes(ws: Workspace) -> list[tuple[int, str]]:
    return [(pid, cmd) for pid, cmd in processes_mentioning(str(ws.root)) if "btrfs" in cmd]


@pytest.mark.slow
def test_a_receive_failing_on_a_full_destination_ends_the_run(
    ws: Workspace, btrfs_fs: Callable[..., Btrfs]
) -> None:
    src_fs = btrfs_fs(ws.src / "vol", SOURCE_MB)
    btrfs_fs(ws.dest, DEST_MB)
    source = src_fs.subvolume("data")
    fill_random(source, DATA_MIB)
    sync(src_fs)
    ws.write_config(btrfs_source("data", source))

    # Before the fix this run never ended: send blocked on the pipe the engine kept open.
    first = ws.run("run", timeout=120)
    assert first.returncode == 1, f"exit {first.returncode}\n{first.stderr}"
    report = ws.report()
    assert report["status"] == "failed", report
    failure = str(report["failure"])
    assert "btrfs receive" in failure, failure
    assert "No space left on device" in failure, failure
    assert _btrfs_processes(ws) == []
    assert in_progress(ws) == []
    assert complete_backups(ws) == []

    # The lock was released: the next run is not refused (exit 3), it fails the same way.
    second = ws.run("run", timeout=120)
    assert second.returncode == 1, f"exit {second.returncode}\n{second.stderr}"
    assert _btrfs_processes(ws) == []
    assert in_progress(ws) == []
