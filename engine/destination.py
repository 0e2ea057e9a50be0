"""The destination: every filesystem operation the engine does where the backups are kept.

``Destination`` is what the engine asks of a destination (scan it, create,
rename and remove folders there, flush it, read its free space, tell whether
it is still the one the run started with); ``LocalDestination`` is a folder
on this machine. A mirror's target, or a destination over SSH, is another
implementation of the same methods: the pipeline, retention and the
commands never call ``os`` on the destination themselves.

The destination is read with ``lstat``: a symbolic link found there is never
a backup and is never followed; one named like an in-progress or deleting
folder is removed as a link (SPEC §1).

Every operation runs off the event loop, in a worker thread abandoned on
cancel, so a signal is always heard (SPEC §2), and nothing waits on the
disk forever: an operation that gets no answer within ``ANSWER_BOUND_S``
(a removal: that makes no progress for that long) raises
``DestinationLost``, and from then on every operation of that destination
does so at once. A dying disk then costs the run one bound, not one per
operation, and the posts still run. An OSError that turns out to be the
destination gone (unmounted, unplugged) is raised as ``DestinationLost``
too, with the line the report says.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import stat
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Literal, NoReturn, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import structlog

from .checksums import MANIFEST_DIR
from .errors import DestinationError
from .filesystems import (
    SUBVOLUME_INODE,
    is_btrfs,
    is_subvolume,
    mount_of,
    on_mounted_filesystem,
)
from .heartbeat import beating, current
from .manifest import Made, add_source, discard_unfinished, write_manifest
from .manifest_process import write_manifest_in_child
from .names import DELETING, IN_PROGRESS, format_name, parse_name
from .processes import describe_exit, run_process
from .threads import Progress, in_worker

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from .config import Config

log = structlog.get_logger("pibackup.destination")

State = Literal["complete", "in-progress", "deleting"]
_SUFFIXES: tuple[tuple[str, State], ...] = ((IN_PROGRESS, "in-progress"), (DELETING, "deleting"))
T = TypeVar("T")

# How long one operation on the destination may go without an answer (a
# removal: without progress) before the destination counts as not answering.
# A disk spinning up from standby answers within seconds; one that is dying,
# or a hung network or FUSE mount, never does, and the run must still end.
ANSWER_BOUND_S = 20.0
# A flush waits for everything written to reach the disk, and that cannot be
# told from a hung disk by time alone: 1 GB of dirty pages on a 30 MB/s USB
# disk is 33 s of honest work, more than ANSWER_BOUND_S, and the kernel lets
# a fifth of memory be dirty. So a flush is bounded like a removal, by how
# long it goes without progress: while the kernel's Dirty + Writeback pages
# (/proc/meminfo) keep reaching new lows, the disk is taking the writes and
# the flush is waited for; once they have not fallen for the answer bound, it
# is hung. The counters are the whole machine's: another disk's writeback can
# make them fall while ours hangs, hence new lows only (a steady writer
# elsewhere soon stops making them) and FLUSH_BOUND_S as a last resort, far
# beyond any honest flush (8 GB at 5 MB/s, an SD card's worst, is 27 min).
FLUSH_BOUND_S = 3600.0
# How often a flush reads the kernel's counters.
_FLUSH_POLL_S = 0.5


class DestinationLost(DestinationError):
    """The destination as a whole is gone (unmounted, unplugged) or does not answer.

    An OSError (EIO), so that what handles a failed deletion or copy handles
    it too; its text is the one line the report says.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, OSError(errno.EIO, message))


@dataclass(frozen=True)
class Entry:
    """A folder of the destination that the engine owns (or a link in its place)."""

    name: str  # the backup name, without suffix
    state: State
    time: datetime
    # A symbolic link named like an in-progress or deleting folder: never a
    # backup, never followed, only ever unlinked (by clean_stale).
    link: bool = False

    @property
    def folder(self) -> str:
        suffix = {"complete": "", "in-progress": IN_PROGRESS, "deleting": DELETING}[self.state]
        return self.name + suffix


def complete(entries: list[Entry]) -> list[Entry]:
    return [e for e in entries if e.state == "complete" and not e.link]


def stale(entries: list[Entry]) -> list[Entry]:
    """What ``clean_stale`` removes of ``entries``, in its order (the dry-run lists them)."""
    return [e for e in entries if e.state != "complete"]


