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

import bisect
import contextlib
import errno
import hashlib
import os
import stat
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .allocated import InodeTrust, open_earlier_folder
from .checksums import MANIFEST_DIR, format_line, manifest_path, parse_line, sources_path

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
_LOWER_HEX = b"0123456789abcdef"
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
    # What the copy's entries not hard-linked outside it take on disk, as
    # ``allocated.written_bytes`` counts it (SPEC §6's bytes).
    allocated: int = 0


def write_manifest(backup_dir: str, source: str, earlier: str | None,
                   check: Callable[[], None] = lambda: None,
                   on_file: Callable[[int], None] | None = None, *,
                   into: str | None = None) -> Made:
    """Write ``<backup_dir>/.pibackup/<source>.sha256`` for the copy ``<backup_dir>/<source>``.

    ``into``: write it there instead (a mirror checks its copy against the
    origin's manifest, which is already in that place).

    The same walk sums what the copy's new entries take on disk
    (``Made.allocated``), the figure ``allocated.written_bytes`` gives: every
    entry but those with a link outside the copy, each inode once. The walk
    reads only the files not linked to ``earlier`` and counts only those with
    a link count it can account for, so an entry linked to the earlier copy
    (a link outside) is never counted, stat or not.

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
    temp = temporary_name(final)
    made = Made()
    earlier_stream = _open_earlier_manifest(earlier, source, made)
    try:
        with open(temp, "wb") as out:
            inherit = _Inherited(earlier_stream)
            _write_lines(out, os.path.join(backup_dir, source), source, earlier, inherit,
                         _Reader(made, check), on_file)
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


def temporary_name(final: str) -> str:
    """The name ``final`` is written under before its rename: ``.<name>.tmp`` beside it."""
    return os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.tmp")


def discard_unfinished(backup_dir: str, source: str) -> None:
    """Remove what a manifest writer that was stopped midway left (its temporary file),
    if it can: what it cannot remove, the backup's failure or its cleanup will."""
    with contextlib.suppress(OSError):
        os.unlink(temporary_name(manifest_path(backup_dir, source)))


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
        temp = temporary_name(path)
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


def _open_file(name: str | bytes, folder: int | None) -> int:
    try:
        return os.open(name, _OPEN_FILE | _NOATIME, dir_fd=folder)
    except PermissionError:
        if not _NOATIME:
            raise
        # O_NOATIME is refused (EPERM) on a file the reader does not own.
        return os.open(name, _OPEN_FILE, dir_fd=folder)


