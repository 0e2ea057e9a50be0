"""``verify``: read a backup back to its end; find what cannot be read or rotted (SPEC §7)."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from pibackup_async.engine.lookup import LATEST, UsageProblem, check_backup_arg
from pibackup_async.engine.verify import (
    VerifyRequest,
    check_sample,
    check_source_name,
    verify_backup,
)

from .exit_codes import EXIT_USAGE
from .progress import cleared, wanted
from .running import under_signals

if TYPE_CHECKING:
    import argparse

    from pibackup_async.engine import Config


def verify_command(args: argparse.Namespace, config: Config) -> int:
    try:
        if args.every and args.backup is not None:
            raise UsageProblem("BACKUP and --all: give one or the other")
        backup = args.backup if args.backup is not None else LATEST
        check_backup_arg(backup)
        check_source_name(args.source)
        sample = check_sample(args.sample)
    except UsageProblem as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    request = VerifyRequest(backup, args.source, args.against_source, every=args.every,
                            sample=sample)
    out = _Stdout()
    return under_signals("verify",
                         lambda interruption: verify_backup(config, interruption, request,
                                                            out.line),
                         progress="verify" if wanted(args) else None)


class _Stdout:
    """What verify finds, line by line as it goes (a dying disk may take hours)."""

    def __init__(self) -> None:
        self.closed = False

    def line(self, text: str) -> None:
        if self.closed:
            return
        try:
            with cleared():
                print(text, flush=True)
        except BrokenPipeError:
            # stdout closed early (`verify | head`): the verify goes on quietly and
            # its exit code still tells; Python must not complain at exit either.
            self.closed = True
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