# --- a local destination, synchronously (worker threads, and the inspection commands) --------


def destination_problem(config: Config) -> str | None:
    """Why the destination cannot be used as it is now, in one line, or None.

    It must be a folder (a link to one is fine); with ``require_mountpoint``
    it must also be on a mounted filesystem other than the root one: a mount
    point, or under one. Reads the disk: call it off the event loop
    (``Destination.problem``) where a signal must be heard.
    """
    return _problem(config.destination, config.require_mountpoint)


def _problem(dest: str, require_mountpoint: bool) -> str | None:
    try:
        st = os.stat(dest)
    except FileNotFoundError:
        return f"destination {dest} does not exist (is the backup disk mounted?)"
    except OSError as e:
        return f"destination {dest} cannot be read: {e.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"destination {dest} is not a folder"
    if require_mountpoint and not on_mounted_filesystem(dest):
        return (f"destination {dest} is not on a mounted filesystem other than the root one "
                "(require_mountpoint = true; is the backup disk mounted?)")
    return None


def scan(destination: str) -> list[Entry]:
    """Every backup, in-progress and deleting folder, newest instant first.

    Anything whose name is not exactly a backup name (plus suffix) is not
    ours and is left out, and so is anything that is not a folder: a symbolic
    link named like a backup is not one. Links named like an in-progress or
    deleting folder are listed with ``link=True``, so that clean_stale
    removes them. Raises OSError if the destination cannot be read.
    """
    entries = []
    with os.scandir(destination) as found:
        for item in found:
            state: State = "complete"
            name = item.name
            for suffix, suffix_state in _SUFFIXES:
                if name.endswith(suffix):
                    name, state = name[: -len(suffix)], suffix_state
            moment = parse_name(name)
            if moment is None:
                continue
            if item.is_dir(follow_symlinks=False):
                entries.append(Entry(name, state, moment))
            elif item.is_symlink() and state != "complete":
                entries.append(Entry(name, state, moment, link=True))
    entries.sort(key=lambda e: (e.time, e.name), reverse=True)
    return entries


def _is_folder(path: str) -> bool:
    """True for a real folder; a symbolic link (to a folder or not) is not one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def newest_holding(destination: str, entries: list[Entry], source: str) -> str | None:
    """The newest complete backup's folder for ``source``, for ``--link-dest``.

    A link in place of the source's folder is not followed: it would make
    rsync compare against (and hard-link to) whatever it points at.
    """
    for entry in complete(entries):
        candidate = os.path.join(destination, entry.name, source)
        if _is_folder(candidate):
            return candidate
    return None


def holds(destination: str, backup: str, source: str | None, inner: bytes | None) -> bool:
    """The backup holds ``source`` (a folder), or ``inner``, a path inside it (anything),
    found without following a link (``locate``)."""
    if source is None:
        return True
    return locate(os.path.join(destination, backup), source, inner) == HELD


# What ``locate`` finds: the path, nothing, or (any other value) the link on the way to it.
HELD = b""
ABSENT = b"/"


def locate(backup_dir: str, source: str, inner: bytes | None) -> bytes:
    """``source`` (a real folder) or ``inner`` (anything) in a backup, looked up one
    component at a time without following a symbolic link (SPEC §7): HELD, ABSENT, or
    the path (``data/etclink``, relative to the backup) of a link on the way. The
    manifests' folder is never a source. Raises OSError for anything else."""
    if source == MANIFEST_DIR:
        return ABSENT
    parts = [source.encode(), *(p for p in (inner or b"").split(b"/") if p)]
    fd = os.open(backup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for depth, name in enumerate(parts[:-1]):
            try:
                below = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                | os.O_CLOEXEC, dir_fd=fd)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    return ABSENT
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                is_link = stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
                return b"/".join(parts[:depth + 1]) if is_link else ABSENT
            os.close(fd)
            fd = below
        try:
            st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return ABSENT
    finally:
        os.close(fd)
    return HELD if inner or stat.S_ISDIR(st.st_mode) else ABSENT


def link_on_the_way(destination: str, backups: list[str], source: str,
                    inner: bytes) -> tuple[str, bytes] | None:
    """The first of ``backups`` where a link stands on the way to ``inner``, and that link."""
    for name in backups:
        found = locate(os.path.join(destination, name), source, inner)
        if found not in (HELD, ABSENT):
            return name, found
    return None


