"""End to end: `du [--json]` on real backups (SPEC §7).

Three backups with known data: what is common to all of them (hard-linked by
--link-dest), what two of them share, and what only one holds. Sizes are
bytes allocated on disk; every file here is a multiple of 4 KiB of random
data, so the truth is its size, and the folders' blocks are the only
difference (well under 1%). A received btrfs subvolume shares extents, not
inodes: there the figures are `btrfs filesystem du`'s.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
from btrfskit import Btrfs, btrfs_source, needs_btrfs, sync
from conftest import needs_rsync
from datakit import cli_ok, complete_backups, rsync_source

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from conftest import Workspace

pytestmark = [needs_rsync]

KiB = 1024
MiB = 1024 * KiB


def random_file(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))


def _run(ws: Workspace) -> str:
    before = set(complete_backups(ws.dest))
    cli_ok(ws, "run")
    [name] = set(complete_backups(ws.dest)) - before
    return name


def du_json(ws: Workspace) -> tuple[dict[str, tuple[int, int]], int]:
    """{backup: (total, exclusive)} and destination_bytes, from `du --json`."""
    out = json.loads(cli_ok(ws, "du", "--json").stdout)
    assert set(out) == {"backups", "destination_bytes"}
    return ({b["name"]: (b["total_bytes"], b["exclusive_bytes"]) for b in out["backups"]},
            out["destination_bytes"])


def near(measured: int, truth: int, slack: int = 0) -> bool:
    """Within 1% of the truth (plus ``slack`` bytes of folders, where the truth is 0)."""
    return abs(measured - truth) <= truth / 100 + slack


@dataclass
class Three:
    ws: Workspace
    names: list[str]  # oldest first


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Three:
    from conftest import Workspace

    ws = Workspace(tmp_path_factory.mktemp("du"))
    data = ws.src / "data"
    for i in range(16):
        random_file(data / "common" / f"c{i:02d}.bin", 256 * KiB)   # 4 MiB in every backup
    random_file(data / "u1.bin", 3 * MiB)                             # only the first
    random_file(data / "b12.bin", 2 * MiB)                            # the first two
    ws.write_config(rsync_source("data", data))
    first = _run(ws)

    (data / "u1.bin").unlink()
    random_file(data / "u2.bin", 5 * MiB)                             # only the second
    second = _run(ws)

    (data / "b12.bin").unlink()
    (data / "u2.bin").unlink()
    random_file(data / "u3.bin", 6 * MiB)                             # only the third,
    os.link(data / "u3.bin", data / "u3.link")                        # twice (one inode)
    random_file(data / "pinned.bin", 1 * MiB)                         # linked from outside
    third = _run(ws)
    os.link(ws.dest / third / "data" / "pinned.bin", ws.root / "pin")
    # A run in progress: not a complete backup, counted nowhere.
    later = datetime.strptime(third, "%Y-%m-%dt%H-%M-%S%z") + timedelta(hours=1)
    running = later.strftime("%Y-%m-%dt%H-%M-%S%z") + ".in-progress"
    random_file(ws.dest / running / "data" / "partial.bin", 2 * MiB)
    return Three(ws, [first, second, third])


def test_totals_and_exclusive_bytes_match_the_truth(three: Three) -> None:
    first, second, third = three.names
    backups, destination = du_json(three.ws)
    assert list(backups) == [third, second, first], "newest first"
    truth = {
        first: (4 * MiB + 3 * MiB + 2 * MiB, 3 * MiB),
        second: (4 * MiB + 2 * MiB + 5 * MiB, 5 * MiB),
        # u3 counted once; pinned.bin is linked from outside: deleting frees nothing of it.
        third: (4 * MiB + 6 * MiB + 1 * MiB, 6 * MiB),
    }
    for name, (total, exclusive) in truth.items():
        got_total, got_exclusive = backups[name]
        assert near(got_total, total), (name, got_total, total)
        assert near(got_exclusive, exclusive), (name, got_exclusive, exclusive)
        assert got_exclusive <= got_total
    # Every file of every complete backup once: the in-progress folder is not counted.
    assert near(destination, (4 + 3 + 2 + 5 + 6 + 1) * MiB), destination


def test_table_on_stdout(three: Three) -> None:
    result = cli_ok(three.ws, "du")
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["BACKUP", "TOTAL", "EXCLUSIVE"]
    assert [line.split()[0] for line in lines[1:]] == [*reversed(three.names), "destination"]
    first_row = lines[3].split()
    assert first_row[1:] == ["9.0", "MiB", "3.0", "MiB"], lines
    # The data's 21 MiB and the manifests' few blocks (.pibackup counts: it is on the disk).
    assert lines[-1].split()[1:] in (["21.0", "MiB"], ["21.1", "MiB"]), lines


def test_no_backup_gives_an_empty_list(ws: Workspace) -> None:
    ws.write_config(rsync_source("data", ws.make_source("data")))
    assert du_json(ws) == ({}, 0)
    assert "no complete backups" in cli_ok(ws, "du").stdout


# --- received btrfs subvolumes ------------------------------------------------------------


def btrfs_du(path: Path) -> tuple[int, int]:
    """`btrfs filesystem du -s --raw`'s (total, exclusive) of one path."""
    out = subprocess.run(["btrfs", "filesystem", "du", "-s", "--raw", str(path)],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    fields: list[Any] = out.splitlines()[-1].split()
    return int(fields[0]), int(fields[1])


@needs_btrfs
@pytest.mark.root
@pytest.mark.slow
def test_received_subvolumes_as_btrfs_filesystem_du_counts_them(
        ws: Workspace, btrfs_fs: Callable[..., Btrfs]) -> None:
    src_fs = btrfs_fs(ws.src / "vol")
    dest_fs = btrfs_fs(ws.dest)
    data = src_fs.subvolume("data")
    for i in range(4):
        random_file(data / f"big{i}.bin", 2 * MiB)                    # big0 only in the first
    ws.write_config(btrfs_source("data", data))
    sync(src_fs)
    first = _run(ws)
    (data / "big0.bin").unlink()
    random_file(data / "u2.bin", 3 * MiB)                             # only the second
    sync(src_fs)
    second = _run(ws)
    (data / "u2.bin").unlink()
    random_file(data / "u3.bin", 4 * MiB)                             # only the third
    sync(src_fs)
    third = _run(ws)
    # Received data still in memory has no extent yet (btrfs filesystem du skips it too).
    sync(dest_fs)

    backups, destination = du_json(ws)
    for name in (first, second, third):
        assert os.lstat(ws.dest / name / "data").st_ino == 256, "a received subvolume"
        folder_blocks = os.lstat(ws.dest / name).st_blocks * 512
        total, exclusive = btrfs_du(ws.dest / name / "data")
        assert backups[name] == (total + folder_blocks, exclusive + folder_blocks)
    truth = {first: (8 * MiB, 2 * MiB), second: (9 * MiB, 3 * MiB), third: (10 * MiB, 4 * MiB)}
    for name, (total, exclusive) in truth.items():
        assert near(backups[name][0], total), (name, backups[name], total)
        assert near(backups[name][1], exclusive), (name, backups[name], exclusive)
    # Extents shared between the subvolumes are counted once.
    assert near(destination, (8 + 3 + 4) * MiB), destination
