"""The run report (SPEC §6): msgspec structs, built as the run goes, written as JSON."""

from __future__ import annotations

import contextlib
import os
import time
from contextvars import ContextVar
from datetime import datetime
from typing import TYPE_CHECKING, Literal

import msgspec
import structlog
from msgspec import Struct

from .private_dir import make_private_dir

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

Status = Literal["ok", "failed", "cancelled", "skipped"]
RunStatus = Literal["ok", "failed", "interrupted"]
log = structlog.get_logger("pibackup")

KEEP_REPORTS = 100


def now() -> datetime:
    """The local time, aware, with sub-second precision."""
    return datetime.now().astimezone()


def stamp(moment: datetime | None = None) -> str:
    """ISO 8601 with offset, always with microseconds (isoformat drops a zero fraction)."""
    return (moment or now()).isoformat(timespec="microseconds")


class Step(Struct, kw_only=True):
    """One timed piece of work: a hook phase, or a source's snapshot or save."""

    status: Status = "skipped"
    start: str | None = None
    end: str | None = None
    duration_s: float | None = None
    exit_code: int | None = None
    stderr_tail: str = ""
    command: list[str] | None = None
    _t0: float = 0.0

    def begin(self, command: list[str] | None = None) -> None:
        self.start = stamp()
        self._t0 = time.monotonic()
        self.command = command

    def finish(self, status: Status) -> None:
        self.status = status
        if self.start is not None:
            self.end = stamp()
            self.duration_s = round(time.monotonic() - self._t0, 6)


class StepResult(Struct, frozen=True, kw_only=True):
    """What a step tells of its work: returned when it succeeds, carried by its error when not.

    Steps return it and never touch the report; ``record`` writes it into
    the report's step, with the status the caller decides.
    """

    exit_code: int | None = None
    stderr_tail: str = ""
    # What the step wrote into the backup (a source's ``bytes``).
    bytes: int = 0
    # What a manifest step read to hash (a source's ``hashed_bytes``, SPEC §9).
    hashed_bytes: int = 0
    # Files copied afresh because verify had found their copy damaged (SPEC §9).
    relinked: int = 0


# The step being recorded in this task (``recording``), told by ``started``
# when its command begins.
_running: ContextVar[Callable[[list[str] | None], None] | None] = ContextVar(
    "pibackup_running_step", default=None)


@contextlib.contextmanager
def recording(step: Step) -> Iterator[None]:
    """While ``step`` runs, ``started`` marks its start on it."""
    token = _running.set(step.begin)
    try:
        yield
    finally:
        _running.reset(token)


def started(command: list[str] | None = None) -> None:
    """The running step's command begins now.

    Told rather than returned: a step cut short (its timeout, a signal)
    returns nothing, and its report still shows when it began and what it
    ran. Outside ``recording`` (a dry-run, a test) it does nothing.
    """
    begin = _running.get()
    if begin is not None:
        begin(command)


def record(step: Step, status: Status, result: StepResult | None = None, *,
           command: list[str] | None = None) -> None:
    """Write a step's end: its result (if it told one), its status and its times.

    A step that stopped before it told ``started`` begins now (with
    ``command``, when the caller knows it): its duration is zero. Only a
    step cancelled before it started, whose command the caller does not
    know (a source's, waiting for its host), keeps no times.
    """
    if step.start is None and (status != "cancelled" or command is not None):
        step.begin(command)
    if result is not None:
        step.exit_code = result.exit_code
        step.stderr_tail = result.stderr_tail
    step.finish(status)


class HookStep(Step, kw_only=True):
    hook: str
    kind: Literal["backup", "snapshot"]
    phase: Literal["pre", "post"]


class SourceReport(Struct, kw_only=True):
    type: str
    status: Status = "skipped"
    bytes: int = 0
    # Time spent waiting for a slot of the run's concurrency limit, snapshot and save summed.
    waited_s: float = 0.0
    # The copy before the snapshot hooks' pre (SPEC §2 step 2); None when none was due.
    precopy: Step | None = None
    snapshot: Step = msgspec.field(default_factory=Step)
    save: Step | None = None
    # What the manifest step read (SPEC §9).
    hashed_bytes: int = 0
    # Files copied afresh instead of linked: verify had found their copy damaged (SPEC §9).
    relinked: int = 0

    def steps(self) -> list[Step]:
        """Its steps in the order they run: the source's duration is theirs (SPEC §6)."""
        before = [self.precopy] if self.precopy is not None else []
        return before + [self.snapshot] + ([self.save] if self.save is not None else [])


def source_status(source: SourceReport) -> Status:
    """A source's status, from its steps alone (SPEC §6).

    ``failed`` if a step failed, ``cancelled`` if one was cut short or
    never started after an earlier one ran (the run cut while it waited for
    a slot, a critical hook), ``skipped`` if none started, else ``ok``.
    """
    # A failed precopy is no failure (SPEC §2 step 3): step 3 copies the rest.
    statuses = [step.status for step in source.steps()
                if step is not source.precopy or step.status != "failed"]
    for status in ("failed", "cancelled"):
        if status in statuses:
            return status
    if statuses[0] == "skipped":
        return "skipped"
    return "ok" if all(status == "ok" for status in statuses) else "cancelled"


class DestinationSpace(Struct):
    free_bytes: int
    total_bytes: int


class RetentionResult(Struct):
    kept: dict[str, list[str]] = {}
    deleted: list[str] = []
    errors: list[str] = []
    # Why nothing dated before a clock jump was deleted (SPEC §3), or None.
    paused: str | None = None


