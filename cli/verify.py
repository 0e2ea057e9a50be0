"""``verify``: read a backup back to its end; find what cannot be read or rotted (SPEC §7)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

    from pibackup_async.engine import Config


def verify_command(args: argparse.Namespace, config: Config) -> int:
    print("error: verify is not built yet", file=sys.stderr)
    return 2
