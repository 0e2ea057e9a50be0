"""Retention (SPEC §3): which backups the rules keep and why. Pure: no I/O, no clock.

The semantics are restic's ``forget``: walk the backups newest first and let
each count rule keep a backup whenever its bucket (hour, day, ISO week, month,
year, read from the name in the name's own UTC offset) differs from the bucket
of the last backup that same rule kept, until the count is used up.
"""

from __future__ import annotations

import re
from datetime import date, timedelta
from functools import cache
from typing import TYPE_CHECKING

import msgspec

from .config import RETENTION_COUNTS, Retention
from .durations import parse_duration
from .names import parse_name

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

NEWEST = "newest"
LAST_OF_SOURCE = "last_of_source"
KEEP_WITHIN = "keep_within"
PAUSED = "paused"
KEEP_ALL = "keep_all"
RULE_ORDER = (NEWEST, LAST_OF_SOURCE, *RETENTION_COUNTS, KEEP_WITHIN, PAUSED, KEEP_ALL)
"""The order in which the rules that keep a backup are listed."""

JUMP_S = 30 * 86400
"""A backup dated more than this after the one before it is a clock jump (SPEC §3), and
nothing older is deleted until the backups from the jump on span as long."""


class RetentionPlan(msgspec.Struct, frozen=True, omit_defaults=True):
    # Both in walk order, newest first; each kept backup's rules in RULE_ORDER.
    kept: dict[str, list[str]]
    deleted: list[str]
    # Why nothing dated before a clock jump is deleted, or None (guarded_plan only).
    paused: str | None = None


# (instant, name, (year, month, day, hour)): the instant in POSIX seconds, the
# calendar fields as the name writes them, in its own offset. Plain tuples,
# because a plan may hold 100,000 of them and they sort natively.
_Local = tuple[int, int, int, int]
_Backup = tuple[int, str, _Local]


def plan_retention(names: Iterable[str], retention: Retention | None) -> RetentionPlan:
    """Split the backup names among ``names`` into kept (with their rules) and deleted.

    The rules alone, restic's walk; ``guarded_plan`` adds what SPEC §3 never
    lets them delete. Only exact backup names count; anything else in
    ``names`` appears in neither list, and duplicates count once. "Newest
    first" means by instant; backups at the same instant (names with
    different offsets) are ordered by name, the greater name counting as the
    newer. The newest backup is always kept, with ``newest`` first among its
    rules. With ``retention`` None, or a table with no rule that keeps
    anything (every count 0 or None and no positive ``keep_within``; the
    configuration refuses such a table), nothing is deleted: every backup is
    kept by ``keep_all``. Raises ValueError if ``keep_within`` is not a
    duration.
    """
    return _plan(_newest_first(names), retention, None, guard=False)


def guarded_plan(names: Iterable[str], retention: Retention | None,
                 holders: Mapping[str, Iterable[str]]) -> RetentionPlan:
    """What retention does (SPEC §3): ``plan_retention``, and what it must never delete.

    ``holders`` gives, for each source of the configuration, backups that hold
    it (at least the newest one that does): the newest of them is kept by
    ``last_of_source``, unless it is the newest backup. A backup dated more
    than JUMP_S after the one before it is a clock jump; while the backups
    from the newest jump on span less than JUMP_S, every backup dated before
    it that the rules would delete is kept by ``paused``, and ``paused`` of
    the plan says why (also when none is held back). Raises ValueError as
    plan_retention does.
    """
    return _plan(_newest_first(names), retention, holders, guard=True)


def _plan(ordered: list[_Backup], retention: Retention | None,
          holders: Mapping[str, Iterable[str]] | None, *, guard: bool) -> RetentionPlan:
    if not ordered:
        return RetentionPlan(kept={}, deleted=[])
    # Only kept backups get a list: most of a long history is deleted.
    reasons: dict[int, list[str]] = {0: [NEWEST]}
    if holders:
        _apply_last_of_source(holders, ordered, reasons)
    rules = None if retention is None else _rules(retention)
    paused = None
    if rules is None:
        for i in range(len(ordered)):
            reasons.setdefault(i, []).append(KEEP_ALL)
    else:
        counts, within = rules
        for rule, count in counts:
            _apply_count(rule, count, ordered, reasons)
        if within > 0:
            _apply_within(within, ordered, reasons)
        if guard:
            paused = _apply_pause(ordered, reasons)
    return RetentionPlan(
        kept={ordered[i][1]: reasons[i] for i in sorted(reasons)},
        deleted=[name for i, (_, name, _) in enumerate(ordered) if i not in reasons],
        paused=paused,
    )


def _rules(retention: Retention) -> tuple[list[tuple[str, int]], float] | None:
    """The count rules that are on, in RULE_ORDER, and keep_within in seconds (0 if off).

    None when no rule keeps anything: taken literally, such a table would
    delete every backup but the newest. restic treats an empty policy as "keep
    everything", and so do we, so that a caller that skipped validation cannot
    lose backups through it.
    """
    # Negative counts (refused by the configuration) are off like 0, not
    # restic's "unlimited" -1.
    counts = [(rule, getattr(retention, rule)) for rule in RETENTION_COUNTS]
    on = [(rule, count) for rule, count in counts if count is not None and count > 0]
    within = 0.0 if retention.keep_within is None else parse_duration(retention.keep_within)
    return (on, within) if on or within > 0 else None


_BUCKET: dict[str, Callable[[str, _Local], object]] = {
    # Every backup is a bucket of its own (names are unique), so keep_last
    # keeps the n newest.
    "keep_last": lambda name, local: name,
    "keep_hourly": lambda name, local: local,
    "keep_daily": lambda name, local: local[:3],
    # The ISO week-year, not the calendar year: 2021-01-03 lies in 2020-W53.
    "keep_weekly": lambda name, local: date(*local[:3]).isocalendar()[:2],
    "keep_monthly": lambda name, local: local[:2],
    "keep_yearly": lambda name, local: local[0],
}


