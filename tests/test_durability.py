"""A backup that has its final name is on the disk, whole (SPEC §1, §9 "Power cuts").

The order of the system calls is what makes a backup survive a power cut,
and it is seen as it happens: the real CLI runs under ``strace -f -y``
(rsync's children and the engine's worker threads followed, every file
descriptor shown with its path), and the trace is read by syscall name and
path. Three promises are checked there:

- ``syncfs`` of the destination after the last write into
  ``<name>.in-progress`` (rsync's, the manifests') and before the rename to
  ``<name>``;
- a flush again after that rename and before retention renames the first
  old backup to ``.deleting`` (else a power cut could keep the deletion and
  lose the new backup's name: the next run removes it as an in-progress
  folder, and nothing is left);
- every ``.deleting`` rename flushed before anything inside it is unlinked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest
from conftest import CLI, needs_root, needs_rsync
from diskkit import Ext4, Ext4Factory, ext4_filesystems, needs_loop
from hangkit import hanging, needs_fuse
from mirrorkit import Bench
from pibackup_async.engine.destination import DestinationLost, LocalDestination
from pibackup_async.engine.names import format_name
from prunekit import make_backup

if TYPE_CHECKING:
    from collections.abc import Iterator

    from conftest import Workspace

needs_strace = pytest.mark.skipif(shutil.which("strace") is None,
                                  reason="strace is not installed (apt-get install strace)")
pytestmark = [needs_rsync, needs_strace]



def _days_ago(days: int) -> str:
    return format_name(datetime.now().astimezone() - timedelta(days=days))


# Recent, so that retention sees no clock jump between them and the new backup.
OLD = [_days_ago(3), _days_ago(2)]
NEWER = _days_ago(1)
STALE_DELETING = _days_ago(4) + ".deleting"

# Calls that change what is on the destination; ``openat`` counts only when it creates
# or opens for writing. The flushes are read separately.
_CHANGING = {"write", "pwrite64", "writev", "pwritev", "pwritev2", "ftruncate", "fallocate",
             "rename", "renameat", "renameat2", "link", "linkat", "symlink", "symlinkat",
             "mkdir", "mkdirat", "mknodat", "unlink", "unlinkat", "rmdir", "chmod", "fchmod",
             "fchmodat", "chown", "fchown", "lchown", "fchownat", "utimensat",
             "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr",
             "fremovexattr", "copy_file_range", "openat"}
_ON_DESCRIPTOR = {"write", "pwrite64", "writev", "pwritev", "pwritev2", "ftruncate", "fallocate",
                  "fchmod", "fchown", "fsetxattr", "fremovexattr"}
_FLUSHES = {"syncfs", "fsync", "fdatasync"}
_REMOVALS = {"unlink", "unlinkat", "rmdir"}
_RENAMES = {"rename", "renameat", "renameat2"}
TRACED = ",".join(sorted(_CHANGING | _FLUSHES))

_FULL = re.compile(r"^(\d+)\s+(\w+)\((.*)\)\s+=\s+(-?\d+|\?)")
_UNFINISHED = re.compile(r"^(\d+)\s+(\w+)\((.*?)\s*<unfinished \.\.\.>$")
_RESUMED = re.compile(r"^(\d+)\s+<\.\.\. (\w+) resumed>(.*)\)\s+=\s+(-?\d+|\?)")


@dataclass
class Call:
    """One system call of the trace: where it started and ended (line numbers)."""

    pid: int
    name: str
    args: str
    result: str
    start: int
    end: int

    @property
    def ok(self) -> bool:
        return self.result not in ("?",) and not self.result.startswith("-")

    def mentions(self, path: str) -> bool:
        """``path`` is named, as a string argument or as a descriptor's path (``-y``)."""
        return f'"{path}' in self.args or f"<{path}" in self.args

    def writes_into(self, path: str) -> bool:
        """The call changes something at or below ``path``. A call on a descriptor is judged
        by the descriptor's path alone: what a log line written to a pipe says is not."""
        if not self.changes:
            return False
        if self.name in _ON_DESCRIPTOR:
            return re.match(rf"\d+<{re.escape(path)}[/>]", self.args) is not None
        return self.mentions(path)

    @property
    def changes(self) -> bool:
        if self.name == "openat":
            return bool(re.search(r"O_CREAT|O_WRONLY|O_RDWR|O_TRUNC", self.args))
        return self.name in _CHANGING


