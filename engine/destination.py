"""The destination folder: what backups it holds, crash leftovers, removal, and the run lock."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Literal

import anyio
import structlog

from .errors import LockHeld
from .filesystems import SUBVOLUME_INODE, is_btrfs, is_subvolume
from .names import DELETING, IN_PROGRESS, format_name, parse_name
from .processes import describe_exit, run_process

if TYPE_CHECKING:
    from collections.abc import Iterator

log = structlog.get_logger("pibackup.destination")

State = Literal["complete", "in-progress", "deleting"]
_SUFFIXES: tuple[tuple[str, State], ...] = ((IN_PROGRESS, "in-progress"), (DELETING, "deleting"))


@dataclass(frozen=True)
class Entry:
    """A folder of the destination that the engine owns."""

    name: str  # the backup name, without suffix
    state: State
    time: datetime

    @property
    def folder(self) -> str:
        suffix = {"complete": "", "in-progress": IN_PROGRESS, "deleting": DELETING}[self.state]
        return self.name + suffix


def scan(destination: str) -> list[Entry]:
    """Every backup, in-progress and deleting folder, newest instant first.

    Anything whose name is not exactly a backup name (plus suffix) is not
    ours and is left out. Raises OSError if the destination cannot be read.
    """
    entries = []
    for folder in os.listdir(destination):
        state: State = "complete"
        name = folder
        for suffix, suffix_state in _SUFFIXES:
            if folder.endswith(suffix):
                name, state = folder[: -len(suffix)], suffix_state
        moment = parse_name(name)
        if moment is not None and os.path.isdir(os.path.join(destination, folder)):
            entries.append(Entry(name, state, moment))
    entries.sort(key=lambda e: (e.time, e.name), reverse=True)
    return entries


def complete(entries: list[Entry]) -> list[Entry]:
    return [e for e in entries if e.state == "complete"]


def newest_holding(destination: str, entries: list[Entry], source: str) -> str | None:
    """The newest complete backup's folder for ``source``, for ``--link-dest``."""
    for entry in complete(entries):
        candidate = os.path.join(destination, entry.name, source)
        if os.path.isdir(candidate):
            return candidate
    return None


def name_is_free(destination: str, name: str) -> bool:
    return not any(
        os.path.lexists(os.path.join(destination, name + suffix))
        for suffix in ("", IN_PROGRESS, DELETING)
    )


async def choose_name(destination: str) -> tuple[str, datetime]:
    """The backup name of now; wait for the next second while it is taken (SPEC §1)."""
    while True:
        moment = datetime.now().astimezone()
        name = format_name(moment)
        if not os.path.isdir(destination) or name_is_free(destination, name):
            return name, moment
        await anyio.sleep(1.0 - moment.microsecond / 1e6 + 0.001)


def _remove_tree_sync(path: str) -> None:
    def on_error(func: object, failed: str, exc: BaseException) -> None:
        # A read-only directory inside the tree (rsync kept its mode) cannot
        # have entries removed: make the parent writable and try once more.
        if isinstance(exc, PermissionError):
            parent = os.path.dirname(failed)
            os.chmod(parent, 0o700)
            if os.path.isdir(failed) and not os.path.islink(failed):
                os.chmod(failed, 0o700)
                shutil.rmtree(failed)
            else:
                os.unlink(failed)
            return
        if isinstance(exc, FileNotFoundError):
            return
        raise exc

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=on_error)
    else:
        shutil.rmtree(path, onerror=lambda func, failed, info: on_error(func, failed, info[1]))


async def remove_tree(path: str) -> None:
    """Remove a folder and everything in it, off the event loop, shielded.

    Once started, a removal finishes even under cancellation: a half-removed
    folder is worse than a late exit.
    """
    with anyio.CancelScope(shield=True):
        # btrfs subvolumes (received backups, snapshots) are read-only and
        # cannot be unlinked file by file: delete them as subvolumes first.
        for subvolume in await anyio.to_thread.run_sync(_subvolumes_at, path):
            finished = await run_process(["btrfs", "subvolume", "delete", subvolume])
            if finished.exit_code != 0:
                raise OSError(f"btrfs subvolume delete {subvolume}: "
                              f"{finished.stderr.text() or describe_exit(finished.exit_code)}")
        if os.path.lexists(path):
            await anyio.to_thread.run_sync(_remove_tree_sync, path)


def _subvolumes_at(path: str) -> list[str]:
    """Subvolumes at ``path`` or directly inside it, inner ones first.

    That is where the engine puts them (``<backup>/<source>``, a snapshot
    itself); a source's nested subvolumes are never copied as subvolumes.
    """
    if not is_btrfs(path):
        return []
    found = []
    try:
        with os.scandir(path) as entries:
            # stat(), not the entry's d_ino: readdir reports a subvolume's
            # id there (257, 258, ...), only stat() gives the inode 256.
            found = [e.path for e in entries
                     if e.is_dir(follow_symlinks=False)
                     and e.stat(follow_symlinks=False).st_ino == SUBVOLUME_INODE
                     and is_subvolume(e.path)]
    except NotADirectoryError:
        pass
    if is_subvolume(path):
        found.append(path)
    return found


async def delete_backup(destination: str, name: str) -> None:
    """Delete a complete backup: rename to ``.deleting`` first, so a crash midway
    never leaves a half-deleted folder under a backup name."""
    deleting = os.path.join(destination, name + DELETING)
    os.rename(os.path.join(destination, name), deleting)
    await remove_tree(deleting)


async def clean_stale(destination: str, entries: list[Entry]) -> None:
    """Remove in-progress folders of crashed runs and finish interrupted deletions."""
    for entry in entries:
        if entry.state == "complete":
            continue
        path = os.path.join(destination, entry.folder)
        what = ("stale in-progress folder of a crashed run" if entry.state == "in-progress"
                else "interrupted deletion")
        log.warning(f"removing {what}", folder=path)
        await remove_tree(path)


@contextmanager
def run_lock(lock_path: str) -> Iterator[None]:
    """Hold an exclusive flock on ``lock_path`` for the block; raise LockHeld if taken.

    The file descriptor is not inherited by children (Python opens it
    close-on-exec), so a stray child can never keep the lock alive.
    """
    os.makedirs(os.path.dirname(lock_path) or ".", exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockHeld(lock_path) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def space(destination: str) -> tuple[int, int] | None:
    """Free and total bytes of the destination's filesystem, or None if not visible."""
    try:
        st = os.statvfs(destination)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
