"""What one run knows about itself while it goes: names, paths, report, failure, interruption."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

import structlog

from .names import IN_PROGRESS
from .remote import Remotes
from .report import stamp

if TYPE_CHECKING:
    import anyio

    from .config import Config
    from .destination import Entry
    from .report import Report

log = structlog.get_logger("pibackup")


@dataclass(frozen=True)
class RunOptions:
    """What the command line may change about a run."""

    jobs: int | None = None
    no_report: bool = False


class StepFailed(Exception):
    """A step failed; the reason is already recorded as the run's failure."""


class CriticalStop(Exception):
    """A critical hook failed: stop at once, as a crash would (SPEC §2)."""


class Interruption:
    """The bridge from a signal handler to the run's cancel scope.

    Only the first signal cancels; later ones are remembered but change
    nothing, so a second Ctrl-C cannot skip the post hooks.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._scope: anyio.CancelScope | None = None

    def attach(self, scope: anyio.CancelScope) -> None:
        self._scope = scope
        if self.signum is not None:
            scope.cancel()

    def trigger(self, signum: int) -> None:
        if self.signum is not None:
            log.warning("signal received again; still cleaning up",
                        signal=signal.Signals(signum).name)
            return
        self.signum = signum
        log.warning("signal received; cancelling the run", signal=signal.Signals(signum).name)
        if self._scope is not None:
            self._scope.cancel()

    @property
    def happened(self) -> bool:
        return self.signum is not None


class RunContext:
    """The state of one run, shared by the pipeline's steps."""

    def __init__(self, config: Config, options: RunOptions, name: str,
                 interruption: Interruption, report: Report) -> None:
        self.config = config
        self.options = options
        self.name = name
        self.interruption = interruption
        self.report = report
        self.destination = config.destination
        # No name: a prune, which makes no backup and has no backup folder.
        self.final_dir = os.path.join(config.destination, name) if name else ""
        self.in_progress_dir = self.final_dir + IN_PROGRESS if name else ""
        self.in_progress_created = False
        # The complete backups found at step 1, newest first (link-dest, parents).
        self.previous: list[Entry] = []
        self.dest_is_btrfs = False
        # Local btrfs snapshots taken by this run: source name -> path.
        self.snapshots: dict[str, str] = {}
        self.remotes = Remotes({})
        self.halted = False

    @property
    def concurrency(self) -> int:
        return self.report.concurrency

    @property
    def backup_dir(self) -> str:
        """``PIBACKUP_BACKUP_DIR``: the in-progress path while it exists, then the final one."""
        if self.report.saved:
            return self.final_dir
        return self.in_progress_dir

    def fail(self, message: str) -> None:
        """Record a failure; the first one is the run's ``failure``. The caller logs it."""
        if self.report.failure is None:
            self.report.failure = message

    def close(self) -> None:
        """Stamp the report's end and settle its status from what happened."""
        self.report.end = stamp()
        if self.interruption.happened:
            self.report.status = "interrupted"
        elif self.report.failure is not None:
            self.report.status = "failed"

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

    def hook_env(self, phase: str, extra: dict[str, str], *,
                 inherit: bool = True) -> dict[str, str]:
        """A hook's environment: ours (local hooks only), its ``env``, the PIBACKUP_* values."""
        env = dict(os.environ) if inherit else {}
        env.update(extra)
        env.update(
            PIBACKUP_NAME=self.name,
            PIBACKUP_DESTINATION=self.destination,
            PIBACKUP_BACKUP_DIR=self.final_dir if phase == "post" else self.backup_dir,
            PIBACKUP_PHASE=phase,
        )
        if phase == "post":
            env["PIBACKUP_STATUS"] = self.post_status
        else:
            env.pop("PIBACKUP_STATUS", None)
        return env