def parse(trace: str) -> list[Call]:
    """The calls of an ``strace -f -y`` output, in the order they ended.

    A call interrupted by another process's line is printed as ``<unfinished
    ...>`` then ``<... name resumed>``: both halves are joined, keeping the
    start line (arguments) and the end line (result).
    """
    calls: list[Call] = []
    pending: dict[int, tuple[str, str, int]] = {}
    for number, line in enumerate(trace.splitlines()):
        if m := _UNFINISHED.match(line):
            pending[int(m[1])] = (m[2], m[3], number)
        elif m := _RESUMED.match(line):
            name, args, start = pending.pop(int(m[1]), (m[2], "", number))
            calls.append(Call(int(m[1]), name, args + m[3], m[4], start, number))
        elif m := _FULL.match(line):
            calls.append(Call(int(m[1]), m[2], m[3], m[4], number, number))
    return calls


def traced(ws: Workspace, *args: str) -> tuple[subprocess.CompletedProcess[str], list[Call]]:
    """The CLI under ``strace -f -y``; its result and its calls."""
    out = ws.root / f"trace-{args[0]}"
    done = subprocess.run(
        ["strace", "-f", "-qq", "-y", "-s", "4096", "-e", f"trace={TRACED}", "-o", str(out),
         *CLI, *args, "-c", str(ws.config_path)],
        capture_output=True, text=True, timeout=300, env=ws.env())
    assert out.exists(), done.stderr
    return done, parse(out.read_text())


def flushes_of(calls: list[Call], dest: Path) -> list[Call]:
    """syncfs of the destination's filesystem, or fsync of the destination folder itself."""
    return [c for c in calls if c.ok and (
        (c.name == "syncfs" and c.mentions(str(dest)))
        or (c.name in ("fsync", "fdatasync") and f"<{dest}>" in c.args))]


def flushed_between(calls: list[Call], dest: Path, after: int, before: int) -> bool:
    """A flush that started after line ``after`` and ended before line ``before``."""
    return any(after < f.start and f.end < before for f in flushes_of(calls, dest))


def assert_deletions_flushed(calls: list[Call], dest: Path) -> list[str]:
    """Every folder renamed ``.deleting`` (or found so) had that flushed before the first
    unlink inside it; returns the folders seen deleted."""
    renamed: dict[str, int] = {}
    for c in calls:
        if c.name in _RENAMES and c.ok and (m := re.search(r'/([^/"]+\.deleting)"', c.args)):
            renamed.setdefault(m[1], c.end)
    seen: dict[str, int] = {}
    for c in calls:
        if c.name in _REMOVALS and c.ok:
            for folder in re.findall(rf"{re.escape(str(dest))}/([^/\">]+\.deleting)", c.args):
                seen.setdefault(folder, c.start)
    for folder, first_unlink in seen.items():
        # One renamed by an earlier run (a crash leftover) may not be on the disk either.
        after = renamed.get(folder, -1)
        assert flushed_between(calls, dest, after, first_unlink), (
            f"{folder}: its contents were deleted (line {first_unlink}) without a flush "
            f"after its rename (line {after})")
    return sorted(seen)


def _configure(ws: Workspace) -> None:
    body = ""
    for name in ("alpha", "beta"):
        source = ws.make_source(name, {f"f{i}.txt": f"{name} {i}\n" * 100 for i in range(5)})
        (source / "big.bin").write_bytes(b"\x5a" * (1 << 20))
        body += f'[[sources]]\nname = "{name}"\ntype = "rsync"\npath = "{source}"\n'
    ws.write_config(body, header="[retention]\nkeep_last = 1\n")


def _backup_made(ws: Workspace) -> str:
    name = str(ws.report()["name"])
    assert (ws.dest / name).is_dir(), ws.backups()
    return name


