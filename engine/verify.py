"""``verify``: read a backup back to its end; find what cannot be read, or rotted (SPEC §7, §9).

One walker thread lists every folder of the backup, depth first and
streaming (never a whole-tree list), and hands the regular files in small
batches through a bounded queue to reader threads. Each reader reads its
files to the end in fixed-size chunks into one buffer of its own, hashing
what it reads when the backup's manifest lists the file, so memory stays
bounded whatever the backup's size. With a cold cache and small files the
time goes in waiting for each inode and its few blocks: several readers keep
several requests before the disk (one reader is no faster than ``cat``).

Everything is reached by directory descriptor (``openat``, ``scandir(fd)``),
never by a whole path: a backup may hold paths longer than PATH_MAX.

**Manifests.** A source listed in ``.pibackup/SOURCES`` is checked against
``.pibackup/<source>.sha256`` by a sort-merge: the walker visits each folder's
entries in byte order, so the files come out in the order of their paths
compared component by component; the manifest is sorted into that same
order (a ``/`` read as a byte below every other) and the two streams are
merged. A line the walk passes is a missing file; a file the manifest has
no line for is unlisted. The manifest writer's order is not relied on: it is
sorted in chunks of ``SORT_CHUNK`` lines, spilled to unlinked files in
``state_dir`` when there is more than one, and merged back. Memory for a
source of N files: min(N, SORT_CHUNK) manifest entries (about 200 bytes
each), the entries of the largest folder, one descriptor per folder level,
and one read buffer per reader.

**--all** verifies every complete backup, oldest first. The walker lists the
same folder of the backup before beside each folder it enters (one more
``getdents``, no ``stat``): a file that is the same inode under the same path
there was read already, and its verdict carries over (damaged inodes are
kept, which are few). **--sample** reads one group of the files, a file's
group fixed by a hash of its ``(st_dev, st_ino)``; the next group's number is
kept in ``state_dir``.

With ``--against-source``, a file whose live copy has the same size and
mtime is compared chunk by chunk as it is read: a difference there is
corruption; a live file changed since is only counted.

The threads run under anyio (``check_cancelled`` between files and every few
MiB), so a signal stops the walk promptly; a thread stuck on a dying disk is
abandoned after a bound, as for the destination's other blocking work.
"""

from __future__ import annotations

import errno
import hashlib
import heapq
import math
import os
import queue
import stat
import struct
import tempfile
import threading
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import anyio
import anyio.from_thread
import msgspec
import structlog

from . import damaged
from .checksums import EXTENSION, MANIFEST_DIR, SOURCES_FILE, read_manifest
from .command_stage import find_and_use, under_hooks, use_backup
from .config import SOURCE_NAME
from .destination import complete
from .heartbeat import beating
from .lookup import NotHeld, UsageProblem
from .pathtext import show_path
from .threads import in_worker
from .units import human_bytes

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import BinaryIO

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
SORT_CHUNK = 50_000  # manifest lines sorted in memory at once (about 10 MB)
SAMPLE_FILE = "verify-sample.json"

_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Reading must not write: without O_NOATIME the first read of each file
# writes its inode back to the backup disk (relatime). Only the owner (or
# root) may ask for it.
_NOATIME = getattr(os, "O_NOATIME", 0)
_MANIFEST = MANIFEST_DIR.encode()
# A path's key in the merge: "/" made the lowest byte, so that keys sort as the
# walk visits (component by component); no name holds a NUL.
_SEP = b"\0"
_SPILL = struct.Struct("<I")
# A damaged inode's verdict, kept for the backups after: a reason of corruption, or
# this mark and the read error.
_UNREADABLE = "!"


@dataclass(frozen=True)
class VerifyRequest:
    """What the command line asks: ``backup`` is a name or ``latest``; ``every`` is
    ``--all``; ``sample`` the PERCENT of ``--sample``."""

    backup: str
    source: str | None = None
    against_source: bool = False
    every: bool = False
    sample: int | None = None


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
    carried: int = 0  # the same inode under the same path in the backup before: not read
    unsampled: int = 0  # not in this run's sample group: not read

    def add(self, other: Tally) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def problems(self) -> int:
        return self.unreadable + self.corrupt


