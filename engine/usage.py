"""``du``: what each complete backup takes on disk and what deleting it would free (SPEC §7).

Sizes are bytes allocated on disk (``st_blocks`` × 512). rsync's
``--link-dest`` makes backups share unchanged files as hard links, so an
inode is counted once: in the total of every backup that holds it, in the
destination's total once, and in a backup's exclusive bytes only when every
one of its links lies in that backup (a link anywhere else — another
backup, a run in progress — keeps it on disk). Only files with more than one
link are remembered, in one dict of ints; a file with a single link is
exclusive to its backup at once, so memory follows the number of shared
files, not the size of the tree.

Received btrfs subvolumes (a btrfs source in a btrfs destination) share
extents, not inodes: ``btrfs filesystem du`` gives their total and exclusive
bytes, and the destination counts the extents they share once (the same
FIEMAP reading ``btrfs filesystem du`` does).
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio.from_thread
import msgspec

from .destination import LocalDestination, complete
from .filesystems import SUBVOLUME_INODE
from .processes import describe_exit, run_process
from .threads import in_worker

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

CHECK_EVERY = 1024
_GONE = (FileNotFoundError, NotADirectoryError)
_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# A value of the inode map: links seen << 32 | shared flag | index of the
# last backup that held it.
_SHARED = 1 << 31
_INDEX = _SHARED - 1


class BackupUsage(msgspec.Struct, frozen=True):
    name: str
    total_bytes: int
    exclusive_bytes: int


class Usage(msgspec.Struct, frozen=True):
    backups: list[BackupUsage]
    destination_bytes: int


@dataclass
class Tally:
    """The running sums of one ``du`` over the backups ``names`` (newest first)."""

    names: list[str]
    total: list[int] = field(default_factory=list)
    exclusive: list[int] = field(default_factory=list)
    destination: int = 0
    # (st_dev << 64 | st_ino) -> packed value (see _SHARED), files with st_nlink > 1
    # whose links have not all been seen yet.
    links: dict[int, int] = field(default_factory=dict)
    # Received subvolumes found, with the index of the backup holding them.
    subvolumes: list[tuple[int, bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.total = [0] * len(self.names)
        self.exclusive = [0] * len(self.names)

    def add_alone(self, index: int, size: int) -> None:
        """Folders and files with one link: this backup's alone."""
        self.total[index] += size
        self.exclusive[index] += size
        self.destination += size

    def add_linked(self, index: int, st: os.stat_result) -> None:
        """A file with several links. Backups come one after the other: an inode last
        seen in another backup is shared."""
        size = st.st_blocks * 512
        key = st.st_dev << 64 | st.st_ino
        value = self.links.get(key)
        if value is None:
            self.total[index] += size
            self.destination += size
            self.links[key] = 1 << 32 | index
            return
        seen = (value >> 32) + 1
        shared = value & _SHARED
        if value & _INDEX != index:
            self.total[index] += size
            shared = _SHARED
        if seen >= st.st_nlink:
            # Every link found: nothing can come back for it, forget it.
            del self.links[key]
            if not shared:
                self.exclusive[index] += size
        else:
            self.links[key] = seen << 32 | shared | index

    def result(self) -> Usage:
        return Usage([BackupUsage(n, t, e) for n, t, e in
                      zip(self.names, self.total, self.exclusive, strict=True)],
                     self.destination)


def _lstat(path: bytes) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except _GONE:
        return None


def _walk(top: bytes, check: Callable[[], None], enter: Callable[[os.DirEntry[str]], bool]
          ) -> Iterator[tuple[int, os.DirEntry[str], bytes]]:
    """(folder's descriptor, entry, folder's path below ``top``) for every entry below the
    folder ``top``, depth first; a folder is entered when ``enter(entry)`` says so.

    Folders are reached by descriptor (``openat``), never by a whole path, which may
    be longer than PATH_MAX. A folder that vanished is skipped; ``check`` runs every
    ``CHECK_EVERY`` entries (a cancel lands there).
    """
    try:
        fd = os.open(top, _FOLDER)
    except _GONE:
        return
    stack = [(fd, os.scandir(fd), b"")]
    seen = 0
    try:
        while stack:
            fd, entries, rel = stack[-1]
            entry = next(entries, None)
            if entry is None:
                entries.close()
                os.close(fd)
                stack.pop()
                continue
            seen += 1
            if seen % CHECK_EVERY == 0:
                check()
            yield fd, entry, rel
            if entry.is_dir(follow_symlinks=False) and enter(entry):
                try:
                    child = os.open(entry.name, _FOLDER, dir_fd=fd)
                except _GONE:
                    continue
                name = os.fsencode(entry.name)
                stack.append((child, os.scandir(child), rel + b"/" + name if rel else name))
    finally:
        for fd, entries, _ in stack:
            entries.close()
            os.close(fd)


def walk_backup(tally: Tally, index: int, top: bytes,
                check: Callable[[], None] = lambda: None) -> None:
    """Add what the backup folder ``top`` holds to ``tally``; received subvolumes are
    recorded, not walked. An entry that vanishes while read counts as gone; other
    read errors raise OSError."""
    st = _lstat(top)
    if st is None or not stat.S_ISDIR(st.st_mode):
        return
    device = st.st_dev
    alone = st.st_blocks  # blocks of folders and single-link files, summed once at the end
    is_dir = stat.S_ISDIR

    def enter(entry: os.DirEntry[str]) -> bool:
        try:
            st = entry.stat(follow_symlinks=False)  # cached: the loop below read it
        except _GONE:
            return False
        return not (st.st_ino == SUBVOLUME_INODE and st.st_dev != device)

    for _, entry, rel in _walk(top, check, enter):
        try:
            st = entry.stat(follow_symlinks=False)
        except _GONE:
            continue
        if is_dir(st.st_mode):
            if st.st_ino == SUBVOLUME_INODE and st.st_dev != device:
                name = os.fsencode(entry.name)
                tally.subvolumes.append((index, os.path.join(top, rel, name) if rel
                                         else os.path.join(top, name)))
                continue
            alone += st.st_blocks
        elif st.st_nlink <= 1:
            alone += st.st_blocks
        else:
            tally.add_linked(index, st)
    tally.add_alone(index, alone * 512)


