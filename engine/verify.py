"""``verify``: read a backup back to its end; find what cannot be read, or rotted (SPEC §7).

One walker thread lists every folder of the backup, depth first and
streaming (never a whole-tree list), and hands the regular files in small
batches through a bounded queue to reader threads. Each reader reads its
files to the end in fixed-size chunks into one buffer of its own, so memory
stays bounded whatever the backup's size. With a cold cache and small files
the time goes in waiting for each inode and its few blocks: several readers
keep several requests before the disk (one reader is no faster than ``cat``).

With ``--against-source``, a file whose live copy has the same size and
mtime is compared chunk by chunk as it is read: a difference there is
corruption; a live file changed since is only counted.

The threads run under anyio (``check_cancelled`` between files and every few
MiB), so a signal stops the walk promptly; a thread stuck on a dying disk is
abandoned after a bound, as for the destination's other blocking work.
"""

from __future__ import annotations

import errno
import os
import queue
import stat
import threading
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import anyio
import anyio.from_thread
import structlog

from .command_stage import find_and_use, under_hooks
from .config import SOURCE_NAME
from .heartbeat import beating
from .lookup import UsageProblem
from .pathtext import show_path
from .threads import in_worker
from .units import human_bytes

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from .config import Config
    from .context import Interruption, RunContext
    from .heartbeat import Beat
    from .report import Report

log = structlog.get_logger("pibackup.verify")

CHUNK = 1 << 20  # bytes per read
CHECK_EVERY = 4  # chunks between cancellation checks inside one file
READERS = 3  # reader threads beside the walker (measured: benchmarks/bench_verify.py)
BATCH = 64  # files handed over at once (fewer queue round trips)
QUEUE_BATCHES = 32  # bound of the hand-over queue
POLL_S = 0.1  # how often a thread waiting on the queue looks for a cancel

_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# Reading must not write: without O_NOATIME the first read of each file
# writes its inode back to the backup disk (relatime). Only the owner (or
# root) may ask for it.
_NOATIME = getattr(os, "O_NOATIME", 0)


@dataclass(frozen=True)
class VerifyRequest:
    """What the command line asks: ``backup`` is a name or ``latest``."""

    backup: str
    source: str | None = None
    against_source: bool = False


@dataclass
class Tally:
    """What a verify saw; summed over its threads."""

    files: int = 0
    folders: int = 0
    bytes: int = 0
    unreadable: int = 0
    corrupt: int = 0
    compared: int = 0  # files found equal to their unchanged live copy
    changed: int = 0  # the live file changed since the backup: not compared
    not_compared: int = 0  # no live copy to compare with (source skipped, unreadable)

    def add(self, other: Tally) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def problems(self) -> int:
        return self.unreadable + self.corrupt


def check_source_name(name: str | None) -> None:
    """Raise UsageProblem unless ``name`` is None or has the form of a source name."""
    if name is not None and not SOURCE_NAME.fullmatch(name):
        raise UsageProblem(f"{name!r} is not a source name (letters, digits, '.', '_', '-')")


async def verify_backup(config: Config, interruption: Interruption, request: VerifyRequest,
                        say: Callable[[str], None]) -> Report:
    """Verify the backup ``request`` names, under the lock and inside the backup hooks.

    ``say`` gets each line for stdout (called from worker threads, one at a
    time): every unreadable or corrupt path, then the closing summary. The
    report (never written) fails when anything could not be read or was
    corrupt, or the backup is not there. Raises LockHeld, StateUnusable or
    Interrupted as ``under_hooks`` does.
    """

    async def work(ctx: RunContext) -> None:
        name = await find_and_use(ctx, request.backup, request.source)
        log.info("verifying backup", backup=name, source=request.source,
                 against_source=request.against_source)
        tally = await _verify(ctx, name, request, say)
        say(summary(name, tally, request.against_source))
        if tally.problems:
            ctx.fail_step(f"backup {name} has {_problem_text(tally)}")

    return await under_hooks(config, interruption, "verify", request.backup, work)


def summary(name: str, tally: Tally, against_source: bool) -> str:
    """The closing line: what was read, what was found."""
    line = (f"verified {name}: {tally.files} files, {tally.folders} folders, "
            f"{tally.bytes} bytes ({human_bytes(tally.bytes)}) read; ")
    line += _problem_text(tally) if tally.problems else "0 problems"
    if against_source:
        line += (f"; against the source: {tally.compared} same, {tally.corrupt} corrupt, "
                 f"{tally.changed} changed since, {tally.not_compared} not compared")
    return line