@needs_root
def test_a_run_flushes_before_the_rename_and_again_before_retention_deletes(
    ws: Workspace,
) -> None:
    _configure(ws)
    for name in OLD:
        make_backup(ws.dest, name, files=3)
    make_backup(ws.dest, STALE_DELETING, files=3)
    done, calls = traced(ws, "run")
    assert done.returncode == 0, done.stderr
    name = _backup_made(ws)
    assert ws.backups() == [name]
    dest = ws.dest

    renamed = [c for c in calls if c.name in _RENAMES and c.ok
               and c.mentions(f"{dest}/{name}.in-progress") and f'{dest}/{name}"' in c.args]
    assert len(renamed) == 1, [c.args for c in calls if c.name in _RENAMES]
    rename = renamed[0]
    writes = [c for c in calls if c.ok and c is not rename and c.end < rename.start
              and c.writes_into(f"{dest}/{name}.in-progress")]
    # rsync's own writes are there (the trace follows its children).
    assert any(c.name.startswith("write") for c in writes), "no write into the backup traced"
    last_write = max(c.end for c in writes)
    assert flushed_between(calls, dest, last_write, rename.start), (
        f"no syncfs of {dest} between the last write into the backup (line {last_write}) "
        f"and its rename (line {rename.start})")

    to_deleting = [c for c in calls if c.name in _RENAMES and c.ok and c.start > rename.end
                   and ".deleting" in c.args]
    assert to_deleting, "retention renamed nothing to .deleting"
    assert flushed_between(calls, dest, rename.end, to_deleting[0].start), (
        f"the rename (line {rename.end}) was not flushed before retention's first deletion "
        f"(line {to_deleting[0].start})")
    deleted = assert_deletions_flushed(calls, dest)
    assert deleted == sorted([STALE_DELETING, *(f"{n}.deleting" for n in OLD)])


@needs_root
def test_what_the_copies_wrote_starts_to_the_disk_while_the_manifests_are_made(
    ws: Workspace,
) -> None:
    """A head start for step 6's flush: a syncfs of the destination begins after the
    copies' last write and before the first manifest is in place (it reads back from the
    page cache what the writeback sends to the disk); the flush before the rename still
    follows the manifests (the test above)."""
    files = {f"d{i // 100}/f{i}.txt": f"{i}\n" for i in range(2000)}
    source = ws.make_source("data", files)
    ws.write_config(f'[[sources]]\nname = "data"\ntype = "rsync"\npath = "{source}"\n')
    done, calls = traced(ws, "run")
    assert done.returncode == 0, done.stderr
    name = _backup_made(ws)
    folder = f"{ws.dest}/{name}.in-progress"
    manifest = f"{folder}/.pibackup/data.sha256"
    [placed] = [c for c in calls if c.name in _RENAMES and c.ok and f'"{manifest}"' in c.args]
    copied = [c for c in calls if c.ok and c.end < placed.start and c.writes_into(folder)
              and "/.pibackup" not in c.args]
    assert any(c.name.startswith("write") for c in copied), "no write of the copy traced"
    last_copy_write = max(c.end for c in copied)
    early = [f for f in flushes_of(calls, ws.dest)
             if f.name == "syncfs" and last_copy_write < f.start < placed.start]
    assert early, (f"no syncfs of {ws.dest} began between the copy's last write (line "
                   f"{last_copy_write}) and the manifest's rename (line {placed.start})")


@needs_root
def test_prune_flushes_each_deleting_rename_before_deleting_its_contents(
    ws: Workspace,
) -> None:
    _configure(ws)
    for name in [*OLD, NEWER]:
        make_backup(ws.dest, name, files=3)
    make_backup(ws.dest, STALE_DELETING, files=3)
    done, calls = traced(ws, "prune")
    assert done.returncode == 0, done.stderr
    assert ws.backups() == [NEWER]
    deleted = assert_deletions_flushed(calls, ws.dest)
    assert deleted == sorted([STALE_DELETING, *(f"{n}.deleting" for n in OLD)])


