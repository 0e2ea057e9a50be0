"""Deleting old backups by the retention rules (the I/O around the pure policy)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import structlog

from .destination import complete, delete_backup, scan
from .retention import plan_retention

if TYPE_CHECKING:
    from .config import Config
    from .report import RetentionResult

log = structlog.get_logger("pibackup.retention")


async def prune(config: Config, result: RetentionResult, *, protect: str | None = None) -> None:
    """Delete the complete backups that no rule keeps, recording what happened in ``result``.

    ``protect`` (the backup just made) is never deleted whatever the rules
    say. A failed deletion is logged and recorded; the others still go.
    """
    names = [e.name for e in complete(scan(config.destination))]
    plan = plan_retention(names, config.retention)
    result.kept = {name: list(rules) for name, rules in plan.kept.items()}
    for name in plan.deleted:
        if name == protect:
            result.kept[name] = ["newest"]
            continue
        try:
            await delete_backup(config.destination, name)
        except OSError as e:
            message = f"could not delete backup {name}: {e}"
            log.error("retention deletion failed", backup=name, error=str(e))
            result.errors.append(message)
        else:
            log.info("old backup deleted", backup=name,
                     folder=os.path.join(config.destination, name))
            result.deleted.append(name)
