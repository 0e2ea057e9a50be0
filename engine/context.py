"""One run, in three parts: what it knows as it goes (``RunContext``: its report, failure,
interruption, and the state it owns), the backup's layout (``Layout``) and what its hooks
are told (``HookEnvironment``).

Nothing of a run lives in a module: the registers that code deep in a step
reports to (the heartbeat's running steps, the processes left behind) are
the run's own, set for its tasks by ``RunContext.scope``, so two runs in one
process, even in one event loop, keep theirs apart.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, NoReturn

import structlog

from .destination import DestinationLost, destination_of
from .failure_text import with_hint
from .heartbeat import Register, current_register, registered
from .names import IN_PROGRESS
from .processes import abandoned_into
from .remote import Remotes
from .report import stamp

if TYPE_CHECKING:
    from collections.abc import Iterator

    import anyio

    from .config import Config
    from .destination import Destination, Entry
    from .report import Report
    from .sources.kind import SourceWork

log = structlog.get_logger("pibackup")


@dataclass(frozen=True)
class RunOptions:
    """What the command line may change about a run."""

    jobs: int | None = None
    no_report: bool = False
    command: str = "run"


class StepFailed(Exception):
    """A step failed; the reason is already recorded as the run's failure."""


class HookCutShort(StepFailed):
    """A hook's pre was ended from outside (timeout, signal, lost connection): its post runs."""


class CriticalStop(Exception):
    """A critical hook failed: stop at once, as a crash would (SPEC §2)."""


class Interruption:
    """The bridge from a signal handler to the run's cancel scopes.

    Before the report is first written, the first signal cancels the run;
    later ones are remembered but change nothing, so a second Ctrl-C cannot
    skip the post hooks. Once the report is written (``delivering``), a
    signal changes neither the report nor the exit code: the first is only
    logged and the mail goes on within its own bounds; a second one (counting
    one that interrupted the run) cuts the delivery short.
    """

    def __init__(self, command: str) -> None:
        # What the signal cancels, as its log line says: "run", "restore", "verify"…
        self.command = command
        self.signum: int | None = None
        self.count = 0
        self._scope: anyio.CancelScope | None = None
        self._delivery: anyio.CancelScope | None = None
        self._delivering = False

    def attach(self, scope: anyio.CancelScope) -> None:
        self._scope = scope
        if self.signum is not None:
            scope.cancel()

    def delivering(self, scope: anyio.CancelScope) -> None:
        """From now on signals only log, and a second one cancels ``scope`` (the delivery)."""
        self._delivering = True
        self._delivery = scope

    def trigger(self, signum: int) -> None:
        self.count += 1
        name = signal.Signals(signum).name
        if self._delivering:
            if self.count >= 2 and self._delivery is not None:
                log.warning("signal received again; cutting the report's delivery short",
                            signal=name)
                self._delivery.cancel()
            else:
                log.warning("signal received after the report was written; delivering it",
                            signal=name)
            return
        if self.signum is not None:
            log.warning("signal received again; still cleaning up", signal=name)
            return
        self.signum = signum
        log.warning(f"signal received; cancelling the {self.command}", signal=name)
        if self._scope is not None:
            self._scope.cancel()

    @property
    def happened(self) -> bool:
        return self.signum is not None


@dataclass(frozen=True)
class Layout:
    """Where the backup goes: the destination, the backup's name and its folders there.

    No name: a command that makes no backup (prune, restore, verify).
    """

    destination: str
    name: str

    @property
    def in_progress(self) -> str:
        """The in-progress folder's name in the destination."""
        return self.name + IN_PROGRESS if self.name else ""

    @property
    def final_dir(self) -> str:
        return os.path.join(self.destination, self.name) if self.name else ""

    @property
    def in_progress_dir(self) -> str:
        return os.path.join(self.destination, self.in_progress) if self.name else ""


class HookEnvironment:
    """What a hook is told: the PIBACKUP_* variables for its kind and phase (SPEC §4)."""

    def __init__(self, layout: Layout, command: str) -> None:
        self.layout = layout
        self.command = command
        # PIBACKUP_NAME and PIBACKUP_BACKUP_DIR when this is not a run making a
        # backup (restore, verify: the backup used, once known).
        self.view: tuple[str, str] | None = None

    def variables(self, kind: str, phase: str, extra: dict[str, str], *, status: str,
                  inherit: bool = True) -> dict[str, str]:
        """A hook's environment: ours (local hooks only), its ``env``, the PIBACKUP_* values.

        ``PIBACKUP_BACKUP_DIR`` is the in-progress path for a backup hook's
        pre and for the snapshot hooks (they run inside the unfinished
        backup), the final path for a backup hook's post. ``status`` is
        ``PIBACKUP_STATUS``, set for a post only.
        """
        env = dict(os.environ) if inherit else {}
        env.update(extra)
        layout = self.layout
        final = kind == "backup" and phase == "post"
        name, backup_dir = self.view or (
            layout.name, layout.final_dir if final else layout.in_progress_dir)
        env.update(
            PIBACKUP_NAME=name,
            PIBACKUP_DESTINATION=layout.destination,
            PIBACKUP_COMMAND=self.command,
            PIBACKUP_BACKUP_DIR=backup_dir,
            PIBACKUP_PHASE=phase,
        )
        if phase == "post":
            env["PIBACKUP_STATUS"] = status
        else:
            env.pop("PIBACKUP_STATUS", None)
        return env