@needs_root
def test_a_mirror_flushes_each_copy_before_its_rename_and_the_renames_before_retention(
    ws: Workspace,
) -> None:
    """Each copy's flush comes after its last write and before its rename; the renames
    are flushed once, after the last copy, before retention's first deletion."""
    bench = Bench(ws)
    names = bench.backups(3)
    make_backup(ws.dest, OLD[0], files=3)  # the mirror's own, older than every copy
    bench.write_mirror_config(extra="[retention]\nkeep_last = 3\n")
    done, calls = traced(ws, "mirror")
    assert done.returncode == 0, done.stderr
    assert bench.mirror_backups() == names
    dest = ws.dest

    renames = []
    for name in names:
        [rename] = [c for c in calls if c.name in _RENAMES and c.ok
                    and c.mentions(f"{dest}/{name}.in-progress") and f'{dest}/{name}"' in c.args]
        writes = [c.end for c in calls if c.ok and c is not rename and c.end < rename.start
                  and c.writes_into(f"{dest}/{name}.in-progress")]
        assert writes, f"no write into {name} traced"
        assert flushed_between(calls, dest, max(writes), rename.start), name
        renames.append(rename)
    to_deleting = [c for c in calls if c.name in _RENAMES and c.ok and ".deleting" in c.args]
    assert to_deleting, "retention renamed nothing to .deleting"
    assert flushed_between(calls, dest, renames[-1].end, to_deleting[0].start), (
        "the last copy's rename was not flushed before retention's first deletion")
    assert assert_deletions_flushed(calls, dest) == [f"{OLD[0]}.deleting"]


# --- a power cut, for real: ext4 shut down without its journal flushed ------------------------

# EXT4_IOC_SHUTDOWN (_IOR('X', 125, __u32)) with EXT4_GOING_FLAGS_NOLOGFLUSH: the
# filesystem stops at once, as at a power cut: what its journal committed is
# kept, nothing else reaches the disk.
_EXT4_IOC_SHUTDOWN = 0x8004587D
_NOLOGFLUSH = 2


@pytest.fixture
def ext4_fs(tmp_path: Path) -> Iterator[Ext4Factory]:
    # The factory itself: power_cut registers its second loop device there.
    for factory in ext4_filesystems(tmp_path):
        assert isinstance(factory, Ext4Factory)
        yield factory


@contextlib.contextmanager
def lazy_writeback() -> Iterator[None]:
    """The kernel's background writeback held back while the test runs (restored after,
    whatever happens): the backup's data stays in the page cache unless the engine
    flushes it, as on a Pi whose USB disk writes slower than rsync reads."""
    keys = ("vm/dirty_expire_centisecs", "vm/dirty_writeback_centisecs")
    saved = {key: (Path("/proc/sys") / key).read_text() for key in keys}
    try:
        (Path("/proc/sys") / keys[0]).write_text("360000")
        (Path("/proc/sys") / keys[1]).write_text("0")
        yield
    finally:
        for key, value in saved.items():
            (Path("/proc/sys") / key).write_text(value)


def power_cut(fs: Ext4, disks: Ext4Factory) -> Ext4:
    """What a power cut leaves of ``fs``: its disk, checked by ``e2fsck`` and mounted.

    First another program on the disk fsyncs a file of its own: that commits
    the journal (the renames and deletions done so far) without writing the
    data still in the page cache, as the journal's own commit every 5 s does.
    The disk is then read from a copy of its image, on a loop device of its
    own: the shut-down filesystem writes nothing more, and its own device may
    stay busy (a mount namespace of a process elsewhere still holding it).
    """
    with open(fs.mount / "other.log", "wb") as f:
        f.write(b"another program's line\n")
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(fs.mount, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, _EXT4_IOC_SHUTDOWN, struct.pack("I", _NOLOGFLUSH))
    finally:
        os.close(fd)
    fs.unmount()
    image = fs.image.with_name(fs.image.stem + "-after.img")
    shutil.copyfile(fs.image, image)
    attached = subprocess.run(["losetup", "--find", "--show", str(image)],
                              capture_output=True, text=True, timeout=60, check=True)
    after = Ext4(image, attached.stdout.strip(), fs.mount.with_name("after-power-cut"))
    disks.made.append(after)  # detached at teardown
    checked = subprocess.run(["e2fsck", "-fy", after.device], capture_output=True, text=True,
                             timeout=120, check=False)
    assert checked.returncode in (0, 1), checked.stdout + checked.stderr  # 1: fixed
    after.mount.mkdir()
    after.mount_now()
    return after