class _Inherited:
    """The earlier manifest, read a folder's lines at a time, in step with the walk.

    Both are in the canonical order, so a folder's lines are consecutive
    and come where the walk reaches the folder. A line is taken as it
    stands when it is exactly what ``format_line`` would write (a lowercase
    digest, two spaces, an unescaped path): its path is the same in both
    backups, so it is this backup's line too. Any other line is parsed and
    written again. On a nightly run this is read for every file, so the
    lines are split a chunk at a time, and a folder whose next lines are
    exactly its names is taken in one comparison (``block``).
    """

    def __init__(self, stream: BinaryIO | None) -> None:
        self._stream = stream
        self._lines: list[bytes] = []  # complete lines, their newline stripped
        self._at = 0  # the next line not used
        self._tail = b""  # a line not read to its end yet
        self._eof = stream is None
        self._ended = stream is None  # nothing more to take from it
        self._number = 0  # lines before self._lines[0]
        # The next line, parsed: its position, folder part, key (to tell
        # which of two folders comes first), name and line to write.
        self._parsed_at = -1
        self._folder = b""
        self._folder_key: tuple[bytes, ...] = ()
        self._name = b""
        self._line = b""
        # Why the earlier manifest stopped being used midway, if it did.
        self.broken: str | None = None

    def block(self, folder: _Folder, names: list[bytes]
              ) -> tuple[list[bytes] | None, dict[bytes, bytes]]:
        """The earlier manifest's lines of the files directly in ``folder``.

        ``names``: the folder's files, sorted. When its next lines are
        exactly theirs, in order: those lines, their newlines stripped (and
        nothing else); else a line for each name the earlier block has.
        """
        count = len(names)
        # Lines of files or folders this copy no longer has go first: else
        # one deleted file would cost the next folder its whole-block path.
        while (self._peek() and self._folder != folder.path
               and self._folder_key < folder.folders):
            self._at += 1
        if count and self._available(count) >= count:
            lines = self._lines[self._at:self._at + count]
            head = b"  " + folder.prefix
            if ([line[64:] for line in lines] == [head + name for name in names]
                    and not b"".join([line[:64] for line in lines]).translate(None, _LOWER_HEX)):
                self._at += count
                return lines, {}
        found: dict[bytes, bytes] = {}
        while self._peek():
            if self._folder == folder.path:
                found[self._name] = self._line
            elif self._folder_key > folder.folders:
                break
            # else a line of a folder this copy no longer has
            self._at += 1
        return None, found

    def _available(self, count: int) -> int:
        """Lines ready to be used, reading until there are ``count`` or the end."""
        while len(self._lines) - self._at < count and not self._eof:
            assert self._stream is not None
            chunk = self._stream.read(1 << 16)
            if self._at:
                # Only here: copying what is left on every read would make a
                # wide folder's block cost its square.
                self._number += self._at
                self._lines = self._lines[self._at:]
                self._at = 0
            if not chunk:
                self._eof = True
                if self._tail:
                    self._lines.append(self._tail)  # the last line, without its newline
                break
            more = (self._tail + chunk).split(b"\n")
            self._tail = more.pop()
            self._lines += more
        return len(self._lines) - self._at

    def _peek(self) -> bool:
        """Parse the next line (once); False at the end, or when a line is malformed."""
        if self._ended:
            return False
        if self._parsed_at == self._number + self._at:
            return True
        if not self._available(1):
            self._ended = True
            return False
        line = self._lines[self._at]
        if (line[64:66] == b"  " and len(line) > 66
                and not line[:64].translate(None, _LOWER_HEX)):
            path = line[66:]
            line += b"\n"
        else:
            try:
                digest, path = parse_line(line)
            except ValueError as e:
                # A damaged earlier manifest only costs reads, never a wrong digest.
                self.broken = (f"the earlier backup's manifest is malformed "
                               f"(line {self._number + self._at + 1}: {e})")
                self._ended = True
                return False
            line = format_line(digest, path)
        folder, _, self._name = path.rpartition(b"/")
        if folder != self._folder:
            self._folder, self._folder_key = folder, tuple(folder.split(b"/"))
        self._line = line
        self._parsed_at = self._number + self._at
        return True


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
    blocks: int  # st_blocks, counted once every name is seen


