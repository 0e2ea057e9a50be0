"""One backup run: the seven steps of SPEC §2, in ``_steps``, each step a call."""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import anyio
import structlog
from structlog.contextvars import bound_contextvars

from .context import CriticalStop, Interruption, RunContext, RunOptions, StepFailed
from .destination import DestinationLost, choose_name, complete
from .errors import Interrupted, StepError
from .heartbeat import beating
from .hooks import Kind, hook_stage
from .lock import private_state
from .mail_body import render_body, should_send
from .monitor import BODY_CAP, ping, previous_success, render_metrics, replace_file
from .pruning import prune
from .remote import open_remotes
from .report import (
    Delivery,
    DestinationSpace,
    HookStep,
    Report,
    SourceReport,
    Step,
    StepResult,
    close_report,
    recording,
    source_status,
    stamp,
    write_report,
)
from .report import record as record_step
from .sources.errors import SourceError
from .sources.kind import SourceConfig, kind_of

if TYPE_CHECKING:
    from datetime import datetime

    from .config import Config, Hook
    from .destination import Destination, Entry

log = structlog.get_logger("pibackup")

# Under a signal, how long the clean-up of an unfinished backup may take
# before it is left to the next run; how long reading free space may take.
_DISCARD_BOUND_S = 30.0
_SPACE_BOUND_S = 10.0


async def run_backup(config: Config, options: RunOptions, interruption: Interruption, *,
                     destination: Destination | None = None) -> Report:
    """Make one backup as SPEC §2 describes, write its report and deliver it.

    ``destination``: where the backup goes instead of the configured folder
    (a test's fake). Returns the report (its ``status`` says how the run
    went). Raises, before any hook runs: LockHeld if another run holds the
    lock, StateUnusable if ``state_dir`` or ``lock_file`` cannot be used, and
    Interrupted if a signal arrived before the lock was taken.
    """
    name, started = await choose_name(config.destination)
    report = Report(name=name, start=stamp(started),
                    concurrency=options.jobs or config.concurrency)
    ctx = RunContext(config, options, name, interruption, report)
    if destination is not None:
        ctx.dest = destination
    for source in config.sources:
        kind = kind_of(source)
        report.sources[source.name] = SourceReport(
            type=source.kind, save=Step() if kind.has_save else None)
        ctx.source_work[source.name] = kind.work(ctx, source)
        if ctx.source_work[source.name].precopy() is not None:
            report.sources[source.name].precopy = Step()  # due: skipped until it starts
    ctx.started = started
    with (ctx.scope(), private_state(config) as warnings,  # step 0
          bound_contextvars(backup=name)):
        report.warnings = warnings
        if interruption.happened:
            raise Interrupted(interruption.signum)
        log.info("run started", destination=config.destination, concurrency=ctx.concurrency)
        t0 = time.monotonic()
        with anyio.CancelScope() as scope:
            interruption.attach(scope)
            try:
                await _ping_start(ctx)
                async with open_remotes(config) as ctx.remotes:
                    await _steps(ctx)
            except (StepFailed, CriticalStop):
                pass
            except Exception as e:
                # Outside every step (opening the remotes, a bug between
                # steps): the posts have run; the user still gets a report.
                ctx.fail_unexpected(e)
        _finish_report(ctx, time.monotonic() - t0)
        log.info("run finished", status=report.status, saved=report.saved,
                 duration_s=report.duration_s)
        await deliver(ctx)
    return report


async def deliver(ctx: RunContext) -> None:
    """Write the report, mail it, write it again with the delivery's outcome.

    The report is the last thing that may fail: built in memory, it is
    mailed even when ``state_dir`` refuses it (a full disk), and the log says
    why it was not written. From the first write on, a signal only logs; a
    second one cuts the delivery short (SPEC §2).
    """
    report = ctx.report
    written = _write_report(ctx)
    done: list[str] = []
    with anyio.CancelScope() as delivery:
        ctx.interruption.delivering(delivery)
        await _send_report(ctx)
        done.append("mail")
        await _ping_end(ctx)
        done.append("ping")
    if delivery.cancelled_caught:
        cut = Delivery(status="failed", error="cut short by a second signal")
        if "mail" not in done and _mail_due(ctx):
            report.delivery = cut
        if "ping" not in done and _ping_url(ctx) is not None:
            report.monitor = cut
    if written and (report.delivery.status, report.monitor.status) != ("skipped", "skipped"):
        _write_report(ctx, again=True)
    await anyio.to_thread.run_sync(_write_metrics, ctx)