def _contents(folder: Path) -> dict[str, tuple[int, str]]:
    """Each file's size and digest (a failure shows sizes, not kilobytes of bytes)."""
    return {p.name: (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()[:12])
            for p in sorted(folder.iterdir()) if p.is_file()}


@needs_root
@needs_loop
def test_a_power_cut_after_a_run_leaves_every_complete_backup_whole(
    ws: Workspace, ext4_fs: Ext4Factory,
) -> None:
    """The issue's reproduction: keep_last = 1, two runs, the power cut right after the
    second. Without the flushes the only complete backup's files are all 0 bytes and
    the good one is gone."""
    fs = ext4_fs(ws.root / "disk", 64)
    dest = fs.mount / "backups"
    dest.mkdir()
    source = ws.make_source("data")
    ws.write_config(f'[[sources]]\nname = "data"\ntype = "rsync"\npath = "{source}"\n',
                    header="[retention]\nkeep_last = 1\n")
    ws.config_path.write_text(ws.config_path.read_text().replace(
        f'destination = "{ws.dest}"', f'destination = "{dest}"'))
    wanted: dict[str, dict[str, tuple[int, str]]] = {}
    with lazy_writeback():
        for run in range(2):
            for i in range(10):
                (source / f"file{i}.bin").write_bytes(os.urandom(32 * 1024 + run * 100 + i))
            done = ws.run("run")
            assert done.returncode == 0, done.stderr
            wanted[str(ws.report()["name"])] = _contents(source)
        dest = power_cut(fs, ext4_fs).mount / "backups"
    backups = sorted(p.name for p in dest.iterdir() if not p.name.endswith(
        (".in-progress", ".deleting")))
    assert backups, f"no complete backup is left: {sorted(os.listdir(dest))}"
    for name in backups:
        assert _contents(dest / name / "data") == wanted[name], (
            f"{name} has its final name but not its content")


# --- the flush's own bound: a hung disk is told from a slow one -------------------------------

BOUND_S = 0.5


@needs_fuse
async def test_a_flush_on_a_disk_that_stops_answering_gives_up_after_the_answer_bound(
    tmp_path: Path,
) -> None:
    # Nothing is being written anywhere that this flush waits for: the kernel's
    # unwritten pages do not fall, so the answer bound applies, not FLUSH_BOUND_S.
    folder = tmp_path / "dest"
    folder.mkdir()
    dest = LocalDestination(str(folder), answer_bound_s=BOUND_S)
    with hanging(folder) as hang:
        hang.start()
        t0 = time.monotonic()
        with pytest.raises(DestinationLost, match="does not answer"):
            await dest.flush()
        assert time.monotonic() - t0 < BOUND_S + 5


@needs_fuse
async def test_a_signal_is_heard_during_a_flush_that_hangs(tmp_path: Path) -> None:
    folder = tmp_path / "dest"
    folder.mkdir()
    dest = LocalDestination(str(folder), answer_bound_s=60)
    with hanging(folder) as hang:
        hang.start()
        t0 = time.monotonic()
        with anyio.move_on_after(0.3) as scope:
            await dest.flush()
        assert scope.cancelled_caught
        assert time.monotonic() - t0 < 3
        assert dest.lost is None  # cancelled, not judged lost


@needs_root
@needs_loop
async def test_a_flush_that_fails_raises_the_disks_error(
    tmp_path: Path, ext4_fs: Ext4Factory,
) -> None:
    fs = ext4_fs(tmp_path / "disk", 16)
    dest = LocalDestination(str(fs.mount), answer_bound_s=BOUND_S)
    (fs.mount / "written").write_bytes(b"x" * 65536)
    fd = os.open(fs.mount, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, _EXT4_IOC_SHUTDOWN, struct.pack("I", _NOLOGFLUSH))
    finally:
        os.close(fd)
    with pytest.raises(OSError) as raised:
        await dest.flush()
    assert raised.value.errno == errno.EIO, raised.value