@dataclass
class Coverage:
    """What the manifests of one backup covered (for its summary)."""

    manifests: list[str] = field(default_factory=list)
    uncovered: list[str] = field(default_factory=list)
    has_manifests: bool = False


@dataclass(frozen=True)
class Sample:
    """Read only the files whose inode falls in ``group`` (0-based) of ``groups``."""

    group: int
    groups: int

    def holds(self, dev: int, ino: int) -> bool:
        digest = hashlib.blake2b(struct.pack("<QQ", dev, ino), digest_size=8).digest()
        return int.from_bytes(digest, "little") % self.groups == self.group


def check_source_name(name: str | None) -> None:
    """Raise UsageProblem unless ``name`` is None or has the form of a source name."""
    if name is not None and not SOURCE_NAME.fullmatch(name):
        raise UsageProblem(f"{name!r} is not a source name (letters, digits, '.', '_', '-')")


def check_sample(percent: str | None) -> int | None:
    """``--sample``'s PERCENT as an int from 1 to 100 (None when not given); else
    UsageProblem."""
    if percent is None:
        return None
    try:
        value = int(percent)
    except ValueError:
        value = 0
    if not 1 <= value <= 100 or not percent.strip().isdigit():
        raise UsageProblem(f"--sample {percent!r}: PERCENT is a whole number from 1 to 100")
    return value


async def verify_backup(config: Config, interruption: Interruption, request: VerifyRequest,
                        say: Callable[[str], None]) -> Report:
    """Verify the backup ``request`` names (or every complete one, oldest first), under
    the lock and inside the backup hooks.

    ``say`` gets each line for stdout (called from worker threads, one at a
    time): every unreadable or corrupt path, then each backup's closing
    summary. The damaged copies found are kept in ``state_dir``. The report
    (never written) fails when anything could not be read or was corrupt, the
    damaged copies could not be kept, or the backup is not there. Raises
    LockHeld, StateUnusable or Interrupted as ``under_hooks`` does.
    """

    async def work(ctx: RunContext) -> None:
        names, backups = await _chosen(ctx, request)
        sample = None
        if request.sample is not None:
            groups = math.ceil(100 / request.sample)
            group = await in_worker(_sample_position, config.state_dir, ctx.destination, groups)
            sample = Sample(group, groups)
        log.info("verifying backup", backups=len(names), backup=names[-1], source=request.source,
                 against_source=request.against_source,
                 sample=f"group {sample.group + 1} of {sample.groups}" if sample else None)
        inodes: dict[tuple[int, int], str] = {}
        found: list[damaged.Damage] = []
        total = Tally()
        previous: str | None = None
        for name in names:
            use_backup(ctx, name)
            tally, coverage = await _verify(ctx, name, previous if request.every else None,
                                            request, sample, say, inodes, found)
            say(summary(name, tally, request.against_source, coverage=coverage,
                        previous=previous if tally.carried else None, sample=sample))
            total.add(tally)
            previous = name
        if found:
            try:
                await in_worker(lambda: damaged.save(config.state_dir, ctx.destination, found,
                                                     backups=set(backups)))
            except OSError as e:
                ctx.fail_step(f"cannot save the damaged copies to "
                              f"{os.path.join(config.state_dir, damaged.FILE_NAME)}: "
                              f"{e.strerror or e}; the next run would link them again")
        if sample is not None:
            await in_worker(_save_sample_position, config.state_dir, ctx.destination,
                            sample.groups, sample.group + 1)
        if total.problems:
            where = names[0] if len(names) == 1 else f"{len(names)} backups"
            ctx.fail_step(f"{'backup ' if len(names) == 1 else ''}{where} "
                          f"{'has' if len(names) == 1 else 'have'} {_problem_text(total)}")

    return await under_hooks(config, interruption, "verify", request.backup, work)


async def _chosen(ctx: RunContext, request: VerifyRequest) -> tuple[list[str], list[str]]:
    """The backups to verify, oldest first, and every complete backup now."""
    backups = [e.name for e in complete(await ctx.dest.scan())]
    if not request.every:
        return [await find_and_use(ctx, request.backup, request.source)], backups
    holding = await ctx.dest.holding(backups, request.source, None)
    if not holding:
        if not backups:
            ctx.fail_step(str(NotHeld(f"the destination {ctx.destination} holds no complete "
                                      "backup")))
        ctx.fail_step(f"no complete backup holds {request.source}")
    return sorted(holding), backups