def _write_report(ctx: RunContext, *, again: bool = False) -> bool:
    try:
        path = write_report(ctx.report, ctx.config.reports_dir)
    except OSError as e:
        carried = "; the mail carries it" if ctx.config.report is not None else ""
        log.error(f"report not written{carried}", folder=ctx.config.reports_dir,
                  error=e.strerror or str(e))
        return False
    # Said once: the second write only adds what the log already told (the
    # delivery's outcome).
    if not again:
        log.info("report written", report=path)
    return True


async def _send_report(ctx: RunContext) -> None:
    """Mail the report where ``[report]`` asks for it; the outcome goes to ``delivery``.

    The mailer bounds its own time. Imported here: aiosmtplib costs start-up time.
    """
    settings = ctx.config.report
    if settings is None or not _mail_due(ctx):
        return
    from .mail import deliver_report

    ctx.report.delivery = await deliver_report(settings, ctx.report)


def _mail_due(ctx: RunContext) -> bool:
    return should_send(ctx.config.report, ctx.report.status, ctx.options.no_report)


def _ping_url(ctx: RunContext) -> str | None:
    return None if ctx.config.monitor is None else ctx.config.monitor.ping_url


async def _ping_start(ctx: RunContext) -> None:
    """``<ping_url>/start`` once the lock is taken; a failure is only logged."""
    url = _ping_url(ctx)
    if url is not None:
        await ping(url, "/start")


async def _ping_end(ctx: RunContext) -> None:
    """``<ping_url>`` when the run is ok, ``<ping_url>/fail`` otherwise, with the mail's body."""
    url = _ping_url(ctx)
    if url is None:
        return
    body = render_body(ctx.report, host=socket.gethostname()).encode()[:BODY_CAP]
    suffix = "" if ctx.report.status == "ok" else "/fail"
    ctx.report.monitor = await ping(url, suffix, body)


def _write_metrics(ctx: RunContext) -> None:
    monitor = ctx.config.monitor
    if monitor is None or monitor.metrics_file is None:
        return
    path = monitor.metrics_file
    text = render_metrics(ctx.report, ctx.layout.destination, end_s=time.time(),
                          previous_success_s=previous_success(path),
                          backups=ctx.backups_after)
    try:
        replace_file(path, text)
    except OSError as e:
        log.error("metrics file not written", file=path, error=e.strerror or str(e))


async def _steps(ctx: RunContext) -> None:
    config = ctx.config
    async with hook_stage(ctx, "backup", config.backup_hooks):  # 1 (and 7 on the way out)
        try:
            await _open_destination(ctx)  # 1
            try:
                await _precopy_sources(ctx)  # 2, before the snapshot hooks' pre
                with _snapshot_window(ctx):
                    async with hook_stage(ctx, "snapshot", config.snapshot_hooks):  # 2 (and 4)
                        await _for_each_source(ctx, _snapshot)  # 3
                # What step 3 wrote goes to the disk while step 5 reads it back from the
                # page cache (the manifests): step 6's flush has less left to wait for.
                ctx.dest.start_writeback()
                await _after_window(ctx)
                await _for_each_source(ctx, _save)  # 5
                await _finish_backup(ctx)  # 6
            finally:
                await _discard_unfinished(ctx)
        finally:
            # The last touch of the destination, before a post unmounts it.
            await _measure_space(ctx)


# --- step 1 -----------------------------------------------------------------------


async def _open_destination(ctx: RunContext) -> None:
    """Check the destination, clean up after crashed runs, create ``<name>.in-progress``."""
    dest = ctx.dest
    t0 = time.monotonic()
    problem = await dest.problem(ctx.config.require_mountpoint)
    if problem is not None:
        ctx.fail_step(problem)
    await dest.remember()
    entries = await dest.scan()
    done = complete(entries)
    # The name's own time, not a later reading: NTP may step the clock
    # forward during a pre, and the name is what orders the backups.
    if done and done[0].time > ctx.started:
        ctx.fail_step(_clock_behind(ctx.started, done))
    layout = ctx.layout
    if not await dest.name_is_free(layout.name):
        ctx.fail_step(f"destination: the backup name {layout.name} is already taken")
    await dest.clean_stale(entries)
    ctx.previous = done
    ctx.dest_is_btrfs = await dest.is_btrfs()
    for work in ctx.source_work.values():
        await work.clean_stale()
    try:
        await dest.create(layout.in_progress)
    except OSError as e:
        ctx.fail_step(_destination_failure(e, f"cannot create {layout.in_progress_dir}"))
    ctx.in_progress_created = True
    log.info("in-progress folder created", folder=layout.in_progress_dir,
             duration_s=round(time.monotonic() - t0, 6))


