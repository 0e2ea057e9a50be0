"""`check` warns when the destination's filesystem cannot promise a whole backup after a
power cut: vfat, exFAT, ext2, ext4 without a journal (SPEC §1).

Each filesystem is real: a small image on a loop device of the test's own,
made by the filesystem's own mkfs and mounted (tests/btrfskit.py releases it).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
from btrfskit import _check, _run, release_loop_filesystems
from datakit import rsync_source
from diskkit import needs_loop

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from conftest import Workspace

pytestmark = needs_loop

WARNING = "cannot promise that a backup survives a power cut whole"


@dataclass
class LoopFs:
    image: Path
    device: str
    mount: Path


@pytest.fixture
def loop_fs(tmp_path: Path) -> Iterator[Callable[[str, list[str]], Path]]:
    """``loop_fs(name, mkfs_argv)``: a 32 MB image formatted by ``mkfs_argv`` (the device
    appended) and mounted; the mount point is returned. Released at teardown."""
    made: list[LoopFs] = []

    def make(name: str, mkfs: list[str]) -> Path:
        if shutil.which(mkfs[0]) is None:
            pytest.skip(f"{mkfs[0]} is not installed")
        image = tmp_path / f"{name}.img"
        _check(["truncate", "-s", "32M", str(image)])
        fs = LoopFs(image, _check(["losetup", "--find", "--show", str(image)]).strip(),
                    tmp_path / name)
        made.append(fs)
        _check([*mkfs, fs.device])
        fs.mount.mkdir()
        mounted = _run(["mount", fs.device, str(fs.mount)])
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount {name} here: {mounted.stderr.strip()}")
        return fs.mount

    yield make
    release_loop_filesystems(tmp_path, made)


def check_on(ws: Workspace, mount: Path) -> subprocess.CompletedProcess[str]:
    dest = mount / "backups"
    dest.mkdir()
    # --no-A/--no-X: the vfat warning about owners and ACLs is another matter.
    ws.config_path.write_text(
        f'destination = "{dest}"\nstate_dir = "{ws.state}"\nrequire_mountpoint = true\n'
        + rsync_source("data", ws.make_source("data"), rsync_args=["--no-A", "--no-X"]))
    result = ws.run("check")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result


def durability_warnings(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if "[warning" in line and WARNING in line]


@pytest.mark.parametrize(("name", "mkfs", "said"), [
    ("vfat", ["mkfs.vfat"], "vfat, which has no journal"),
    ("exfat", ["mkfs.exfat"], "exfat, which has no journal"),
    ("ext2", ["mkfs.ext2", "-q"], "ext2, which has no journal"),
    ("ext4-nojournal", ["mkfs.ext4", "-q", "-O", "^has_journal"], "ext4 without a journal"),
])
def test_check_warns_on_a_filesystem_without_a_journal(
    ws: Workspace, loop_fs: Callable[[str, list[str]], Path], name: str, mkfs: list[str],
    said: str,
) -> None:
    result = check_on(ws, loop_fs(name, mkfs))
    [warning] = durability_warnings(result)
    assert f"destination: its filesystem ({said})" in warning, warning
    assert "ok (" in result.stderr, result.stderr


def test_check_does_not_warn_on_ext4_with_its_journal(
    ws: Workspace, loop_fs: Callable[[str, list[str]], Path],
) -> None:
    result = check_on(ws, loop_fs("ext4", ["mkfs.ext4", "-q"]))
    assert durability_warnings(result) == [], result.stderr
    assert "[warning" not in result.stderr, result.stderr