def summary(name: str, tally: Tally, against_source: bool, *,
            coverage: Coverage | None = None, previous: str | None = None,
            sample: Sample | None = None) -> str:
    """The closing line of one backup: what was read, what was found, what covered it."""
    line = (f"verified {name}: {tally.files} files, {tally.folders} folders, "
            f"{tally.bytes} bytes ({human_bytes(tally.bytes)}) read; ")
    line += _problem_text(tally) if tally.problems else "0 problems"
    if coverage is not None:
        if not coverage.has_manifests:
            line += "; no manifest (made before manifests)"
        elif coverage.manifests:
            line += "; manifests: " + ", ".join(coverage.manifests)
        if coverage.uncovered and coverage.has_manifests:
            line += "; not covered by a manifest: " + ", ".join(coverage.uncovered)
    if previous is not None:
        line += f"; {tally.carried} files carried over from {previous}"
    if sample is not None:
        line += (f"; sample: group {sample.group + 1} of {sample.groups}, "
                 f"{tally.unsampled} files not read")
    if against_source:
        line += (f"; against the source: {tally.compared} same, {tally.corrupt} corrupt, "
                 f"{tally.changed} changed since, {tally.not_compared} not compared")
    return line


def _problem_text(tally: Tally) -> str:
    noun = "problem" if tally.problems == 1 else "problems"
    return f"{tally.problems} {noun} ({tally.unreadable} unreadable, {tally.corrupt} corrupt)"


async def _verify(ctx: RunContext, name: str, previous: str | None, request: VerifyRequest,
                  sample: Sample | None, say: Callable[[str], None],
                  inodes: dict[tuple[int, int], str], found: list[damaged.Damage]
                  ) -> tuple[Tally, Coverage]:
    live = _live_roots(ctx.config, request) if request.against_source else None
    base = os.fsencode(ctx.destination)
    job = _Job(os.path.join(base, name.encode()),
               os.path.join(base, previous.encode()) if previous is not None else None,
               live, say, ctx.dest.gone_now)
    job.name = name
    job.prefix = name.encode() + b"/" if request.every else b""
    job.sample = sample
    job.inodes = inodes
    job.found = found
    job.spill = ctx.config.state_dir
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
                top = os.fsencode(request.source) if request.source is not None else None
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
    return total, job.coverage


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


# --- where --sample got to, per destination ------------------------------------------------


class _Position(msgspec.Struct):
    groups: int
    next: int


def _sample_file(state_dir: str) -> str:
    return os.path.join(state_dir, SAMPLE_FILE)


def _read_positions(state_dir: str) -> dict[str, _Position]:
    try:
        with open(_sample_file(state_dir), "rb") as f:
            return msgspec.json.decode(f.read(), type=dict[str, _Position])
    except FileNotFoundError:
        return {}
    except (OSError, msgspec.DecodeError) as e:
        # Losing the position only repeats a group: start again from the first.
        log.warning("where --sample got to cannot be read: starting from the first group",
                    path=_sample_file(state_dir), error=str(e))
        return {}


def _sample_position(state_dir: str, destination: str, groups: int) -> int:
    """The group this run reads (0-based) of ``groups``."""
    kept = _read_positions(state_dir).get(destination)
    return kept.next % groups if kept is not None else 0


def _save_sample_position(state_dir: str, destination: str, groups: int, after: int) -> None:
    positions = _read_positions(state_dir)
    positions[destination] = _Position(groups, after % groups)
    target = _sample_file(state_dir)
    temporary = f"{target}.new"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as f:
            f.write(msgspec.json.encode(positions))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    except OSError as e:
        # The next run reads this group again: nothing is missed, only repeated.
        log.warning("where --sample got to cannot be kept: the next run reads this group again",
                    path=target, error=e.strerror or str(e))


# --- the manifest, sorted as the walk visits ---------------------------------------------


def _key(path: bytes) -> bytes:
    return path.replace(b"/", _SEP)


