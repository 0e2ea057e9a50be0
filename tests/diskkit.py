"""Small real ext4 filesystems for the tests: a loop device under the test's own tmp_path.

``ext4_filesystems`` backs a factory fixture (``ext4_fs`` in the test
modules): ``ext4_fs(mount_point, size_mb)`` makes a sparse image in the
test's folder (``truncate``), attaches it to a loop device of its own
(``losetup --find --show``), formats it (``mkfs.ext4 -q``, no reserved
blocks, so what root may write is what ``statvfs`` calls available) and
mounts it on ``mount_point`` — or leaves it unmounted with ``mounted=False``,
for a test whose backup hook mounts the device itself. At teardown, even
after a failure, every process still mentioning the test's folder is
killed, the filesystem is unmounted (lazily if still busy) and its loop
device detached, as tests/btrfskit.py does for btrfs (whose helpers these
are). No other loop device is ever touched.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
from btrfskit import _check, _run, mount_points, release_loop_filesystems

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

TOOLS = ("losetup", "mkfs.ext4", "mount", "umount", "truncate")
MiB = 1024 * 1024


def skip_reason() -> str | None:
    """Why loop-mounted ext4 tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (loop devices, mount)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing tools: {', '.join(missing)}"
    return None


needs_loop = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")


@dataclass
class Ext4:
    """One ext4 filesystem on a loop device made by the fixture."""

    image: Path
    device: str  # e.g. /dev/loop3
    mount: Path

    def is_mounted(self) -> bool:
        return str(self.mount) in mount_points()

    def mount_now(self) -> None:
        _check(["mount", self.device, str(self.mount)])

    def unmount(self) -> None:
        _check(["umount", str(self.mount)])

    def space(self) -> tuple[int, int]:
        """Free and total bytes while mounted, as the engine's report counts them."""
        assert self.is_mounted(), f"{self.mount} is not mounted"
        st = os.statvfs(self.mount)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def fill_until_free(folder: Path, free_bytes: int, name: str = "ballast.bin") -> Path:
    """Write one file into ``folder`` until its filesystem has about ``free_bytes`` left."""
    st = os.statvfs(folder)
    size = max(0, st.f_bavail * st.f_frsize - free_bytes)
    path = folder / name
    with open(path, "wb") as f:
        block = b"\xa5" * MiB
        while size > 0:
            size -= f.write(block[: min(size, MiB)])
        f.flush()
        os.fsync(f.fileno())
    return path


class Ext4Factory:
    """Makes loop-device ext4 filesystems for one test and removes them afterwards."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: list[Ext4] = []

    def __call__(self, mount: Path, size_mb: int = 16, *, mounted: bool = True,
                 mkfs_options: tuple[str, ...] = ()) -> Ext4:
        images = self.root / "images"
        images.mkdir(exist_ok=True)
        image = images / f"ext4-{len(self.made)}-{mount.name}.img"
        mount.mkdir(parents=True, exist_ok=True)
        _check(["truncate", "-s", f"{size_mb}M", str(image)])
        attached = _run(["losetup", "--find", "--show", str(image)])
        if attached.returncode != 0:
            image.unlink()
            pytest.skip(f"cannot attach a loop device here: {attached.stderr.strip()}")
        fs = Ext4(image, attached.stdout.strip(), mount)
        # Registered before anything else can fail, so teardown detaches it.
        self.made.append(fs)
        _check(["mkfs.ext4", "-q", "-m", "0", *mkfs_options, fs.device])
        if mounted:
            fs.mount_now()
        return fs

    def close(self) -> None:
        release_loop_filesystems(self.root, self.made)


def ext4_filesystems(root: Path) -> Iterator[Callable[..., Ext4]]:
    """The body of an ``ext4_fs`` fixture: ``yield from ext4_filesystems(tmp_path)``."""
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    factory = Ext4Factory(root)
    try:
        yield factory
    finally:
        factory.close()
