"""``diff``: what changed between two complete backups, from metadata alone (SPEC §7).

No file content is read. rsync's ``--link-dest`` hard-links every file that
did not change, so an entry with the same inode (``st_dev`` and ``st_ino``)
in both backups is unchanged without looking further; otherwise type, size,
mtime, mode, owner and link target decide. A folder whose only change is its
mtime (or its size, which follows its entries) is not listed.

Both trees are walked together in sorted order, one folder level at a time,
so memory holds the names of the folders on the current path only, never a
whole tree. Entries are read with ``lstat``: a link is never followed. An
entry (or folder) that vanishes while it is read counts as gone. The walk is
synchronous: run it in a worker thread, passing ``check`` (for example
``anyio.from_thread.check_cancelled``) so that a signal stops it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .checksums import MANIFEST_DIR
from .destination import complete, scan
from .errors import PibackupError
from .lookup import LATEST, NotHeld, check_backup_arg, find_backup

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

ChangeKind = Literal["+", "-", "M", "T"]

# How many entries pass between two calls of ``check`` (a cancel is heard
# within a few milliseconds without paying for a call per entry).
CHECK_EVERY = 256
# The backup's manifests: never a source (SPEC §9).
_MANIFEST = MANIFEST_DIR.encode()

_GONE = (FileNotFoundError, NotADirectoryError)
_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class TooFewBackups(PibackupError):
    """``diff`` needs two complete backups (exit 1)."""


@dataclass(frozen=True, slots=True)
class Change:
    """One entry that differs: its path relative to the source folder (bytes, ``b"."``
    for the source folder itself) and the sizes of the regular files on either side."""

    path: bytes
    change: ChangeKind
    old_size: int | None
    new_size: int | None


@dataclass
class Summary:
    """What a source's changes add up to. Bytes added: the sizes on the NEW side of
    added, changed and retyped files; bytes removed: those on the OLD side."""

    added: int = 0
    removed: int = 0
    changed: int = 0
    retyped: int = 0
    bytes_added: int = 0
    bytes_removed: int = 0

    def count(self, item: Change) -> None:
        if item.change == "+":
            self.added += 1
        elif item.change == "-":
            self.removed += 1
        elif item.change == "M":
            self.changed += 1
        else:
            self.retyped += 1
        self.bytes_added += item.new_size or 0
        self.bytes_removed += item.old_size or 0

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.retyped)


def pick_backups(destination: str, old: str | None, new: str | None) -> tuple[str, str]:
    """The (OLD, NEW) pair to compare: the two newest complete backups by default; one
    name: that one against the newest. Raises UsageProblem for a malformed name (check
    the arguments with ``check_backup_arg`` before anything else), TooFewBackups,
    NotHeld for a name the destination does not hold, OSError if it cannot be read."""
    backups = [e.name for e in complete(scan(destination))]
    if len(backups) < 2:
        raise TooFewBackups(f"diff needs two complete backups; the destination {destination} "
                            f"holds {len(backups)}")
    if old is None:
        return backups[1], backups[0]
    return (find_backup(destination, old),
            find_backup(destination, new if new is not None else LATEST))


def check_args(old: str | None, new: str | None) -> None:
    """Raise UsageProblem for a malformed OLD or NEW."""
    for arg in (old, new):
        if arg is not None:
            check_backup_arg(arg)


def _is_folder(path: bytes) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except _GONE:
        return False


def _folders(path: bytes) -> set[bytes]:
    try:
        with os.scandir(path) as entries:
            return {e.name for e in entries if e.is_dir(follow_symlinks=False)}
    except _GONE:
        return set()


def holds_source(destination: str, backup: str, source: bytes) -> bool:
    """The backup has a folder (not a link) named ``source``."""
    return _is_folder(os.path.join(os.fsencode(destination), backup.encode(), source))


def source_names(destination: str, old: str, new: str, only: str | None = None) -> list[bytes]:
    """The sources (folders) of either backup, sorted; just ``only`` when given. Raises
    NotHeld when neither backup holds ``only``."""
    base = os.fsencode(destination)
    if only is not None:
        name = os.fsencode(only)
        if not (holds_source(destination, old, name) or holds_source(destination, new, name)):
            raise NotHeld(f"neither {old} nor {new} holds a source {only}")
        return [name]
    return sorted((_folders(os.path.join(base, old.encode()))
                   | _folders(os.path.join(base, new.encode()))) - {_MANIFEST})


def _lstat(name: bytes, folder: int | None = None) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=folder, follow_symlinks=False)
    except _GONE:
        return None


def _open_folder(name: bytes, folder: int | None = None) -> int | None:
    try:
        return os.open(name, _FOLDER, dir_fd=folder)
    except _GONE:
        return None


def _names(folder: int | None) -> list[bytes]:
    if folder is None:
        return []
    try:
        names = [os.fsencode(n) for n in os.listdir(folder)]
    except _GONE:
        return []
    names.sort()
    return names


def _merged(old: int | None, new: int | None) -> Iterator[bytes]:
    """Every name of either folder once, in byte order."""
    a, b = _names(old), _names(new)
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] < b[j]:
            yield a[i]
            i += 1
        elif a[i] > b[j]:
            yield b[j]
            j += 1
        else:
            yield a[i]
            i += 1
            j += 1
    yield from a[i:]
    yield from b[j:]


def _size(st: os.stat_result | None) -> int | None:
    return st.st_size if st is not None and stat.S_ISREG(st.st_mode) else None


# Where an entry is: its folder's descriptor (None: ``name`` is a whole path) and name.
_Place = tuple[int | None, bytes]


def _readlink(place: _Place) -> bytes | None:
    try:
        return os.readlink(place[1], dir_fd=place[0])
    except _GONE:
        return None


def _differs(old: os.stat_result, new: os.stat_result, old_at: _Place, new_at: _Place) -> bool:
    """Same type: does anything but a folder's mtime and size differ?"""
    if (old.st_mode != new.st_mode or old.st_uid != new.st_uid
            or old.st_gid != new.st_gid):
        return True
    kind = stat.S_IFMT(old.st_mode)
    if kind == stat.S_IFDIR:
        return False
    if old.st_mtime_ns != new.st_mtime_ns:
        return True
    if kind == stat.S_IFREG:
        return old.st_size != new.st_size
    if kind == stat.S_IFLNK:
        # A link that vanished reads as None here: it differs, and is gone
        # by the time anyone looks.
        return _readlink(old_at) != _readlink(new_at)
    if kind in (stat.S_IFCHR, stat.S_IFBLK):
        return old.st_rdev != new.st_rdev
    return False


