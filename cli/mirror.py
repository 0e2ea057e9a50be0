"""``mirror``: copy what this destination lacks of ``[origin]`` (SPEC §10); thin, like ``run``."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import anyio
from pibackup_async.engine.mirror import plan_mirror, run_mirror

from .exit_codes import EXIT_OK
from .progress import wanted
from .running import under_signals

if TYPE_CHECKING:
    import argparse

    from pibackup_async.engine import Config


def mirror_command(args: argparse.Namespace, config: Config) -> int:
    if args.dry_run:
        print("\n".join(anyio.run(plan_mirror, config, backend="asyncio")))
        sys.stdout.flush()
        return EXIT_OK
    return under_signals("mirror", lambda interruption: run_mirror(
        config, interruption, no_report=args.no_report),
        progress="mirror" if wanted(args) else None)
