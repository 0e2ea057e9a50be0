"""The mail's text (SPEC §6): subject and a body a person reads on a phone. Pure.

The same report and host always give the same text, so a golden file can pin
what a person reads.
"""

from __future__ import annotations

import re
import shlex
from datetime import datetime
from typing import TYPE_CHECKING

from .durations import format_duration
from .failure_text import root_cause, telling_line, without_hint
from .processes import describe_exit
from .report import MirrorReport
from .units import human_bytes

if TYPE_CHECKING:
    from .config import ReportSettings
    from .report import Report, Step

# What the body shows of a failure: enough to act on, short enough for a phone.
TAIL_LINES = 10
LINE_CAP = 160
COMMAND_CAP = 300
SUBJECT_FAILURE_CAP = 70
_CUT_MARK = re.compile(r"^\[(\d+) earlier lines cut\]$")


def should_send(settings: ReportSettings | None, status: str, no_report: bool) -> bool:
    """Whether this run's report is mailed: ``[report]`` present, ``when`` allows it.

    ``when = "failure"`` covers every run that is not ok, interrupted ones
    included; ``--no-report`` (``no_report``) suppresses the mail only.
    """
    if settings is None or no_report or settings.when == "never":
        return False
    return settings.when == "always" or status != "ok"


# --- rendering ----------------------------------------------------------------------------


def render_subject(report: Report, *, host: str) -> str:
    """``[pibackup] OK <host>: 4 sources, 3m12s (<name>)``, ``FAILED <host>: <failure> (…)``, …

    What happened comes first, so a phone's one line shows it; the backup's
    name last. ``host`` is shortened to the machine's short name, so that
    several machines can share one mailbox.
    """
    who = f"{short_host(host)}:"
    if isinstance(report, MirrorReport):
        return _mirror_subject(report, who)
    if report.status == "ok":
        count = len(report.sources)
        what = f"{count} source{'' if count == 1 else 's'}, {_duration(report.duration_s)}"
        return f"[pibackup] OK {who} {what} ({report.name})"
    if report.status == "interrupted":
        saved = "backup saved" if report.saved else "no backup saved"
        return (f"[pibackup] INTERRUPTED {who} after {_duration(report.duration_s)}, "
                f"{saved} ({report.name})")
    return f"[pibackup] FAILED {who} {_subject_failure(report)} ({report.name})"


def _mirror_subject(report: MirrorReport, who: str) -> str:
    """``[pibackup] OK <host>: mirrored 3 backups of <origin> (<newest name>)``, ``FAILED
    <host>: <cause> (mirror of <origin>)``, ``INTERRUPTED …`` alike (SPEC §10)."""
    if report.status == "ok":
        copied = [c.name for c in report.copied if c.status == "ok"]
        count = f"{len(copied)} backup{'' if len(copied) == 1 else 's'}"
        # Copied oldest first: the last is the newest (a name's order is not its time's
        # across a change of UTC offset).
        newest = f" ({copied[-1]})" if copied else ""
        return f"[pibackup] OK {who} mirrored {count} of {report.origin}{newest}"
    if report.status == "interrupted":
        cause = f"after {_duration(report.duration_s)}"
        return f"[pibackup] INTERRUPTED {who} {cause} (mirror of {report.origin})"
    return f"[pibackup] FAILED {who} {_subject_failure(report)} (mirror of {report.origin})"


def _subject_failure(report: Report) -> str:
    """The first failure in a few words, cut at a word to fit a phone's one line."""
    failure = gist(report.failure or "failed")
    if len(failure) > SUBJECT_FAILURE_CAP:
        failure = failure[:SUBJECT_FAILURE_CAP].rsplit(" ", 1)[0].rstrip(" ,;:") + "…"
    return failure


def _copied(report: MirrorReport) -> list[str]:
    """A mirror's table: each backup it started to copy, oldest first (SPEC §10)."""
    lines = [f"Copied from {report.origin}"]
    for c in report.copied:
        resumed = ", resumed" if c.resumed else ""
        lines.append(f"  {c.status:<9} {_duration(c.duration_s):>6} "
                     f"{human_bytes(c.bytes):>10}  {c.name}{resumed}")
    if not report.copied:
        lines.append("  nothing to copy: the mirror holds every backup it keeps")
    return lines