def name_is_free(destination: str, name: str) -> bool:
    return not any(
        os.path.lexists(os.path.join(destination, name + suffix))
        for suffix in ("", IN_PROGRESS, DELETING)
    )


def _name_is_taken(destination: str, name: str) -> bool:
    return os.path.isdir(destination) and not name_is_free(destination, name)


def space(destination: str) -> tuple[int, int] | None:
    """Free and total bytes of the destination's filesystem, or None if not visible."""
    try:
        st = os.statvfs(destination)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _make_folder(path: str) -> None:
    os.mkdir(path)


def _rename_folder(source: str, target: str) -> None:
    # lstat itself, not _is_folder: a disk that fails to answer (EIO) must say
    # so, not read as "a link".
    if not stat.S_ISDIR(os.lstat(source).st_mode):
        raise OSError(errno.ENOTDIR, "not a folder (a symbolic link is never deleted)", source)
    if os.path.lexists(target):
        raise OSError(errno.EEXIST, "already exists", target)
    os.rename(source, target)


_libc = ctypes.CDLL(None, use_errno=True)


def _cpus() -> int:
    """The CPUs this process may run on (a container or ``taskset`` may give it fewer)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _syncfs(path: str) -> None:
    """Write everything of the filesystem that holds ``path`` to its disk (syncfs(2))."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), path)
    finally:
        os.close(fd)


def _write_back(path: str) -> None:
    """``_syncfs``, its failure left to the flush that counts."""
    with contextlib.suppress(OSError):
        _syncfs(path)


