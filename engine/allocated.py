"""What a run wrote into a source's folder of the backup: its new files' blocks (SPEC §6).

rsync's transferred size is the wrong figure for it: a sparse 1 GiB image
holding 1 MiB of data transfers a GiB but takes 1 MiB on the disk
(``--sparse``), and a file rsync hard-links against the previous backup
(``--link-dest``) takes nothing new. So the copy is walked once it is
written: every entry's ``st_blocks`` × 512, each inode once, except files
that share their inode with a file outside the copy (the earlier backup's).

``walk_copy`` is the walk itself, pairing each entry of a copy with the
same path in the earlier copy of the source; ``written_bytes`` sums it.
A file hard-linked to the earlier copy is told by the inode numbers of the
two folders' listings (``getdents``), without a ``stat`` of either: on a
re-run where little changed, that is nearly every file, and a ``stat``
costs as much as the listing of a whole folder. The walk reads folders by
file descriptor (``*at`` calls: no path resolved again, no link followed)
and skips what vanishes while it reads; run it in a worker thread
(``threads.in_worker``) with a ``check`` that lands a cancel.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterator

CHECK_EVERY = 1024
_OPEN_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_GONE = (FileNotFoundError, NotADirectoryError)


class Found(NamedTuple):
    """One entry below the copy's top folder."""

    # Relative to the top ("a/b"); os.fsencode gives its exact bytes.
    path: str
    # Its ``stat(follow_symlinks=False)`` is read on first call and kept
    # (already read for folders); call it before asking the walk for the next
    # entry: it is read relative to a folder the walk closes when done.
    entry: os.DirEntry[str]
    # Not a folder, and the same inode as the same path in the earlier copy:
    # a file an earlier run wrote and this one hard-linked (rsync's
    # --link-dest).
    linked: bool


@dataclass
class InodeTrust:
    """Whether a folder listing's inode numbers can tell a hard-linked file (manifest.py too)."""

    device: int
    # Whether listings' inode numbers are the files' own on this
    # filesystem; settled by a stat of the first file they call linked.
    # A filesystem that makes them up (FUSE without use_ino) then calls
    # nothing linked: written_bytes falls back to link counts.
    trusted: bool | None = None

    def confirm(self, entry: os.DirEntry[str]) -> bool:
        if self.trusted is None:
            try:
                st = entry.stat(follow_symlinks=False)
            except _GONE:
                return False
            self.trusted = (st.st_ino == entry.inode() and st.st_dev == self.device
                            and st.st_nlink > 1)
        return self.trusted


@dataclass
class _Folder:
    fd: int
    earlier: int | None  # the same folder in the earlier copy, if it has one
    path: str
    subfolders: list[str] = field(default_factory=list)
    # Name -> inode in the earlier folder's listing, read on first need: no
    # folder of a first copy needs it.
    earlier_inodes: dict[str, int] | None = None

    def earlier_inode(self, name: str) -> int | None:
        if self.earlier is None:
            return None
        if self.earlier_inodes is None:
            try:
                with os.scandir(self.earlier) as entries:
                    self.earlier_inodes = {e.name: e.inode() for e in entries
                                           if not e.is_dir(follow_symlinks=False)}
            except OSError:
                self.earlier_inodes = {}
        return self.earlier_inodes.get(name)

    def close(self) -> None:
        os.close(self.fd)
        if self.earlier is not None:
            os.close(self.earlier)


def _open_folder(name: str, parent: int | None) -> int | None:
    try:
        return os.open(name, _OPEN_FOLDER, dir_fd=parent)
    except _GONE:
        return None
    except PermissionError:
        # Only without root, for a folder rsync gave a mode without read
        # permission (a pull through sudo): it cannot be measured, and that
        # must not fail a backup that was written.
        return None


def open_earlier_folder(name: str, parent: int | None, device: int) -> int | None:
    """The earlier copy's folder ``name`` (relative to ``parent``), or None."""
    # Anything amiss in the earlier copy only means "nothing to compare
    # with" (written_bytes then tells shared inodes by their link count;
    # the manifest reads the file).
    # Inode numbers mean the same file only on the same filesystem.
    try:
        fd = os.open(name, _OPEN_FOLDER, dir_fd=parent)
    except OSError:
        return None
    if os.fstat(fd).st_dev != device:
        os.close(fd)
        return None
    return fd


