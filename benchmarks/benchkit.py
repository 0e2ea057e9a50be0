"""What the benchmark scripts share: commands, the page cache, loop-mounted btrfs.

Imported by the scripts beside it (``python benchmarks/x.py`` puts this folder
on ``sys.path``).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path


def sh(argv: list[str]) -> str:
    """Run a command; its stdout, or exit the benchmark with what it said."""
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} exited {result.returncode}:\n"
                         f"{result.stdout}{result.stderr}")
    return str(result.stdout)


def drop_caches() -> None:
    """Write everything out and empty the page cache (root only): a cold run."""
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def count_tree(root: Path) -> tuple[int, int]:
    """Files below ``root`` and their total size (to check a copy against its source)."""
    files = size = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            files += 1
            size += os.lstat(os.path.join(dirpath, name)).st_size
    return files, size


def mounted(point: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(point) for line in f if len(line.split()) > 4)


@dataclass
class Filesystem:
    """A loop-mounted btrfs; ``remove`` detaches only this image's loop devices."""

    image: Path
    mount: Path

    def make(self, size_mb: int) -> Filesystem:
        self.remove()
        self.image.parent.mkdir(parents=True, exist_ok=True)
        self.mount.mkdir(parents=True, exist_ok=True)
        sh(["truncate", "-s", f"{size_mb}M", str(self.image)])
        sh(["mkfs.btrfs", "-q", "-f", str(self.image)])
        sh(["mount", "-o", "loop", str(self.image), str(self.mount)])
        return self

    def remove(self) -> None:
        deadline = time.monotonic() + 20
        while mounted(self.mount):
            if subprocess.run(["umount", str(self.mount)], capture_output=True).returncode == 0:
                break
            if time.monotonic() > deadline:
                subprocess.run(["umount", "-l", str(self.mount)], capture_output=True)
                break
            time.sleep(0.2)
        # Only the loop devices backing this image (`mount -o loop` sets autoclear,
        # but the kernel releases the device asynchronously).
        while self.image.exists() and time.monotonic() < deadline:
            out = subprocess.run(["losetup", "-j", str(self.image)], capture_output=True,
                                 text=True).stdout
            devices = [line.split(":", 1)[0] for line in out.splitlines() if line.strip()]
            if not devices:
                break
            for device in devices:
                subprocess.run(["losetup", "-d", device], capture_output=True)
            time.sleep(0.1)
        self.image.unlink(missing_ok=True)


def build_tree(root: Path, files: int, *, size: int, seed: int = 0,
               per_folder: int = 200) -> None:
    """``files`` files of ``size`` bytes in folders of ``per_folder``, distinct contents (no
    dedup tricks); built once: a finished tree is marked and reused by later invocations."""
    if (root / ".complete").exists():
        return
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    block = os.urandom(size - 16)
    for i in range(files):
        folder = root / f"d{i // per_folder:04d}"
        if i % per_folder == 0:
            folder.mkdir()
        with open(folder / f"f{i:06d}.dat", "wb") as f:
            f.write(seed.to_bytes(8, "little") + i.to_bytes(8, "little") + block)
    (root / ".complete").write_text("")