def short_host(host: str) -> str:
    """``pi`` of ``pi.home.arpa``."""
    return host.split(".", 1)[0] or host


def gist(failure: str) -> str:
    """The first failure in a few words, for the subject.

    The failure's first line without its hint; when that is too long for a
    subject and names a root cause, who failed and that cause (``source
    "data" snapshot failed: No space left on device``), rather than a cut
    that loses it.
    """
    text = without_hint(_first_line(failure))
    who, sep, what = text.partition(" failed: ")
    if not sep or len(text) <= SUBJECT_FAILURE_CAP:
        return text
    cause = root_cause(what)
    if cause is not None:
        return f"{who}{sep}{cause}"
    return text


def render_body(report: Report, *, host: str) -> str:
    """The plain-text body, laid out for a phone screen; deterministic for a given report."""
    sections = [
        _headline(report),
        _facts(report, host),
        _hook_table(report),
        _source_table(report) if not isinstance(report, MirrorReport) else _copied(report),
        _relinked(report),
        _failures(report),
        _abandoned(report),
        _warnings(report),
        _timing(report),
        _retention(report),
        _space(report),
        ["The JSON report is attached."],
    ]
    return "\n\n".join("\n".join(s) for s in sections if s) + "\n"


def _headline(report: Report) -> list[str]:
    saved = "the backup was saved" if report.saved else "no backup was saved"
    if isinstance(report, MirrorReport):
        done = sum(1 for c in report.copied if c.status == "ok")
        saved = f"{done} backup{'' if done == 1 else 's'} copied"
    lines = [f"{report.status.upper()} — {saved}"]
    if report.failure is not None:
        lines.append(report.failure)
    if _space_is_short(report):
        lines.append("Warning: the destination is running out of space (see below).")
    return lines


def _facts(report: Report, host: str) -> list[str]:
    return [
        f"Backup    {report.name}",
        f"Host      {host}",
        f"Started   {_clock(report.start)}",
        f"Ended     {_clock(report.end)}",
        f"Duration  {_duration(report.duration_s)}",
    ]


def _hook_table(report: Report) -> list[str]:
    if not report.hooks:
        return []
    lines = ["Hooks, in the order they ran"]
    for h in report.hooks:
        lines.append(f"  {h.status:<9} {_duration(h.duration_s):>6}  {h.phase:<4}  {h.hook}")
    return lines


def _source_table(report: Report) -> list[str]:
    lines = ["Sources"]
    for name, s in report.sources.items():
        spent = [st.duration_s for st in s.steps() if st.duration_s is not None]
        took = _duration(sum(spent)) if spent else "-"
        lines.append(f"  {s.status:<9} {took:>6} {human_bytes(s.bytes):>10}  {name}")
    lines.append(f"  {'written':<16} {human_bytes(_written(report)):>10}")
    return lines


def _relinked(report: Report) -> list[str]:
    """Damage not spread (SPEC §9): what the run copied afresh instead of linking."""
    lines = []
    for name, s in report.sources.items():
        if s.relinked == 1:
            lines.append(f"{name}: 1 file copied afresh: verify found its copy damaged")
        elif s.relinked > 1:
            lines.append(f"{name}: {s.relinked} files copied afresh: verify found their "
                         "copies damaged")
    return lines


def _abandoned(report: Report) -> list[str]:
    if not report.abandoned:
        return []
    return ["Left behind (did not die after SIGKILL; a dying disk?)",
            *(f"  {line}" for line in report.abandoned)]


def _warnings(report: Report) -> list[str]:
    if not report.warnings:
        return []
    return ["Warnings (the run went on; fix them)", *(f"  {line}" for line in report.warnings)]


def _failures(report: Report) -> list[str]:
    failed: list[tuple[str, Step]] = [
        (f'hook "{h.hook}" {h.phase}', h) for h in report.hooks if h.status == "failed"]
    for name, s in report.sources.items():
        # A failed precopy is not the run's failure (SPEC §2 step 3), but its cause is shown.
        for kind, step in (("precopy (the window copied the rest)", s.precopy),
                           ("snapshot", s.snapshot), ("save", s.save)):
            if step is not None and step.status == "failed":
                failed.append((f'source "{name}" {kind}', step))
    if not failed:
        return []
    lines = ["Failures"]
    for what, step in failed:
        how = "failed" if step.exit_code is None else describe_exit(step.exit_code)
        lines.append(f"  {what}: {how}")
        if step.command:
            lines.append(f"    $ {_cap(shlex.join(step.command), COMMAND_CAP)}")
        tail = _tail(step.stderr_tail)
        lines += [f"    | {line}" for line in tail] if tail else ["    (no output)"]
    return lines


