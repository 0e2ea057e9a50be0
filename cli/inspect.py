"""``diff`` and ``du``: read the destination as it is, no lock, no hook (SPEC §7)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

    from pibackup_async.engine import Config


def diff_command(args: argparse.Namespace, config: Config) -> int:
    print("error: diff is not built yet", file=sys.stderr)
    return 2


def du_command(args: argparse.Namespace, config: Config) -> int:
    print("error: du is not built yet", file=sys.stderr)
    return 2
