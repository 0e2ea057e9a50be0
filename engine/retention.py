"""Retention (SPEC §3): which backups the rules keep and why. Pure: no I/O, no clock.

The semantics are restic's ``forget``: walk the backups newest first and let
each count rule keep a backup whenever its bucket (hour, day, ISO week, month,
year, read from the name in the name's own UTC offset) differs from the bucket
of the last backup that same rule kept, until the count is used up.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from functools import cache
from operator import attrgetter
from typing import NamedTuple

import msgspec

from .config import RETENTION_COUNTS, Retention
from .durations import parse_duration
from .names import parse_name

NEWEST = "newest"
KEEP_WITHIN = "keep_within"
KEEP_ALL = "keep_all"
RULE_ORDER = (NEWEST, *RETENTION_COUNTS, KEEP_WITHIN, KEEP_ALL)
"""The order in which the rules that keep a backup are listed."""


class RetentionPlan(msgspec.Struct, frozen=True):
    # Both are in walk order, newest first; each kept backup's rules follow RULE_ORDER.
    kept: dict[str, list[str]]
    deleted: list[str]


class _Backup(NamedTuple):
    instant: float  # POSIX seconds; names have whole seconds, so floats compare exactly
    name: str
    local: datetime  # aware, in the name's own offset: its fields are the name's fields


def plan_retention(names: Iterable[str], retention: Retention | None) -> RetentionPlan:
    """Split the backup names among ``names`` into kept (with their rules) and deleted.

    Only exact backup names count; anything else in ``names`` appears in
    neither list, and duplicates count once. "Newest first" means by instant;
    backups at the same instant (names with different offsets) are ordered by
    name, the greater name counting as the newer. The newest backup is always
    kept, with the rule ``newest`` first in its list. With ``retention`` None,
    or a table with no rule that keeps anything (all counts 0/None and no
    positive ``keep_within``, which the configuration refuses anyway), nothing
    is deleted and every backup is kept by ``keep_all``. Raises ValueError if
    ``keep_within`` is not a duration.
    """
    ordered = _newest_first(names)
    if not ordered:
        return RetentionPlan(kept={}, deleted=[])
    reasons: list[list[str]] = [[] for _ in ordered]
    reasons[0].append(NEWEST)
    if retention is None or _keeps_nothing(retention):
        for rules in reasons:
            rules.append(KEEP_ALL)
    else:
        for rule in RETENTION_COUNTS:
            count: int | None = getattr(retention, rule)
            if count:
                _apply_count(rule, count, ordered, reasons)
        if retention.keep_within is not None:
            _apply_within(parse_duration(retention.keep_within), ordered, reasons)
    return RetentionPlan(
        kept={b.name: rules for b, rules in zip(ordered, reasons, strict=True) if rules},
        deleted=[b.name for b, rules in zip(ordered, reasons, strict=True) if not rules],
    )


def _keeps_nothing(retention: Retention) -> bool:
    # Such a table would delete all but the newest backup; restic treats an
    # empty policy as "keep everything", and so do we, whatever the caller checked.
    if any(getattr(retention, rule) for rule in RETENTION_COUNTS):
        return False
    return retention.keep_within is None or parse_duration(retention.keep_within) == 0


_BUCKET: dict[str, Callable[[_Backup], object]] = {
    # Every backup is a bucket of its own, so keep_last keeps the n newest.
    "keep_last": attrgetter("name"),
    "keep_hourly": lambda b: (b.local.year, b.local.month, b.local.day, b.local.hour),
    "keep_daily": lambda b: (b.local.year, b.local.month, b.local.day),
    # The ISO year, not the calendar one: 2021-01-03 lies in 2020-W53.
    "keep_weekly": lambda b: b.local.isocalendar()[:2],
    "keep_monthly": lambda b: (b.local.year, b.local.month),
    "keep_yearly": lambda b: b.local.year,
}


def _apply_count(
    rule: str, count: int, ordered: list[_Backup], reasons: list[list[str]]
) -> None:
    bucket_of = _BUCKET[rule]
    # Compared with the last bucket this rule kept, not with every bucket seen:
    # across a change of offset local time can step back (restic does the same).
    last: object = None
    for backup, rules in zip(ordered, reasons, strict=True):
        bucket = bucket_of(backup)
        if bucket != last:
            rules.append(rule)
            last = bucket
            count -= 1
            if count == 0:
                return


def _apply_within(seconds: float, ordered: list[_Backup], reasons: list[list[str]]) -> None:
    # Real elapsed time (instants), not wall-clock differences between names.
    after = ordered[0].instant - seconds
    for backup, rules in zip(ordered, reasons, strict=True):
        if backup.instant <= after:
            return
        rules.append(KEEP_WITHIN)


def _newest_first(names: Iterable[str]) -> list[_Backup]:
    backups = []
    for name in set(names):
        local = _read_name(name)
        if local is not None:
            backups.append(_Backup(local.timestamp(), name, local))
    # The name breaks ties in instant, so the plan never depends on listing order.
    backups.sort(key=attrgetter("instant", "name"), reverse=True)
    return backups


# parse_name (strptime) costs about 9 µs a name, most of the time of a plan
# over 100,000 backups. Names of the plain ASCII shape are read here by slicing
# instead, with the same outcome (the tests compare the two); every other
# string still goes to parse_name, which stays the authority on what a backup
# name is.
_ASCII_NAME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}t[0-9]{2}-[0-9]{2}-[0-9]{2}[+-][0-9]{4}")


def _read_name(name: str) -> datetime | None:
    if _ASCII_NAME.fullmatch(name) is None:
        return parse_name(name)
    offset_hours, offset_minutes = int(name[20:22]), int(name[22:24])
    if offset_minutes >= 60:  # strptime's %z refuses these
        return None
    offset = offset_hours * 60 + offset_minutes
    try:
        return datetime(
            int(name[0:4]), int(name[5:7]), int(name[8:10]),
            int(name[11:13]), int(name[14:16]), int(name[17:19]),
            tzinfo=_zone(-offset if name[19] == "-" else offset),
        )
    except ValueError:  # year 0, Feb 30, hour 24, second 60, an offset of 24 h or more
        return None


@cache
def _zone(minutes: int) -> timezone:
    # A destination holds few distinct offsets; sharing their tzinfo saves
    # an allocation per name.
    return timezone(timedelta(minutes=minutes))