class _Reader:
    """Reads and hashes the files this run wrote, each inode once."""

    def __init__(self, made: Made, check: Callable[[], None]) -> None:
        self.made = made
        self.check = check
        self.buffer = bytearray(CHUNK)
        # Files of this run with several names in the copy: read once, by inode.
        # Dropped once every name is seen, so this follows such files, not the tree.
        self.several: dict[int, _Shared] = {}
        self.files = 0
        self.checked_at = 0

    def digest(self, folder: _Folder, name: bytes) -> str | None:
        """The digest of ``name`` in ``folder``; None when it is gone or no regular file.

        Run for every file of a first backup: what costs here is the Python
        around the system calls, so the common case (a small file with one
        name) takes one ``read`` of its size and one call to hash it.
        """
        self.files += 1
        made = self.made
        # Between files, not after each: a check costs as much as hashing a
        # small file. Often enough that a cancel lands, and a read that moves
        # keeps its Progress alive, within a fraction of a second.
        if (self.files % CHECK_EVERY == 0
                or made.hashed_bytes - self.checked_at >= CHECK_BYTES):
            self.checked_at = made.hashed_bytes
            self.check()
        try:
            fd = _open_file(name, folder.fd)
        except _GONE:
            return None
        except OSError as e:
            raise OSError(e.errno, e.strerror, os.fsdecode(folder.prefix + name)) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            if st.st_nlink == 1:
                made.allocated += st.st_blocks * 512
                return self._hash(fd, st.st_size)
            known = self.several.get(st.st_ino)
            if known is None:
                known = _Shared(self._hash(fd, st.st_size), 0, st.st_blocks)
                self.several[st.st_ino] = known
            self._seen(known, st)
            return known.digest
        except OSError as e:
            raise OSError(e.errno, e.strerror, os.fsdecode(folder.prefix + name)) from None
        finally:
            os.close(fd)

    def other(self, entry: os.DirEntry[str]) -> None:
        """Count an entry that is neither a regular file nor a folder (a symbolic link)."""
        try:
            st = entry.stat(follow_symlinks=False)
        except _GONE:
            return
        if st.st_nlink <= 1:
            self.made.allocated += st.st_blocks * 512
            return
        known = self.several.setdefault(st.st_ino, _Shared("", 0, st.st_blocks))
        self._seen(known, st)

    def _seen(self, known: _Shared, st: os.stat_result) -> None:
        """One more name of an inode with several; once every name is seen, all
        of them in the copy, it is the copy's own: counted, and forgotten."""
        known.seen += 1
        if known.seen >= st.st_nlink:
            del self.several[st.st_ino]
            self.made.allocated += known.blocks * 512

    def folder(self, fd: int) -> int:
        """The device of an open folder, its blocks counted."""
        st = os.fstat(fd)
        self.made.allocated += st.st_blocks * 512
        return st.st_dev

    def _hash(self, fd: int, size: int) -> str:
        made = self.made
        if size < CHUNK:
            # Read one byte more than fstat said: all of it, and its end told,
            # in one read (a file that grew since goes on below).
            data = os.read(fd, size + 1)
            made.hashed_bytes += len(data)
            if len(data) == size:
                return hashlib.sha256(data).hexdigest()
            digest = hashlib.sha256(data)
            if not data:
                return digest.hexdigest()
        else:
            digest = hashlib.sha256()
        buffer = self.buffer
        view = memoryview(buffer)
        while True:
            count = os.readv(fd, [buffer])
            if count == 0:
                return digest.hexdigest()
            # hashlib lets go of the GIL for blocks this size: the event loop runs on.
            digest.update(view[:count])
            made.hashed_bytes += count
            if count == CHUNK:
                self.check()


def _write_lines(out: BinaryIO, top: str, source: str, earlier: str | None,
                 inherit: _Inherited, reader: _Reader,
                 on_file: Callable[[int], None] | None) -> None:
    """Every regular file below ``top``, folder by folder in the canonical order.

    Folders on another filesystem are not entered.
    """
    made, check = reader.made, reader.check
    fd = os.open(top, _OPEN_FOLDER)
    device = reader.folder(fd)
    trust = InodeTrust(device)
    first_earlier = None if earlier is None else open_earlier_folder(earlier, None, device)
    stack = [_Folder(fd, first_earlier, (os.fsencode(source),))]
    try:
        out.write(_folder_lines(stack[-1], trust, inherit, reader))
        while stack:
            check()
            if on_file is not None:
                on_file(made.files)
            parent = stack[-1]
            assert parent.subfolders is not None
            name = next(parent.subfolders, None)
            if name is None:
                stack.pop().close()
                continue
            child = _enter(parent, name, device, reader)
            if child is not None:
                stack.append(child)
                out.write(_folder_lines(child, trust, inherit, reader))
    finally:
        for left in stack:
            left.close()