def walk_backups(destination: str, names: list[str],
                 check: Callable[[], None] = lambda: None) -> Tally:
    """The inode walk of every backup in ``names``, one after the other."""
    tally = Tally(names)
    base = os.fsencode(destination)
    for index, name in enumerate(names):
        walk_backup(tally, index, os.path.join(base, name.encode()), check)
    return tally


# --- received btrfs subvolumes ------------------------------------------------------------


class SubvolumeError(OSError):
    """``btrfs filesystem du`` failed on a subvolume."""


async def subvolume_du(path: bytes) -> tuple[int, int]:
    """``btrfs filesystem du``'s (total, exclusive) bytes of a subvolume."""
    finished = await run_process(["btrfs", "filesystem", "du", "-s", "--raw", os.fsdecode(path)],
                                 stdout_lines=8)
    if finished.exit_code != 0:
        raise SubvolumeError(f"btrfs filesystem du {os.fsdecode(path)}: "
                             f"{finished.stderr.text() or describe_exit(finished.exit_code)}")
    # "Total Exclusive Set shared Filename", then one row: the figures come first.
    for line in finished.stdout.lines:
        fields = line.split(None, 3)
        if len(fields) >= 3 and fields[0].isdigit() and fields[1].isdigit():
            return int(fields[0]), int(fields[1])
    raise SubvolumeError(f"btrfs filesystem du {os.fsdecode(path)}: unexpected output "
                         f"{finished.stdout.text()!r}")


_FS_IOC_FIEMAP = 0xC020660B
_HEADER = struct.Struct("=QQIIII")          # struct fiemap
_EXTENT = struct.Struct("=QQQQQIIII")       # struct fiemap_extent
_BATCH = 128
_LAST, _UNKNOWN, _DELALLOC, _INLINE, _SHARED_EXTENT = 0x1, 0x2, 0x4, 0x200, 0x2000
# What btrfs filesystem du leaves out: extents with no place on disk of their own.
_SKIP = _UNKNOWN | _DELALLOC | _INLINE


def _shared_extents(fd: int, shared: dict[int, int]) -> None:
    """Add the file's shared extents (physical start -> length) to ``shared``."""
    start = 0
    buffer = bytearray(_HEADER.size + _EXTENT.size * _BATCH)
    while True:
        _HEADER.pack_into(buffer, 0, start, (1 << 64) - 1 - start, 0, 0, _BATCH, 0)
        fcntl.ioctl(fd, _FS_IOC_FIEMAP, buffer)
        mapped = _HEADER.unpack_from(buffer, 0)[3]
        if mapped == 0:
            return
        for i in range(mapped):
            logical, physical, length, _, _, flags, _, _, _ = _EXTENT.unpack_from(
                buffer, _HEADER.size + i * _EXTENT.size)
            if flags & _SHARED_EXTENT and not flags & _SKIP and length:
                if shared.get(physical, 0) < length:
                    shared[physical] = length
            if flags & _LAST:
                return
        start = logical + length


def shared_bytes(subvolumes: list[bytes], check: Callable[[], None] = lambda: None) -> int:
    """The bytes of the extents that files of ``subvolumes`` share, each counted once."""
    shared: dict[int, int] = {}
    for top in subvolumes:
        inodes: set[int] = set()  # hard links within a subvolume: read once
        for folder, entry, _ in _walk(top, check, lambda _: True):
            if not entry.is_file(follow_symlinks=False):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
                if st.st_nlink > 1:
                    if st.st_ino in inodes:
                        continue
                    inodes.add(st.st_ino)
                fd = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=folder)
            except _GONE:
                continue
            try:
                _shared_extents(fd, shared)
            finally:
                os.close(fd)
    return _union(shared)


def _union(extents: dict[int, int]) -> int:
    """The length of the union of the ranges ``start -> length`` (they may overlap)."""
    total = 0
    end = -1
    for start in sorted(extents):
        stop = start + extents[start]
        if start >= end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


async def measure(destination: str) -> Usage:
    """Every complete backup's total and exclusive bytes, newest first, and the
    destination's total. The walks run in worker threads that stop on cancel. Raises
    OSError if the destination cannot be read (DestinationLost if it does not answer,
    SubvolumeError if ``btrfs filesystem du`` fails)."""
    names = [e.name for e in complete(await LocalDestination(destination).scan())]
    tally = await in_worker(walk_backups, destination, names, anyio.from_thread.check_cancelled)
    found = []
    for index, path in tally.subvolumes:
        if not await in_worker(os.path.lexists, path):
            continue  # deleted while we read: gone
        total, exclusive = await subvolume_du(path)
        tally.total[index] += total
        tally.exclusive[index] += exclusive
        tally.destination += exclusive
        found.append(path)
    if found:
        tally.destination += await in_worker(shared_bytes, found,
                                              anyio.from_thread.check_cancelled)
    return tally.result()