def _classify(old: os.stat_result | None, new: os.stat_result | None, old_at: _Place,
              new_at: _Place) -> ChangeKind | None:
    if old is None:
        return "+"
    if new is None:
        return "-"
    if old.st_ino == new.st_ino and old.st_dev == new.st_dev:
        return None
    if stat.S_IFMT(old.st_mode) != stat.S_IFMT(new.st_mode):
        return "T"
    return "M" if _differs(old, new, old_at, new_at) else None


def diff_source(old_root: bytes | None, new_root: bytes | None,
                check: Callable[[], None] = lambda: None) -> Iterator[Change]:
    """The changes from the folder ``old_root`` to ``new_root`` (either None or missing:
    everything added or removed), in sorted order, each folder's entries right after it.

    The two folders themselves are compared too (path ``b"."``), without their mtime.
    Below them, everything is reached by directory descriptor, never by a whole
    path (which may be longer than PATH_MAX); one descriptor per side and level.
    Raises OSError for a read error other than an entry vanishing.
    """
    old_st = _lstat(old_root) if old_root is not None else None
    new_st = _lstat(new_root) if new_root is not None else None
    old_dir = old_root if old_st is not None and stat.S_ISDIR(old_st.st_mode) else None
    new_dir = new_root if new_st is not None and stat.S_ISDIR(new_st.st_mode) else None
    if old_dir is not None and new_dir is not None:
        assert old_st is not None and new_st is not None
        if _classify(old_st, new_st, (None, old_dir), (None, new_dir)) is not None:
            yield Change(b".", "M", None, None)
    old_fd = _open_folder(old_dir) if old_dir is not None else None
    new_fd = _open_folder(new_dir) if new_dir is not None else None
    # Depth first without recursion: (path relative to the root, old folder, new
    # folder, the names still to visit).
    stack = [(b"", old_fd, new_fd, _merged(old_fd, new_fd))]
    seen = 0
    try:
        while stack:
            rel, old, new, names = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                for fd in (old, new):
                    if fd is not None:
                        os.close(fd)
                continue
            seen += 1
            if seen % CHECK_EVERY == 0:
                check()
            old_st = _lstat(name, old) if old is not None else None
            new_st = _lstat(name, new) if new is not None else None
            if old_st is None and new_st is None:
                continue
            path = rel + b"/" + name if rel else name
            change = _classify(old_st, new_st, (old, name), (new, name))
            if change is not None:
                yield Change(path, change, _size(old_st), _size(new_st))
            elif old_st is not None and new_st is not None and old_st.st_ino == new_st.st_ino \
                    and old_st.st_dev == new_st.st_dev:
                continue  # the same inode: the same folder, nothing below can differ
            old_sub = _open_folder(name, old) if old_st is not None and stat.S_ISDIR(
                old_st.st_mode) else None
            new_sub = _open_folder(name, new) if new_st is not None and stat.S_ISDIR(
                new_st.st_mode) else None
            if old_sub is not None or new_sub is not None:
                stack.append((path, old_sub, new_sub, _merged(old_sub, new_sub)))
    finally:
        for _, old, new, _ in stack:
            for fd in (old, new):
                if fd is not None:
                    os.close(fd)


def diff_backups(destination: str, old: str, new: str, source: bytes,
                 check: Callable[[], None] = lambda: None) -> Iterator[Change]:
    """``diff_source`` on a source folder of the two backups ``old`` and ``new``."""
    base = os.fsencode(destination)
    yield from diff_source(os.path.join(base, old.encode(), source),
                           os.path.join(base, new.encode(), source), check)
