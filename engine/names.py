"""Backup names: the local start time, and the suffixes of unfinished states."""

from __future__ import annotations

import re
from datetime import datetime

NAME_FORMAT = "%Y-%m-%dt%H-%M-%S%z"
IN_PROGRESS = ".in-progress"
DELETING = ".deleting"

_NAME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}t[0-9]{2}-[0-9]{2}-[0-9]{2}[+-][0-9]{4}")


def format_name(moment: datetime) -> str:
    """The backup name of an aware local time, e.g. ``2021-04-02t07-00-12+0200``."""
    return moment.strftime(NAME_FORMAT)


def parse_name(name: str) -> datetime | None:
    """The aware time a backup name stands for, or None if ``name`` is not one.

    Only an exact backup name counts: the engine never touches anything else
    in the destination (``lost+found``, notes, other tools' folders).
    """
    if not _NAME.fullmatch(name):
        return None
    try:
        return datetime.strptime(name, NAME_FORMAT)
    except ValueError:
        return None