def _folder_lines(folder: _Folder, trust: InodeTrust, inherit: _Inherited, reader: _Reader
                  ) -> bytes:
    """The lines of the files directly in ``folder``, sorted; its subfolders kept, for later.

    A file is linked when its inode is the one the same name has in the
    earlier folder; a linked file takes the earlier manifest's line. Told
    for the whole folder at once (the two listings' items compared as
    sets): on a nightly run nearly every file is linked, and a folder
    whose files are all linked and whose names are the earlier block's
    takes that block as it stands, without any work per file.
    """
    with os.scandir(folder.fd) as listing:
        entries = list(listing)
    # is_file()/is_dir() read the listing's type; they stat only where the
    # filesystem does not tell it, and say False for what vanished since.
    files: dict[str, int] = {}
    subfolders = []
    for entry in entries:
        if entry.is_file(follow_symlinks=False):
            files[entry.name] = entry.inode()
        elif entry.is_dir(follow_symlinks=False):
            subfolders.append(entry.name)
        else:
            reader.other(entry)  # a symbolic link, a fifo: no line, but its blocks
    folder.subfolders = iter(sorted(subfolders, key=os.fsencode))
    # One encoding for the whole folder (a name holds no NUL).
    keys = list(files)
    encoded = os.fsencode("\0".join(keys)).split(b"\0") if keys else []
    names = sorted(encoded)
    fresh = _fresh(folder, files, entries, trust)
    linked = len(fresh) < len(names)
    lines, inherited = inherit.block(folder, names if linked else [])
    made = reader.made
    if lines is not None:
        # The earlier block has these very names: only the fresh lines change.
        made.files += len(names)
        made.inherited += len(names) - len(fresh)
        gone = 0
        if fresh:
            for key in sorted(fresh):
                name = os.fsencode(key)
                at = bisect.bisect_left(names, name)
                digest = reader.digest(folder, name)
                if digest is None:  # gone, or no longer a regular file
                    made.files -= 1
                    gone += 1
                    lines[at] = b""
                else:
                    lines[at] = format_line(digest, folder.prefix + name)[:-1]
            lines = [line for line in lines if line] if gone else lines
        lines.append(b"")
        return b"\n".join(lines)
    parts = []
    if not linked:  # every file is read (a first backup): nothing to look up
        prefix, digest_of = folder.prefix, reader.digest
        for name in names:
            digest = digest_of(folder, name)
            if digest is not None:  # else gone, or no longer a regular file
                parts.append(format_line(digest, prefix + name))
        made.files += len(parts)
        return b"".join(parts)
    by_bytes = dict(zip(encoded, keys, strict=True))
    for name in names:
        line = None if by_bytes[name] in fresh else inherited.get(name)
        if line is not None:
            made.inherited += 1
        else:
            digest = reader.digest(folder, name)
            if digest is None:
                continue  # gone, or no longer a regular file
            line = format_line(digest, folder.prefix + name)
        parts.append(line)
        made.files += 1
    return b"".join(parts)


def _fresh(folder: _Folder, files: dict[str, int], entries: list[os.DirEntry[str]],
           trust: InodeTrust) -> set[str] | dict[str, int]:
    """The names of ``files`` that are not linked to the earlier folder (to be read)."""
    if folder.earlier is None or not files:
        return files
    try:
        with os.scandir(folder.earlier) as listing:
            earlier = {e.name: e.inode() for e in listing if not e.is_dir(follow_symlinks=False)}
    except OSError:
        return files  # anything amiss in the earlier copy only means "nothing to inherit"
    fresh = {name for name, _ in files.items() - earlier.items()}
    if len(fresh) == len(files):
        return fresh
    if trust.trusted is None:
        linked = next(e for e in entries if e.name in files and e.name not in fresh)
        if not trust.confirm(linked) and trust.trusted is None:
            return fresh | {linked.name}  # it vanished before it could tell
    return fresh if trust.trusted else files


def _enter(parent: _Folder, name: str, device: int, reader: _Reader) -> _Folder | None:
    try:
        fd = os.open(name, _OPEN_FOLDER, dir_fd=parent.fd)
    except _GONE:
        return None
    if reader.folder(fd) != device:
        os.close(fd)
        return None
    earlier = (None if parent.earlier is None
               else open_earlier_folder(name, parent.earlier, device))
    return _Folder(fd, earlier, (*parent.folders, os.fsencode(name)))