def _apply_count(
    rule: str, count: int, ordered: list[_Backup], reasons: dict[int, list[str]]
) -> None:
    bucket_of = _BUCKET[rule]
    # Compared with the last bucket this rule kept, not with every bucket seen:
    # across a change of offset local time can step back, and restic keeps
    # such a backup again too.
    last: object = None
    for i, (_, name, local) in enumerate(ordered):
        bucket = bucket_of(name, local)
        if bucket != last:
            reasons.setdefault(i, []).append(rule)
            last = bucket
            count -= 1
            if count == 0:
                return


def _apply_within(seconds: float, ordered: list[_Backup], reasons: dict[int, list[str]]) -> None:
    # Real elapsed time between instants, not the wall-clock difference of the
    # names, which is an hour off across a change to or from summer time.
    after = ordered[0][0] - seconds
    for i, (instant, _, _) in enumerate(ordered):
        if instant <= after:
            return
        reasons.setdefault(i, []).append(KEEP_WITHIN)


def _apply_last_of_source(holders: Mapping[str, Iterable[str]], ordered: list[_Backup],
                          reasons: dict[int, list[str]]) -> None:
    # Applied right after ``newest`` (RULE_ORDER): the newest backup already has its
    # rule, and a backup that holds several sources gets this one once.
    where = {name: i for i, (_, name, _) in enumerate(ordered)}
    for held in holders.values():
        found = [where[name] for name in held if name in where]
        if found and (i := min(found)) not in reasons:
            reasons[i] = [LAST_OF_SOURCE]


def _apply_pause(ordered: list[_Backup], reasons: dict[int, list[str]]) -> str | None:
    """Keep by ``paused`` what is dated before the newest clock jump, while it is recent.

    A jump is read between neighbours in time: a wrong clock (a real-time
    clock ten years ahead) makes one, and ``keep_within`` measured from it
    would delete every real backup. A machine switched off for two months
    makes one too, and merely keeps its older backups a month longer.
    """
    jump = next((i for i in range(len(ordered) - 1)
                 if ordered[i][0] - ordered[i + 1][0] > JUMP_S), None)
    if jump is None or ordered[0][0] - ordered[jump][0] >= JUMP_S:
        return None
    held = 0
    for i in range(jump + 1, len(ordered)):
        if i not in reasons:
            reasons[i] = [PAUSED]
            held += 1
    name, before = ordered[jump][1], ordered[jump + 1][1]
    days = (ordered[jump][0] - ordered[jump + 1][0]) // 86400
    moment = parse_name(name)
    until = "" if moment is None else f", on {(moment + timedelta(seconds=JUMP_S)):%Y-%m-%d}"
    newer = f" (and each of the {jump} newer ones)" if jump else ""
    return (f"clock jump: backup {name} is dated {days} days after the backup before it "
            f"({before}); retention deletes nothing older ({held} kept that it would "
            f"delete) until the backups from {name} on span {JUMP_S // 86400} days{until}. "
            f"If the clock was ahead when it was made: pibackup-async prune --discard {name}"
            f"{newer}")


def _newest_first(names: Iterable[str]) -> list[_Backup]:
    backups = [backup for name in set(names) if (backup := _read(name)) is not None]
    # Names are unique, so tuples never compare past the name, which breaks
    # ties in instant: the plan does not depend on the order of the listing.
    backups.sort(reverse=True)
    return backups


# parse_name (strptime) costs about 9 µs a name, most of the time of a plan
# over 100,000 backups. Names of the plain ASCII shape are read here by slicing
# instead, with the same outcome (the tests compare the two); every other
# string still goes to parse_name, which stays the authority on what a backup
# name is.
_ASCII_NAME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}t[0-9]{2}-[0-9]{2}-[0-9]{2}[+-][0-9]{4}")
_EPOCH_DAY = date(1970, 1, 1).toordinal()


def _read(name: str) -> _Backup | None:
    if _ASCII_NAME.fullmatch(name) is None:
        moment = parse_name(name)
        if moment is None:
            return None
        local = (moment.year, moment.month, moment.day, moment.hour)
        return int(moment.timestamp()), name, local
    day, offset = _day(name[:10]), _offset(name[19:])
    hour, minute, second = int(name[11:13]), int(name[14:16]), int(name[17:19])
    if day is None or offset is None or hour > 23 or minute > 59 or second > 59:
        return None  # strptime refuses these too
    midnight, year, month, mday = day
    instant = midnight + hour * 3600 + minute * 60 + second - offset
    return instant, name, (year, month, mday, hour)


# Many backups share a day and nearly all share one or two offsets, so these
# caches stay small and save most of the integer parsing.


@cache
def _day(text: str) -> tuple[int, int, int, int] | None:
    """POSIX seconds of UTC midnight of "YYYY-MM-DD", and its fields; None if no such day."""
    year, month, mday = int(text[0:4]), int(text[5:7]), int(text[8:10])
    try:
        days = date(year, month, mday).toordinal() - _EPOCH_DAY
    except ValueError:  # year 0, month 13, February 30, ...
        return None
    return days * 86400, year, month, mday


@cache
def _offset(text: str) -> int | None:
    """Seconds east of UTC of "+HHMM" / "-HHMM"; None past what a tzinfo may hold."""
    hours, minutes = int(text[1:3]), int(text[3:5])
    if hours > 23 or minutes > 59:
        return None
    seconds = hours * 3600 + minutes * 60
    return -seconds if text[0] == "-" else seconds