def _clock_behind(started: datetime, done: list[Entry]) -> str:
    """The clock guard's line: which backups are dated after the clock, and both ways out."""
    # Either reading may be the wrong one: a Pi before NTP has synced reads
    # behind, a wrong real-time clock dated those backups ahead. Short, so that
    # the names fit in the report's failure line.
    ahead = [e.name for e in reversed(done) if e.time > started]
    one = len(ahead) == 1
    return (f"destination: the clock read {started.isoformat(timespec='seconds')} when the "
            f"run started, before {'the backup' if one else f'{len(ahead)} backups'} dated "
            f"after it: {', '.join(ahead)}; either the clock is behind (wait for NTP to "
            f"sync) or {'that backup is' if one else 'those are'} dated ahead (pibackup-async "
            f"prune --discard {ahead[0] if one else 'NAME, for each'})")


# --- the precopy, before step 2 ------------------------------------------------------


async def _precopy_sources(ctx: RunContext) -> None:
    """Copy every source that has a precopy once, while the services still run (SPEC §2).

    Concurrently, at most ``concurrency`` at once, as step 3. A precopy that
    fails or times out fails nothing: its step says so, the log says why,
    and step 3 copies what it left. A signal interrupts the run as anywhere.
    """
    due = [s for s in ctx.config.sources if ctx.report.sources[s.name].precopy is not None]
    if not due:
        return
    limiter = anyio.CapacityLimiter(ctx.concurrency)

    async def one(source: SourceConfig) -> None:
        record = ctx.report.sources[source.name]
        copy = ctx.source_work[source.name].precopy()
        assert record.precopy is not None and copy is not None
        # The host's own limit first: waiting for it must not hold a global slot.
        host_limit = ctx.remotes[source.host].limiter if source.host else _NO_LIMIT
        async with host_limit:
            waiting = time.monotonic()
            async with limiter:
                record.waited_s = round(record.waited_s + time.monotonic() - waiting, 6)
                with bound_contextvars(source=source.name):
                    await _run_precopy(source, record.precopy, copy)

    t0 = time.monotonic()
    async with anyio.create_task_group() as tg:
        for source in due:
            tg.start_soon(one, source)
    log.info("precopies finished", duration_s=round(time.monotonic() - t0, 6))


async def _attempt(kind: str, source: SourceConfig, step: Step,
                   call: Callable[[], Awaitable[StepResult]]
                   ) -> tuple[str | None, StepResult | None]:
    """Run one of a source's steps with its timeout: (None, its result), or (what went
    wrong, the result its error carried). A cancel is recorded and goes on."""
    log.info(f"{kind} started")
    result: StepResult | None = None
    try:
        with (recording(step), anyio.fail_after(source.timeout_s),
              beating(kind, source=source.name)):
            result = await call()
    except anyio.get_cancelled_exc_class():
        record_step(step, "cancelled")
        log.warning(f"{kind} cancelled", duration_s=step.duration_s)
        raise
    except TimeoutError:
        return f"timed out after {source.timeout}", None
    except SourceError as e:
        return str(e), e.result
    # An adapter's error says what failed in one line; a bare OSError is
    # tolerated in case one slips past its adapter.
    except (StepError, OSError) as e:
        return str(e), None
    except Exception as e:
        log.debug("unexpected error", exc_info=True)
        return f"unexpected error: {e!r}", None
    return None, result


async def _run_precopy(source: SourceConfig, step: Step,
                       copy: Callable[[], Awaitable[StepResult]]) -> None:
    """One precopy with the source's timeout; its end recorded, a failure only logged."""
    problem, result = await _attempt("precopy", source, step, copy)
    if problem is None:
        record_step(step, "ok", result)
        log.info("precopy finished", duration_s=step.duration_s)
        return
    record_step(step, "failed", result)
    log.warning("precopy failed; the snapshot copies what it left, in the window",
                problem=problem, duration_s=step.duration_s)


async def _after_window(ctx: RunContext) -> None:
    """Before the saves: what only the window needed goes, what it left out joins
    (after a precopy, the names step 3 found unchanged are linked from its copy)."""
    for name, work in ctx.source_work.items():
        try:
            await work.after_window()
        except OSError as e:
            ctx.fail_step(_destination_failure(
                e, f"cannot finish source {name}'s copy after the snapshot window in "
                   f"{ctx.layout.in_progress_dir}"))


# --- steps 3 and 5 ------------------------------------------------------------------

Work = Callable[[RunContext, SourceConfig], Awaitable[StepResult]]
_NO_LIMIT = contextlib.nullcontext()