class Delivery(Struct):
    status: Literal["sent", "failed", "skipped"] = "skipped"
    error: str | None = None


class Report(Struct, kw_only=True):
    name: str
    status: RunStatus = "ok"
    saved: bool = False
    start: str
    end: str | None = None
    duration_s: float | None = None
    concurrency: int
    failure: str | None = None
    hooks: list[HookStep] = []
    sources: dict[str, SourceReport] = {}
    snapshot_window_s: float | None = None
    source_seconds_total: float = 0.0
    destination: DestinationSpace | None = None
    retention: RetentionResult = msgspec.field(default_factory=RetentionResult)
    # What the user should fix that did not stop the run, one line each.
    warnings: list[str] = []
    delivery: Delivery = msgspec.field(default_factory=Delivery)
    # The dead man's switch's final ping (SPEC §8); skipped without a ping_url.
    monitor: Delivery = msgspec.field(default_factory=Delivery)
    # Processes that survived SIGKILL and were left behind (SPEC §2).
    abandoned: list[str] = []


CopyStatus = Literal["ok", "failed", "cancelled", "dropped"]
MIRROR_PREFIX = "mirror-"


class CopiedBackup(Struct, kw_only=True):
    """One origin backup that a ``mirror`` started to copy (SPEC §10)."""

    name: str
    # dropped: the origin deleted it while it was being copied (not a failure).
    status: CopyStatus = "cancelled"
    bytes: int = 0  # allocated on the mirror by this copy
    received_bytes: int = 0  # over the transfer, in this run
    duration_s: float = 0.0
    resumed: bool = False  # it continued an in-progress copy of an earlier run


class MirrorReport(Report, kw_only=True):
    """A ``mirror``'s report: ``mirror-<start>.json`` (SPEC §10). Its ``name`` is that file's
    name; of run's keys it keeps only those §10 names (``encode_report``)."""

    origin: str = ""
    copied: list[CopiedBackup] = []
    # The newest origin backup's time minus the newest mirrored one's (the metrics
    # file's pibackup_mirror_lag_seconds); None while the mirror holds none.
    _lag_s: float | None = None


# Of run's keys, those a mirror's report has (SPEC §10), in this order.
_MIRROR_KEYS = ("status", "start", "end", "duration_s", "failure", "origin", "hooks", "copied",
                "destination", "retention", "warnings", "delivery", "monitor", "abandoned")


def close_report(report: Report, configured: Iterable[HookStep], duration_s: float) -> None:
    """The report's last touches, once the run is over.

    ``configured``: every hook phase of the configuration, in order; those
    that never ran follow those that did, ``skipped`` (SPEC §6). Each
    source's status comes from its steps, ``source_seconds_total`` sums them.
    """
    report.duration_s = round(duration_s, 6)
    ran = {(h.hook, h.phase) for h in report.hooks}
    report.hooks += [h for h in configured if (h.hook, h.phase) not in ran]
    total = 0.0
    for record in report.sources.values():
        total += sum(step.duration_s or 0.0 for step in record.steps())
        record.status = source_status(record)
    report.source_seconds_total = round(total, 6)


_encoder = msgspec.json.Encoder()


def encode_report(report: Report) -> bytes:
    """The report as indented JSON, without the engine's private bookkeeping."""
    data = msgspec.to_builtins(report)
    _strip(data)
    if isinstance(report, MirrorReport):
        data = {key: data[key] for key in _MIRROR_KEYS}
    return msgspec.json.format(_encoder.encode(data), indent=2) + b"\n"


def _strip(data: object) -> None:
    if isinstance(data, dict):
        for key in [k for k in data if k.startswith("_")]:
            del data[key]
        for value in data.values():
            _strip(value)
    elif isinstance(data, list):
        for value in data:
            _strip(value)


def write_report(report: Report, reports_dir: str) -> str:
    """Write ``<reports_dir>/<name>.json`` atomically, mode 0600; keep the newest 100 reports.

    Raises OSError (a full disk, say); no partial file is left behind then.
    """
    make_private_dir(reports_dir)
    path = os.path.join(reports_dir, f"{report.name}.json")
    partial = path + ".partial"
    data = encode_report(report)
    # Reports hold hook command lines and output: private, whatever the umask.
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(partial, path)
    except OSError:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    _prune_reports(reports_dir, mirror=report.name.startswith(MIRROR_PREFIX))
    return path


def _prune_reports(reports_dir: str, *, mirror: bool = False) -> None:
    """Keep the newest ``KEEP_REPORTS``; what cannot be removed waits for the next report.

    ``mirror``: of the mirror's reports (``mirror-<start>.json``), kept apart from
    run's, so that neither command's history pushes out the other's (SPEC §10).

    The new report is written by now: a failure here is only logged, never
    told as a report not written.
    """
    try:
        reports = sorted(
            (e for e in os.scandir(reports_dir) if e.name.endswith(".json")
             and e.name.startswith(MIRROR_PREFIX) == mirror),
            key=lambda e: e.stat().st_mtime,
        )
    except OSError as e:
        log.warning("old reports not pruned", folder=reports_dir, error=e.strerror or str(e))
        return
    for old in reports[:-KEEP_REPORTS]:
        try:
            os.unlink(old.path)
        except FileNotFoundError:
            continue
        except OSError as e:
            log.warning("old report not removed", report=old.path, error=e.strerror or str(e))
