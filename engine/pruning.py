"""Deleting old backups by the retention rules (the I/O around the pure policy)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import structlog

from .command_stage import under_hooks
from .destination import DestinationLost, complete, newest_holding
from .retention import RetentionPlan, guarded_plan

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from .config import Config, Retention
    from .context import Interruption, RunContext
    from .destination import Destination, Entry
    from .report import Report, RetentionResult

log = structlog.get_logger("pibackup.retention")


def decide(names: list[str], rules: Retention | None, protect: str | None = None,
           holders: Mapping[str, Iterable[str]] | None = None) -> RetentionPlan:
    """What retention keeps (with its rules) and deletes among the complete backups
    ``names``, in the order ``prune`` deletes; ``protect`` is kept as the newest whatever
    the rules say. ``holders``: for each source, the backups that hold it (see
    ``guarded_plan``; none known: no ``last_of_source``). A clock jump pauses deletions
    before it. The run decides with it, and so do its dry-run's plan and ``list``."""
    plan = guarded_plan(names, rules, holders or {})
    if protect is None or protect not in plan.deleted:
        return plan
    kept = {**plan.kept, protect: ["newest"]}
    return RetentionPlan(kept=kept, deleted=[n for n in plan.deleted if n != protect],
                         paused=plan.paused)


def held_by(destination: str, entries: list[Entry], sources: Iterable[str]
            ) -> dict[str, list[str]]:
    """For each of ``sources``, the newest complete backup among ``entries`` holding it (a
    real folder of that name), if any. Reads the disk: for ``list``, which runs no loop."""
    return _named(destination, {source: newest_holding(destination, entries, source)
                                for source in sources})


async def held_by_async(dest: Destination, entries: list[Entry], sources: Iterable[str]
                        ) -> dict[str, list[str]]:
    """``held_by`` through the destination: off the event loop, each look bounded."""
    return _named(dest.path, {source: await dest.newest_holding(entries, source)
                              for source in sources})


def _named(destination: str, folders: dict[str, str | None]) -> dict[str, list[str]]:
    # newest_holding answers with <destination>/<backup>/<source>: keep the backup.
    return {source: [os.path.relpath(folder, destination).split(os.sep)[0]]
            for source, folder in folders.items() if folder is not None}


async def prune(dest: Destination, rules: Retention | None, result: RetentionResult, *,
                protect: str | None = None, sources: Iterable[str] = ()) -> None:
    """Delete the complete backups that no rule keeps, recording what happened in ``result``.

    ``protect`` (the backup just made) is never deleted whatever the rules
    say, nor is the newest backup holding each of ``sources`` (the
    configuration's), nor, while a clock jump is recent, anything dated
    before it: ``result.paused`` and the log say why. A failed deletion is
    logged and recorded; the others still go, unless the destination itself
    is lost (none of them could). A cancel takes effect before the next
    deletion (the one under way stays ``.deleting``, for the next run): what
    was deleted by then is recorded. Raises OSError if the destination
    cannot be read.
    """
    entries = complete(await dest.scan())
    holders = await held_by_async(dest, entries, sources)
    plan = decide([e.name for e in entries], rules, protect, holders)
    result.kept = {name: list(kept_by) for name, kept_by in plan.kept.items()}
    result.paused = plan.paused
    if plan.paused is not None:
        log.warning("retention paused", why=plan.paused)
    for name in plan.deleted:
        try:
            await dest.delete_backup(name)
        except OSError as e:
            message = f"could not delete backup {name}: {e}"
            log.error("retention deletion failed", backup=name, error=str(e))
            result.errors.append(message)
            if isinstance(e, DestinationLost):
                break
        else:
            log.info("old backup deleted", backup=name, folder=dest.path_of(name))
            result.deleted.append(name)


async def prune_backups(config: Config, interruption: Interruption) -> Report:
    """``prune``: retention alone, under the lock, inside the backup hooks (SPEC §5).

    Interrupted deletions of earlier runs are finished first. Hooks see an
    empty ``PIBACKUP_NAME`` and ``PIBACKUP_BACKUP_DIR``: no backup is made.
    Returns a report (not written to disk) whose status says how it went;
    raises LockHeld, StateUnusable or Interrupted as ``run_backup`` does.
    """

    async def work(ctx: RunContext) -> None:
        entries = await ctx.dest.scan()
        await ctx.dest.clean_stale([e for e in entries if e.state == "deleting"])
        await prune(ctx.dest, config.retention, ctx.report.retention,
                    sources=[source.name for source in config.sources])
        if ctx.report.retention.errors:
            ctx.fail(f"retention: {ctx.report.retention.errors[0]}")

    return await under_hooks(config, interruption, "prune", "", work)


async def discard_backup(config: Config, interruption: Interruption, name: str) -> Report:
    """``prune --discard NAME``: delete that one complete backup whatever keeps it (SPEC §3).

    The newest included: the way out of a backup dated ahead by a wrong
    clock. Under the lock, inside the backup hooks, as ``prune``; renamed
    ``.deleting`` first, as retention deletes. Fails (the report's status and
    failure) when ``name`` is not a complete backup of the destination (a
    link, a file, an in-progress or deleting folder are not). Raises as
    ``prune_backups`` does.
    """

    async def work(ctx: RunContext) -> None:
        entries = complete(await ctx.dest.scan())
        if name not in {e.name for e in entries}:
            ctx.fail_step(f"prune --discard: {name} is not a complete backup in "
                          f"{config.destination}")
        try:
            await ctx.dest.delete_backup(name)
        except OSError as e:
            ctx.fail_step(f"prune --discard: could not delete backup {name}: {e}")
        log.info("backup discarded", backup=name, folder=ctx.dest.path_of(name))
        ctx.report.retention.deleted.append(name)

    return await under_hooks(config, interruption, "prune", "", work)