async def _for_each_source(ctx: RunContext, work: Work) -> None:
    """Run ``work`` for every source, concurrently, at most ``concurrency`` at once.

    A required source's failure cancels the others (their processes are
    ended as groups) and fails the step; an optional one's only removes its
    own folder from the backup.
    """
    limiter = anyio.CapacityLimiter(ctx.concurrency)
    failed_required = False

    async def one(source: SourceConfig) -> None:
        nonlocal failed_required
        record = ctx.report.sources[source.name]
        step = record.snapshot if work is _snapshot else record.save
        if step is None or source_status(record) == "failed":
            return
        # The host's own limit first: waiting for it must not hold a global slot.
        host_limit = ctx.remotes[source.host].limiter if source.host else _NO_LIMIT
        async with host_limit:
            waiting = time.monotonic()
            async with limiter:
                # Only the run's own limit counts: what a higher concurrency would buy.
                record.waited_s = round(record.waited_s + time.monotonic() - waiting, 6)
                with bound_contextvars(source=source.name):
                    problem = await _run_step(ctx, source, step, work, record)
        if problem is None:
            return
        ctx.fail(f'source "{source.name}" {"snapshot" if work is _snapshot else "save"} '
                 f"failed: {problem}")
        if source.optional:
            await _remove_optional_folder(ctx, source.name)
        else:
            failed_required = True
            tg.cancel_scope.cancel()

    t0 = time.monotonic()
    async with anyio.create_task_group() as tg:
        for source in ctx.config.sources:
            tg.start_soon(one, source)
    log.info("snapshots finished" if work is _snapshot else "saves finished",
             duration_s=round(time.monotonic() - t0, 6), failed=failed_required)
    if failed_required:
        raise StepFailed("a source failed")


async def _remove_optional_folder(ctx: RunContext, source: str) -> None:
    """Take a failed optional source's folder out of the backup.

    The run has failed for that source already: a folder that cannot be
    removed is said, and stays; it is no reason to cancel the other sources.
    """
    try:
        await ctx.dest.remove(os.path.join(ctx.layout.in_progress, source))
    except OSError as e:
        log.warning("folder of a failed optional source not removed; it stays in the backup",
                    folder=os.path.join(ctx.layout.in_progress_dir, source), error=str(e))


async def _run_step(ctx: RunContext, source: SourceConfig, step: Step, work: Work,
                    record: SourceReport) -> str | None:
    """Run one source's step with its timeout, record its result; return what went wrong, or None.

    The kind's step returns its result (or its error carries it); only here
    does it become the report's step.
    """
    kind = "snapshot" if work is _snapshot else "save"
    problem, result = await _attempt(kind, source, step, lambda: work(ctx, source))
    if problem is None and result is not None:
        record.bytes += result.bytes
        record.hashed_bytes += result.hashed_bytes
        record.relinked += result.relinked
        record_step(step, "ok", result)
        log.info(f"{kind} finished", duration_s=step.duration_s, bytes=record.bytes)
        return None
    problem = problem or "unexpected error: no result"
    # The step ran and failed: recorded before the destination is asked
    # below, so a signal while it is asked leaves the step failed, not skipped.
    record_step(step, "failed", result)
    log.error(f"{kind} failed", problem=problem, duration_s=step.duration_s)
    # A copy that failed because the disk went away (or hangs) says so, not
    # "rsync code 23"; asking is bounded, so the posts still run.
    return await ctx.dest.gone() or problem


async def _snapshot(ctx: RunContext, source: SourceConfig) -> StepResult:
    return await ctx.source_work[source.name].snapshot()


async def _save(ctx: RunContext, source: SourceConfig) -> StepResult:
    return await ctx.source_work[source.name].save()


@contextmanager
def _snapshot_window(ctx: RunContext) -> Iterator[None]:
    t0 = time.monotonic()
    try:
        yield
    finally:
        ctx.report.snapshot_window_s = round(time.monotonic() - t0, 6)
        log.info("snapshot window closed", duration_s=ctx.report.snapshot_window_s)


# --- step 6 and the clean-up --------------------------------------------------------


