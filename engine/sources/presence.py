"""A source that is not there is a failure, not an empty backup (SPEC §2 Failures).

A data disk that did not mount leaves its mount point as an empty folder on
the root filesystem: rsync copies that happily, the run says ok, and
retention then deletes the backups that held the files. Two guards, for
rsync sources: ``require_mountpoint`` (a local source must be on a mounted
filesystem other than the root one, judged as the destination's key is)
before the copy, and the emptiness check after it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import anyio.from_thread
import anyio.to_thread

from ..destination import newest_holding
from ..filesystems import on_mounted_filesystem
from ..threads import in_worker
from .errors import SourceError

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..destination import Entry
    from ..report import StepResult
    from .kind import Run

# How many files of the last backup are counted for the message: enough to
# say "20,000", bounded so that a huge backup on a slow disk is not walked
# whole to say that its source is empty.
COUNT_CAP = 100_000


def mountpoint_problem(path: str) -> str | None:
    """Why a local source at ``path`` fails ``require_mountpoint``, or None (reads the disk)."""
    if on_mounted_filesystem(path):
        return None
    return (f"{path} is not on a mounted filesystem other than the root one "
            "(require_mountpoint = true; is its disk mounted?)")


async def refuse_unmounted(path: str) -> None:
    """Before the copy: raise SourceError when the source's disk is not mounted."""
    # realpath may wait on a hung disk: off the event loop, abandoned on cancel.
    problem = await anyio.to_thread.run_sync(mountpoint_problem, path, abandon_on_cancel=True)
    if problem is not None:
        raise SourceError(problem)


async def refuse_empty(run: Run, name: str, path: str, copied: StepResult) -> None:
    """After the copy: raise SourceError when it copied nothing while the last backup held files.

    Judged on the copy, not on the source: the same for a remote source as
    for a local one, with no listing of its own. The copy has run by then
    (into an empty folder, which costs nothing), and it fails the source, so
    the backup holding it is never saved. The error carries the copy's
    result (``copied``) for the report.
    """
    copy = os.path.join(run.in_progress_dir, name)
    held = await in_worker(_files_if_empty, copy, run.destination, run.previous, name,
                           anyio.from_thread.check_cancelled)
    if held:
        count = f"more than {COUNT_CAP - 1:,}" if held >= COUNT_CAP else f"{held:,}"
        raise SourceError(f"{path} is empty, its last backup holds {count} "
                          f"file{'' if held == 1 else 's'}: is its disk mounted?",
                          result=copied)


def _files_if_empty(copy: str, destination: str, previous: list[Entry], name: str,
                    check: Callable[[], None]) -> int:
    """0 if the copy holds anything; else the regular files of the last backup's copy."""
    with os.scandir(copy) as entries:
        if next(entries, None) is not None:
            return 0
    last = newest_holding(destination, previous, name)
    return 0 if last is None else count_files(last, COUNT_CAP, check)


def count_files(root: str, cap: int, check: Callable[[], None]) -> int:
    """Regular files under ``root``, up to ``cap``; no symbolic link is followed.

    Walked by folder descriptors (one open per level), so no path ever grows
    past PATH_MAX however deep the tree. A folder that cannot be read is
    passed over: what can be read still counts.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    count = 0
    # Each level: its folder's descriptor and the names of its folders still to walk.
    stack: list[tuple[int, list[str]]] = []

    def enter(name: str, parent: int | None) -> None:
        nonlocal count
        try:
            fd = os.open(name, flags, dir_fd=parent)
        except OSError:
            return
        folders = []
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(entry.name)
                    elif entry.is_file(follow_symlinks=False):
                        count += 1
        except OSError:
            folders = []
        stack.append((fd, folders))

    try:
        enter(root, None)
        while stack and count < cap:
            check()
            fd, folders = stack[-1]
            if folders:
                enter(folders.pop(), fd)
            else:
                os.close(stack.pop()[0])
    finally:
        for fd, _ in stack:
            os.close(fd)
    return min(count, cap)
