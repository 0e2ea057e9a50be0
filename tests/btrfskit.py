"""Real btrfs for the tests: loop-mounted filesystems under the test's own tmp_path.

``btrfs_filesystems`` backs a factory fixture (``btrfs_fs`` in the test
modules): ``btrfs_fs(mount_point)`` makes a sparse
image beside the workspace (``truncate``), formats it (``mkfs.btrfs -q -f``)
and mounts it with ``mount -o loop`` on ``mount_point``. At teardown every
process still mentioning the test's folder is killed, each filesystem is
unmounted (retried, lazily as a last resort) and the loop devices attached to
*its own images* (``losetup -j <image>``) are detached. No other loop device
is ever touched. The tests are skipped, with the reason, when not root or
when mkfs.btrfs, losetup or btrfs are missing.

Also here: helpers that read subvolumes back (``btrfs subvolume list`` and
``show``), fill a source with big random files, and write btrfs sources.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import pytest
from conftest import kill_mentioning, processes_mentioning

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from pathlib import Path

TOOLS = ("mkfs.btrfs", "losetup", "btrfs", "mount", "umount", "truncate")
SNAPSHOTS = ".pibackup-snapshots"  # the default snapshot_dir's folder name (SPEC §2 step 3)
MiB = 1024 * 1024


def skip_reason() -> str | None:
    """Why real-btrfs tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (loop devices, mount)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing tools: {', '.join(missing)}"
    return None


needs_btrfs = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, **kwargs)


def _check(argv: list[str]) -> str:
    result = _run(argv)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr}")
    return result.stdout


@dataclass
class Btrfs:
    """One loop-mounted btrfs filesystem made by the fixture."""

    image: Path
    mount: Path

    def subvolume(self, rel: str) -> Path:
        """Create a subvolume at ``rel`` (relative to the mount) and return its path."""
        path = self.mount / rel
        _check(["btrfs", "subvolume", "create", str(path)])
        return path

    def subvolumes(self) -> list[str]:
        """Every subvolume of this filesystem, as paths relative to its top, sorted."""
        return subvolume_list(self.mount)

    def is_mounted(self) -> bool:
        return str(self.mount) in mount_points()


def mount_points() -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4:
                points.append(fields[4].replace("\\040", " "))
    return points


def subvolume_list(mount: Path) -> list[str]:
    """``btrfs subvolume list`` of the filesystem mounted at ``mount``: relative paths."""
    out = _check(["btrfs", "subvolume", "list", str(mount)])
    return sorted(line.split(" path ", 1)[1] for line in out.splitlines() if " path " in line)


def subvolume_show(path: Path) -> dict[str, str]:
    """The ``key: value`` fields of ``btrfs subvolume show`` (UUID, Received UUID, Flags …)."""
    out = _check(["btrfs", "subvolume", "show", str(path)])
    fields = {}
    for line in out.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def is_subvolume(path: Path) -> bool:
    return os.lstat(path).st_ino == 256


def sync(fs: Btrfs) -> None:
    """Write the filesystem's dirty data out (``btrfs filesystem sync``): data at rest,
    as a real source's mostly is, so a snapshot does not wait on fresh writes."""
    _check(["btrfs", "filesystem", "sync", str(fs.mount)])


def snapshot_space(snapshot_dir: Path, destination: Path) -> Path:
    """``<snapshot_dir>/<id>``: where runs keep their snapshots for ``destination`` (SPEC §2
    step 3). The engine's own id: test_snapshot_dir checks it against blkid's UUID."""
    from pibackup_async.engine.destination import identify

    return snapshot_dir / identify(str(destination)).id


def snapshot_names(folder: Path) -> list[str]:
    """Entries of a snapshot_dir (backup names), sorted; [] when it does not exist."""
    return sorted(os.listdir(folder)) if folder.exists() else []


