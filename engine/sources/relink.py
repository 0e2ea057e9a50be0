"""Damage does not spread (SPEC §9): copies ``verify`` found damaged are copied afresh.

rsync's ``--link-dest`` trusts size and mtime, and a rotten byte changes
neither: the copy of a run hard-links the damaged inode into the new backup
like any unchanged file. So, once that copy has ended and inside the
source's own step (its timeout, its cancel, its process group), every path
``damaged.json`` names for this source is looked at in the new backup: where
it is the damaged inode it is unlinked and copied again from the source by a
second rsync without ``--link-dest`` (the same command otherwise: remote
sources through the same transport, excludes and ``rsync_args`` alike).
Copying afresh after the copy rather than keeping the paths out of it keeps
the copy's command as it was and works whether or not a precopy ran. The
damaged copies in older backups are left alone: they are history, and
``verify`` reports them until retention removes those backups.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import threading
from typing import TYPE_CHECKING

import anyio.from_thread
import structlog

from .. import damaged
from ..failure_text import telling_line
from ..pathtext import parse_path
from ..processes import describe_exit, run_process
from ..report import StepResult
from ..threads import in_worker
from .errors import SourceError

if TYPE_CHECKING:
    from collections.abc import Callable

    from .kind import Run

log = structlog.get_logger("pibackup.relink")

# damaged.json is read, changed and replaced whole: the sources of one run
# drop stale records one at a time (a verify, which could also write it,
# runs under the run lock).
_rewriting = threading.Lock()


async def copy_afresh(run: Run, source: str, argv: list[str], link_dest: str | None,
                      ok_codes: list[int]) -> int:
    """Copy afresh what verify found damaged that the copy (``argv``) linked; return the count.

    ``argv``: the command that just copied the source into its folder of
    the backup, with ``--link-dest=<link_dest>`` (and any other). Raises SourceError if the
    second rsync fails. A ``damaged.json`` that cannot be read is logged,
    not a failure: the backup is still a backup.
    """
    if link_dest is None:
        return 0  # nothing was linked
    target = os.path.join(run.in_progress_dir, source)
    unlinked = await drop_damaged(run, source, target)
    if not unlinked:
        return 0
    await _rsync_paths(_without_link_dest(argv), unlinked, ok_codes)
    copied = await in_worker(count_regular, target, unlinked)
    log.info("copied afresh: verify had found their copies damaged", files=copied)
    return copied


async def drop_damaged(run: Run, source: str, folder: str) -> list[bytes]:
    """Unlink from ``folder`` (a finished precopy's copy) each path that is a damaged inode.

    Step 3 then compares with that copy (``--compare-dest``) and links what it
    left out from there after the window, so a damaged inode the precopy
    linked would come back with no copy here to replace it; unlinked now,
    step 3 transfers it from the source like any file the copy lacks.
    Returns the paths unlinked. A ``damaged.json`` that cannot be read is
    logged, as in ``copy_afresh``.
    """
    done = {entry.name for entry in run.previous}
    try:
        records = await in_worker(_records, run.config.state_dir, run.destination, source, done)
    except OSError as e:
        log.error("the copies verify found damaged are not known: they may be linked again",
                  error=str(e))
        return []
    if not records:
        return []
    return await in_worker(_unlink_damaged, run.destination, folder, records,
                           anyio.from_thread.check_cancelled)


def _records(state_dir: str, destination: str, source: str, done: set[str]
             ) -> list[damaged.Damage]:
    """This source's records among those of backups that still exist; the others are dropped."""
    with _rewriting:
        records = damaged.load(state_dir, destination)
        if any(d.backup not in done for d in records):
            try:
                damaged.save(state_dir, destination, [], backups=done)
            except OSError as e:
                # Ignored records cost nothing; a state_dir that cannot be written is §5's.
                log.warning("records of deleted backups not dropped from damaged.json",
                            error=e.strerror or str(e))
    return [d for d in records if d.source == source and d.backup in done]


def _components(text: str) -> list[bytes] | None:
    """The names on the way to a recorded path, or None when it is not a plain relative path."""
    try:
        parts = parse_path(text).split(b"/")
    except ValueError:
        return None
    if any(p in (b"", b".", b"..") for p in parts):
        return None
    return parts


def _open_folder(path: bytes | str, parent: int | None = None) -> int:
    # O_NOFOLLOW: a symbolic link on the way (the source may now hold one) is never
    # followed, so nothing outside the backup is ever unlinked.
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                   dir_fd=parent)


