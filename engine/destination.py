"""The destination folder: what backups it holds, crash leftovers, removal, and the run lock.

The destination is read with ``lstat``: a symbolic link found there is never
a backup and is never followed; one named like an in-progress or deleting
folder is removed as a link (SPEC §1). Everything that touches the
destination's disk and can block (scan, delete, free space) has a version
that runs in a worker thread, so a signal is always heard (SPEC §2).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Literal, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import structlog

from .filesystems import SUBVOLUME_INODE, is_btrfs, on_mounted_filesystem
from .heartbeat import beating
from .names import DELETING, IN_PROGRESS, format_name, parse_name
from .processes import describe_exit, run_process

if TYPE_CHECKING:
    from collections.abc import Callable

    from .config import Config

log = structlog.get_logger("pibackup.destination")

State = Literal["complete", "in-progress", "deleting"]
_SUFFIXES: tuple[tuple[str, State], ...] = ((IN_PROGRESS, "in-progress"), (DELETING, "deleting"))
T = TypeVar("T")

# How long a cancelled worker thread is waited for before it is abandoned. It
# stops at its next check within microseconds, unless a dying disk holds it in
# a system call: then the run must still end.
STOP_WAIT_S = 10.0


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


def destination_problem(config: Config) -> str | None:
    """Why the destination cannot be used as it is now, in one line, or None.

    It must be a folder (a link to one is fine); with ``require_mountpoint``
    it must also be on a mounted filesystem other than the root one: a mount
    point, or under one. Reads the disk: call it off the event loop
    (``destination_problem_async``) where a signal must be heard.
    """
    dest = config.destination
    try:
        st = os.stat(dest)
    except FileNotFoundError:
        return f"destination {dest} does not exist (is the backup disk mounted?)"
    except OSError as e:
        return f"destination {dest} cannot be read: {e.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"destination {dest} is not a folder"
    if config.require_mountpoint and not on_mounted_filesystem(dest):
        return (f"destination {dest} is not on a mounted filesystem other than the root one "
                "(require_mountpoint = true; is the backup disk mounted?)")
    return None


async def destination_problem_async(config: Config) -> str | None:
    """``destination_problem`` in a worker thread (abandoned on cancel)."""
    return await anyio.to_thread.run_sync(destination_problem, config, abandon_on_cancel=True)


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


async def scan_async(destination: str) -> list[Entry]:
    """``scan`` in a worker thread (abandoned on cancel). Raises OSError as scan does."""
    return await anyio.to_thread.run_sync(scan, destination, abandon_on_cancel=True)


def complete(entries: list[Entry]) -> list[Entry]:
    return [e for e in entries if e.state == "complete" and not e.link]


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


def name_is_free(destination: str, name: str) -> bool:
    return not any(
        os.path.lexists(os.path.join(destination, name + suffix))
        for suffix in ("", IN_PROGRESS, DELETING)
    )


def _name_is_taken(destination: str, name: str) -> bool:
    return os.path.isdir(destination) and not name_is_free(destination, name)


async def choose_name(destination: str) -> tuple[str, datetime]:
    """The backup name of now; wait for the next second while it is taken (SPEC §1)."""
    while True:
        moment = datetime.now().astimezone()
        name = format_name(moment)
        if not await anyio.to_thread.run_sync(_name_is_taken, destination, name,
                                              abandon_on_cancel=True):
            return name, moment
        await anyio.sleep(1.0 - moment.microsecond / 1e6 + 0.001)


async def space_async(destination: str) -> tuple[int, int] | None:
    """``space`` in a worker thread (abandoned on cancel)."""
    return await anyio.to_thread.run_sync(space, destination, abandon_on_cancel=True)


def space(destination: str) -> tuple[int, int] | None:
    """Free and total bytes of the destination's filesystem, or None if not visible."""
    try:
        st = os.statvfs(destination)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


# --- removal ----------------------------------------------------------------------------