def sorted_manifest(stream: BinaryIO, spill_dir: str | None = None
                    ) -> Iterator[tuple[bytes, bytes]]:
    """(key, raw digest) of every line of an open manifest, sorted by key (a path with
    ``/`` as NUL). Reads and checks the whole manifest before it returns, holding at
    most SORT_CHUNK lines in memory (the rest spilled to unlinked files in
    ``spill_dir``). Raises ValueError for a malformed line, OSError for a read error."""
    chunk: list[tuple[bytes, bytes]] = []
    spilled: list[BinaryIO] = []
    try:
        for digest, path in read_manifest(stream):
            chunk.append((_key(path), bytes.fromhex(digest)))
            if len(chunk) >= SORT_CHUNK:
                spilled.append(_spill(chunk, spill_dir))
                chunk = []
        chunk.sort()
        if not spilled:
            return iter(chunk)
        spilled.append(_spill(chunk, spill_dir))
    except BaseException:
        for f in spilled:
            f.close()
        raise
    return heapq.merge(*(_unspill(f) for f in spilled))


def _spill(chunk: list[tuple[bytes, bytes]], folder: str | None) -> BinaryIO:
    chunk.sort()
    f = tempfile.TemporaryFile(dir=folder, prefix="verify-sort-")
    for key, digest in chunk:
        f.write(_SPILL.pack(len(key)) + key + digest)
    f.seek(0)
    return f


def _unspill(f: BinaryIO) -> Iterator[tuple[bytes, bytes]]:
    with f:
        while head := f.read(_SPILL.size):
            (size,) = _SPILL.unpack(head)
            record = f.read(size + 32)
            yield record[:size], record[size:]


class _Vanished(Exception):
    """The destination went away under the verify; the message says so."""


class _Unreadable(Exception):
    def __init__(self, error: OSError, offset: int) -> None:
        self.error, self.offset = error, offset


@dataclass(frozen=True)
class _Item:
    name: bytes
    digest: bytes | None  # what the manifest says; None: not listed (or no manifest)


@dataclass(frozen=True)
class _Batch:
    folder: int  # a descriptor of the folder, the reader's to close
    rel: bytes  # the folder, relative to the backup
    live: bytes | None  # its live counterpart, when compared
    items: list[_Item]


@dataclass
class _Level:
    """A folder the walker is in: its descriptor, its entries still to visit, and the same
    folder of the backup before (the inodes of its regular files)."""

    fd: int
    rel: bytes
    live: bytes | None
    entries: list[tuple[bytes, int, int]]  # (name, kind, inode), in name order
    at: int = 0
    batch: list[_Item] = field(default_factory=list)
    before_fd: int | None = None
    before: dict[bytes, int] = field(default_factory=dict)
    dev: int = 0
    before_dev: int = -1


_DIR, _FILE, _LINK, _OTHER = range(4)


