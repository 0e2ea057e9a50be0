"""Text for people: the `list` table and the `prune --dry-run` summary."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pibackup_async.engine import Listed


def listing_table(rows: list[Listed]) -> str:
    """One line a backup, newest first, with what keeps it."""
    if not rows:
        return "no backups"
    lines = [("BACKUP", "STATE", "KEPT BY")]
    for row in rows:
        if row.state != "complete":
            kept = "-"
        else:
            kept = ", ".join(row.kept_by) or "deleted at next prune"
        lines.append((row.name, row.state, kept))
    width = [max(len(line[i]) for line in lines) for i in range(2)]
    return "\n".join(f"{a:<{width[0]}}  {b:<{width[1]}}  {c}" for a, b, c in lines)
