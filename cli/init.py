"""``init``: write a first configuration with every option commented (SPEC §7)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse


def init_command(args: argparse.Namespace, output: str) -> int:
    print("error: init is not built yet", file=sys.stderr)
    return 2