def walk_copy(top: str, earlier: str | None,
              check: Callable[[], None] = lambda: None, *,
              skip: Collection[str] = ()) -> Iterator[Found]:
    """Every entry below ``top`` (folders included), paired with ``earlier``.

    ``earlier`` is the earlier copy of the same source (rsync's
    ``--link-dest``), or None. Folders on another filesystem are listed but
    not entered. A folder is read whole before the walk goes deeper, so the
    descriptors it holds follow the depth of the tree, not its width.
    ``check`` runs every CHECK_EVERY entries. Raises OSError when the copy
    cannot be read (other than an entry that vanished). ``skip``: names in
    ``top`` left out, with all they hold.
    """
    fd = _open_folder(top, None)
    if fd is None:
        return
    walk = InodeTrust(os.fstat(fd).st_dev)
    first_earlier = None if earlier is None else open_earlier_folder(earlier, None, walk.device)
    stack = [_Folder(fd, first_earlier, "")]
    seen = 0
    try:
        folder: _Folder | None = stack[0]
        while folder is not None:
            prefix = folder.path + "/" if folder.path else ""
            with os.scandir(folder.fd) as entries:
                for entry in entries:
                    seen += 1
                    if seen % CHECK_EVERY == 0:
                        check()
                    name = entry.name
                    if skip and folder is stack[0] and name in skip:
                        continue
                    linked = False
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            if entry.stat(follow_symlinks=False).st_dev == walk.device:
                                folder.subfolders.append(name)
                        elif folder.earlier_inode(name) == entry.inode():
                            linked = walk.confirm(entry)
                    except _GONE:
                        continue
                    yield Found(prefix + name, entry, linked)
            folder = _next_folder(stack, walk)
    finally:
        for left in stack:
            left.close()


def _next_folder(stack: list[_Folder], walk: InodeTrust) -> _Folder | None:
    """Enter the next subfolder to read, leaving (and closing) the finished folders."""
    while stack:
        parent = stack[-1]
        if not parent.subfolders:
            stack.pop().close()
            continue
        name = parent.subfolders.pop()
        fd = _open_folder(name, parent.fd)
        if fd is None:
            continue
        earlier = (None if parent.earlier is None
                   else open_earlier_folder(name, parent.earlier, walk.device))
        child = _Folder(fd, earlier, f"{parent.path}/{name}" if parent.path else name)
        stack.append(child)
        return child
    return None


def written_bytes(top: str, earlier: str | None,
                  check: Callable[[], None] = lambda: None, *,
                  skip: Collection[str] = ()) -> int:
    """The bytes ``top``'s new entries take on disk (``st_blocks`` × 512, each inode once).

    New: everything but files that share their inode with a file outside
    ``top`` — those rsync hard-linked against ``earlier`` (the
    ``--link-dest`` folder). Folders count (rsync makes them afresh); a
    sparse file counts what it holds. A file with several links not found
    linked (hard links inside the source, or an earlier copy that could not
    be compared) counts only if every one of its links lies in ``top``:
    memory follows such files, not the tree. 0 when ``top`` does not exist.
    ``skip``: names in ``top`` not counted (counted elsewhere). Raises
    OSError as walk_copy does.
    """
    try:
        blocks = os.lstat(top).st_blocks
    except _GONE:
        return 0
    # inode -> [links found in top, links it has, its blocks]
    several: dict[int, list[int]] = {}
    for found in walk_copy(top, earlier, check, skip=skip):
        if found.linked:
            continue
        try:
            st = found.entry.stat(follow_symlinks=False)
        except _GONE:
            continue
        if st.st_nlink <= 1 or stat.S_ISDIR(st.st_mode):
            blocks += st.st_blocks
            continue
        counted = several.get(st.st_ino)
        if counted is None:
            several[st.st_ino] = [1, st.st_nlink, st.st_blocks]
        else:
            counted[0] += 1
    blocks += sum(b for links, nlink, b in several.values() if links >= nlink)
    return blocks * 512
