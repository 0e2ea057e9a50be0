"""``restore``: copy a backup, or a file or folder of it, back (SPEC §7)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

    from pibackup_async.engine import Config


def restore_command(args: argparse.Namespace, config: Config) -> int:
    print("error: restore is not built yet", file=sys.stderr)
    return 2