def fill_random(folder: Path, mib: int, files: int = 4) -> None:
    """``mib`` MiB of incompressible data in ``files`` big files (fast: one random MiB,
    each copy made unique by its index, so nothing can be shared or deduplicated)."""
    folder.mkdir(parents=True, exist_ok=True)
    block = bytearray(os.urandom(MiB))
    per_file = max(1, mib // files)
    for i in range(files):
        with open(folder / f"big{i}.bin", "wb") as f:
            for j in range(per_file):
                block[:16] = f"{i:08d}{j:08d}".encode()
                f.write(block)


def btrfs_source(name: str, path: Path | str, **extra: Any) -> str:
    """A ``[[sources]]`` table of type btrfs (values rendered as JSON, valid TOML)."""
    lines = ["[[sources]]", f"name = {json.dumps(name)}", 'type = "btrfs"',
             f"path = {json.dumps(str(path))}"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def receive_running(dest: Path) -> bool:
    """A live ``btrfs receive`` into ``dest`` (this test's destination) exists."""
    return any("btrfs receive" in cmd for _, cmd in processes_mentioning(str(dest)))


def _kill_leftovers(root: Path) -> None:
    """SIGKILL what a failed test left running under ``root``; wait (bounded) for it to go."""
    kill_mentioning(str(root))
    deadline = time.monotonic() + 10
    while processes_mentioning(str(root)) and time.monotonic() < deadline:
        time.sleep(0.05)


def _unmount(mount: Path) -> None:
    deadline = time.monotonic() + 10
    while str(mount) in mount_points():
        if _run(["umount", str(mount)]).returncode == 0:
            return
        if time.monotonic() > deadline:
            # Still busy: detach it now; the kernel frees it when the last user goes.
            _run(["umount", "-l", str(mount)])
            return
        time.sleep(0.1)


def _loop_devices(image: Path) -> list[str]:
    """The loop devices backed by ``image`` (``losetup -j``), e.g. ["/dev/loop3"]."""
    out = _run(["losetup", "-j", str(image)]).stdout
    return [line.split(":", 1)[0] for line in out.splitlines() if line.strip()]


def _detach(image: Path) -> None:
    """Detach the image's loop devices; bounded wait, as the kernel releases them
    asynchronously after the unmount (``mount -o loop`` sets autoclear)."""
    deadline = time.monotonic() + 15
    while (devices := _loop_devices(image)) and time.monotonic() < deadline:
        for device in devices:
            _run(["losetup", "-d", device])
        time.sleep(0.1)


class BtrfsFactory:
    """Makes loop-mounted btrfs filesystems for one test and removes them afterwards."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: list[Btrfs] = []

    def __call__(self, mount: Path, size_mb: int = 320) -> Btrfs:
        """A fresh btrfs of ``size_mb`` MB (sparse image) mounted on ``mount``."""
        images = self.root / "images"
        images.mkdir(exist_ok=True)
        image = images / f"fs{len(self.made)}-{mount.name}.img"
        mount.mkdir(parents=True, exist_ok=True)
        _check(["truncate", "-s", f"{size_mb}M", str(image)])
        _check(["mkfs.btrfs", "-q", "-f", str(image)])
        mounted = _run(["mount", "-o", "loop", str(image), str(mount)])
        if mounted.returncode != 0:
            _detach(image)
            image.unlink()
            pytest.skip(f"cannot loop-mount a btrfs image here: {mounted.stderr.strip()}")
        fs = Btrfs(image, mount)
        self.made.append(fs)
        return fs

    def close(self) -> None:
        release_loop_filesystems(self.root, self.made)


class _LoopFs(Protocol):
    image: Path
    mount: Path


def release_loop_filesystems(root: Path, made: Sequence[_LoopFs]) -> None:
    """Teardown of loop filesystems a test made: end its processes, unmount, detach, delete;
    fail the test if a loop device is still attached."""
    _kill_leftovers(root)
    problems = []
    for fs in reversed(made):
        _unmount(fs.mount)
        _detach(fs.image)
        if _loop_devices(fs.image):
            problems.append(f"{fs.image} is still attached to {_loop_devices(fs.image)}")
        else:
            fs.image.unlink(missing_ok=True)
    if problems:
        raise AssertionError("; ".join(problems))


def btrfs_filesystems(root: Path) -> Iterator[Callable[..., Btrfs]]:
    """The body of a ``btrfs_fs`` fixture: ``yield from btrfs_filesystems(tmp_path)``.

    (A test module defines the fixture itself: importing a fixture object
    would shadow it, and ``pytest_plugins`` cannot rewrite an imported kit.)
    """
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    factory = BtrfsFactory(root)
    try:
        yield factory
    finally:
        factory.close()


def save_command(report: dict[str, Any], source: str = "data") -> list[str]:
    """A btrfs source's save command from the report (``btrfs send … | btrfs receive …``)."""
    command = report["sources"][source]["save"]["command"]
    assert command is not None, report["sources"][source]
    return [str(arg) for arg in command]


def parent_of(command: list[str]) -> str | None:
    """The ``-p`` argument of a ``btrfs send … | btrfs receive …`` command, if any."""
    send = command[: command.index("|")] if "|" in command else command
    return send[send.index("-p") + 1] if "-p" in send else None


# Whole-second-free mtimes: what a first backup holds, then what a change gives.
SETTLED = 1_400_000_000_987_654_321
LATER = 1_500_000_000_123_456_789


def change(root: Path, *, remove: str) -> None:
    """Edit one file, add one, remove ``remove``; what changed gets a new, settled mtime."""
    (root / "bin" / "tool.sh").write_text("#!/bin/sh\necho changed, and longer\n")
    (root / "new.txt").write_text("added after the first backup\n")
    (root / remove).unlink()
    for path in (root / "bin" / "tool.sh", root / "bin", root / "new.txt", root):
        os.utime(path, ns=(LATER, LATER), follow_symlinks=False)


def assert_received(copy: Path, snapshot: Path | None = None) -> dict[str, str]:
    """``copy`` is a complete received subvolume (read-only, with a received UUID),
    made from ``snapshot`` when one is given."""
    assert is_subvolume(copy), f"{copy} is not a subvolume"
    info = subvolume_show(copy)
    assert "readonly" in info.get("Flags", ""), info
    assert info.get("Received UUID", "-") != "-", info
    if snapshot is not None:
        assert info["Received UUID"] == subvolume_show(snapshot)["UUID"]
    return info
