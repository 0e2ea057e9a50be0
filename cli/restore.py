"""``restore``: copy a backup, or a file or folder of it, back (SPEC §7)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import anyio
from pibackup_async.engine import DestinationUnavailable
from pibackup_async.engine.lookup import NotHeld, UsageProblem
from pibackup_async.engine.restore import PlanFailed, parse_request, plan_restore, restore

from .exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from .progress import wanted
from .running import under_signals

if TYPE_CHECKING:
    import argparse

    from pibackup_async.engine import Config


def restore_command(args: argparse.Namespace, config: Config) -> int:
    try:
        request = parse_request(config, args.backup, args.item, args.to, delete=args.delete)
    except UsageProblem as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if not args.dry_run:
        # A link on the way to PATH is found only on the disk, under the lock:
        # still bad usage (exit 2), whatever else the outcome.
        refused: list[str] = []
        code = under_signals("restore",
                             lambda interruption: restore(config, request, interruption,
                                                          refused),
                             progress="restore" if wanted(args) else None)
        return EXIT_USAGE if refused and code == EXIT_FAILED else code
    try:
        anyio.run(plan_restore, config, request, print, backend="asyncio")
    except UsageProblem as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (DestinationUnavailable, NotHeld, PlanFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        if isinstance(e, BrokenPipeError):
            raise
        print(f"error: cannot read the destination {config.destination}: "
              f"{e.strerror or e} (is the backup disk mounted?)", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
