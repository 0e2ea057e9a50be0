"""What ``restore`` checks before it writes: the backup's copies against its manifest (SPEC §7, §9).

Every regular file under the restored item that the source's manifest
(``<backup>/.pibackup/<source>.sha256``) lists is read and hashed; one
whose content is not the manifest's digest is damaged and must not be
written into the target. The manifest is streamed: only the damaged files
are kept, so a restore of one file from a backup of millions reads one
manifest line at a time. For each damaged file the other complete backups'
manifests are searched (newest first) for the same path with the same
digest, and such a copy is read to be sure it really has it.

Files are opened one component at a time without following a symbolic link,
from the backup's folder down: what is hashed is what rsync will read.
Everything here reads the disk and runs in a worker thread; ``check`` is
called between blocks so that a cancel lands within one block.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .checksums import DIGEST_HEX, manifest_path, parse_line

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import BinaryIO

_BLOCK = 1 << 20
# A manifest line is at most a digest and a path of 4,096 bytes written twice
# as long by the escaping; a longer one is not a line of a manifest.
_LINE_CAP = 16 << 10
# How many manifest lines are read between two looks for a cancel.
_LINES_PER_CHECK = 4096
_PATH_AT = DIGEST_HEX + 2


@dataclass(frozen=True)
class Damage:
    """A file of the backup whose copy is not what its manifest says."""

    path: bytes  # relative to the backup folder: data/photos/a.jpg
    digest: str  # the manifest's
    why: str  # what is wrong, for the log
    inode: tuple[int, int] | None  # the damaged copy's (st_dev, st_ino), if it has one


@dataclass(frozen=True)
class Checked:
    """What the check of a restored item found."""

    files: int  # listed files read
    damaged: list[Damage]
    malformed: int  # manifest lines that are not sha256sum lines (their files unchecked)


class Opener:
    """Opens paths inside one folder without following links; keeps the last folder open
    (a manifest lists the files of one folder together)."""

    def __init__(self, top: str) -> None:
        self.top = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.folder: tuple[bytes, ...] = ()
        self.fd = self.top

    def close(self) -> None:
        if self.fd != self.top:
            os.close(self.fd)
        os.close(self.top)

    def enter(self, parts: tuple[bytes, ...]) -> int:
        if parts == self.folder:
            return self.fd
        if self.fd != self.top:
            os.close(self.fd)
        self.folder, self.fd = (), self.top
        fd = os.dup(self.top)
        try:
            for name in parts:
                below = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = below
        except BaseException:
            os.close(fd)
            raise
        self.folder, self.fd = parts, fd
        return fd

    def open_file(self, path: bytes) -> int:
        """A read descriptor of the regular file ``path``. OSError: ENOENT when it or a
        folder on the way is missing, ELOOP/ENOTDIR for a link on the way or in its
        place, EISDIR (raised here) for something that is not a regular file."""
        *folders, name = path.split(b"/")
        # O_NONBLOCK: a FIFO in a file's place must not hold the open until a writer comes.
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                     dir_fd=self.enter(tuple(folders)))
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EISDIR, "not a regular file", os.fsdecode(path))
        return fd


def _digest(fd: int, check: Callable[[], None]) -> str:
    sha = hashlib.sha256()
    buffer = bytearray(_BLOCK)
    view = memoryview(buffer)
    while True:
        check()
        count = os.readv(fd, [buffer])
        if count == 0:
            return sha.hexdigest()
        sha.update(view[:count])


def _lines(stream: BinaryIO, check: Callable[[], None],
           starts: tuple[tuple[bytes, ...], tuple[bytes, ...]],
           ) -> Iterator[tuple[str, bytes] | None]:
    """(digest, path) of the lines of an open manifest whose path may start with one of
    ``starts`` (raw forms, escaped forms: ``_forms``), None for such a line that is
    malformed. Other lines are only looked at, not parsed: a restore of one file goes
    through a manifest of millions of lines at about the speed of reading it."""
    raw, escaped = starts
    for number, line in enumerate(iter(lambda: stream.readline(_LINE_CAP), b"")):
        if number % _LINES_PER_CHECK == 0:
            check()  # a long manifest read is progress too
        if not line.endswith(b"\n") and len(line) == _LINE_CAP:
            while (rest := stream.readline(_LINE_CAP)) and not rest.endswith(b"\n"):
                pass
            yield None
            continue
        # After the digest and its two separator characters; one more for the
        # backslash that starts a line with an escaped name.
        if not (line.startswith(raw, _PATH_AT) or line.startswith(escaped, _PATH_AT + 1)):
            continue
        try:
            yield parse_line(line)
        except ValueError:
            yield None


def _forms(*paths: bytes) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """``paths`` as a manifest line may hold them: raw, and escaped as coreutils 8 and the
    engine write them (``\\\\``, ``\\n``) or as coreutils 9 does (``\\r`` too)."""
    escaped = [p.replace(b"\\", b"\\\\").replace(b"\n", b"\\n") for p in paths]
    escaped += [p.replace(b"\r", b"\\r") for p in escaped if b"\r" in p]
    return tuple(paths), tuple(escaped)


def _under(path: bytes, item: bytes) -> bool:
    return path == item or path.startswith(item + b"/")


def check_item(backup_dir: str, source: str, inner: bytes,
               check: Callable[[], None]) -> Checked | None:
    """Hash every file the source's manifest lists under ``inner`` (b"": the whole source);
    None when the backup has no manifest for the source. Raises OSError if the manifest
    or the backup's folder cannot be read."""
    item = source.encode() + (b"/" + inner if inner else b"")
    try:
        stream = open(manifest_path(backup_dir, source), "rb")
    except FileNotFoundError:
        return None
    files = malformed = 0
    damaged: list[Damage] = []
    with stream:
        opener = Opener(backup_dir)
        try:
            for entry in _lines(stream, check, _forms(item)):
                if entry is None:
                    malformed += 1
                    continue
                digest, path = entry
                if not _under(path, item):
                    continue
                check()
                files += 1
                found = _damage(opener, path, digest, check)
                if found is not None:
                    damaged.append(found)
        finally:
            opener.close()
    return Checked(files, damaged, malformed)