async def _finish_backup(ctx: RunContext) -> None:
    """Flush, rename the in-progress folder to the backup's name, flush, apply retention."""
    layout = ctx.layout
    # A backup that has its final name is on the disk, whole (SPEC §1): what
    # was written into the in-progress folder (every save, the manifests,
    # .pibackup/SOURCES: all of it before this point) reaches the disk before
    # the rename. A flush that fails fails the run with nothing renamed; the
    # folder is then removed as after any failed save (on a disk that no
    # longer answers that fails too, within its bound, and the next run does it).
    try:
        await ctx.dest.flush()
    except OSError as e:
        ctx.fail_step(_destination_failure(
            e, f"cannot flush {layout.in_progress_dir} to the disk"))
    try:
        await ctx.dest.rename(layout.in_progress, layout.name)
    except OSError as e:
        ctx.fail_step(_destination_failure(e, f"cannot rename {layout.in_progress_dir}"))
    ctx.report.saved = True
    t0 = time.monotonic()
    log.info("backup saved", folder=layout.final_dir)
    # The rename on the disk before an old backup goes: else a power cut could
    # keep a deletion and lose the new name, and the next run would remove the
    # new backup as a crashed run's in-progress folder.
    renamed_on_disk = await _flush_rename(ctx)
    for source_name, work in ctx.source_work.items():
        # Only now, with the new copy under its final name (a parent for the next run).
        await work.finish(failed=source_status(ctx.report.sources[source_name]) == "failed")
    retention = ctx.report.retention
    if not renamed_on_disk:
        return
    await prune(ctx.dest, ctx.config.retention, retention, protect=layout.name,
                sources=[source.name for source in ctx.config.sources])
    log.info("retention applied", deleted=len(retention.deleted), kept=len(retention.kept),
             duration_s=round(time.monotonic() - t0, 6))
    if retention.errors:
        ctx.fail(f"retention: {retention.errors[0]}")  # each error was logged


async def _flush_rename(ctx: RunContext) -> bool:
    """Flush the destination after the rename; False (the run failed, said why) if that
    failed: the backup keeps its name, but retention deletes nothing this time."""
    try:
        await ctx.dest.flush()
    except OSError as e:
        message = _destination_failure(
            e, f"cannot flush {ctx.layout.final_dir} to the disk (old backups not deleted)")
        log.error(message)
        ctx.fail(message)
        return False
    return True


async def _discard_unfinished(ctx: RunContext) -> None:
    """Remove this run's snapshots and in-progress folder unless the backup was saved.

    After a critical hook's failure nothing is cleaned, as after a crash;
    the next run removes it. Under a signal the removal is shielded but
    bounded: the posts and the report must still fit in a service manager's
    stop timeout, and what is left stays ``.in-progress`` for the next run.
    """
    if ctx.report.saved or ctx.halted:
        return
    layout = ctx.layout
    bound = _DISCARD_BOUND_S if ctx.interruption.happened else math.inf
    with anyio.move_on_after(bound, shield=ctx.interruption.happened) as scope:
        for work in ctx.source_work.values():
            await work.discard()
        if ctx.in_progress_created:
            log.info("removing the unfinished backup", folder=layout.in_progress_dir)
            try:
                await ctx.dest.remove(layout.in_progress)
            except OSError as e:
                log.warning("unfinished backup not removed; the next run removes it",
                            folder=layout.in_progress_dir, error=e.strerror or str(e))
    if scope.cancelled_caught:
        log.warning("unfinished backup not removed in time; the next run removes it",
                    folder=layout.in_progress_dir, bound_s=bound)


async def _measure_space(ctx: RunContext) -> None:
    """Free and total bytes of the destination, if it is still the one step 1 found."""
    dest = ctx.dest
    with anyio.move_on_after(_SPACE_BOUND_S, shield=True), contextlib.suppress(OSError):
        if dest.identity is None or await dest.gone():
            return
        measured = await dest.space()
        if measured is not None:
            ctx.report.destination = DestinationSpace(*measured)
        ctx.backups_after = len(complete(await dest.scan()))


def _destination_failure(error: OSError, doing: str) -> str:
    """The line for an operation on the destination that failed: the destination's own
    (vanished, not answering) when that is why."""
    if isinstance(error, DestinationLost):
        return str(error)
    return f"destination: {doing}: {error.strerror or error}"


# --- the report -----------------------------------------------------------------------


def _finish_report(ctx: RunContext, duration: float) -> None:
    ctx.close()
    config = ctx.config
    stages: tuple[tuple[Kind, list[Hook]], ...] = (
        ("backup", config.backup_hooks), ("snapshot", config.snapshot_hooks))
    configured: list[HookStep] = []
    for kind, hooks in stages:
        for hook in hooks:
            if hook.pre is not None:
                configured.append(HookStep(hook=hook.name, kind=kind, phase="pre"))
            if hook.post is not None:
                configured.append(HookStep(hook=hook.name, kind=kind, phase="post"))
    close_report(ctx.report, configured, duration)