def lstat_in(root: bytes, parts: list[bytes]) -> tuple[int, os.stat_result] | None:
    """The folder holding ``root/parts`` (open, for the caller to close) and its lstat."""
    try:
        fd = _open_folder(root)
    except OSError:
        return None
    try:
        for name in parts[:-1]:
            inner = _open_folder(name, fd)
            os.close(fd)
            fd = inner
        return fd, os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
    except OSError:
        os.close(fd)
        return None


def _is_damaged(new: os.stat_result, record: damaged.Damage, named: os.stat_result | None
                ) -> bool:
    if not stat.S_ISREG(new.st_mode) or new.st_ino != record.ino:
        return False
    if new.st_dev == record.dev:
        return True
    # A disk's device number may change between boots (sdb, then sdc): then the
    # copy verify named, as it is now, tells the inode.
    return named is not None and named.st_ino == record.ino and os.path.samestat(new, named)


def _unlink_damaged(destination: str, target: str, records: list[damaged.Damage],
                    check: Callable[[], None]) -> list[bytes]:
    """Unlink each recorded path of the new copy that is the damaged inode; return those paths."""
    unlinked: list[bytes] = []
    for record in records:
        check()
        parts = _components(record.path)
        if parts is None:
            continue
        rel = b"/".join(parts)
        if rel in unlinked:
            continue
        named = lstat_in(os.path.join(os.fsencode(destination), record.backup.encode(),
                                       record.source.encode()), parts)
        if named is not None:
            os.close(named[0])
        found = lstat_in(os.fsencode(target), parts)
        if found is None:
            continue  # gone from the source since, or a link on the way
        fd, st = found
        try:
            if _is_damaged(st, record, named[1] if named is not None else None):
                os.unlink(parts[-1], dir_fd=fd)
                unlinked.append(rel)
        finally:
            os.close(fd)
    return unlinked


def count_regular(target: str, paths: list[bytes]) -> int:
    """How many of ``paths`` below ``target`` are regular files, no link followed on the way."""
    count = 0
    for rel in paths:
        found = lstat_in(os.fsencode(target), rel.split(b"/"))
        if found is not None:
            os.close(found[0])
            count += stat.S_ISREG(found[1].st_mode)
    return count


def _without_link_dest(argv: list[str]) -> list[str]:
    # Every one: after a precopy, step 3 also links from the precopied folder,
    # which holds the damaged inode as the earlier backup does.
    return [arg for arg in argv if not arg.startswith("--link-dest=")]


async def _rsync_paths(argv: list[str], paths: list[bytes], ok_codes: list[int]) -> None:
    """Run ``argv`` (origin and target last) for ``paths`` only: ``--files-from``, NUL-separated.

    The list is a private temporary file here; for a remote source rsync
    sends it to the other side itself.
    """
    fd, listing = tempfile.mkstemp(prefix="pibackup-afresh-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"".join(p + b"\0" for p in paths))
        command = [*argv[:-2], f"--files-from={listing}", "--from0", *argv[-2:]]
        finished = await run_process(command, stdout_lines=40)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(listing)
    if finished.exit_code not in ok_codes:
        telling = telling_line(finished.stderr.lines) or "no error output"
        raise SourceError(
            f"copying afresh the files verify found damaged: rsync "
            f"{describe_exit(finished.exit_code)}: {telling}",
            result=StepResult(exit_code=finished.exit_code, stderr_tail=finished.stderr.text()))