def _damage(opener: Opener, path: bytes, digest: str,
            check: Callable[[], None]) -> Damage | None:
    try:
        fd = opener.open_file(path)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP) and not _in_place(opener, path):
            # Not in the backup (or behind a link, which rsync copies as the link):
            # nothing of it is restored, so nothing damaged is written.
            return None
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            return Damage(path, digest, "it is no longer a regular file", None)
        return Damage(path, digest, f"it cannot be read: {e.strerror}", None)
    try:
        st = os.fstat(fd)
        actual = _digest(fd, check)
    except OSError as e:
        return Damage(path, digest, f"it cannot be read: {e.strerror}", None)
    finally:
        os.close(fd)
    if actual == digest:
        return None
    return Damage(path, digest, "its content differs from the manifest's digest",
                  (st.st_dev, st.st_ino))


def _in_place(opener: Opener, path: bytes) -> bool:
    """Something that is not a folder stands at ``path`` itself (its folder reached)."""
    *folders, name = path.split(b"/")
    try:
        st = os.stat(name, dir_fd=opener.enter(tuple(folders)), follow_symlinks=False)
    except OSError:
        return False
    return not stat.S_ISDIR(st.st_mode)


def good_copies(destination: str, backups: list[str], source: str, damaged: list[Damage],
                check: Callable[[], None]) -> dict[bytes, str]:
    """For each damaged path, the first of ``backups`` (newest first) whose manifest gives it
    the same digest and whose copy really has it. Reads only those copies (a copy that
    is the damaged one, the same inode, is not read again)."""
    pending = {d.path: d for d in damaged}
    starts = _forms(*(d.path for d in damaged))
    found: dict[bytes, str] = {}
    for name in backups:
        if not pending:
            break
        top = os.path.join(destination, name)
        try:
            with open(manifest_path(top, source), "rb") as stream:
                candidates = []
                for entry in _lines(stream, check, starts):
                    if (entry is not None and entry[1] in pending
                            and entry[0] == pending[entry[1]].digest):
                        candidates.append(entry[1])
        except OSError:
            continue  # no manifest there (or none readable): nothing to compare with
        if candidates and _same_copy(top, candidates, pending, found, name, check):
            for path in found:
                pending.pop(path, None)
    return found


def _same_copy(top: str, candidates: list[bytes], pending: dict[bytes, Damage],
               found: dict[bytes, str], name: str, check: Callable[[], None]) -> bool:
    """Record in ``found`` the candidates whose copy in ``top`` hashes to the digest."""
    try:
        opener = Opener(top)
    except OSError:
        return False
    added = False
    try:
        for path in candidates:
            wanted = pending[path]
            try:
                fd = opener.open_file(path)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != wanted.inode and _digest(fd, check) == wanted.digest:
                    found[path] = name
                    added = True
            except OSError:
                continue
            finally:
                os.close(fd)
    finally:
        opener.close()
    return added
