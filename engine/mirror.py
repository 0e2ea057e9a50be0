"""``mirror``: keep this destination in step with another one, the origin (SPEC §10).

The steps, as ``run``'s: the lock, the backup hooks around the work, the
destination checked (``require_mountpoint``, never created), what crashed
runs left cleaned (an in-progress copy of a backup the origin still has is
kept, to be continued), then every origin backup the mirror lacks and its
retention would keep, oldest first, each copied by ``mirror_copy`` into
``<name>.in-progress``, flushed and renamed; then retention; then the report,
the mail, the ping and the metrics file, as ``run`` delivers them.

Nothing here writes to the origin: it is only read, by rsync (and by
``btrfs send`` for received subvolumes).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import anyio
import structlog
from structlog.contextvars import bound_contextvars

from .context import CriticalStop, RunContext, RunOptions, StepFailed
from .destination import DestinationLost, complete
from .errors import Interrupted
from .heartbeat import beating
from .hooks import hook_stage
from .lock import private_state
from .mirror_btrfs import KIND as _SUBVOLUMES  # noqa: F401  (registers the btrfs folder kind)
from .mirror_copy import (
    BackupCopy,
    CopyFailed,
    CopyMismatch,
    claimed,
    copy_backup,
    damaged_paths,
    rsync_command,
    written,
)
from .mirror_origin import OriginUnreadable
from .mirror_ssh import origin_of
from .monitor import ping
from .names import format_name
from .pipeline import deliver
from .pruning import decide, prune
from .remote import open_remotes
from .report import (
    MIRROR_PREFIX,
    CopiedBackup,
    DestinationSpace,
    HookStep,
    MirrorReport,
    close_report,
    now,
)
from .threads import in_worker

if TYPE_CHECKING:
    from .config import Config
    from .context import Interruption
    from .destination import Destination, Entry
    from .mirror_origin import Origin

log = structlog.get_logger("pibackup.mirror")

_DISCARD_BOUND_S = 30.0
_SPACE_BOUND_S = 10.0


async def run_mirror(config: Config, interruption: Interruption, *, no_report: bool = False,
                     origin: Origin | None = None) -> MirrorReport:
    """Copy what the mirror lacks of the origin (SPEC §10), then apply retention; write the
    report and deliver it.

    ``origin``: read that instead of the configured one (a test's). Returns
    the report (its ``status`` says how it went). Raises, before any hook
    runs: LockHeld, StateUnusable, or Interrupted, as ``run_backup`` does.
    """
    started = now()
    the_origin = origin or origin_of(config)
    report = MirrorReport(name=MIRROR_PREFIX + format_name(started), start=started.isoformat(
        timespec="microseconds"), concurrency=1, origin=the_origin.label)
    ctx = RunContext(config, RunOptions(no_report=no_report, command="mirror"), "",
                     interruption, report)
    # No backup is made: the hooks' PIBACKUP_NAME and PIBACKUP_BACKUP_DIR are empty.
    ctx.hook_environment.view = ("", "")
    with ctx.scope(), private_state(config) as warnings:
        report.warnings = warnings
        if interruption.happened:
            raise Interrupted(interruption.signum)
        log.info("mirror started", origin=the_origin.label, destination=config.destination)
        t0 = time.monotonic()
        with anyio.CancelScope() as scope:
            interruption.attach(scope)
            try:
                if config.monitor is not None and config.monitor.ping_url is not None:
                    await ping(config.monitor.ping_url, "/start")
                hook_hosts = {hook.host for hook in config.backup_hooks if hook.host}
                async with (open_remotes(config, hook_hosts) as ctx.remotes,
                            hook_stage(ctx, "backup", config.backup_hooks)):
                    try:
                        await _mirror(ctx, the_origin)
                    finally:
                        await _measure(ctx, the_origin)
            except (StepFailed, CriticalStop):
                pass
            except Exception as e:
                ctx.fail_unexpected(e)
            finally:
                with anyio.CancelScope(shield=True):
                    await the_origin.close()
        ctx.close()
        close_report(report, _configured_hooks(config), time.monotonic() - t0)
        log.info("mirror finished", status=report.status, copied=len(report.copied),
                 duration_s=report.duration_s)
        await deliver(ctx)
    return report


def _configured_hooks(config: Config) -> list[HookStep]:
    """Every backup hook's phases, in order (those that never ran are listed ``skipped``)."""
    configured = []
    for hook in config.backup_hooks:
        if hook.pre is not None:
            configured.append(HookStep(hook=hook.name, kind="backup", phase="pre"))
        if hook.post is not None:
            configured.append(HookStep(hook=hook.name, kind="backup", phase="post"))
    return configured


# --- the work ----------------------------------------------------------------------------


async def _mirror(ctx: RunContext, origin: Origin) -> None:
    dest = ctx.dest
    problem = await dest.problem(ctx.config.require_mountpoint)
    if problem is not None:
        ctx.fail_step(problem)
    await dest.remember()
    try:
        await origin.open()
        theirs = await origin.backups()
    except OriginUnreadable as e:
        ctx.fail_step(str(e))
    entries = await dest.scan()
    wanted = to_copy(ctx.config, complete(entries), theirs)
    await _clean(dest, entries, {e.name for e in theirs})
    ctx.dest_is_btrfs = await dest.is_btrfs()
    log.info("origin read", backups=len(theirs), to_copy=len(wanted))
    good = _newest_before(complete(entries), None)
    for entry in wanted:
        previous = _newest_before(complete(await dest.scan()), entry)
        copied = await _copy_one(ctx, origin, entry, previous or good)
        if copied.status == "ok":
            good = entry.name
        if ctx.interruption.happened:
            break
    any_copied = any(c.status == "ok" for c in _report(ctx).copied)
    if any_copied:
        # The renames, before retention deletes anything (SPEC §1) and before the
        # report calls them copied.
        await dest.flush()
    if ctx.report.failure is None or any_copied or not wanted:
        await _retention(ctx)


def to_copy(config: Config, mine: list[Entry], theirs: list[Entry]) -> list[Entry]:
    """The origin backups the mirror lacks and its retention would keep, oldest first.

    "Would keep" is decided over both sides' complete backups together, so
    nothing is copied only to be deleted (SPEC §10). No holders for
    ``last_of_source``: a mirror's sources are the folders of its newest
    backup, which after the copies is the newest of both sides and holds them
    all, so that rule keeps nothing that ``newest`` does not (asking the
    origin for every backup's folders would change no answer).
    """
    have = {e.name for e in mine}
    names = sorted(have | {e.name for e in theirs})
    plan = decide(names, config.retention)
    lacking = [e for e in theirs if e.name not in have and e.name in plan.kept]
    return sorted(lacking, key=lambda e: (e.time, e.name))


def _newest_before(mine: list[Entry], entry: Entry | None) -> str | None:
    """The mirror's newest complete backup older than ``entry`` (any, for None)."""
    for e in mine:  # newest first
        if entry is None or (e.time, e.name) < (entry.time, entry.name):
            return e.name
    return None


async def _clean(dest: Destination, entries: list[Entry], theirs: set[str]) -> None:
    """Finish interrupted deletions; remove in-progress copies of backups the origin no
    longer has (an in-progress copy of one it has is continued, SPEC §10)."""
    doomed = [e for e in entries if e.state == "deleting" or e.link
              or (e.state == "in-progress" and e.name not in theirs)]
    for e in doomed:
        if e.state == "in-progress" and not e.link:
            log.info("removing the in-progress copy of a backup the origin no longer has",
                     folder=dest.path_of(e.folder))
    await dest.clean_stale(doomed)


async def _copy_one(ctx: RunContext, origin: Origin, entry: Entry, previous: str | None
                    ) -> CopiedBackup:
    dest = ctx.dest
    name = entry.name
    record = CopiedBackup(name=name)
    _report(ctx).copied.append(record)
    settings = ctx.config.origin
    timeout = settings.timeout_s if settings is not None else float("inf")
    t0 = time.monotonic()
    copy: BackupCopy | None = None
    with bound_contextvars(backup=name):
        try:
            with beating("copy", backup=name):
                if not await origin.holds(name):
                    record.status = "dropped"
                    log.info("backup dropped: the origin deleted it before it was copied")
                    return record
                folders = await origin.folders(name)
                copy = BackupCopy(ctx.config, origin, dest, name, previous, folders,
                                  ctx.dest_is_btrfs,
                                  never_link=await in_worker(damaged_paths, ctx.config, previous))
                record.resumed = copy.resumed = not await dest.name_is_free(name)
                if record.resumed:
                    log.info("continuing an interrupted copy", folder=copy.in_progress_dir)
                else:
                    await dest.create(copy.in_progress)
                log.info("copy started", previous=previous)
                with anyio.fail_after(timeout):
                    await copy_backup(copy)
                record.bytes = await written(copy)
                await dest.flush()
                await dest.rename(copy.in_progress, name)
                # The rename is flushed once, after the last copy (_mirror): the next
                # copy's flush takes it along, and nothing is deleted before then.
            record.status = "ok"
            log.info("backup copied", folder=dest.path_of(name), bytes=record.bytes,
                     received_bytes=copy.received_bytes)
        except anyio.get_cancelled_exc_class():
            record.status = "cancelled"
            log.warning("copy cut short; its in-progress folder is kept for the next mirror")
            raise
        except TimeoutError:
            record.status = "failed"
            _failed(ctx, f"copy of {name} timed out after {settings and settings.timeout}; "
                    "the next mirror continues it")
        except CopyMismatch as e:
            record.status = "failed"
            _failed(ctx, f"copy of {name}: {e}")
            await _remove(ctx, name)
        except (CopyFailed, OriginUnreadable, FileNotFoundError) as e:
            if not await _still_there(origin, name):
                record.status = "dropped"
                log.info("backup dropped: the origin deleted it while it was copied")
                await _remove(ctx, name)
            else:
                record.status = "failed"
                _failed(ctx, f"copy of {name}: {e}")
        except OSError as e:
            if isinstance(e, DestinationLost):
                raise
            record.status = "failed"
            _failed(ctx, f"copy of {name}: destination: {e.strerror or e}")
        finally:
            record.duration_s = round(time.monotonic() - t0, 6)
            if copy is not None:
                record.received_bytes = copy.received_bytes
    return record


async def _still_there(origin: Origin, name: str) -> bool:
    try:
        return await origin.holds(name)
    except OSError:
        return True  # cannot tell: a failure, not a drop


def _report(ctx: RunContext) -> MirrorReport:
    report = ctx.report
    assert isinstance(report, MirrorReport)
    return report


def _failed(ctx: RunContext, message: str) -> None:
    log.error(message)
    ctx.fail(message)


async def _remove(ctx: RunContext, name: str) -> None:
    folder = name + ".in-progress"
    with anyio.move_on_after(_DISCARD_BOUND_S, shield=True):
        try:
            await ctx.dest.remove(folder)
        except OSError as e:
            log.warning("failed copy not removed; the next mirror removes it",
                        folder=ctx.dest.path_of(folder), error=e.strerror or str(e))


async def _retention(ctx: RunContext) -> None:
    """The mirror's own ``[retention]`` (SPEC §10); ``last_of_source`` reads the folders of
    the mirror's newest backup."""
    dest = ctx.dest
    mine = complete(await dest.scan())
    if not mine:
        return
    folders = await in_worker(_folders_of, dest.path_of(mine[0].name))
    result = ctx.report.retention
    await prune(dest, ctx.config.retention, result, sources=folders)
    log.info("retention applied", deleted=len(result.deleted), kept=len(result.kept))
    if result.errors:
        ctx.fail(f"retention: {result.errors[0]}")


def _folders_of(backup_dir: str) -> list[str]:
    from .checksums import MANIFEST_DIR

    with os.scandir(backup_dir) as entries:
        return sorted(e.name for e in entries
                      if e.is_dir(follow_symlinks=False) and e.name != MANIFEST_DIR)


async def _measure(ctx: RunContext, origin: Origin) -> None:
    """Free space, backups after retention, and the lag behind the origin (metrics)."""
    dest = ctx.dest
    report = _report(ctx)
    with anyio.move_on_after(_SPACE_BOUND_S, shield=True):
        try:
            if dest.identity is None or await dest.gone():
                return
            measured = await dest.space()
            if measured is not None:
                report.destination = DestinationSpace(*measured)
            mine = complete(await dest.scan())
            ctx.backups_after = len(mine)
            theirs = await origin.backups()
        except OSError:
            return
        if mine and theirs:
            report._lag_s = max(0.0, (theirs[0].time - mine[0].time).total_seconds())


# --- the dry-run ---------------------------------------------------------------------------


async def plan_mirror(config: Config, origin: Origin | None = None) -> list[str]:
    """What ``mirror`` would copy and delete, in order, with the exact commands; changes
    nothing (no lock, no hook). Lines for stdout."""
    the_origin = origin or origin_of(config)
    from .destination import LocalDestination

    dest = LocalDestination(config.destination)
    lines = [f"mirror of {the_origin.label} into {config.destination}"]
    problem = await dest.problem(config.require_mountpoint)
    try:
        await the_origin.open()
        theirs = await the_origin.backups()
    except OriginUnreadable as e:
        return [*lines, f"the origin cannot be read now: {e}", "dry run: nothing was changed"]
    finally:
        await the_origin.close()
    mine: list[Entry] = []
    if problem is not None:
        lines.append(f"the destination is not visible now ({problem}); what it lacks is "
                     "decided at run time")
    else:
        mine = complete(await dest.scan())
    wanted = to_copy(config, mine, theirs)
    good = _newest_before(mine, None)
    for entry in wanted:
        previous = _newest_before(mine, entry) or good
        copy = BackupCopy(config, the_origin, dest, entry.name, previous,
                          await the_origin.folders(entry.name),
                          problem is None and await dest.is_btrfs())
        link = [f"--link-dest={copy.previous_dir}"] if copy.previous_dir else []
        lines.append(f"would copy {entry.name}"
                     + (f" (linked against {previous})" if previous else ""))
        lines.append("  " + " ".join(rsync_command(copy, [*link, "--delete"])))
        for kind, folders in claimed(copy):
            lines += kind.plan(copy, folders)
        good = entry.name
    after = sorted({e.name for e in mine} | {e.name for e in wanted})
    plan = decide(after, config.retention)
    for name in plan.deleted:
        lines.append(f"would delete {os.path.join(config.destination, name)}")
    lines.append(f"dry run: {len(wanted)} backups would be copied, {len(plan.deleted)} "
                 "deleted; nothing was changed")
    return lines