async def in_worker(func: Callable[..., T], *args: object) -> T:
    """Run destination work that checks for cancellation in a worker thread.

    On cancel the worker stops at its next ``check_cancelled``; it is waited
    for (so nothing still holds the destination open when a post unmounts
    it), but at most STOP_WAIT_S: a thread stuck on a dying disk is abandoned
    rather than keep the run from ending.
    """
    started, finished = threading.Event(), threading.Event()

    def work() -> T:
        started.set()
        try:
            return func(*args)
        finally:
            finished.set()

    try:
        return await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():
        # A work item cancelled before a worker took it is never run at all:
        # only one that started has anything to stop.
        if started.is_set():
            with anyio.move_on_after(STOP_WAIT_S, shield=True):
                await anyio.to_thread.run_sync(finished.wait, STOP_WAIT_S,
                                               abandon_on_cancel=True)
        raise


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


def _remove_tree_sync(path: str) -> None:
    """Remove ``path`` and everything below it; never follows a symbolic link.

    Works on file descriptors (``*at`` calls), as shutil.rmtree does, so a
    link swapped in while it runs is unlinked, never entered. Checks for
    cancellation before each entry: run it in a worker thread (in_worker).
    """
    check = anyio.from_thread.check_cancelled
    # The parent may be reached through a link (a destination configured as
    # one); only what is removed, and everything below it, is never followed.
    top = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
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


async def remove_tree(path: str) -> None:
    """Remove ``path`` and everything in it, off the event loop; never follows a link.

    A symbolic link at ``path`` is unlinked, not followed; nothing below is
    entered through one. Not shielded: it stops as soon as the enclosing
    scope is cancelled or its deadline passes (raising the cancellation),
    leaving the rest in place, so callers name what they remove ``.deleting``
    or ``.in-progress`` first, for the next run to finish. A caller that must
    remove under a cancel wraps the call in ``anyio.move_on_after(bound,
    shield=True)``. btrfs subvolume deletes are managed processes, ended on
    cancel. Raises OSError if something cannot be removed.
    """
    with beating("deletion", folder=path):
        # btrfs subvolumes (received backups, snapshots) are read-only and
        # cannot be unlinked file by file: delete them as subvolumes first.
        for subvolume in await in_worker(_subvolumes_at, path):
            finished = await run_process(["btrfs", "subvolume", "delete", subvolume])
            if finished.exit_code != 0:
                raise OSError(f"btrfs subvolume delete {subvolume}: "
                              f"{finished.stderr.text() or describe_exit(finished.exit_code)}")
        await in_worker(_remove_tree_sync, path)


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


def _rename_folder(source: str, target: str) -> None:
    if not _is_folder(source):
        raise OSError(errno.ENOTDIR, "not a folder (a symbolic link is never deleted)", source)
    if os.path.lexists(target):
        raise OSError(errno.EEXIST, "already exists", target)
    os.rename(source, target)


async def delete_backup(destination: str, name: str) -> None:
    """Delete a complete backup: rename to ``.deleting`` first, so a crash midway
    never leaves a half-deleted folder under a backup name.

    Cancellable (see remove_tree): a cancel before the rename leaves the
    backup as it is; one after, a ``.deleting`` folder for the next run.
    Raises OSError, and renames nothing, if ``name`` is not a real folder.
    """
    await anyio.lowlevel.checkpoint_if_cancelled()
    deleting = os.path.join(destination, name + DELETING)
    await in_worker(_rename_folder, os.path.join(destination, name), deleting)
    await remove_tree(deleting)


async def clean_stale(destination: str, entries: list[Entry]) -> None:
    """Remove in-progress folders of crashed runs and finish interrupted deletions.

    Links named like them are removed as links. A cancel takes effect
    before the next entry (and within the one being removed).
    """
    for entry in entries:
        if entry.state == "complete":
            continue
        await anyio.lowlevel.checkpoint_if_cancelled()
        path = os.path.join(destination, entry.folder)
        if entry.link:
            what = "symbolic link named like a backup folder"
        elif entry.state == "in-progress":
            what = "stale in-progress folder of a crashed run"
        else:
            what = "interrupted deletion"
        log.warning(f"removing {what}", folder=path)
        await remove_tree(path)



