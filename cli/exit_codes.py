"""The command's exit codes (SPEC §5, §7), for every subcommand."""

from __future__ import annotations

import signal

EXIT_OK = 0
# The run or command failed: a step, the report's delivery, a backup that is
# not there, anything unreadable for ``verify``.
EXIT_FAILED = 1
# Bad usage or configuration (argparse's own errors exit 2 as well).
EXIT_USAGE = 2
# Another run holds the lock.
EXIT_LOCKED = 3


def exit_for_signal(signum: int | None) -> int:
    """Interrupted: 128 + the signal (129 SIGHUP, 130 SIGINT, 143 SIGTERM); SIGINT if unknown."""
    return 128 + (signum or signal.SIGINT)