def _tail(text: str) -> list[str]:
    """The last TAIL_LINES lines, each capped, with a mark where earlier ones were cut.

    The most telling line stays in view even when it came earlier (an
    ENOSPC followed by many lines of fallout): it then takes the place of
    the oldest line kept.
    """
    lines = text.splitlines()
    dropped = 0
    if lines and (mark := _CUT_MARK.match(lines[0])):
        dropped, lines = int(mark.group(1)), lines[1:]
    while lines and not lines[-1].strip():
        lines.pop()
    kept = lines[-TAIL_LINES:]
    dropped += len(lines) - len(kept)
    telling = telling_line(lines)
    if telling is not None and len(kept) > 1 and telling not in (ln.strip() for ln in kept):
        kept = [telling, *kept[1:]]  # as many lines shown, as many cut
    head = [f"[{dropped} earlier lines cut]"] if dropped else []
    return head + [_cap(line, LINE_CAP) for line in kept]


def _timing(report: Report) -> list[str]:
    window = report.snapshot_window_s
    lines = ["Timing", f"  snapshot window  {_duration(window)}"]
    work = report.source_seconds_total
    wall = _source_wall_seconds(report)
    if wall is not None and wall > 0:
        lines.append(f"  source work      {format_duration(work)} in {format_duration(wall)}, "
                     f"concurrency {report.concurrency}")
    else:
        lines.append(f"  source work      {format_duration(work)}, "
                     f"concurrency {report.concurrency}")
    return lines


def _source_wall_seconds(report: Report) -> float | None:
    """How long the snapshot and save phases took on the clock (the sum of both spans)."""
    total, seen = 0.0, False
    for phase in ("snapshot", "save"):
        starts, ends = [], []
        for s in report.sources.values():
            step = s.snapshot if phase == "snapshot" else s.save
            if step is not None and step.start is not None and step.end is not None:
                starts.append(datetime.fromisoformat(step.start))
                ends.append(datetime.fromisoformat(step.end))
        if starts:
            seen = True
            total += (max(ends) - min(starts)).total_seconds()
    return total if seen else None


def _retention(report: Report) -> list[str]:
    r = report.retention
    if not r.kept and not r.deleted and not r.errors:
        why = "" if report.saved else " (no backup was saved)"
        return [f"Retention: not applied{why}"]
    lines = [f"Retention: kept {len(r.kept)}, deleted {len(r.deleted)}"]
    lines += [f"  deleted  {name}" for name in sorted(r.deleted, reverse=True)]
    lines += [f"  kept     {name}  {', '.join(r.kept[name])}"
              for name in sorted(r.kept, reverse=True)]
    lines += [f"  error    {error}" for error in r.errors]
    if r.paused is not None:
        lines.append(f"  paused   {r.paused}")
    return lines


def _written(report: Report) -> int:
    return sum(s.bytes for s in report.sources.values())


def _space_is_short(report: Report) -> bool:
    d = report.destination
    return d is not None and d.free_bytes < _written(report)


def _space(report: Report) -> list[str]:
    d = report.destination
    if d is None:
        return ["Destination: not visible after the run; free space unknown"]
    share = f" ({d.free_bytes * 100 // d.total_bytes}% free)" if d.total_bytes else ""
    lines = [f"Destination: {human_bytes(d.free_bytes)} free of "
             f"{human_bytes(d.total_bytes)}{share}"]
    if _space_is_short(report):
        lines += [
            f"WARNING: less free space than this backup wrote ({human_bytes(_written(report))}).",
            "The next run may not fit, and a full disk fails every run until someone acts.",
        ]
    return lines


def _duration(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(seconds)


def _clock(iso: str | None) -> str:
    if iso is None:
        return "-"
    return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S %z")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + " [cut]"


# --- the message ---------------------------------------------------------------------------