def _problem_text(tally: Tally) -> str:
    noun = "problem" if tally.problems == 1 else "problems"
    return f"{tally.problems} {noun} ({tally.unreadable} unreadable, {tally.corrupt} corrupt)"


async def _verify(ctx: RunContext, name: str, request: VerifyRequest,
                  say: Callable[[str], None]) -> Tally:
    live = _live_roots(ctx.config, request) if request.against_source else None
    job = _Job(os.fsencode(os.path.join(ctx.destination, name)), live, say,
               ctx.dest.gone_now)
    tallies: list[Tally] = []

    async def run(func: Callable[[], Tally]) -> None:
        tallies.append(await in_worker(func))

    def so_far(beat: Beat) -> None:
        beat.files = sum(t.files for t in job.tallies)
        beat.bytes = sum(t.bytes for t in job.tallies)

    gone: _Vanished | None = None
    try:
        with beating("verify", backup=name) as beat:
            # Summed when progress is drawn or a heartbeat is due, not on a timer.
            beat.probe = so_far
            async with anyio.create_task_group() as readers:
                top = os.fsencode(request.source) if request.source is not None else b""
                readers.start_soon(run, lambda: job.walk(top))
                for _ in range(READERS):
                    readers.start_soon(run, job.read)
            beat.refresh()
    except* _Vanished as group:
        gone = group.exceptions[0]  # type: ignore[assignment]
    if gone is not None:
        ctx.fail_step(str(gone))
    total = Tally()
    for t in tallies:
        total.add(t)
    return total


def _live_roots(config: Config, request: VerifyRequest) -> dict[bytes, bytes | None]:
    """Each configured source's live folder, or None (with a warning) when it is not local."""
    roots: dict[bytes, bytes | None] = {}
    for source in config.sources:
        if request.source is not None and source.name != request.source:
            continue
        if source.host is not None:
            log.warning("source is on another host: not compared with the backup",
                        source=source.name, host=source.host)
            roots[source.name.encode()] = None
        else:
            roots[source.name.encode()] = os.fsencode(source.path)
    return roots


class _Vanished(Exception):
    """The destination went away under the verify; the message says so."""


class _Unreadable(Exception):
    def __init__(self, error: OSError, offset: int) -> None:
        self.error, self.offset = error, offset


@dataclass(frozen=True)
class _Batch:
    rel: bytes  # the folder, relative to the backup
    live: bytes | None  # its live counterpart, when compared
    names: list[bytes]


