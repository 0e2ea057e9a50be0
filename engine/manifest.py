"""A source's manifest, written in step 5 (SPEC §9): a digest for every name of a regular file.

``write_manifest`` walks one source's copy in the backup and writes
``.pibackup/<source>.sha256`` (checksums.py: the lines ``sha256sum --check``
reads). What costs is reading: a file that is the same inode as the same
path in the earlier copy of the source (rsync hard-linked it there,
``--link-dest``) takes its digest from the earlier backup's manifest and is
not read; only what this run wrote is read, once. Linked files are told
from the two folders' listings (their inode numbers), as allocated.py tells
them, without a ``stat``.

Memory follows the widest folder, not the tree: every manifest lists its
files in one canonical order (a folder's files sorted by their bytes, then
its subfolders, each in turn, sorted), so the earlier manifest is read
alongside, line by line, as a merge join, never loaded whole. An earlier
manifest in another order only costs reads: a digest is taken only for the
exact same path.

Run it in a worker thread (``threads.in_worker``) with a ``check`` that
lands a cancel (and pushes a ``Progress`` on): it is called between files
and between the blocks of one file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .checksums import MANIFEST_DIR, format_line, manifest_path, read_manifest, sources_path

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import BinaryIO

CHUNK = 1 << 20  # bytes per read, into one reused buffer
CHECK_EVERY = 256  # entries between calls of ``check``
CHECK_BYTES = 8 * CHUNK  # or bytes read
_OPEN_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Reading must not write: without O_NOATIME the first read of each file
# writes its inode back (relatime). Only the owner (or root) may ask for it.
_NOATIME = getattr(os, "O_NOATIME", 0)
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_GONE = (FileNotFoundError, NotADirectoryError)
# Sources are saved concurrently, each adding its name to SOURCES.
_SOURCES_LOCK = threading.Lock()


@dataclass
class Made:
    """What ``write_manifest`` did."""

    files: int = 0  # lines written
    hashed_bytes: int = 0  # bytes read to hash them
    inherited: int = 0  # lines whose digest came from the earlier manifest
    # Why no digest could be inherited at all (no earlier copy, or no
    # manifest of it), or None when there was an earlier manifest to use.
    unused_earlier: str | None = None


def write_manifest(backup_dir: str, source: str, earlier: str | None,
                   check: Callable[[], None] = lambda: None,
                   on_file: Callable[[int], None] | None = None, *,
                   into: str | None = None) -> Made:
    """Write ``<backup_dir>/.pibackup/<source>.sha256`` for the copy ``<backup_dir>/<source>``.

    ``into``: write it there instead (a mirror checks its copy against the
    origin's manifest, which is already in that place).

    ``earlier``: the earlier copy of the source that rsync linked against
    (``<backup>/<source>``), whose backup's manifest lends its digests, or
    None. Written through a temporary name, then renamed; not flushed (the
    whole backup is, before its rename). ``on_file`` gets the count of lines
    so far now and then (live progress). Raises OSError (its filename set)
    when the copy cannot be read or the manifest written.
    """
    if into is None:
        os.makedirs(os.path.join(backup_dir, MANIFEST_DIR), exist_ok=True)
    final = into or manifest_path(backup_dir, source)
    temp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.tmp")
    made = Made()
    earlier_stream = _open_earlier_manifest(earlier, source, made)
    try:
        with open(temp, "wb") as out:
            inherit = _Inherited(earlier_stream)
            _write_lines(out, os.path.join(backup_dir, source), source, earlier, inherit,
                         made, check, on_file)
        os.rename(temp, final)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    finally:
        if earlier_stream is not None:
            earlier_stream.close()
    if made.unused_earlier is None and inherit.broken is not None:
        made.unused_earlier = inherit.broken
    return made


def add_source(backup_dir: str, source: str) -> None:
    """Add ``source`` to ``.pibackup/SOURCES`` (the sources that have a manifest).

    One source at a time (sources are saved concurrently): the file is read,
    the name added, and the whole written again through a temporary name.
    """
    path = sources_path(backup_dir)
    with _SOURCES_LOCK:
        try:
            with open(path, "rb") as f:
                names = set(f.read().splitlines())
        except FileNotFoundError:
            names = set()
        names.add(source.encode())
        temp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
        with open(temp, "wb") as out:
            out.writelines(n + b"\n" for n in sorted(names))
        os.rename(temp, path)


def _open_earlier_manifest(earlier: str | None, source: str, made: Made) -> BinaryIO | None:
    if earlier is None:
        made.unused_earlier = "no earlier backup"
        return None
    path = manifest_path(os.path.dirname(earlier.rstrip("/")), source)
    try:
        fd = _open_file(path, None)
    except OSError as e:
        # Made before manifests existed, or unreadable: read everything.
        made.unused_earlier = (f"the earlier backup has no manifest of it ({e.strerror})"
                               if e.errno == errno.ENOENT else
                               f"the earlier backup's manifest cannot be read ({e.strerror})")
        return None
    return os.fdopen(fd, "rb", buffering=1 << 16)


def _open_file(name: str, folder: int | None) -> int:
    try:
        return os.open(name, _OPEN_FILE | _NOATIME, dir_fd=folder)
    except PermissionError:
        if not _NOATIME:
            raise
        # O_NOATIME is refused (EPERM) on a file the reader does not own.
        return os.open(name, _OPEN_FILE, dir_fd=folder)


class _Inherited:
    """The earlier manifest, read in step with the walk (both in the canonical order).

    A folder's lines are consecutive and share their folder's part of the
    path: that part is compared as bytes, and split into its components
    (to tell which of two folders comes first) once per folder, not per line.
    """

    def __init__(self, stream: BinaryIO | None) -> None:
        self._lines = read_manifest(stream) if stream is not None else iter(())
        self._ended = stream is None
        # The line read ahead: its folder part, name and digest (name None: none).
        self._folder = b""
        self._folder_key: tuple[bytes, ...] = ()
        self._name: bytes | None = None
        self._digest = ""
        # Why the earlier manifest stopped being used midway, if it did.
        self.broken: str | None = None

    def digest(self, folder: _Folder, name: bytes) -> str | None:
        """The earlier manifest's digest for ``name`` in ``folder``, or None if it has none."""
        while not self._ended:
            if self._name is None:
                self._advance()
                continue
            if self._folder == folder.path:
                if self._name < name:
                    self._name = None
                    continue
                if self._name == name:
                    self._name = None
                    return self._digest
                return None
            if self._folder_key < folder.folders:
                self._name = None
                continue
            return None
        return None

    def _advance(self) -> None:
        try:
            digest, path = next(self._lines)
        except StopIteration:
            self._ended = True
            return
        except ValueError as e:
            # A damaged earlier manifest only costs reads, never a wrong digest.
            self.broken = f"the earlier backup's manifest is malformed ({e})"
            self._ended = True
            return
        folder, _, name = path.rpartition(b"/")
        if folder != self._folder:
            self._folder, self._folder_key = folder, tuple(folder.split(b"/"))
        self._name, self._digest = name, digest


@dataclass
class _Folder:
    fd: int
    earlier: int | None  # the same folder in the earlier copy, if there is one
    folders: tuple[bytes, ...]  # its path's components, the source's name first
    subfolders: Iterator[str] | None = None

    def __post_init__(self) -> None:
        self.path = b"/".join(self.folders)  # relative to the backup: b"data/photos"
        self.prefix = self.path + b"/"

    def close(self) -> None:
        os.close(self.fd)
        if self.earlier is not None:
            os.close(self.earlier)


@dataclass
class _Shared:
    """A file of this run with several names: its digest, and how many names were seen."""

    digest: str
    seen: int


@dataclass
class _Trust:
    device: int
    # Whether listings' inode numbers are the files' own here: settled by a
    # stat of the first file they call linked (FUSE without use_ino makes
    # them up; then nothing counts as linked and everything is read).
    trusted: bool | None = None

    def confirm(self, entry: os.DirEntry[str]) -> bool:
        if self.trusted is None:
            st = entry.stat(follow_symlinks=False)
            self.trusted = (st.st_ino == entry.inode() and st.st_dev == self.device
                            and st.st_nlink > 1)
        return self.trusted


def _write_lines(out: BinaryIO, top: str, source: str, earlier: str | None,
                 inherit: _Inherited, made: Made, check: Callable[[], None],
                 on_file: Callable[[int], None] | None) -> None:
    buffer = bytearray(CHUNK)
    # Files of this run with several names in the copy: read once, by inode.
    # Dropped once every name is seen, so this follows such files, not the tree.
    several: dict[int, _Shared] = {}
    seen = checked_at = 0
    for folder, name, entry, linked in _walk(top, source, earlier, check):
        seen += 1
        # Between files, not after each: a check costs as much as hashing a
        # small file. Often enough that a cancel lands, and a read that moves
        # keeps its Progress alive, within a fraction of a second.
        if seen % CHECK_EVERY == 0 or made.hashed_bytes - checked_at >= CHECK_BYTES:
            checked_at = made.hashed_bytes
            check()
            if on_file is not None:
                on_file(made.files)
        digest = inherit.digest(folder, name) if linked else None
        if digest is not None:
            made.inherited += 1
        else:
            digest = _digest_new(folder, name, entry, several, buffer, made, check)
            if digest is None:
                continue  # gone, or no longer a regular file
        out.write(format_line(digest, folder.prefix + name))
        made.files += 1


def _digest_new(folder: _Folder, name: bytes, entry: os.DirEntry[str],
                several: dict[int, _Shared], buffer: bytearray, made: Made,
                check: Callable[[], None]) -> str | None:
    try:
        fd = _open_file(entry.name, folder.fd)
    except _GONE:
        return None
    except OSError as e:
        raise OSError(e.errno, e.strerror, os.fsdecode(folder.prefix + name)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        known = several.get(st.st_ino) if st.st_nlink > 1 else None
        if known is not None:
            known.seen += 1
            if known.seen >= st.st_nlink:
                del several[st.st_ino]
            return known.digest
        try:
            digest = _hash(fd, st.st_size, buffer, made, check)
        except OSError as e:
            raise OSError(e.errno, e.strerror, os.fsdecode(folder.prefix + name)) from None
        if st.st_nlink > 1:
            several[st.st_ino] = _Shared(digest, 1)
        return digest
    finally:
        os.close(fd)


def _hash(fd: int, size: int, buffer: bytearray, made: Made, check: Callable[[], None]) -> str:
    digest = hashlib.sha256()
    view = memoryview(buffer)
    total = 0
    while True:
        count = os.readv(fd, [buffer])
        if count == 0:
            return digest.hexdigest()
        # hashlib lets go of the GIL for blocks this size: the event loop runs on.
        digest.update(view[:count])
        total += count
        made.hashed_bytes += count
        if count < CHUNK and total == size:
            # A short read that ends where fstat said: the end, without one
            # more read (most files are smaller than a block).
            return digest.hexdigest()
        if count == CHUNK:
            check()


def _walk(top: str, source: str, earlier: str | None, check: Callable[[], None]
          ) -> Iterator[tuple[_Folder, bytes, os.DirEntry[str], bool]]:
    """Every regular file below ``top`` in the canonical order: (its folder, its name, it,
    linked).

    ``linked``: the same inode as the same path in ``earlier``. Folders on
    another filesystem are not entered. The folder's descriptor is open
    while the file is handled (before the next is asked for).
    """
    fd = os.open(top, _OPEN_FOLDER)
    device = os.fstat(fd).st_dev
    trust = _Trust(device)
    stack = [_Folder(fd, _open_earlier(earlier, None, device), (os.fsencode(source),))]
    try:
        yield from _files_of(stack[-1], trust)
        while stack:
            check()
            parent = stack[-1]
            assert parent.subfolders is not None
            name = next(parent.subfolders, None)
            if name is None:
                stack.pop().close()
                continue
            child = _enter(parent, name, device)
            if child is not None:
                stack.append(child)
                yield from _files_of(child, trust)
    finally:
        for left in stack:
            left.close()


def _enter(parent: _Folder, name: str, device: int) -> _Folder | None:
    try:
        fd = os.open(name, _OPEN_FOLDER, dir_fd=parent.fd)
    except _GONE:
        return None
    if os.fstat(fd).st_dev != device:
        os.close(fd)
        return None
    earlier = (None if parent.earlier is None
               else _open_earlier(name, parent.earlier, device))
    return _Folder(fd, earlier, (*parent.folders, os.fsencode(name)))


def _open_earlier(name: str | None, parent: int | None, device: int) -> int | None:
    # Anything amiss in the earlier copy only means "nothing to inherit".
    # Inode numbers mean the same file only on the same filesystem.
    if name is None:
        return None
    try:
        fd = os.open(name, _OPEN_FOLDER, dir_fd=parent)
    except OSError:
        return None
    if os.fstat(fd).st_dev != device:
        os.close(fd)
        return None
    return fd


def _files_of(folder: _Folder, trust: _Trust
              ) -> Iterator[tuple[_Folder, bytes, os.DirEntry[str], bool]]:
    """The folder's regular files, sorted; its subfolders are kept, sorted, for later."""
    with os.scandir(folder.fd) as listing:
        entries = sorted(((os.fsencode(e.name), e) for e in listing), key=_by_name)
    folder.subfolders = iter([e.name for _, e in entries if e.is_dir(follow_symlinks=False)])
    earlier = _earlier_inodes(folder.earlier)
    for name, entry in entries:
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            linked = (earlier.get(entry.name) == entry.inode()
                      and trust.confirm(entry))
        except _GONE:
            continue
        yield folder, name, entry, linked


def _by_name(item: tuple[bytes, os.DirEntry[str]]) -> bytes:
    return item[0]


def _earlier_inodes(fd: int | None) -> dict[str, int]:
    if fd is None:
        return {}
    try:
        with os.scandir(fd) as entries:
            return {e.name: e.inode() for e in entries if not e.is_dir(follow_symlinks=False)}
    except OSError:
        return {}