class _Job:
    """The state the walker and readers share: the queue, the output, the live roots."""

    def __init__(self, backup: bytes, before: bytes | None,
                 live_roots: dict[bytes, bytes | None] | None,
                 say: Callable[[str], None], gone: Callable[[], str | None]) -> None:
        self.backup = backup
        self.before = before
        self.live_roots = live_roots
        self.compare = live_roots is not None
        self.queue: queue.Queue[_Batch | None] = queue.Queue(QUEUE_BATCHES)
        self._say = say
        self._gone = gone
        self._lock = threading.Lock()
        # Every reader's tally, read (never written) by the progress task.
        self.tallies: list[Tally] = []
        self.name = ""
        self.prefix = b""
        self.sample: Sample | None = None
        # Damaged inodes of the backups verified so far (the verdicts that carry over).
        self.inodes: dict[tuple[int, int], str] = {}
        self.found: list[damaged.Damage] = []
        self.spill: str | None = None
        self.coverage = Coverage()

    # --- output, from any thread ------------------------------------------------------

    def say(self, line: str) -> None:
        with self._lock:
            self._say(line)

    def shown(self, rel: bytes) -> str:
        return show_path(self.prefix + rel)

    def unreadable(self, tally: Tally, rel: bytes, error: OSError, *, folder: bool = False,
                   offset: int = 0) -> None:
        # A destination that vanished explains every error that follows: stop at once.
        gone = self._gone()
        if gone is not None:
            raise _Vanished(gone)
        tally.unreadable += 1
        where = f" (after {offset} bytes)" if offset else ""
        self.say(f"unreadable: {self.shown(rel)}{'/' if folder else ''}: "
                 f"{error.strerror or error}{where}")

    def corrupt(self, tally: Tally, rel: bytes, why: str) -> None:
        tally.corrupt += 1
        self.say(f"corrupt: {self.shown(rel)}: {why}")

    def keep_damaged(self, rel: bytes, dev: int, ino: int, line: str) -> None:
        """Keep a damaged copy: its verdict carries over, and the next run relinks it."""
        source, _, path = rel.partition(b"/")
        with self._lock:
            self.inodes[dev, ino] = line
            if path and source != _MANIFEST:
                self.found.append(damaged.Damage(backup=self.name, source=os.fsdecode(source),
                                                 path=show_path(path), dev=dev, ino=ino))

    # --- the walker -------------------------------------------------------------------

    def walk(self, only: bytes | None) -> Tally:
        """List every folder of the backup (or of the source ``only``); check each
        source's files against its manifest; hand the files to the readers."""
        tally = Tally()
        self.tallies.append(tally)  # the files it counts (read or not) show in the progress
        try:
            self._walk(tally, only)
        finally:
            for _ in range(READERS):
                self._put(None)
        return tally

    def _walk(self, tally: Tally, only: bytes | None) -> None:
        try:
            top = os.open(self.backup, _FOLDER)
        except OSError as e:
            self.unreadable(tally, b"", e, folder=True)
            return
        before_top = _open_folder(None, self.before) if self.before is not None else None
        try:
            listed = self._manifests(tally, top)
            names = [only] if only is not None else sorted(map(os.fsencode, os.listdir(top)))
            for name in names:
                try:
                    st = os.stat(name, dir_fd=top, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    self.unreadable(tally, name, e)
                    continue
                manifest = None
                if name in listed:
                    manifest = self._manifest(tally, top, name)
                    if manifest is not None:
                        self.coverage.manifests.append(os.fsdecode(name))
                if manifest is None and name != _MANIFEST and (
                        stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                    self.coverage.uncovered.append(show_path(name))
                if stat.S_ISDIR(st.st_mode):
                    self._walk_folder(tally, top, before_top, name, manifest)
                elif stat.S_ISREG(st.st_mode):
                    self._top_file(tally, top, name)
                elif stat.S_ISLNK(st.st_mode):
                    self._read_link(tally, top, b"", name)
        finally:
            os.close(top)
            if before_top is not None:
                os.close(before_top)

    def _manifests(self, tally: Tally, top: int) -> set[bytes]:
        """The sources ``.pibackup/SOURCES`` lists (none when the backup has no manifests)."""
        try:
            fd = os.open(_MANIFEST + b"/" + SOURCES_FILE.encode(), _OPEN, dir_fd=top)
        except FileNotFoundError:
            try:
                os.stat(_MANIFEST, dir_fd=top, follow_symlinks=False)
            except FileNotFoundError:
                return set()  # made before manifests existed
            self.coverage.has_manifests = True
            self.corrupt(tally, _MANIFEST + b"/" + SOURCES_FILE.encode(), "missing")
            return set()
        except OSError as e:
            self.coverage.has_manifests = True
            self.corrupt(tally, _MANIFEST + b"/" + SOURCES_FILE.encode(), e.strerror or str(e))
            return set()
        self.coverage.has_manifests = True
        with open(fd, "rb") as f:
            try:
                return {line.rstrip(b"\n") for line in f if line.strip()}
            except OSError as e:
                self.corrupt(tally, _MANIFEST + b"/" + SOURCES_FILE.encode(),
                             e.strerror or str(e))
                return set()

    def _manifest(self, tally: Tally, top: int, source: bytes
                  ) -> Iterator[tuple[bytes, bytes]] | None:
        """The source's manifest sorted for the merge; None (said) when it is corrupt."""
        rel = _MANIFEST + b"/" + source + b"." + EXTENSION.encode()
        try:
            fd = os.open(rel, _OPEN, dir_fd=top)
        except FileNotFoundError:
            self.corrupt(tally, rel, f"missing ({show_path(source)} is listed in "
                         f"{MANIFEST_DIR}/{SOURCES_FILE})")
            return None
        except OSError as e:
            self.corrupt(tally, rel, e.strerror or str(e))
            return None
        try:
            with open(fd, "rb") as f:
                return sorted_manifest(f, self.spill)
        except OSError as e:
            self.corrupt(tally, rel, e.strerror or str(e))
        except ValueError as e:
            self.corrupt(tally, rel, str(e))
        return None

    def _top_file(self, tally: Tally, top: int, name: bytes) -> None:
        """A file right in the backup folder (what a hook wrote): read like the rest."""
        self._put(_Batch(os.dup(top), b"", None, [_Item(name, None)]))

    def _walk_folder(self, tally: Tally, top: int, before_top: int | None, source: bytes,
                     manifest: Iterator[tuple[bytes, bytes]] | None) -> None:
        """Depth first below the folder ``source``, in name order, merging its files with
        the sorted ``manifest`` (None: nothing to check them against)."""
        check = anyio.from_thread.check_cancelled
        pending = next(manifest, None) if manifest is not None else None
        stack: list[_Level] = []
        live = self._live_for(source) if source != _MANIFEST else None
        self._enter(tally, stack, top, before_top, source, source, live)
        try:
            self._merge(tally, stack, manifest, pending, check)
        finally:
            for level in stack:
                os.close(level.fd)
                if level.before_fd is not None:
                    os.close(level.before_fd)

    def _merge(self, tally: Tally, stack: list[_Level],
               manifest: Iterator[tuple[bytes, bytes]] | None,
               pending: tuple[bytes, bytes] | None, check: Callable[[], None]) -> None:
        while stack:
            level = stack[-1]
            if level.at >= len(level.entries):
                self._leave(stack.pop())
                continue
            name, kind, inode = level.entries[level.at]
            level.at += 1
            check()
            rel = level.rel + b"/" + name
            if kind == _DIR:
                self._enter(tally, stack, level.fd, level.before_fd, name, rel,
                            level.live + b"/" + name if level.live is not None else None)
                continue
            if kind == _LINK:
                self._read_link(tally, level.fd, level.rel, name)
                continue
            if kind != _FILE:
                continue
            tally.files += 1
            digest = None
            if manifest is not None:
                key = _key(rel)
                while pending is not None and pending[0] < key:
                    self.corrupt(tally, pending[0].replace(_SEP, b"/"),
                                 "listed in the manifest, missing")
                    pending = next(manifest, None)
                if pending is not None and pending[0] == key:
                    digest = pending[1]
                    pending = next(manifest, None)
                else:
                    self.corrupt(tally, rel, "not in the manifest")
            if level.before.get(name) == inode and level.before_dev == level.dev:
                tally.carried += 1
                line = self.inodes.get((level.dev, inode))
                if line is not None:
                    self.corrupt(tally, rel, line) if not line.startswith("!") else \
                        self.unreadable(tally, rel, OSError(0, line[1:]))
                    self.keep_damaged(rel, level.dev, inode, line)
                continue
            if self.sample is not None and not self.sample.holds(level.dev, inode):
                tally.unsampled += 1
                continue
            level.batch.append(_Item(name, digest))
            if len(level.batch) >= BATCH:
                self._put(_Batch(os.dup(level.fd), level.rel, level.live, level.batch))
                level.batch = []
        while manifest is not None and pending is not None:
            self.corrupt(tally, pending[0].replace(_SEP, b"/"), "listed in the manifest, missing")
            pending = next(manifest, None)

    def _enter(self, tally: Tally, stack: list[_Level], parent: int, before_parent: int | None,
               name: bytes, rel: bytes, live: bytes | None) -> None:
        try:
            fd = os.open(name, _FOLDER, dir_fd=parent)
        except OSError as e:
            self.unreadable(tally, rel, e, folder=True)
            return
        entries: list[tuple[bytes, int, int]] = []
        try:
            with os.scandir(fd) as found:
                for entry in found:
                    if entry.is_dir(follow_symlinks=False):
                        kind = _DIR
                    elif entry.is_file(follow_symlinks=False):
                        kind = _FILE
                    elif entry.is_symlink():
                        kind = _LINK
                    else:
                        kind = _OTHER
                    entries.append((os.fsencode(entry.name), kind, entry.inode()))
        except OSError as e:  # the folder's listing broke off
            self.unreadable(tally, rel, e, folder=True)
        entries.sort()
        tally.folders += 1
        level = _Level(fd, rel, live, entries, dev=os.fstat(fd).st_dev)
        if before_parent is not None:
            level.before_fd = _open_folder(before_parent, name)
        if level.before_fd is not None:
            try:
                level.before_dev = os.fstat(level.before_fd).st_dev
                with os.scandir(level.before_fd) as found:
                    level.before = {os.fsencode(e.name): e.inode() for e in found
                                    if e.is_file(follow_symlinks=False)}
            except OSError:
                level.before = {}  # the backup before is only a shortcut: read these again
        stack.append(level)

    def _leave(self, level: _Level) -> None:
        if level.batch:
            self._put(_Batch(os.dup(level.fd), level.rel, level.live, level.batch))
        os.close(level.fd)
        if level.before_fd is not None:
            os.close(level.before_fd)

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

    def _read_link(self, tally: Tally, folder: int, rel: bytes, name: bytes) -> None:
        try:
            os.readlink(name, dir_fd=folder)
        except OSError as e:
            self.unreadable(tally, rel + b"/" + name if rel else name, e)

    def _put(self, batch: _Batch | None) -> None:
        while True:
            try:
                self.queue.put(batch, timeout=POLL_S)
                return
            except queue.Full:
                try:
                    anyio.from_thread.check_cancelled()
                except BaseException:
                    if batch is not None:
                        os.close(batch.folder)
                    raise

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
            try:
                for item in batch.items:
                    check()
                    self._read_one(tally, batch, item, mine, theirs)
            finally:
                os.close(batch.folder)

    def _read_one(self, tally: Tally, batch: _Batch, item: _Item, mine: bytearray,
                  theirs: bytearray | None) -> None:
        rel = batch.rel + b"/" + item.name if batch.rel else item.name
        if not batch.rel:
            tally.files += 1  # a file right in the backup folder: the walker did not count it
        try:
            fd = _open(item.name, batch.folder)
        except OSError as e:
            self.unreadable(tally, rel, e)
            return
        try:
            st = os.fstat(fd)
            hasher = hashlib.sha256() if item.digest is not None else None
            try:
                if batch.live is not None and theirs is not None:
                    verdict = self._compare(tally, fd, st, rel,
                                            batch.live + b"/" + item.name, mine, theirs,
                                            hasher)
                else:
                    # Only a source's files have a live copy (not the manifests').
                    tally.not_compared += self.compare and batch.rel.partition(b"/")[0] \
                        not in (b"", _MANIFEST)
                    tally.bytes += _drain(fd, mine, hasher)
                    verdict = None
            except _Unreadable as e:
                tally.bytes += e.offset
                self.unreadable(tally, rel, e.error, offset=e.offset)
                self.keep_damaged(rel, st.st_dev, st.st_ino,
                                  _UNREADABLE + (e.error.strerror or str(e.error)))
                return
            # The comparison with the live file says where; the manifest only that.
            if verdict is None and hasher is not None and hasher.digest() != item.digest:
                verdict = "does not match the manifest"
            if verdict is not None:
                self.corrupt(tally, rel, verdict)
                self.keep_damaged(rel, st.st_dev, st.st_ino, verdict)
        finally:
            os.close(fd)

    def _compare(self, tally: Tally, fd: int, st: os.stat_result, rel: bytes, live: bytes,
                 mine: bytearray, theirs: bytearray, hasher: hashlib._Hash | None
                 ) -> str | None:
        """Read the backup's file to its end, comparing it with ``live`` where unchanged;
        what is wrong with it, if anything."""
        try:
            before = os.lstat(live)
        except (FileNotFoundError, NotADirectoryError):
            before = None
        except OSError as e:
            self._cannot_compare(tally, live, e)
            tally.bytes += _drain(fd, mine, hasher)
            return None
        if before is not None and _truncated(st, before):
            tally.bytes += _drain(fd, mine, hasher)
            return (f"{st.st_size} bytes, but {show_path(live)} has {before.st_size} "
                    "and has not changed since")
        if before is None or not _unchanged(st, before):
            tally.changed += 1
            tally.bytes += _drain(fd, mine, hasher)
            return None
        try:
            other = _open(live)
        except OSError as e:
            self._cannot_compare(tally, live, e)
            tally.bytes += _drain(fd, mine, hasher)
            return None
        try:
            offset, differs = _read_both(fd, other, mine, theirs, hasher)
        finally:
            os.close(other)
        tally.bytes += offset
        if differs is None:
            tally.compared += 1
            return None
        if isinstance(differs, OSError):
            self._cannot_compare(tally, live, differs)
            return None
        try:
            after = os.lstat(live)
        except OSError:
            after = None
        if after is None or not _unchanged(st, after) or after.st_mtime_ns != before.st_mtime_ns:
            tally.changed += 1  # written to while it was read
            return None
        return f"differs from {show_path(live)} at byte {differs}"

    def _cannot_compare(self, tally: Tally, live: bytes, error: OSError) -> None:
        tally.not_compared += 1
        log.warning("live file cannot be read: not compared", path=show_path(live),
                    error=error.strerror or str(error))


def _open_folder(parent: int | None, name: bytes) -> int | None:
    """A descriptor of the folder ``name`` (not a link), or None when it is not one."""
    try:
        return os.open(name, _FOLDER, dir_fd=parent)
    except OSError:
        return None


def _open(name: bytes, folder: int | None = None) -> int:
    try:
        return os.open(name, _OPEN | _NOATIME, dir_fd=folder)
    except PermissionError as e:
        if e.errno != errno.EPERM or not _NOATIME:  # EPERM: not the file's owner
            raise
        return os.open(name, _OPEN, dir_fd=folder)


def _fill(fd: int, view: memoryview) -> int:
    """Read into ``view`` until it is full or the file ends; the bytes read."""
    got = 0
    while got < len(view):
        n = os.readv(fd, [view[got:]])
        if n == 0:
            break
        got += n
    return got


def _drain(fd: int, buffer: bytearray, hasher: hashlib._Hash | None = None) -> int:
    """Read ``fd`` to its end, into ``hasher`` if given; the bytes read. Raises
    _Unreadable."""
    view = memoryview(buffer)
    offset = chunks = 0
    while True:
        try:
            n = _fill(fd, view)
        except OSError as e:
            raise _Unreadable(e, offset) from None
        if hasher is not None:
            hasher.update(view[:n])
        offset += n
        if n < len(view):
            return offset
        chunks += 1
        if chunks == 1:
            # A big file: a larger read-ahead window.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        if chunks % CHECK_EVERY == 0:
            anyio.from_thread.check_cancelled()


def _read_both(fd: int, other: int, mine: bytearray, theirs: bytearray,
               hasher: hashlib._Hash | None = None) -> tuple[int, int | OSError | None]:
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
        if hasher is not None:
            hasher.update(view[:n])
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
    return _same_mtime(backup.st_mtime_ns, live.st_mtime_ns)


def _same_mtime(a: int, b: int) -> bool:
    if a == b:
        return True
    second = 1_000_000_000
    return (a % second == 0 or b % second == 0) and a // second == b // second


def _truncated(backup: os.stat_result, live: os.stat_result) -> bool:
    """The backup's copy has another size than a live file that has not changed since.

    Same mtime and another size is what a truncated (or rotted) copy looks
    like, but a source file can change size keeping its mtime too (two writes
    in one clock tick, ``touch -r``). The rule: the live file's inode last
    changed (ctime, which no one can set back) before the backup's copy last
    did. rsync wrote the copy, or a later run hard-linked it, when the source
    had the copy's size and mtime (else it would have copied it afresh), so a
    source unchanged since then still has that size: another size is the
    copy's damage. A source changed (ctime) after that is only changed since.
    """
    return (stat.S_ISREG(live.st_mode) and live.st_size != backup.st_size
            and _same_mtime(backup.st_mtime_ns, live.st_mtime_ns)
            and live.st_ctime_ns < backup.st_ctime_ns)