class _Job:
    """The state the walker and readers share: the queue, the output, the live roots."""

    def __init__(self, backup: bytes, live_roots: dict[bytes, bytes | None] | None,
                 say: Callable[[str], None], gone: Callable[[], str | None]) -> None:
        self.backup = backup
        self.live_roots = live_roots
        self.compare = live_roots is not None
        self.queue: queue.Queue[_Batch | None] = queue.Queue(QUEUE_BATCHES)
        self._say = say
        self._gone = gone
        self._lock = threading.Lock()
        # Every reader's tally, read (never written) by the progress task.
        self.tallies: list[Tally] = []

    # --- output, from any thread ------------------------------------------------------

    def say(self, line: str) -> None:
        with self._lock:
            self._say(line)

    def unreadable(self, tally: Tally, rel: bytes, error: OSError, *, folder: bool = False,
                   offset: int = 0) -> None:
        # A destination that vanished explains every error that follows: stop at once.
        gone = self._gone()
        if gone is not None:
            raise _Vanished(gone)
        tally.unreadable += 1
        where = f" (after {offset} bytes)" if offset else ""
        shown = show_path(rel) + ("/" if folder else "")
        self.say(f"unreadable: {shown}: {error.strerror or error}{where}")

    # --- the walker -------------------------------------------------------------------

    def walk(self, top: bytes) -> Tally:
        """List every folder below ``top`` (the whole backup if empty); hand files over."""
        tally = Tally()
        check = anyio.from_thread.check_cancelled
        stack: list[tuple[bytes, bytes | None, Iterator[os.DirEntry[bytes]], list[bytes]]] = []

        def enter(rel: bytes, live: bytes | None) -> None:
            try:
                found = os.scandir(os.path.join(self.backup, rel) if rel else self.backup)
            except OSError as e:
                self.unreadable(tally, rel, e, folder=True)
                return
            if rel:  # the backup's own folder is not one of its sources' folders
                tally.folders += 1
            stack.append((rel, live, found, []))

        enter(top, self._live_for(top) if top else None)
        while stack:
            rel, live, entries, batch = stack[-1]
            child: bytes | None = None
            try:
                for entry in entries:
                    check()
                    if entry.is_dir(follow_symlinks=False):
                        child = entry.name
                        break
                    if entry.is_file(follow_symlinks=False):
                        batch.append(entry.name)
                        if len(batch) >= BATCH:
                            self._put(_Batch(rel, live, batch.copy()))
                            batch.clear()
                    elif entry.is_symlink():
                        self._read_link(tally, rel, entry.name)
            except OSError as e:  # the folder's listing broke off
                self.unreadable(tally, rel, e, folder=True)
            if child is not None:
                inner = os.path.join(rel, child) if rel else child
                enter(inner, os.path.join(live, child) if live is not None
                      else (self._live_for(child) if not rel else None))
                continue
            if batch:
                self._put(_Batch(rel, live, batch))
            stack.pop()
            entries.close()  # type: ignore[attr-defined]
        for _ in range(READERS):
            self._put(None)
        return tally

    def _live_for(self, source: bytes) -> bytes | None:
        """The live folder a source's backup is compared with, or None (warned once)."""
        if self.live_roots is None:
            return None
        if source not in self.live_roots:
            log.warning("source is not in the configuration: not compared with the backup",
                        source=show_path(source))
            return None
        live = self.live_roots[source]
        if live is not None and not os.path.isdir(live):
            log.warning("source cannot be read: not compared with the backup",
                        source=show_path(source), path=show_path(live))
            return None
        return live

    def _read_link(self, tally: Tally, rel: bytes, name: bytes) -> None:
        try:
            os.readlink(os.path.join(self.backup, rel, name))
        except OSError as e:
            self.unreadable(tally, os.path.join(rel, name), e)

    def _put(self, batch: _Batch | None) -> None:
        while True:
            try:
                self.queue.put(batch, timeout=POLL_S)
                return
            except queue.Full:
                anyio.from_thread.check_cancelled()

    # --- the readers ------------------------------------------------------------------

    def read(self) -> Tally:
        """Read the files the walker hands over, until it says it is done."""
        tally = Tally()
        self.tallies.append(tally)
        mine = bytearray(CHUNK)
        theirs = bytearray(CHUNK) if self.compare else None
        check = anyio.from_thread.check_cancelled
        while True:
            try:
                batch = self.queue.get(timeout=POLL_S)
            except queue.Empty:
                check()
                continue
            if batch is None:
                return tally
            folder = os.path.join(self.backup, batch.rel)
            for name in batch.names:
                check()
                tally.files += 1
                rel = os.path.join(batch.rel, name)
                try:
                    fd = _open(os.path.join(folder, name))
                except OSError as e:
                    self.unreadable(tally, rel, e)
                    continue
                try:
                    if batch.live is not None and theirs is not None:
                        self._compare(tally, fd, rel, os.path.join(batch.live, name),
                                      mine, theirs)
                    else:
                        tally.not_compared += self.compare
                        tally.bytes += _drain(fd, mine)
                except _Unreadable as e:
                    tally.bytes += e.offset
                    self.unreadable(tally, rel, e.error, offset=e.offset)
                finally:
                    os.close(fd)

    def _compare(self, tally: Tally, fd: int, rel: bytes, live: bytes, mine: bytearray,
                 theirs: bytearray) -> None:
        """Read the backup's file to its end, comparing it with ``live`` where unchanged."""
        st = os.fstat(fd)
        try:
            before = os.lstat(live)
        except (FileNotFoundError, NotADirectoryError):
            before = None
        except OSError as e:
            self._cannot_compare(tally, live, e)
            tally.bytes += _drain(fd, mine)
            return
        if before is None or not _unchanged(st, before):
            tally.changed += 1
            tally.bytes += _drain(fd, mine)
            return
        try:
            other = _open(live)
        except OSError as e:
            self._cannot_compare(tally, live, e)
            tally.bytes += _drain(fd, mine)
            return
        try:
            offset, differs = _read_both(fd, other, mine, theirs)
        finally:
            os.close(other)
        tally.bytes += offset
        if differs is None:
            tally.compared += 1
            return
        if isinstance(differs, OSError):
            self._cannot_compare(tally, live, differs)
            return
        try:
            after = os.lstat(live)
        except OSError:
            after = None
        if after is None or not _unchanged(st, after) or after.st_mtime_ns != before.st_mtime_ns:
            tally.changed += 1  # written to while it was read
            return
        tally.corrupt += 1
        self.say(f"corrupt: {show_path(rel)}: differs from {show_path(live)} at byte {differs}")

    def _cannot_compare(self, tally: Tally, live: bytes, error: OSError) -> None:
        tally.not_compared += 1
        log.warning("live file cannot be read: not compared", path=show_path(live),
                    error=error.strerror or str(error))


