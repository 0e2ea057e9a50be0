"""rsync sources: one copy into the in-progress folder, hard-linked against the last backup.

Also the copy every kind that rsync copies shares (``copy_into``: a btrfs
snapshot into a destination that is not btrfs), and rsync's command line.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import time
from typing import TYPE_CHECKING, Any

import anyio.from_thread
import anyio.to_thread
import msgspec
import structlog
from msgspec import field

from ..checksums import manifest_path
from ..destination import DestinationLost, newest_holding, remove_tree
from ..failure_text import telling_line, with_hint
from ..filesystems import is_within
from ..heartbeat import current
from ..proc_io import most_written
from ..processes import describe_exit, run_process
from ..report import StepResult, started
from ..threads import in_worker
from .errors import SourceError
from .kind import (
    InitChoice,
    SourceConfig,
    SourceKind,
    SourcePlan,
    SourceWork,
    engine_folders,
    register,
)
from .precopy import (
    aside_path,
    compare_options,
    drop_recent,
    link_skipped,
    listing_path,
    saw_all,
    set_aside,
    skipped_names,
    source_clock,
)
from .presence import mountpoint_problem, refuse_empty, refuse_unmounted
from .relink import copy_afresh, count_regular, drop_damaged

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from ..config import Config
    from ..heartbeat import Beat
    from ..processes import Finished
    from ..remote import Transport
    from .kind import Copy, DryRun, Run


class RsyncOptions(SourceConfig, frozen=True, kw_only=True):
    """The keys of every source that rsync copies, whatever made what it copies."""

    rsync_args: list[str] = field(default_factory=list)
    rsync_ok_codes: list[int] = field(default_factory=lambda: [0, 24])


class RsyncSource(RsyncOptions, frozen=True, kw_only=True, tag="rsync"):
    exclude: list[str] = field(default_factory=list)
    # Copied once before the snapshot hooks' pre (SPEC §2 step 3). Here, not in
    # RsyncOptions: a btrfs snapshot is instant, and its precopy is refused.
    precopy: bool = True
    # A source that is not there fails (SPEC §2 Failures): a local one must be on a
    # mounted filesystem other than the root one; an empty copy fails while the
    # last backup held files, unless allowed.
    require_mountpoint: bool = False
    allow_empty: bool = False


log = structlog.get_logger("pibackup.rsync")

# Everything a restore needs: archive mode (permissions, times, symlinks,
# devices and owners when root), hard links, ACLs, xattrs, numeric owners so
# a restore onto a fresh system does not remap ids by name, sparse files.
# --stats gives the transferred size, which a restore logs; a backup's report
# counts what its copy takes on disk instead (allocated.py: a sparse file's
# holes are transferred, not written). Progress comes from the kernel's
# counters (proc_io), not from rsync: --info=progress2 cost rsync 6.5% on
# small files.
RSYNC_BASE = ("rsync", "-aHAX", "--numeric-ids", "--sparse", "--stats")

_TRANSFERRED = re.compile(r"Total transferred file size: ([\d,.]+)")


def _escape(pattern: str) -> str:
    # rsync matches a pattern without * ? [ literally, backslashes and all;
    # only in one with a wildcard does a backslash escape (itself included).
    if not re.search(r"[*?\[]", pattern):
        return pattern
    return re.sub(r"([*?\[\\])", r"\\\1", pattern)


def auto_excludes(config: Config, source_path: str) -> list[str]:
    """Anchored excludes for the engine's own folders that lie inside the source.

    Backing up ``/`` to ``/mnt/backup`` must not copy the backups into
    themselves, nor the state folder, the lock or local btrfs snapshots.
    Paths are compared after resolving symbolic links: a destination reached
    through a link (or a source that is one) still lies inside the tree rsync
    walks, and the pattern is relative to that tree (rsync follows the
    source's own top-level link, as the path ends in ``/``, and no other).
    """
    walked = os.path.realpath(source_path)
    excludes: list[str] = []
    for real in _real_paths(tuple(engine_folders(config))):
        if is_within(real, walked) and not is_within(walked, real):
            pattern = f"--exclude=/{_escape(os.path.relpath(real, walked))}"
            if pattern not in excludes:
                excludes.append(pattern)
    return excludes


@functools.lru_cache(maxsize=8)
def _real_paths(paths: tuple[str, ...]) -> tuple[str, ...]:
    # The same few folders for every source of a run: resolved once, not per source.
    return tuple(os.path.realpath(p) for p in paths)


def rsync_argv(config: Config, source: RsyncOptions, target: str, link_dest: str | None, *,
               excludes: Sequence[str] = (), from_path: str | None = None,
               remote: Transport | None = None, extra: Sequence[str] = ()) -> list[str]:
    """The exact rsync command that copies a source into ``target``.

    ``from_path`` copies from elsewhere (a btrfs source's read-only
    snapshot) with the source's own arguments; ``remote`` pulls from that
    host over ssh; ``extra``: the engine's own options for this copy (step
    3's after a precopy), before the user's.
    """
    argv = list(RSYNC_BASE)
    if remote is None:
        argv += auto_excludes(config, source.path)
    else:
        # -s: the paths travel inside rsync's protocol; before 3.2.4 (Debian 11)
        # rsync gave them to the remote shell, which split them at spaces.
        argv += ["-e", remote.shell, "-s"]
        if remote.sudo:
            argv.append("--rsync-path=sudo -n rsync")
    argv += [f"--exclude={pattern}" for pattern in excludes]
    if link_dest is not None:
        argv.append(f"--link-dest={link_dest}")
    argv += extra
    argv += source.rsync_args
    # A trailing slash copies the contents of the folder, whichever way the
    # user wrote the path.
    origin = (from_path or source.path).rstrip("/") + "/"
    if remote is not None:
        origin = f"{remote.target}:{origin}"
    argv += [origin, target.rstrip("/") + "/"]
    return argv


def transferred_bytes(stdout: str) -> int:
    """rsync's "Total transferred file size" from ``--stats`` output (0 if absent)."""
    match = _TRANSFERRED.search(stdout)
    return int(re.sub(r"[,.]", "", match.group(1))) if match else 0


async def copy(argv: list[str], ok_codes: list[int]) -> StepResult:
    """Run one rsync: its exit code and stderr tail. Raises SourceError if it failed."""
    started(argv)
    finished, _ = await run_rsync(argv)
    result = StepResult(exit_code=finished.exit_code, stderr_tail=finished.stderr.text())
    if finished.exit_code not in ok_codes:
        # Not merely the last line: rsync's "No space left on device" comes
        # before the "Broken pipe" and "rsync error: (code 11)" lines.
        telling = telling_line(finished.stderr.lines) or "no error output"
        raise SourceError(with_hint(f"rsync {describe_exit(finished.exit_code)}: {telling}"),
                          result=result)
    if finished.exit_code != 0:
        # rsync_ok_codes let it pass (24: files vanished while copying); say so.
        log.warning("rsync reported a problem, accepted by rsync_ok_codes",
                    exit_code=finished.exit_code, stderr=finished.stderr.text())
    return result


async def run_rsync(argv: list[str]) -> tuple[Finished, int]:
    """Run an rsync to its end: how it ended, and the bytes it transferred (``--stats``).

    Meanwhile the running step's bytes follow what it writes.
    """
    beat = current()

    def watch(pid: int) -> None:
        if beat is not None:
            beat.probe = lambda b: _follow(b, pid)

    try:
        finished = await run_process(argv, stdout_lines=40, on_start=watch)
    finally:
        if beat is not None:
            beat.probe = None
    transferred = transferred_bytes(finished.stdout.text())
    if beat is not None:
        beat.bytes = transferred
    return finished, transferred


def _follow(beat: Beat, pid: int) -> None:
    written = most_written(pid)
    if written is not None:
        beat.bytes = written


# --- the copy of a run, and the rsync kind -------------------------------------------


# rsync's quick check compares mtimes in whole seconds unless told otherwise:
# a file rewritten with the same size within the second in which its basis was
# copied (a service restarted by a post rewriting a small file, say) would be
# linked to its old content, and stay so until it changes again. With
# --modify-window=-1 (rsync >= 3.1.3 receiving) it compares nanoseconds, which
# leaves only the kernel's timestamp tick (a few ms). Only where the basis
# keeps times finer than exFAT's 10 ms: on a destination that truncates them
# (vfat, exFAT, ext4 with 128-byte inodes) every file would differ every night.
PRECISE_TIMES = "--modify-window=-1"
_COARSEST_NS = 10_000_000
_PROBED_FILES = 32
_PROBED_FOLDERS = 16


def keeps_fine_times(folder: str) -> bool:
    """A regular file below ``folder`` has an mtime finer than 10 ms.

    A few files are looked at, breadth first, no link followed; a folder
    that cannot be read counts as none (rsync's own check decides then).
    """
    pending = [folder]
    files = folders = 0
    while pending and files < _PROBED_FILES and folders < _PROBED_FOLDERS:
        folders += 1
        try:
            with os.scandir(pending.pop(0)) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        files += 1
                        if entry.stat(follow_symlinks=False).st_mtime_ns % _COARSEST_NS:
                            return True
        except OSError:
            continue
    return False


def copy_argv(run: Run, source: RsyncOptions, remote: Transport | None, *,
              excludes: Sequence[str] = (), from_path: str | None = None,
              extra: Sequence[str] = ()) -> tuple[list[str], str | None]:
    """The command that copies ``source`` into its folder of the backup, and its link-dest.

    The run and its dry-run decide here alike: ``--link-dest`` is the newest
    complete backup holding the source (none before the first).
    """
    target = os.path.join(run.in_progress_dir, source.name)
    # Step 3 comparing with a precopy's copy, which already links against
    # that backup (window_options): rsync refuses --link-dest beside it, and
    # it links nothing itself (so nothing damaged to copy afresh).
    compared = next((arg.removeprefix("--compare-dest=") for arg in extra
                     if arg.startswith("--compare-dest=")), None)
    link_dest = (None if compared is not None
                 else newest_holding(run.destination, run.previous, source.name))
    # What rsync compares the source with: the earlier backup, or the precopied copy.
    basis = compared if compared is not None else link_dest
    if basis is not None and keeps_fine_times(basis):
        extra = [*extra, PRECISE_TIMES]
    argv = rsync_argv(run.config, source, target, link_dest,
                      excludes=excludes, from_path=from_path, remote=remote, extra=extra)
    return argv, link_dest


async def copy_into(run: Run, source: RsyncOptions, *, excludes: Sequence[str] = (),
                    from_path: str | None = None, extra: Sequence[str] = ()) -> StepResult:
    """Copy a source (or ``from_path``: what its kind made of it) into the backup.

    Returns rsync's result; its bytes are counted later, by the manifest's
    walk of the copy (``write_manifest``). Raises SourceError, or RemoteError
    when the host cannot be reached.
    """
    remote = None
    if source.host is not None:
        host = run.remotes[source.host]
        await host.ensure_master()
        remote = host.transport
    # Both read the destination's disk (its link-dest, its real path for the
    # excludes), which may hang: off the event loop, abandoned on cancel.
    argv, link_dest = await anyio.to_thread.run_sync(
        functools.partial(copy_argv, run, source, remote, excludes=excludes,
                          from_path=from_path, extra=extra), abandon_on_cancel=True)
    ran = await copy(argv, source.rsync_ok_codes)
    # What verify found damaged is not linked again (SPEC §9).
    relinked = await copy_afresh(run, source.name, argv, link_dest, source.rsync_ok_codes)
    return msgspec.structs.replace(ran, relinked=relinked)


async def write_manifest(run: Run, source: RsyncOptions) -> StepResult:
    """The manifest of a source that rsync copied (SPEC §9); its hashed_bytes: what it
    read; its bytes: what the copy's new files take on disk (SPEC §6).

    A file rsync linked against the previous copy (the same ``--link-dest``
    folder as the copy's) takes its digest from that backup's manifest. The
    bytes come from the same walk (``allocated.written_bytes``'s figure: not
    rsync's transferred size, which counts a sparse file's holes and knows
    nothing of the disk), so the copy is walked once, after the window.
    Raises SourceError when the copy cannot be read or the manifest written
    (DestinationLost when the disk went away or stopped answering).
    """
    dest = run.dest
    link_dest = await dest.newest_holding(run.previous, source.name)
    try:
        made = await dest.write_manifest(os.path.basename(run.in_progress_dir), source.name,
                                         link_dest)
    except DestinationLost:
        raise
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise SourceError(f"manifest not written: {e.strerror or e}{where}") from e
    if made.unused_earlier is not None:
        # Every file read: the save takes longer than a nightly one, and this says why.
        log.info("manifest: nothing inherited", reason=made.unused_earlier)
    beat = current()
    if beat is not None:
        # Live progress and the run's total end on the figure the report gives.
        beat.bytes = made.allocated
    return StepResult(hashed_bytes=made.hashed_bytes, bytes=made.allocated)


def asks_for_metadata(source: RsyncOptions) -> bool:
    """rsync keeps owners, ACLs and xattrs unless told not to (``--no-A --no-X``)."""
    return not ("--no-A" in source.rsync_args and "--no-X" in source.rsync_args)


def left_out(config: Config, source: RsyncOptions) -> list[str]:
    """The patterns of the engine's own folders that a local copy of the source leaves out."""
    if source.host is not None:
        return []
    return [e.removeprefix("--exclude=") for e in auto_excludes(config, source.path)]


def precopy_due(config: Config, source: RsyncSource) -> bool:
    """A source with ``precopy`` is copied first when a snapshot hook has a ``pre`` (SPEC §2)."""
    return source.precopy and any(hook.pre is not None for hook in config.snapshot_hooks)


def second_pass_options(in_progress_dir: str, source: str, link_dest: str | None) -> list[str]:
    """Step 3's own options after a precopy whose ``--link-dest`` was ``link_dest``.

    Step 3 must never change a file it did not create (SPEC §2): rsync sets
    a changed mode, owner, ACL or xattr on an existing file in place, and a
    precopy that linked against an earlier backup left that backup's inodes
    in the folder (a chmod between the passes would change the earlier
    backup too). So such a folder is set aside and step 3 copies into a
    fresh one, with the precopied folder as a second ``--link-dest``: an
    unchanged file is linked (to the same inode, the earlier backup's where
    the precopy had linked it), one whose attributes differ is copied anew.
    The price, inside the window, is a link per file instead of a stat
    (benchmarks/bench_precopy.py measures it) — what a run without precopy
    pays for its unchanged files anyway: so this is only the way after a
    precopy that did not finish (or ``rsync_args`` that rule the other out,
    ``compares``); after one that finished, ``window_options``. Without an
    earlier backup every file there is this run's own: step 3 updates the
    folder in place, the cheaper pass, and deletes what the source no longer
    holds.
    """
    if link_dest is None:
        return ["--delete"]
    return [f"--link-dest={aside_path(in_progress_dir, source)}"]


# rsync_args that step 3's compare pass cannot take beside its own options:
# rsync refuses --compare-dest with --link-dest or --copy-dest, and a log
# file or format of the user's would replace the one step 3's names are read from.
_COMPARE_CONFLICTS = ("--link-dest", "--compare-dest", "--copy-dest", "--log-file",
                      "--write-batch", "--only-write-batch", "--read-batch")


def compares(source: RsyncOptions) -> bool:
    """Whether step 3 after a finished precopy may compare with its copy (``window_options``)."""
    return not any(arg.startswith(c) for arg in source.rsync_args for c in _COMPARE_CONFLICTS)


def window_options(in_progress_dir: str, source: RsyncOptions, link_dest: str | None
                   ) -> list[str]:
    """Step 3's own options after a precopy that finished.

    With an earlier backup, the precopied folder is set aside and step 3
    copies into a fresh one comparing with it (``--compare-dest``): only
    what changed since the precopy is created in the window, the rest is
    linked from the precopied copy after it (``precopy.link_skipped``; the
    precopy module says why this way). Else as ``second_pass_options``.
    """
    if link_dest is None or not compares(source):
        return second_pass_options(in_progress_dir, source.name, link_dest)
    return compare_options(aside_path(in_progress_dir, source.name),
                           listing_path(in_progress_dir, source.name))


class RsyncWork(SourceWork[RsyncSource]):
    """The snapshot is the copy: rsync straight into the backup, in the snapshot window.

    With a precopy (``precopy``), step 3 is the second pass: only what
    changed since the precopy goes inside the window.
    """

    def __init__(self, run: Run, source: RsyncSource) -> None:
        super().__init__(run, source)
        # The precopy's start by the source's clock, once its copy began.
        self._since: float | None = None
        # Its files changed since that start are gone from the folder.
        self._dropped = False
        # The precopied folder, set aside by step 3 until the window is over.
        self._aside: str | None = None
        # The precopy ran to its end: step 3 may compare with its copy.
        self._finished = False
        # Paths of damaged copies taken out of the precopied folder (relink.drop_damaged).
        self._damaged: list[bytes] = []
        # Step 3's log of the names it saw, when it compared with the precopied copy.
        self._listing: str | None = None
        # Step 3 compared and ended well: the names it left out, to join after the window.
        self._skipped: list[bytes] | None = None

    def precopy(self) -> Copy | None:
        return self._precopy if precopy_due(self.run.config, self.source) else None

    async def _precopy(self) -> StepResult:
        """Step 3's copy, before the window: the same command, into the same folder."""
        run, source = self.run, self.source
        since = await source_clock(run, source)
        remote = None
        if source.host is not None:
            host = run.remotes[source.host]
            await host.ensure_master()
            remote = host.transport
        argv, _ = await anyio.to_thread.run_sync(
            functools.partial(copy_argv, run, source, remote, excludes=source.exclude),
            abandon_on_cancel=True)
        self._since = since
        try:
            ran = await copy(argv, source.rsync_ok_codes)
        except SourceError:
            # What it copied before it failed is kept for step 3: the same rule applies.
            await self._drop_recent()
            raise
        await self._drop_recent()
        self._damaged = await drop_damaged(run, source.name, self.target)
        self._finished = True
        return ran

    async def _drop_recent(self) -> None:
        assert self._since is not None
        dropped = await in_worker(drop_recent, self.target, self._since,
                                  anyio.from_thread.check_cancelled)
        self._dropped = True
        if dropped:
            log.info("precopy: files changed since it started are copied again in the window",
                     files=dropped)

    async def _second_pass(self) -> list[str]:
        """Step 3's own options: none without a precopy (``second_pass_options``)."""
        run, name = self.run, self.source.name
        if self._since is None:
            return []
        if not self._dropped:
            await self._drop_recent()  # the precopy was cut before it could
        link_dest = await anyio.to_thread.run_sync(
            newest_holding, run.destination, run.previous, name, abandon_on_cancel=True)
        if self._finished:
            options = window_options(run.in_progress_dir, self.source, link_dest)
        else:
            options = second_pass_options(run.in_progress_dir, name, link_dest)
        if link_dest is None:
            return options
        aside = aside_path(run.in_progress_dir, name)
        if not await anyio.to_thread.run_sync(set_aside, self.target, aside,
                                              abandon_on_cancel=True):
            return []  # the precopy copied nothing: a plain copy
        self._aside = aside
        listing = listing_path(run.in_progress_dir, name)
        if f"--log-file={listing}" in options:
            # rsync appends to a log file: only this step 3's names may be in it.
            await in_worker(_remove_file, listing)
            self._listing = listing
        return options

    async def after_window(self) -> None:
        """Outside the window: what step 3 left out joins the copy; the precopied folder goes.

        Raises OSError if a name cannot be linked or the folder removed.
        """
        listing, self._listing = self._listing, None
        if listing is not None:
            try:
                if self._skipped is not None:
                    await self._join_skipped(self._skipped)
            finally:
                await in_worker(_remove_file, listing)
        if self._aside is not None:
            await remove_tree(self._aside)
            self._aside = None

    async def _join_skipped(self, skipped: list[bytes]) -> None:
        assert self._aside is not None
        self._skipped = None
        t0 = time.monotonic()
        linked = await in_worker(link_skipped, skipped, self._aside, self.target,
                                 anyio.from_thread.check_cancelled)
        log.info("precopy: what step 3 found unchanged linked from the precopied copy",
                 files=linked, duration_s=round(time.monotonic() - t0, 6))

    async def snapshot(self) -> StepResult:
        """The copy (its bytes are counted by the save step's manifest walk)."""
        source = self.source
        if source.require_mountpoint and source.host is None:
            await refuse_unmounted(source.path)
        result = await copy_into(self.run, self.source, excludes=self.source.exclude,
                                 extra=await self._second_pass())
        if self._listing is not None:
            return await self._compared(result)
        if not source.allow_empty:
            await refuse_empty(self.run, source.name, source.path, result)
        return result

    async def _compared(self, result: StepResult) -> StepResult:
        """Step 3 compared with the precopied copy: judged on every name it saw."""
        source, listing = self.source, self._listing
        assert listing is not None
        skipped, total = await in_worker(skipped_names, listing)
        if not await in_worker(saw_all, self.target, skipped, total,
                               anyio.from_thread.check_cancelled):
            # Still in the window, the source as step 3 saw it: the way that
            # does not depend on rsync's log, in place (every file there is step 3's).
            log.warning("step 3 left out names its log does not give (rsync --compare-dest "
                        "with hard links): copied again, linked against the precopied copy")
            aside = aside_path(self.run.in_progress_dir, source.name)
            result = await copy_into(self.run, source, excludes=source.exclude,
                                     extra=[f"--link-dest={aside}"])
            skipped = []
        else:
            self._skipped = skipped
        # Its folder may hold nothing yet while step 3 saw files: they join later.
        if not source.allow_empty and not skipped:
            await refuse_empty(self.run, source.name, source.path, result)
        if self._damaged:
            # Taken out of the precopied copy: step 3 copied them from the source.
            afresh = await in_worker(count_regular, self.target, self._damaged)
            result = msgspec.structs.replace(result, relinked=result.relinked + afresh)
        return result

    async def save(self) -> StepResult:
        """The manifest (SPEC §9), after the snapshot hooks' window; the copy's bytes.

        What step 3 left out and joined the copy after the window is in it by
        now: counted as the rest (the precopy's own copies are new, what it
        linked to the earlier backup is not).
        """
        started()
        return await write_manifest(self.run, self.source)

    async def plan(self, dry: DryRun) -> SourcePlan:
        remote = dry.transport(self.source.host)
        argv, link_dest = copy_argv(dry, self.source, remote, excludes=self.source.exclude)
        decided = "" if dry.known else "  (--link-dest decided at run time)"
        save = manifest_plan(dry, self.source.name, link_dest)
        if not precopy_due(dry.config, self.source):
            return SourcePlan(shlex.join(argv) + decided, save)
        second, _ = copy_argv(dry, self.source, remote, excludes=self.source.exclude,
                              extra=window_options(dry.in_progress_dir, self.source, link_dest))
        return SourcePlan(shlex.join(second) + decided, save, precopy=shlex.join(argv) + decided)


def _remove_file(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def manifest_plan(dry: DryRun, source: str, link_dest: str | None) -> str:
    """The dry-run's line for a manifest step (SPEC §9)."""
    line = f"write the manifest {manifest_path(dry.in_progress_dir, source)}"
    if link_dest is not None:
        return line + (f": digests of files linked to {link_dest} taken from its backup's "
                       "manifest, the others read")
    return line + ": every file read"


class RsyncKind(SourceKind[RsyncSource]):
    config = RsyncSource
    has_save = True  # the manifest
    leaves_out_own_folders = True
    init_rank = 0  # any folder, the last resort

    def work(self, run: Run, source: RsyncSource) -> RsyncWork:
        return RsyncWork(run, source)

    def check(self, source: RsyncSource) -> tuple[list[str], list[str]]:
        if source.require_mountpoint and mountpoint_problem(source.path) is not None:
            return [], [f"path: {source.path} is not on a mounted filesystem other than the "
                        "root one (require_mountpoint = true): a run fails until it is mounted"]
        return [], []

    def key_problems(self, table: Mapping[str, Any]) -> list[str]:
        if "host" in table and "require_mountpoint" in table:
            # What is mounted there is the host's to say; emptiness is still judged.
            return ["require_mountpoint: only for a local source (this one has host); "
                    "an empty copy still fails unless allow_empty = true"]
        return []

    def asks_for_metadata(self, source: RsyncSource) -> bool:
        return asks_for_metadata(source)

    def kept_by_restore(self, config: Config, source: RsyncSource) -> list[str]:
        return [*source.exclude, *left_out(config, source)]

    def init_choice(self, path: str, destination: str) -> InitChoice:
        return InitChoice(fits=True)

    def init_path(self, path: str) -> str:
        # A trailing slash says "the folder's contents", as rsync reads it.
        return path if path == "/" else path.rstrip("/") + "/"


KIND = register(RsyncKind())
