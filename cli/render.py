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
    from pibackup_async.engine.units import human_bytes

    def took(seconds: float | None) -> str:
        return "-" if seconds is None else format_duration(seconds)

    lines = [f"{report.status.upper()} {report.name}"
             + (f": {report.failure}" if report.failure else ""),
             f"  {'SOURCE':<16} {'STATUS':<9} {'TIME':>7} {'BYTES':>10} {'WAITED':>7}"]
    for name, source in report.sources.items():
        spent = [s.duration_s for s in source.steps() if s.duration_s is not None]
        lines.append(f"  {name:<16} {source.status:<9} "
                     f"{took(sum(spent) if spent else None):>7} "
                     f"{human_bytes(source.bytes):>10} {took(source.waited_s):>7}")
    lines.append(f"  snapshot window {took(report.snapshot_window_s)}")
    if report.duration_s:
        lines.append(f"  {_concurrency_bought(report, report.duration_s)}")
    if report.destination is not None:
        space = report.destination
        lines.append(f"  destination: {human_bytes(space.free_bytes)} free of "
                     f"{human_bytes(space.total_bytes)}")
    return "\n".join(lines)


def _concurrency_bought(report: Report, duration: float) -> str:
    """The sources' time against the run's, in words (SPEC §8).

    A multiplier is shown only where it means a gain: more source time than
    run time can only come from sources working side by side. Less says
    nothing about concurrency (hooks, retention or one long source took the
    rest), so it is not dressed up as a slow-down.
    """
    from pibackup_async.engine.durations import format_duration

    work = report.source_seconds_total
    said = f"source time {format_duration(work)} in a run of {format_duration(duration)}"
    if report.concurrency == 1:
        return f"{said} (sources ran one at a time: concurrency 1)"
    if len(report.sources) < 2:
        return f"{said} (one source: nothing ran side by side)"
    at_once = f"up to {report.concurrency} at once"
    if work > duration:
        return f"{said} ({work / duration:.1f}× through concurrency, {at_once})"
    return f"{said} (no gain from concurrency to show, {at_once})"