def _open(path: bytes) -> int:
    try:
        return os.open(path, _OPEN | _NOATIME)
    except PermissionError as e:
        if e.errno != errno.EPERM or not _NOATIME:  # EPERM: not the file's owner
            raise
        return os.open(path, _OPEN)


def _fill(fd: int, view: memoryview) -> int:
    """Read into ``view`` until it is full or the file ends; the bytes read."""
    got = 0
    while got < len(view):
        n = os.readv(fd, [view[got:]])
        if n == 0:
            break
        got += n
    return got


def _drain(fd: int, buffer: bytearray) -> int:
    """Read ``fd`` to its end; the bytes read. Raises _Unreadable."""
    view = memoryview(buffer)
    offset = chunks = 0
    while True:
        try:
            n = _fill(fd, view)
        except OSError as e:
            raise _Unreadable(e, offset) from None
        offset += n
        if n < len(view):
            return offset
        chunks += 1
        if chunks == 1:
            # A big file: a larger read-ahead window.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        if chunks % CHECK_EVERY == 0:
            anyio.from_thread.check_cancelled()


def _read_both(fd: int, other: int, mine: bytearray, theirs: bytearray
               ) -> tuple[int, int | OSError | None]:
    """Read the backup's ``fd`` to its end, comparing it with ``other`` as it goes.

    Returns the bytes read and where they first differ (None: equal; an
    OSError: the live file could not be read). Raises _Unreadable for the
    backup's file.
    """
    view, their_view = memoryview(mine), memoryview(theirs)
    offset = chunks = 0
    differs: int | OSError | None = None
    while True:
        try:
            n = _fill(fd, view)
        except OSError as e:
            raise _Unreadable(e, offset) from None
        if differs is None:
            try:
                m = _fill(other, their_view)
            except OSError as e:
                differs = e
            else:
                if n == m == CHUNK:
                    same = mine == theirs
                else:  # bytes, not memoryviews: those compare item by item
                    same = n == m and mine[:n] == theirs[:m]
                if not same:
                    differs = offset + _first_difference(view[:n], their_view[:m])
        offset += n
        if n < len(view):
            return offset, differs
        chunks += 1
        if chunks % CHECK_EVERY == 0:
            anyio.from_thread.check_cancelled()


def _first_difference(a: memoryview, b: memoryview) -> int:
    """Where ``a`` and ``b`` first differ (their common length if one is a prefix)."""
    step = 4096
    for start in range(0, min(len(a), len(b)), step):
        if a[start:start + step] != b[start:start + step]:
            return start + next(i for i, (x, y) in enumerate(
                zip(a[start:start + step], b[start:start + step], strict=False)) if x != y)
    return min(len(a), len(b))


def _unchanged(backup: os.stat_result, live: os.stat_result) -> bool:
    """The live file is the one backed up: a regular file of the same size and mtime.

    A filesystem that keeps whole seconds only (either side) is compared in
    whole seconds.
    """
    if not stat.S_ISREG(live.st_mode) or live.st_size != backup.st_size:
        return False
    a, b = backup.st_mtime_ns, live.st_mtime_ns
    if a == b:
        return True
    second = 1_000_000_000
    return (a % second == 0 or b % second == 0) and a // second == b // second
