"""``init``: write a first configuration with every option commented (SPEC §7)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from pibackup_async.engine import PibackupError
from pibackup_async.engine.init_config import InitRefused, init_config, summary

from .exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:
    import argparse


def init_command(args: argparse.Namespace, output: str) -> int:
    try:
        written = init_config(args.destination, args.sources, output)
    except InitRefused as e:
        for problem in e.problems:
            print(f"error: init: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"error: init: cannot write {e.filename or output}: {e.strerror or e}",
              file=sys.stderr)
        return EXIT_FAILED
    except PibackupError as e:
        print(f"error: init: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(f"wrote {written.path} (destination {written.destination}; sources: "
          f"{', '.join(summary(written))}); next: pibackup-async check -c {written.path}",
          file=sys.stderr)
    return EXIT_OK