class RunContext:
    """What one run knows as it goes, shared by the pipeline's steps; it owns its layout,
    its hooks' environment and its registers."""

    def __init__(self, config: Config, options: RunOptions, name: str,
                 interruption: Interruption, report: Report) -> None:
        self.config = config
        self.options = options
        self.interruption = interruption
        self.report = report
        self.layout = Layout(config.destination, name)
        self.hook_environment = HookEnvironment(self.layout, options.command)
        self.in_progress_created = False
        # The complete backups found at step 1, newest first (link-dest, parents).
        self.previous: list[Entry] = []
        self.dest_is_btrfs = False
        # Each source's work in this run, by source name (what it took, to save or discard).
        self.source_work: dict[str, SourceWork[Any]] = {}
        self.remotes = Remotes({})
        self.halted = False
        # Every filesystem operation on the destination goes through it; it
        # remembers the destination as step 1 found it and whether it is lost.
        self.dest: Destination = destination_of(config)
        # Complete backups in the destination after retention, when last measured.
        self.backups_after: int | None = None
        # When the run started: the time its backup name stands for.
        self.started = datetime.now().astimezone()
        # The run's steps, passed on to the register of whoever started it (the
        # command line's, which draws them), never to another run's.
        self.beats = Register(parent=current_register())
        # The run's processes that survived SIGKILL, for the report.
        self.abandoned: list[str] = []

    @contextmanager
    def scope(self) -> Iterator[None]:
        """The run's registers, for every task started in the block."""
        with registered(self.beats), abandoned_into(self.abandoned):
            yield

    # What a source's work reads of the run (sources.kind.Run).

    @property
    def name(self) -> str:
        return self.layout.name

    @property
    def destination(self) -> str:
        return self.layout.destination

    @property
    def in_progress_dir(self) -> str:
        return self.layout.in_progress_dir

    @property
    def concurrency(self) -> int:
        return self.report.concurrency

    def fail(self, message: str) -> None:
        """Record a failure; the first one is the run's ``failure``. The caller logs it.

        A failure the user can act on (a full disk) carries its hint.
        """
        if self.report.failure is None:
            self.report.failure = with_hint(message)

    def close(self) -> None:
        """Stamp the report's end and settle its status from what happened."""
        self.report.end = stamp()
        self.report.abandoned = list(self.abandoned)
        if self.interruption.happened:
            self.report.status = "interrupted"
        elif self.report.failure is not None:
            self.report.status = "failed"

    def fail_unexpected(self, error: BaseException) -> None:
        """Record an error nobody foresaw as the failure of the step it hit, in one line.

        The traceback goes to the debug log only (``-v``). A destination
        that vanished or stopped answering explains most OS errors on it:
        say that instead. What is known of it, that is: nothing here reads
        the disk, which may be the one that hangs.
        """
        log.debug("unexpected error", exc_info=error)
        lost = _lost_in(error) or self.dest.lost
        message = lost or f"unexpected error: {_one_line(error)}"
        log.error(message)
        self.fail(message)

    def fail_step(self, message: str) -> NoReturn:
        """Log and record ``message`` as a failure, and end the step (StepFailed)."""
        log.error(message)
        self.fail(message)
        raise StepFailed(message)

    @property
    def post_status(self) -> str:
        """``PIBACKUP_STATUS`` for a post hook starting now."""
        if self.interruption.happened:
            return "interrupted"
        return "failed" if self.report.failure is not None else "ok"

    def hook_env(self, kind: str, phase: str, extra: dict[str, str], *,
                 inherit: bool = True) -> dict[str, str]:
        """A hook's environment now (``HookEnvironment.variables``, with the run's status)."""
        return self.hook_environment.variables(kind, phase, extra, status=self.post_status,
                                               inherit=inherit)


def _lost_in(error: BaseException) -> str | None:
    """The line of the DestinationLost that ``error`` is or (a task group's) holds, or None."""
    if isinstance(error, DestinationLost):
        return str(error)
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            line = _lost_in(inner)
            if line is not None:
                return line
    return None


def _one_line(error: BaseException) -> str:
    # A task group wraps what its children raised: name the first of them.
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
