"""Deleting old backups by the retention rules (the I/O around the pure policy)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from .command_stage import under_hooks
from .destination import DestinationLost, complete
from .retention import RetentionPlan, plan_retention

if TYPE_CHECKING:
    from .config import Config, Retention
    from .context import Interruption, RunContext
    from .destination import Destination
    from .report import Report, RetentionResult

log = structlog.get_logger("pibackup.retention")


def decide(names: list[str], rules: Retention | None, protect: str | None = None
           ) -> RetentionPlan:
    """What retention keeps (with its rules) and deletes among the complete backups
    ``names``, in the order ``prune`` deletes; ``protect`` is kept as the newest whatever
    the rules say. The run decides with it, and so does its dry-run's plan."""
    plan = plan_retention(names, rules)
    if protect is None or protect not in plan.deleted:
        return plan
    kept = {**plan.kept, protect: ["newest"]}
    return RetentionPlan(kept=kept, deleted=[n for n in plan.deleted if n != protect])


async def prune(dest: Destination, rules: Retention | None, result: RetentionResult, *,
                protect: str | None = None) -> None:
    """Delete the complete backups that no rule keeps, recording what happened in ``result``.

    ``protect`` (the backup just made) is never deleted whatever the rules
    say. A failed deletion is logged and recorded; the others still go,
    unless the destination itself is lost (none of them could). A cancel
    takes effect before the next deletion (the one under way stays
    ``.deleting``, for the next run): what was deleted by then is recorded.
    Raises OSError if the destination cannot be read.
    """
    names = [e.name for e in complete(await dest.scan())]
    plan = decide(names, rules, protect)
    result.kept = {name: list(kept_by) for name, kept_by in plan.kept.items()}
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
        await prune(ctx.dest, config.retention, ctx.report.retention)
        if ctx.report.retention.errors:
            ctx.fail(f"retention: {ctx.report.retention.errors[0]}")

    return await under_hooks(config, interruption, "prune", "", work)