def _unwritten_kib() -> int | None:
    """Dirty + Writeback of /proc/meminfo (KiB): what the kernel has yet to write, or None."""
    found = 0
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                key, _, value = line.partition(b":")
                if key in (b"Dirty", b"Writeback"):
                    found += int(value.split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return found


def _syncfs_watched(path: str, progress: Progress) -> None:
    """``_syncfs`` in a thread of its own, this worker watching it (see FLUSH_BOUND_S).

    ``progress`` is pushed on whenever the kernel's unwritten pages reach a new
    low; a cancel lands within _FLUSH_POLL_S. On either, the thread held in
    syncfs by a hung disk is abandoned (a daemon, it never keeps the process
    alive); its error, if it returns one, is raised here.
    """
    failure: list[OSError] = []
    done = threading.Event()

    def flush() -> None:
        try:
            _syncfs(path)
        except OSError as e:
            failure.append(e)
        finally:
            done.set()

    threading.Thread(target=flush, name="syncfs", daemon=True).start()
    lowest = _unwritten_kib()
    while not done.wait(_FLUSH_POLL_S):
        anyio.from_thread.check_cancelled()
        now = _unwritten_kib()
        if now is not None and (lowest is None or now < lowest):
            lowest = now
            progress.check()
    if failure:
        raise failure[0]


# --- removal -------------------------------------------------------------------------------


_OPEN_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_folder(parent: int, name: str) -> int:
    try:
        return os.open(name, _OPEN_FOLDER, dir_fd=parent)
    except PermissionError:
        # A folder rsync copied without read or search permission (not a
        # problem for root): give it back to its owner, then open it.
        os.chmod(name, 0o700, dir_fd=parent)
        return os.open(name, _OPEN_FOLDER, dir_fd=parent)


def _unlink_in(parent: int, name: str, *, folder: bool = False) -> None:
    remove = os.rmdir if folder else os.unlink
    try:
        try:
            remove(name, dir_fd=parent)
        except PermissionError:
            # A read-only folder (rsync kept its mode) cannot have entries
            # removed: make it writable and try once more.
            os.fchmod(parent, 0o700)
            remove(name, dir_fd=parent)
    except FileNotFoundError:
        pass


def _remove_tree_sync(path: str, check: Callable[[], None]) -> None:
    """Remove ``path`` and everything below it; never follows a symbolic link.

    Works on file descriptors (``*at`` calls), as shutil.rmtree does, so a
    link swapped in while it runs is unlinked, never entered. Calls ``check``
    before each entry: run it in a worker thread (in_worker) with one that
    lands a cancel.
    """
    # The parent may be reached through a link (a destination configured as
    # one); only what is removed, and everything below it, is never followed.
    try:
        top = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # nothing to remove
    try:
        check()
        base = os.path.basename(path)
        try:
            st = os.stat(base, dir_fd=top, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            _unlink_in(top, base)
            return
        # Depth first without recursion: (parent fd, name, fd, its entries).
        first = _open_folder(top, base)
        stack = [(top, base, first, os.scandir(first))]
        try:
            while stack:
                parent, name, fd, entries = stack[-1]
                for entry in entries:
                    check()
                    if entry.is_dir(follow_symlinks=False):
                        child = _open_folder(fd, entry.name)
                        stack.append((fd, entry.name, child, os.scandir(child)))
                        break
                    _unlink_in(fd, entry.name)
                else:
                    stack.pop()
                    entries.close()
                    os.close(fd)
                    _unlink_in(parent, name, folder=True)
        finally:
            for _, _, fd, entries in stack:
                entries.close()
                os.close(fd)
    finally:
        os.close(top)


async def remove_tree(path: str, progress: Progress | None = None) -> None:
    """Remove ``path`` and everything in it, off the event loop; never follows a link.

    A symbolic link at ``path`` is unlinked, not followed; nothing below is
    entered through one; a ``path`` that does not exist is done. Not
    shielded: it stops as soon as the enclosing scope is cancelled or its
    deadline passes (raising the cancellation), leaving the rest in place,
    so callers name what they remove ``.deleting`` or ``.in-progress``
    first, for the next run to finish. A caller that must remove under a
    cancel wraps the call in ``anyio.move_on_after(bound, shield=True)``;
    one that gives up on a disk that stops answering passes a ``progress``
    and enters its scope. btrfs subvolume deletes are managed processes,
    ended on cancel. Raises OSError if something cannot be removed.
    """
    check = progress.check if progress is not None else anyio.from_thread.check_cancelled
    with beating("deletion", folder=path):
        # btrfs subvolumes (received backups, snapshots) are read-only and
        # cannot be unlinked file by file: delete them as subvolumes first.
        for subvolume in await in_worker(_subvolumes_at, path, progress=progress):
            finished = await run_process(["btrfs", "subvolume", "delete", subvolume])
            if finished.exit_code != 0:
                raise OSError(f"btrfs subvolume delete {subvolume}: "
                              f"{finished.stderr.text() or describe_exit(finished.exit_code)}")
            if progress is not None:
                progress.moved()
        await in_worker(_remove_tree_sync, path, check, progress=progress)


def _subvolumes_at(path: str) -> list[str]:
    """Subvolumes at ``path`` or directly inside it, inner ones first; none through a link.

    That is where the engine puts them (``<backup>/<source>``, a snapshot
    itself); a source's nested subvolumes are never copied as subvolumes.
    """
    if not _is_folder(path) or not is_btrfs(path):
        return []
    with os.scandir(path) as entries:
        # stat(), not the entry's d_ino: readdir reports a subvolume's
        # id there (257, 258, ...), only stat() gives the inode 256.
        found = [e.path for e in entries
                 if e.is_dir(follow_symlinks=False)
                 and e.stat(follow_symlinks=False).st_ino == SUBVOLUME_INODE]
    if os.lstat(path).st_ino == SUBVOLUME_INODE:
        found.append(path)
    return found


# --- the destination's own name, for what is kept for it elsewhere (local snapshots) ------


@dataclass(frozen=True)
class Identity:
    """Which destination this is, whatever the mount point: its filesystem and its folder there.

    ``id`` names it in a btrfs source's ``snapshot_dir`` (SPEC §2 step 3):
    two disks rotated at one mount point get two ids, so each keeps its own
    parents, and so do two destinations on one disk.
    """

    filesystem: str  # the filesystem's UUID (or, lacking one, its type and device)
    inner: str  # the destination's path inside that filesystem
    id: str


# _IOR(0x15, 0, struct fsuuid2 {u8 len; u8 uuid[16]}): any filesystem's UUID, Linux 6.5.
_GETFSUUID = (2 << 30) | (17 << 16) | (0x15 << 8) | 0
# _IOR(0x94, 31, struct btrfs_ioctl_fs_info_args): btrfs's fsid at byte 16 (no root needed).
_BTRFS_FS_INFO = (2 << 30) | (1024 << 16) | (0x94 << 8) | 31
_EXT_FILESYSTEMS = ("ext2", "ext3", "ext4")


def _ioctl_uuid(fd: int) -> str | None:
    for request, size, start in ((_GETFSUUID, 17, 1), (_BTRFS_FS_INFO, 1024, 16)):
        buffer = bytearray(size)
        try:
            fcntl.ioctl(fd, request, buffer, True)
        except OSError:
            continue
        raw = bytes(buffer[start:start + 16])
        # A filesystem without one (tmpfs, overlay) answers zeros.
        if any(raw):
            return str(uuid.UUID(bytes=raw))
    return None


def _ext_uuid(device: str) -> str | None:
    """The UUID in an ext2/3/4 superblock (kernels before 6.5 have no ioctl for it)."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        block = os.pread(fd, 136, 1024)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(block) < 136 or int.from_bytes(block[0x38:0x3A], "little") != 0xEF53:
        return None
    raw = block[0x68:0x78]
    return str(uuid.UUID(bytes=raw)) if any(raw) else None


def identify(path: str) -> Identity:
    """The identity of the destination folder ``path``, which must exist (it reads the disk).

    The UUID as blkid says it: by ioctl (any filesystem on Linux 6.5 and
    later; btrfs on any), else from an ext superblock; a filesystem that has
    none (tmpfs, NFS) is named by its type and device. Raises OSError.
    """
    real = os.path.realpath(path)
    fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        found = _ioctl_uuid(fd)
    finally:
        os.close(fd)
    mount = mount_of(real)
    if mount is None:
        raise OSError(errno.ENOENT, "not on any mounted filesystem", path)
    if found is None and mount.fstype in _EXT_FILESYSTEMS:
        found = _ext_uuid(mount.source)
    filesystem = found or f"{mount.fstype}:{mount.source}"
    inner = os.path.normpath(os.path.join(mount.root, os.path.relpath(real, mount.mount_point)))
    digest = hashlib.sha256(f"{filesystem}\0{inner}".encode()).hexdigest()[:12]
    return Identity(filesystem, inner, digest)


# --- the interface ---------------------------------------------------------------------------


class Destination(abc.ABC):
    """Where the backups are kept, as the engine uses it.

    Folders are named relative to the destination (``<name>.in-progress``,
    ``<name>.in-progress/<source>``); ``path_of`` gives the path a program
    (rsync, btrfs receive) writes to. Every method may raise DestinationLost;
    the others' OSErrors are what the operation itself met.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        # The destination as the run first found it, once ``remember`` ran.
        self.identity: tuple[int, int] | None = None
        # Why it is no longer usable, once known: every later operation says so at once.
        self.lost: str | None = None

    def path_of(self, folder: str) -> str:
        return os.path.join(self.path, folder)

    @abc.abstractmethod
    async def problem(self, require_mountpoint: bool) -> str | None:
        """Why the destination cannot be used as it is now, in one line, or None."""

    @abc.abstractmethod
    async def remember(self) -> None:
        """Take the destination's identity: ``gone`` compares with it from now on."""

    @abc.abstractmethod
    async def gone(self) -> str | None:
        """A line saying the destination vanished or does not answer, or None if it is
        still the one ``remember`` found (or was never remembered). Never raises."""

    @abc.abstractmethod
    def gone_now(self) -> str | None:
        """``gone`` for work that already runs in a worker thread: unbounded, blocking."""

    @abc.abstractmethod
    async def scan(self) -> list[Entry]:
        """Every backup, in-progress and deleting folder, newest first (see ``scan``)."""

    @abc.abstractmethod
    async def name_is_free(self, name: str) -> bool:
        """No ``<name>``, ``<name>.in-progress`` nor ``<name>.deleting`` exists."""

    @abc.abstractmethod
    async def holding(self, backups: list[str], source: str | None,
                      inner: bytes | None) -> list[str]:
        """Those of ``backups`` that hold ``source`` (a folder) or ``inner``, a path in it."""

    async def link_on_the_way(self, backups: list[str], source: str,
                              inner: bytes) -> tuple[str, bytes] | None:
        """The first of ``backups`` where a symbolic link stands on the way to ``inner`` in
        ``source``, and that link's path relative to the backup; None if none."""
        with anyio.fail_after(ANSWER_BOUND_S):
            return await anyio.to_thread.run_sync(link_on_the_way, self.path, backups, source,
                                                  inner, abandon_on_cancel=True)

    @abc.abstractmethod
    async def is_btrfs(self) -> bool:
        """The destination is on btrfs (sources are received as subvolumes)."""

    @abc.abstractmethod
    async def newest_holding(self, entries: list[Entry], source: str) -> str | None:
        """The path of the newest complete backup's folder for ``source`` (a real
        folder, never a link), or None: what ``--link-dest`` compares with."""

    @abc.abstractmethod
    async def is_subvolume(self, path: str) -> bool:
        """``path`` (from ``newest_holding``) is the top of a btrfs subvolume."""

    @abc.abstractmethod
    async def create(self, folder: str) -> None:
        """Make the new, empty ``folder``."""

    @abc.abstractmethod
    async def rename(self, folder: str, new: str) -> None:
        """Rename the real folder ``folder`` (never a link) to ``new``, which must not exist."""

    @abc.abstractmethod
    async def remove(self, folder: str) -> None:
        """Remove ``folder`` and everything below it, never following a link.

        Cancellable between entries: what is left stays for the next run.
        """

    @abc.abstractmethod
    async def flush(self) -> None:
        """Everything written into the destination is on its disk once this returns."""

    def start_writeback(self) -> None:
        """Have what the destination holds unwritten start on its way to the disk, and
        return at once: a head start for ``flush``, which alone says that it is there."""
        return None

    @abc.abstractmethod
    async def space(self) -> tuple[int, int] | None:
        """Free and total bytes of the destination's filesystem, or None if unknown."""

    async def write_manifest(self, backup: str, source: str, earlier: str | None) -> Made:
        """Write the manifest of ``<backup>/<source>`` and add it to SOURCES (SPEC §9).

        ``backup``: a folder of the destination (``<name>.in-progress``);
        ``earlier``: the path of the earlier copy the source was linked
        against (``newest_holding``), whose backup's manifest lends the
        digests of linked files. Raises OSError when the copy cannot be
        read or the manifest written.
        """
        raise NotImplementedError(f"{type(self).__name__} writes no manifests")

    async def identify(self) -> Identity:
        """Which destination this is (``identify``): for a folder on this machine; another
        kind of destination says its own. Raises OSError."""
        with anyio.fail_after(ANSWER_BOUND_S):
            return await anyio.to_thread.run_sync(identify, self.path, abandon_on_cancel=True)

    async def delete_backup(self, name: str) -> None:
        """Delete a complete backup: rename to ``.deleting`` first, so a crash midway
        never leaves a half-deleted folder under a backup name.

        The rename is flushed before anything in the folder is removed: else a
        power cut could keep some removals and lose the rename, leaving a
        half-deleted folder under a backup name (SPEC §1).

        Cancellable (see remove): a cancel before the rename leaves the
        backup as it is; one after, a ``.deleting`` folder for the next run.
        Raises OSError, and renames nothing, if ``name`` is not a real folder.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        await self.rename(name, name + DELETING)
        await self.flush()
        await self.remove(name + DELETING)

    async def clean_stale(self, entries: list[Entry]) -> None:
        """Remove in-progress folders of crashed runs and finish interrupted deletions.

        Links named like them are removed as links. A cancel takes effect
        before the next entry (and within the one being removed). A
        ``.deleting`` rename of a run killed in this boot may not be on the
        disk yet: the destination is flushed once before the first such
        folder's contents go, as ``delete_backup`` does.
        """
        flushed = False
        for entry in stale(entries):
            await anyio.lowlevel.checkpoint_if_cancelled()
            if entry.state == "deleting" and not entry.link and not flushed:
                await self.flush()
                flushed = True
            if entry.link:
                what = "symbolic link named like a backup folder"
            elif entry.state == "in-progress":
                what = "stale in-progress folder of a crashed run"
            else:
                what = "interrupted deletion"
            log.warning(f"removing {what}", folder=self.path_of(entry.folder))
            await self.remove(entry.folder)


class LocalDestination(Destination):
    """A destination folder on this machine; each operation in a worker thread, bounded.

    ``answer_bound_s``: how long an operation may go without an answer (a
    removal, a flush: without progress; see FLUSH_BOUND_S).
    """

    def __init__(self, path: str, answer_bound_s: float = ANSWER_BOUND_S) -> None:
        super().__init__(path)
        self.answer_bound_s = answer_bound_s
        # One manifest at a time in this process: their per-file work is Python's, which
        # threads do not share out (four at once spent 42 µs of CPU a file, one alone 15.5).
        self._manifests = anyio.Lock()
        # Manifests that read every file, one a CPU at once: one in this process, the
        # others each in a process of its own (19 MiB each, the engine 30).
        self._readers = anyio.CapacityLimiter(_cpus())

    async def _call(self, func: Callable[..., T], *args: object,
                    bound: float | None = None) -> T:
        """``func(*args)`` in a worker thread, abandoned on cancel and after ``bound``
        (default: the answer bound)."""
        async with self._answering(self.answer_bound_s if bound is None else bound):
            return await anyio.to_thread.run_sync(func, *args, abandon_on_cancel=True)
        raise AssertionError("unreachable: _answering raises when it ends the block")

    @contextlib.asynccontextmanager
    async def _answering(self, stall_s: float, overall_s: float | None = None
                         ) -> AsyncIterator[Progress]:
        """One operation on the destination, its errors mapped where they enter the engine:
        refused once the destination is lost; an OSError raised as DestinationLost when
        the disk went away under it; no progress for ``stall_s`` (the yielded Progress,
        which work in a worker keeps alive), or longer than ``overall_s`` in all, counts
        as a destination that does not answer."""
        if self.lost is not None:
            raise DestinationLost(self.lost)
        progress = Progress(stall_s)
        try:
            with anyio.fail_after(overall_s), progress.scope:
                yield progress
        except TimeoutError:
            raise self._not_answering(overall_s or stall_s) from None
        except DestinationLost:
            raise
        except OSError as e:
            await self._raise_explained(e)
        if progress.scope.cancelled_caught:
            raise self._not_answering(stall_s)

    def _not_answering(self, bound: float) -> DestinationLost:
        self.lost = (f"destination {self.path} does not answer (nothing in {bound:g} s): the "
                     "backup disk may be failing, or was unplugged")
        log.error("destination does not answer", destination=self.path, bound_s=bound)
        return DestinationLost(self.lost)

    async def _raise_explained(self, error: OSError) -> NoReturn:
        """Raise ``error``, or DestinationLost when the destination went away under it."""
        gone = await self.gone()
        if gone is None:
            raise error
        raise DestinationLost(gone) from error

    def _vanished(self) -> str | None:
        if self.identity is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError as e:
            seen = f"{e.strerror}"
        else:
            if (st.st_dev, st.st_ino) == self.identity:
                return None
            seen = "another filesystem is there now"
        return (f"destination {self.path} vanished during the run ({seen}): "
                "the backup disk was unmounted or unplugged")

    def gone_now(self) -> str | None:
        return self.lost or self._vanished()

    async def gone(self) -> str | None:
        if self.lost is not None or self.identity is None:
            return self.lost
        try:
            with anyio.fail_after(self.answer_bound_s):
                seen = await anyio.to_thread.run_sync(self._vanished, abandon_on_cancel=True)
        except TimeoutError:
            return str(self._not_answering(self.answer_bound_s))
        if seen is not None:
            self.lost = seen
        return seen

    async def problem(self, require_mountpoint: bool) -> str | None:
        return await self._call(_problem, self.path, require_mountpoint)

    async def remember(self) -> None:
        self.identity = await self._call(_identity, self.path)

    async def scan(self) -> list[Entry]:
        return await self._call(scan, self.path)

    async def name_is_free(self, name: str) -> bool:
        return await self._call(name_is_free, self.path, name)

    async def holding(self, backups: list[str], source: str | None,
                      inner: bytes | None) -> list[str]:
        def look() -> list[str]:
            return [n for n in backups if holds(self.path, n, source, inner)]

        return await self._call(look)

    async def link_on_the_way(self, backups: list[str], source: str,
                              inner: bytes) -> tuple[str, bytes] | None:
        return await self._call(link_on_the_way, self.path, backups, source, inner)

    async def is_btrfs(self) -> bool:
        return await self._call(is_btrfs, self.path)

    async def newest_holding(self, entries: list[Entry], source: str) -> str | None:
        return await self._call(newest_holding, self.path, entries, source)

    async def is_subvolume(self, path: str) -> bool:
        return await self._call(is_subvolume, path)

    async def create(self, folder: str) -> None:
        await self._call(_make_folder, self.path_of(folder))

    async def rename(self, folder: str, new: str) -> None:
        await self._call(_rename_folder, self.path_of(folder), self.path_of(new))

    async def remove(self, folder: str) -> None:
        async with self._answering(self.answer_bound_s) as progress:
            await remove_tree(self.path_of(folder), progress)

    async def flush(self) -> None:
        async with self._answering(self.answer_bound_s, FLUSH_BOUND_S) as progress:
            with beating("flush", folder=self.path):
                await in_worker(_syncfs_watched, self.path, progress, progress=progress)

    def start_writeback(self) -> None:
        # A daemon never waited for: on a disk that hangs it hangs with it, and the
        # flush that follows tells that within its bound, as without it.
        threading.Thread(target=_write_back, args=(self.path,), name="writeback",
                         daemon=True).start()

    async def space(self) -> tuple[int, int] | None:
        return await self._call(space, self.path)

    async def write_manifest(self, backup: str, source: str, earlier: str | None) -> Made:
        # As long as the reads move (one big file, a slow first backup), the
        # disk answers; only a read that makes no progress for the answer
        # bound counts as a disk that stopped answering.
        folder = self.path_of(backup)
        beat = current()

        def files_so_far(count: int) -> None:
            if beat is not None:
                beat.files = count  # a plain attribute: read by the event loop

        if earlier is None:
            # Nothing to inherit: every file is read, and the walk is CPU; while this
            # process's thread writes one such manifest, the next goes to another CPU.
            async with self._readers:
                if self._manifests.locked() and self._readers.total_tokens > 1:
                    return await self._manifest_in_child(folder, source, files_so_far)
                return await self._manifest_here(folder, source, None, files_so_far)
        return await self._manifest_here(folder, source, earlier, files_so_far)

    async def _manifest_here(self, folder: str, source: str, earlier: str | None,
                             files_so_far: Callable[[int], None]) -> Made:
        async with self._manifests, self._answering(self.answer_bound_s) as progress:
            def work() -> Made:
                made = write_manifest(folder, source, earlier, progress.check, files_so_far)
                files_so_far(made.files)
                progress.check()
                add_source(folder, source)
                return made

            return await in_worker(work, progress=progress)
        raise AssertionError("unreachable: _answering raises when it ends the block")

    async def _manifest_in_child(self, folder: str, source: str,
                                 files_so_far: Callable[[int], None]) -> Made:
        try:
            async with self._answering(self.answer_bound_s) as progress:
                made = await write_manifest_in_child(folder, source, progress, files_so_far)
                files_so_far(made.files)
                await in_worker(add_source, folder, source, progress=progress)
                return made
        except BaseException:
            # A child ended midway (killed, cancelled, timed out) cannot remove its
            # temporary file as the thread's walk does: an optional source's backup is
            # kept without it, and must not keep that either. Not on a lost disk.
            if self.lost is None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(self.answer_bound_s):
                    await anyio.to_thread.run_sync(discard_unfinished, folder, source,
                                                   abandon_on_cancel=True)
            raise
        raise AssertionError("unreachable: _answering raises when it ends the block")

    async def identify(self) -> Identity:
        return await self._call(identify, self.path)


def destination_of(config: Config) -> Destination:
    """The configured destination."""
    return LocalDestination(config.destination)


async def destination_problem_async(config: Config) -> str | None:
    """``destination_problem`` off the event loop, bounded (DestinationLost when it does
    not answer)."""
    return await destination_of(config).problem(config.require_mountpoint)


async def scan_async(destination: str) -> list[Entry]:
    """``scan`` off the event loop, bounded (see LocalDestination)."""
    return await LocalDestination(destination).scan()


async def clean_stale(destination: str, entries: list[Entry]) -> None:
    """``Destination.clean_stale`` on the local folder ``destination``."""
    await LocalDestination(destination).clean_stale(entries)


async def delete_backup(destination: str, name: str) -> None:
    """``Destination.delete_backup`` on the local folder ``destination``."""
    await LocalDestination(destination).delete_backup(name)


async def choose_name(destination: str) -> tuple[str, datetime]:
    """The backup name of now; wait for the next second while it is taken (SPEC §1).

    A destination that does not answer is not visible: its names are
    checked again once the backup hooks' ``pre`` have run.
    """
    while True:
        moment = datetime.now().astimezone()
        name = format_name(moment)
        with anyio.move_on_after(ANSWER_BOUND_S):
            if await anyio.to_thread.run_sync(_name_is_taken, destination, name,
                                              abandon_on_cancel=True):
                await anyio.sleep(1.0 - moment.microsecond / 1e6 + 0.001)
                continue
        return name, moment
