"""Text for people: the `list` table and the end-of-run summary."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pibackup_async.engine import Listed, Report


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


def summary_table(report: Report) -> str:
    """The end-of-run summary on a terminal: sources, the snapshot window, what
    concurrency bought, the free space left (SPEC §8)."""
    from pibackup_async.engine.durations import format_duration
    from pibackup_async.engine.mail_body import human_bytes

    def took(seconds: float | None) -> str:
        return "-" if seconds is None else format_duration(seconds)

    lines = [f"{report.status.upper()} {report.name}"
             + (f": {report.failure}" if report.failure else ""),
             f"  {'SOURCE':<16} {'STATUS':<9} {'TIME':>7} {'BYTES':>10} {'WAITED':>7}"]
    for name, source in report.sources.items():
        steps = [source.snapshot] + ([source.save] if source.save is not None else [])
        spent = [s.duration_s for s in steps if s.duration_s is not None]
        lines.append(f"  {name:<16} {source.status:<9} "
                     f"{took(sum(spent) if spent else None):>7} "
                     f"{human_bytes(source.bytes):>10} {took(source.waited_s):>7}")
    lines.append(f"  snapshot window {took(report.snapshot_window_s)}")
    if report.duration_s:
        lines.append(f"  sources took {took(report.source_seconds_total)} in all, the run "
                     f"{took(report.duration_s)} at concurrency {report.concurrency} "
                     f"({report.source_seconds_total / report.duration_s:.1f}× in parallel)")
    if report.destination is not None:
        space = report.destination
        lines.append(f"  destination: {human_bytes(space.free_bytes)} free of "
                     f"{human_bytes(space.total_bytes)}")
    return "\n".join(lines)
