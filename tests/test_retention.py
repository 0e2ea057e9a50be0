"""Retention (SPEC §3): golden cases worked out by hand, then properties over random histories.

Every golden expectation was reasoned out from the spec, not printed by the
code: the comments next to a case show the walk, newest first. The properties
hold the plan to invariants and to a plain restatement of the spec that reads
names with parse_name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from itertools import pairwise
from typing import TYPE_CHECKING

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pibackup_async.engine.config import RETENTION_COUNTS, Retention
from pibackup_async.engine.durations import parse_duration
from pibackup_async.engine.names import format_name, parse_name
from pibackup_async.engine.retention import (
    RULE_ORDER,
    RetentionPlan,
    guarded_plan,
    plan_retention,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from random import Random

NEWEST = "newest"
ALL = "keep_all"
LAST, HOURLY, DAILY, WEEKLY = "keep_last", "keep_hourly", "keep_daily", "keep_weekly"
MONTHLY, YEARLY, WITHIN = "keep_monthly", "keep_yearly", "keep_within"


@dataclass(frozen=True)
class Case:
    id: str
    retention: Retention | None
    names: list[str]
    kept: dict[str, list[str]]  # newest first, each with its rules
    deleted: list[str]  # newest first


CASES = [
    Case(
        "no table: everything is kept, junk is ignored",
        None,
        ["2021-04-01t07-00-00+0200", "lost+found", "2021-04-02t07-00-12+0200",
         "2021-04-02t07-00-12+0200.in-progress", "2021-03-31t23-00-00+0200", "notes.txt"],
        {
            "2021-04-02t07-00-12+0200": [NEWEST, ALL],
            "2021-04-01t07-00-00+0200": [ALL],
            "2021-03-31t23-00-00+0200": [ALL],
        },
        [],
    ),
    Case(
        "keep_last: the n newest, seconds apart or days apart",
        Retention(keep_last=3),
        ["2021-04-01t23-59-59+0200", "2021-04-02t00-00-00+0200", "2021-04-02t07-00-12+0200",
         "2021-04-02t07-00-13+0200", "2021-04-05t13-30-00+0200"],
        {
            "2021-04-05t13-30-00+0200": [NEWEST, LAST],
            "2021-04-02t07-00-13+0200": [LAST],
            "2021-04-02t07-00-12+0200": [LAST],
        },
        ["2021-04-02t00-00-00+0200", "2021-04-01t23-59-59+0200"],
    ),
    Case(
        "keep_daily: the newest of each of the 3 latest days that have backups",
        Retention(keep_daily=3),
        # Walk: 04-05 18:00 kept (day 5), 06:00:01 and 06:00 same day; 04-02 23:59:59 kept
        # (day 2; days 3 and 4 have none), 04-02 00:00 same day; 04-01 20:00 kept (day 1),
        # count used up: 04-01 08:00 and 03-31 go.
        ["2021-03-31t23-59-59+0200", "2021-04-01t08-00-00+0200", "2021-04-01t20-00-00+0200",
         "2021-04-02t00-00-00+0200", "2021-04-02t23-59-59+0200", "2021-04-05t06-00-00+0200",
         "2021-04-05t06-00-01+0200", "2021-04-05t18-00-00+0200"],
        {
            "2021-04-05t18-00-00+0200": [NEWEST, DAILY],
            "2021-04-02t23-59-59+0200": [DAILY],
            "2021-04-01t20-00-00+0200": [DAILY],
        },
        ["2021-04-05t06-00-01+0200", "2021-04-05t06-00-00+0200", "2021-04-02t00-00-00+0200",
         "2021-04-01t08-00-00+0200", "2021-03-31t23-59-59+0200"],
    ),
    Case(
        "keep_hourly: an hour is (day, hour), so 13h on two days are two hours",
        Retention(keep_hourly=4),
        # Walk: 06-11 13h kept; 06-10 13h kept (another day), 13:00 same hour;
        # 11h kept; 10h (10:55) kept, the 4th; 10:05 goes.
        ["2022-06-10t10-05-00+0000", "2022-06-10t10-55-00+0000", "2022-06-10t11-00-00+0000",
         "2022-06-10t13-00-00+0000", "2022-06-10t13-59-59+0000", "2022-06-11t13-30-00+0000"],
        {
            "2022-06-11t13-30-00+0000": [NEWEST, HOURLY],
            "2022-06-10t13-59-59+0000": [HOURLY],
            "2022-06-10t11-00-00+0000": [HOURLY],
            "2022-06-10t10-55-00+0000": [HOURLY],
        },
        ["2022-06-10t13-00-00+0000", "2022-06-10t10-05-00+0000"],
    ),
    Case(
        "every calendar bucket includes the year: the same hour a year apart is another hour",
        Retention(keep_hourly=3, keep_daily=3, keep_weekly=3, keep_monthly=3),
        # Three 15 Marches at 10h; each is in ISO week 11 of its year (2022-03-14,
        # 2021-03-15 and 2020-03-09 are the Mondays), so every rule keeps all three.
        ["2020-03-15t10-00-00+0000", "2021-03-15t10-00-00+0000", "2022-03-15t10-00-00+0000"],
        {
            "2022-03-15t10-00-00+0000": [NEWEST, HOURLY, DAILY, WEEKLY, MONTHLY],
            "2021-03-15t10-00-00+0000": [HOURLY, DAILY, WEEKLY, MONTHLY],
            "2020-03-15t10-00-00+0000": [HOURLY, DAILY, WEEKLY, MONTHLY],
        },
        [],
    ),
    Case(
        "keep_monthly and keep_yearly over gaps of months",
        Retention(keep_monthly=3, keep_yearly=3),
        # Monthly: 2021-02, 2020-06 (06-30), 2020-01 (01-20): used up.
        # Yearly: 2021, 2020 (06-30), 2019 (12-31).
        ["2019-11-15t03-00-00+0100", "2019-12-31t23-00-00+0100", "2020-01-01t01-00-00+0100",
         "2020-01-20t03-00-00+0100", "2020-06-01t03-00-00+0200", "2020-06-30t03-00-00+0200",
         "2021-02-10t03-00-00+0100"],
        {
            "2021-02-10t03-00-00+0100": [NEWEST, MONTHLY, YEARLY],
            "2020-06-30t03-00-00+0200": [MONTHLY, YEARLY],
            "2020-01-20t03-00-00+0100": [MONTHLY],
            "2019-12-31t23-00-00+0100": [YEARLY],
        },
        ["2020-06-01t03-00-00+0200", "2020-01-01t01-00-00+0100", "2019-11-15t03-00-00+0100"],
    ),
    Case(
        "keep_weekly uses the ISO week-year: 2021-01-01 and -03 are in 2020-W53",
        Retention(keep_weekly=3, keep_yearly=2),
        # Weeks: 01-10 and 01-04 are 2021-W01; 01-03, 01-01 and 2020-12-31 are 2020-W53;
        # 12-27 (Sunday) and 12-21 are 2020-W52; 12-20 is 2020-W51.
        # Weekly: 01-10 (W01), 01-03 (W53), 12-27 (W52): used up.
        # Yearly (calendar year): 01-10 (2021), 2020-12-31 (2020).
        ["2020-12-20t12-00-00+0100", "2020-12-21t12-00-00+0100", "2020-12-27t12-00-00+0100",
         "2020-12-31t12-00-00+0100", "2021-01-01t12-00-00+0100", "2021-01-03t23-59-59+0100",
         "2021-01-04t00-00-00+0100", "2021-01-10t12-00-00+0100"],
        {
            "2021-01-10t12-00-00+0100": [NEWEST, WEEKLY, YEARLY],
            "2021-01-03t23-59-59+0100": [WEEKLY],
            "2020-12-31t12-00-00+0100": [YEARLY],
            "2020-12-27t12-00-00+0100": [WEEKLY],
        },
        ["2021-01-04t00-00-00+0100", "2021-01-01t12-00-00+0100", "2020-12-21t12-00-00+0100",
         "2020-12-20t12-00-00+0100"],
    ),
    Case(
        "keep_weekly: 2019-12-30 (Monday) is already in 2020-W01",
        Retention(keep_weekly=10),
        # 01-06 is 2020-W02; 01-05 (Sunday) and 2019-12-30 are 2020-W01; 2019-12-29 is 2019-W52.
        ["2019-12-29t10-00-00+0000", "2019-12-30t10-00-00+0000", "2020-01-05t10-00-00+0000",
         "2020-01-06t10-00-00+0000"],
        {
            "2020-01-06t10-00-00+0000": [NEWEST, WEEKLY],
            "2020-01-05t10-00-00+0000": [WEEKLY],
            "2019-12-29t10-00-00+0000": [WEEKLY],
        },
        ["2019-12-30t10-00-00+0000"],
    ),
    Case(
        "end of summer time: the newest is not the greatest name",
        Retention(keep_last=1),
        # 01:30+0200 = 23:30Z, 02:30+0200 = 00:30Z, 02:10+0100 = 01:10Z: the newest is
        # 02:10+0100 although 02:30+0200 sorts after it.
        ["2021-10-31t01-30-00+0200", "2021-10-31t02-30-00+0200", "2021-10-31t02-10-00+0100"],
        {"2021-10-31t02-10-00+0100": [NEWEST, LAST]},
        ["2021-10-31t02-30-00+0200", "2021-10-31t01-30-00+0200"],
    ),
    Case(
        "end of summer time: hours are read from the names, keep_last follows instants",
        Retention(keep_last=3, keep_hourly=10),
        # Newest first: 03:20+0100 (02:20Z, h3), 02:50+0100 (01:50Z, h2),
        # 02:10+0100 (01:10Z, h2), 02:30+0200 (00:30Z, h2), 01:30+0200 (23:30Z, h1).
        # keep_last: the first three. Hourly: h3, h2 (02:50), then h2 twice, then h1.
        ["2021-10-31t01-30-00+0200", "2021-10-31t02-30-00+0200", "2021-10-31t02-10-00+0100",
         "2021-10-31t02-50-00+0100", "2021-10-31t03-20-00+0100"],
        {
            "2021-10-31t03-20-00+0100": [NEWEST, LAST, HOURLY],
            "2021-10-31t02-50-00+0100": [LAST, HOURLY],
            "2021-10-31t02-10-00+0100": [LAST],
            "2021-10-31t01-30-00+0200": [HOURLY],
        },
        ["2021-10-31t02-30-00+0200"],
    ),
    Case(
        "start of summer time: keep_within counts real time, not wall-clock time",
        Retention(keep_within="61m"),
        # 03:30+0200 = 01:30Z; 01:30+0100 = 00:30Z is 60 minutes before (not 120);
        # 00:30+0100 = 23:30Z is 120 minutes before.
        ["2021-03-28t00-30-00+0100", "2021-03-28t01-30-00+0100", "2021-03-28t03-30-00+0200"],
        {
            "2021-03-28t03-30-00+0200": [NEWEST, WITHIN],
            "2021-03-28t01-30-00+0100": [WITHIN],
        },
        ["2021-03-28t00-30-00+0100"],
    ),
    Case(
        "keep_within: a backup exactly d before the newest is not within",
        Retention(keep_within="1h"),
        ["2021-03-28t00-30-00+0100", "2021-03-28t01-30-00+0100", "2021-03-28t03-30-00+0200"],
        {"2021-03-28t03-30-00+0200": [NEWEST, WITHIN]},
        ["2021-03-28t01-30-00+0100", "2021-03-28t00-30-00+0100"],
    ),
    Case(
        "keep_within 1d: one second inside, the boundary outside",
        Retention(keep_within="1d"),
        ["2023-03-08t00-00-00+0000", "2023-03-09t12-00-00+0000", "2023-03-09t12-00-01+0000",
         "2023-03-10t12-00-00+0000"],
        {
            "2023-03-10t12-00-00+0000": [NEWEST, WITHIN],
            "2023-03-09t12-00-01+0000": [WITHIN],
        },
        ["2023-03-09t12-00-00+0000", "2023-03-08t00-00-00+0000"],
    ),
    Case(
        "keep_within 1d12h: back to 03-09 00:00, exclusive",
        Retention(keep_within="1d12h"),
        ["2023-03-08t00-00-00+0000", "2023-03-09t00-00-00+0000", "2023-03-09t12-00-00+0000",
         "2023-03-09t12-00-01+0000", "2023-03-10t12-00-00+0000"],
        {
            "2023-03-10t12-00-00+0000": [NEWEST, WITHIN],
            "2023-03-09t12-00-01+0000": [WITHIN],
            "2023-03-09t12-00-00+0000": [WITHIN],
        },
        ["2023-03-09t00-00-00+0000", "2023-03-08t00-00-00+0000"],
    ),
    Case(
        "keep_within 2w keeps all four",
        Retention(keep_within="2w"),
        ["2023-03-08t00-00-00+0000", "2023-03-09t12-00-00+0000", "2023-03-09t12-00-01+0000",
         "2023-03-10t12-00-00+0000"],
        {
            "2023-03-10t12-00-00+0000": [NEWEST, WITHIN],
            "2023-03-09t12-00-01+0000": [WITHIN],
            "2023-03-09t12-00-00+0000": [WITHIN],
            "2023-03-08t00-00-00+0000": [WITHIN],
        },
        [],
    ),
    Case(
        "a change of offset makes the local day step back, and it is kept again",
        Retention(keep_daily=3),
        # Newest first: 00:10+0000 (Jun 1), 23:45+0000 (May 31, 23:45Z),
        # 01:30+0200 (Jun 1 local, 23:30Z), 22:00+0200 (May 31, 20:00Z).
        # Each day differs from the last kept one until the count (3) is used up.
        ["2021-05-31t22-00-00+0200", "2021-06-01t01-30-00+0200", "2021-05-31t23-45-00+0000",
         "2021-06-01t00-10-00+0000"],
        {
            "2021-06-01t00-10-00+0000": [NEWEST, DAILY],
            "2021-05-31t23-45-00+0000": [DAILY],
            "2021-06-01t01-30-00+0200": [DAILY],
        },
        ["2021-05-31t22-00-00+0200"],
    ),
    Case(
        "a negative offset: the day is the name's, not the UTC day",
        Retention(keep_daily=2),
        # 22:00-0500 = Apr 2 03:00Z but day Apr 1; 01:00+0000 is Apr 2; 20:00+0000 Apr 1.
        ["2021-04-01t20-00-00+0000", "2021-04-02t01-00-00+0000", "2021-04-01t22-00-00-0500"],
        {
            "2021-04-01t22-00-00-0500": [NEWEST, DAILY],
            "2021-04-02t01-00-00+0000": [DAILY],
        },
        ["2021-04-01t20-00-00+0000"],
    ),
    Case(
        "keep_yearly: the year of the name, across the new year in UTC",
        Retention(keep_yearly=2),
        # 2020-12-31 23:30-0100 = 2021-01-01 00:30Z is the newest, year 2020;
        # 2021-01-01 00:10+0000 is year 2021; 2020-06-01 is 2020 again, count used up.
        ["2020-06-01t00-00-00+0000", "2021-01-01t00-10-00+0000", "2020-12-31t23-30-00-0100"],
        {
            "2020-12-31t23-30-00-0100": [NEWEST, YEARLY],
            "2021-01-01t00-10-00+0000": [YEARLY],
        },
        ["2020-06-01t00-00-00+0000"],
    ),
    Case(
        "combined rules, in rule order, with a count left unused",
        Retention(keep_last=2, keep_daily=3, keep_weekly=2, keep_monthly=2, keep_within="2h"),
        # 2022-03-07 is the Monday of W10. Newest first:
        # 03-09 07:30, 07:00, 06:00 (W10), 03-08 21:00, 09:00, 03-07 01:00 (W10),
        # 03-06 22:00 (Sunday, W09), 03-03 09:00 (W09).
        # last: 07:30, 07:00. daily: 03-09 07:30, 03-08 21:00, 03-07 01:00.
        # weekly: 07:30 (W10), 03-06 (W09). monthly: 07:30 only (all March).
        # within 2h: after 05:30, exclusive: 07:30, 07:00, 06:00.
        ["2022-03-03t09-00-00+0000", "2022-03-06t22-00-00+0000", "2022-03-07t01-00-00+0000",
         "2022-03-08t09-00-00+0000", "2022-03-08t21-00-00+0000", "2022-03-09t06-00-00+0000",
         "2022-03-09t07-00-00+0000", "2022-03-09t07-30-00+0000"],
        {
            "2022-03-09t07-30-00+0000": [NEWEST, LAST, DAILY, WEEKLY, MONTHLY, WITHIN],
            "2022-03-09t07-00-00+0000": [LAST, WITHIN],
            "2022-03-09t06-00-00+0000": [WITHIN],
            "2022-03-08t21-00-00+0000": [DAILY],
            "2022-03-07t01-00-00+0000": [DAILY],
            "2022-03-06t22-00-00+0000": [WEEKLY],
        },
        ["2022-03-08t09-00-00+0000", "2022-03-03t09-00-00+0000"],
    ),
    Case(
        "ties in instant: the greater name counts as newer",
        Retention(keep_last=1, keep_daily=5),
        # 01:00+0100, 00:00+0000 and 23:00-0100 are the same instant. Order: the greatest
        # name first. Daily: Jan 1 (01:00+0100), Jan 1 again, Dec 31, Dec 30.
        ["2020-12-30t12-00-00+0000", "2020-12-31t23-00-00-0100", "2021-01-01t00-00-00+0000",
         "2021-01-01t01-00-00+0100"],
        {
            "2021-01-01t01-00-00+0100": [NEWEST, LAST, DAILY],
            "2020-12-31t23-00-00-0100": [DAILY],
            "2020-12-30t12-00-00+0000": [DAILY],
        },
        ["2021-01-01t00-00-00+0000"],
    ),
    Case(
        "leap days: 2000-02-29 and 2024-02-29 exist, 1900-02-29 and 2023-02-29 do not",
        Retention(keep_daily=2, keep_yearly=5),
        ["2000-02-29t12-00-00+0000", "1900-02-29t12-00-00+0000", "2023-02-29t10-00-00+0000",
         "2024-02-29t10-00-00+0000", "2024-02-28t10-00-00+0000", "2024-03-01t00-00-00+0000"],
        {
            "2024-03-01t00-00-00+0000": [NEWEST, DAILY, YEARLY],
            "2024-02-29t10-00-00+0000": [DAILY],
            "2000-02-29t12-00-00+0000": [YEARLY],
        },
        ["2024-02-28t10-00-00+0000"],
    ),
    Case(
        "only exact backup names count; duplicates count once",
        Retention(keep_last=1),
        # Every string but the first three is newer than them if it were read as a
        # backup, so taking any for one would change the newest.
        ["2021-04-02t07-00-12+0200", "2021-04-02t07-00-12+0200", "2021-04-01t07-00-12+0200",
         "lost+found", "", "2021-04-02t07-00-12+0200.in-progress",
         "2021-04-03t07-00-12+0200.deleting", "2021-04-04T07-00-12+0200",
         "2021-04-05t24-00-00+0200", "2021-04-05t07-60-00+0200", "2021-04-05t07-00-60+0200",
         "2021-04-05t07-00-00+0260", "2021-04-05t07-00-00+2400", "2021-13-05t07-00-00+0200",
         "2021-04-31t07-00-00+0200", "2021-04-00t07-00-00+0200", " 2021-04-05t07-00-00+0200",
         "2021-04-05t07-00-00+0200\n", "2021-04-05t07-00-00+02:00", "2021-04-05t07-00-00Z",
         "2021-04-05 07-00-00+0200", "2021-4-05t07-00-00+0200", "2021-04-05t07:00:00+0200"],
        {"2021-04-02t07-00-12+0200": [NEWEST, LAST]},
        ["2021-04-01t07-00-12+0200"],
    ),
    Case("no backup names at all", Retention(keep_last=3), ["lost+found", "x"], {}, []),
    Case("nothing at all", None, [], {}, []),
    Case(
        "counts of 0 and None are off, not 'keep none' or 'unlimited'",
        Retention(keep_last=0, keep_hourly=0, keep_daily=1, keep_weekly=None),
        ["2021-04-03t10-00-00+0000", "2021-04-02t10-00-00+0000", "2021-04-01t10-00-00+0000"],
        {"2021-04-03t10-00-00+0000": [NEWEST, DAILY]},
        ["2021-04-02t10-00-00+0000", "2021-04-01t10-00-00+0000"],
    ),
    Case(
        "keep_last larger than the history keeps it all",
        Retention(keep_last=10),
        ["2021-04-03t10-00-00+0000", "2021-04-02t10-00-00+0000", "2021-04-01t10-00-00+0000"],
        {
            "2021-04-03t10-00-00+0000": [NEWEST, LAST],
            "2021-04-02t10-00-00+0000": [LAST],
            "2021-04-01t10-00-00+0000": [LAST],
        },
        [],
    ),
    Case(
        "a table with no rule that keeps anything deletes nothing (like no table)",
        Retention(keep_last=0, keep_within="0s"),
        ["2021-04-01t10-00-00+0000", "2021-04-03t10-00-00+0000"],
        {"2021-04-03t10-00-00+0000": [NEWEST, ALL], "2021-04-01t10-00-00+0000": [ALL]},
        [],
    ),
    Case(
        "an empty table deletes nothing either",
        Retention(),
        ["2021-04-01t10-00-00+0000", "2021-04-03t10-00-00+0000"],
        {"2021-04-03t10-00-00+0000": [NEWEST, ALL], "2021-04-01t10-00-00+0000": [ALL]},
        [],
    ),
    Case(
        "a negative count (refused by the configuration) is off, not unlimited",
        Retention(keep_last=-1, keep_daily=1),
        ["2021-04-03t10-00-00+0000", "2021-04-02t10-00-00+0000"],
        {"2021-04-03t10-00-00+0000": [NEWEST, DAILY]},
        ["2021-04-02t10-00-00+0000"],
    ),
]


@pytest.mark.parametrize("listing", ["as written", "reversed", "sorted by name"])
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_golden_case(case: Case, listing: str) -> None:
    names = {
        "as written": case.names,
        "reversed": case.names[::-1],
        "sorted by name": sorted(case.names),
    }[listing]
    plan = plan_retention(iter(names), case.retention)
    assert plan.kept == case.kept
    assert list(plan.kept) == list(case.kept), "kept is not newest first"
    assert plan.deleted == case.deleted


def test_golden_cases_are_consistent() -> None:
    # Guards the hand-written data itself: every backup name of a case is either
    # kept or deleted, each once.
    for case in CASES:
        valid = {name for name in case.names if parse_name(name) is not None}
        assert set(case.kept) | set(case.deleted) == valid, case.id
        assert not set(case.kept) & set(case.deleted), case.id
        assert len(case.deleted) == len(set(case.deleted)), case.id


def test_a_bad_keep_within_is_refused() -> None:
    with pytest.raises(ValueError, match="duration"):
        plan_retention(["2021-04-01t10-00-00+0000"], Retention(keep_last=1, keep_within="3 days"))


def test_the_plan_serialises_for_the_report() -> None:
    plan = plan_retention(
        ["2021-04-02t10-00-00+0000", "2021-04-01t10-00-00+0000"], Retention(keep_last=1)
    )
    data = msgspec.json.encode(plan)
    assert msgspec.json.decode(data) == {
        "kept": {"2021-04-02t10-00-00+0000": ["newest", "keep_last"]},
        "deleted": ["2021-04-01t10-00-00+0000"],
    }
    assert msgspec.json.decode(data, type=RetentionPlan) == plan


def test_a_hundred_thousand_backups() -> None:
    # The bound is several times what a slow, busy machine needs: it is there to
    # catch a quadratic walk, not to measure (benchmarks/bench_retention.py does).
    start = datetime(2019, 1, 1, tzinfo=UTC)
    zones = [timezone(timedelta(hours=1)), timezone(timedelta(hours=2))]
    names = [
        format_name((start + timedelta(minutes=29 * i)).astimezone(zones[i // 5000 % 2]))
        for i in range(100_000)
    ]
    retention = Retention(keep_last=10, keep_hourly=48, keep_daily=14, keep_weekly=8,
                          keep_monthly=24, keep_yearly=100, keep_within="3d")
    began = time.perf_counter()
    plan = plan_retention(names, retention)
    assert time.perf_counter() - began < 5
    assert len(plan.kept) + len(plan.deleted) == 100_000


# --- properties ------------------------------------------------------------------------------


def valid_names(names: Iterable[str]) -> set[str]:
    return {name for name in names if parse_name(name) is not None}


def newest_first(names: Iterable[str]) -> list[str]:
    """The backup names among ``names``, newest first, ties broken by the greater name."""
    times = {name: parse_name(name) for name in valid_names(names)}
    return sorted(times, key=lambda name: (times[name], name), reverse=True)


def reference_plan(names: list[str], retention: Retention | None) -> dict[str, list[str]]:
    """SPEC §3 restated as plainly as possible on parse_name's datetimes: name -> rules."""
    ordered = newest_first(names)
    times = {name: parse_name(name) for name in ordered}
    kept: dict[str, list[str]] = {name: [] for name in ordered}
    if not ordered:
        return {}
    kept[ordered[0]].append(NEWEST)
    if retention is None:
        return {name: [*rules, ALL] for name, rules in kept.items()}
    counts = {rule: getattr(retention, rule) or 0 for rule in RETENTION_COUNTS}
    within = retention.keep_within
    seconds = 0.0 if within is None else parse_duration(within)
    if max(counts.values()) <= 0 and seconds == 0:
        return {name: [*rules, ALL] for name, rules in kept.items()}
    buckets: dict[str, Callable[[str, datetime], object]] = {
        LAST: lambda name, t: name,
        HOURLY: lambda name, t: (t.date(), t.hour),
        DAILY: lambda name, t: t.date(),
        WEEKLY: lambda name, t: t.isocalendar()[:2],
        MONTHLY: lambda name, t: (t.year, t.month),
        YEARLY: lambda name, t: t.year,
    }
    for rule, count in counts.items():
        last: object = None
        for name in ordered:
            if count <= 0:
                break
            moment = times[name]
            assert moment is not None
            bucket = buckets[rule](name, moment)
            if bucket != last:
                kept[name].append(rule)
                last = bucket
                count -= 1
    newest = times[ordered[0]]
    assert newest is not None
    for name in ordered:
        moment = times[name]
        assert moment is not None
        if seconds > 0 and moment > newest - timedelta(seconds=seconds):
            kept[name].append(WITHIN)
    return {name: rules for name, rules in kept.items() if rules}


JUNK = st.one_of(
    st.sampled_from([
        "lost+found", "notes.txt", "", ".", "2021-04-02t07-00-12+0200.in-progress",
        "2021-04-02t07-00-12+0200.deleting", "2021-04-02T07-00-12+0200",
        "2021-02-30t07-00-12+0200", "2021-04-02t07-00-12+2400", "2021-04-02t07-00-12+0260",
    ]),
    st.text(max_size=26),
)

# Minutes east of UTC: common offsets, and any other a tzinfo can hold.
OFFSETS = st.one_of(st.sampled_from([0, 60, 120, -300, 330, 345, -570]), st.integers(-1439, 1439))

# Seconds between backups: some at the same instant, some in the same hour, day,
# week or month, some months apart, so that every rule finds shared buckets.
GAPS = st.one_of(
    st.integers(0, 120), st.integers(0, 7200), st.integers(0, 4 * 86400),
    st.integers(0, 60 * 86400), st.integers(0, 400 * 86400),
    # About an hour, a day, a week, a month or a year: neighbours in the walk whose
    # hour, day, week or month is the same but in another day, week, month or year.
    st.builds(
        lambda period, jitter: max(0, period + jitter),
        st.sampled_from([3600, 86400, 7 * 86400, 31 * 86400, 365 * 86400]),
        st.integers(-1800, 1800),
    ),
)


# Where a history starts: anywhere in 2014-2030, or within ten days of a new year,
# where ISO weeks and calendar years part.
STARTS = st.one_of(
    st.integers(1_400_000_000, 1_900_000_000),
    st.builds(
        lambda year, delta: int(datetime(year, 1, 1, tzinfo=UTC).timestamp()) + delta,
        st.integers(2015, 2030), st.integers(-10 * 86400, 10 * 86400),
    ),
)

# The offsets a history's names use: any one to three, summer time, or a machine
# whose clock zone jumps far, so that local days and hours step back in the walk.
ZONES = st.one_of(
    st.lists(OFFSETS, min_size=1, max_size=3),
    st.sampled_from([[60, 120], [-300, -240], [0, 600, -600], [-720, 840]]),
)


@st.composite
def histories(draw: st.DrawFn, max_backups: int = 30) -> list[str]:
    """Backup names mixed with junk, in any order."""
    moment = draw(STARTS)
    zones = draw(ZONES)
    names = []
    for gap in draw(st.lists(GAPS, max_size=max_backups)):
        moment += gap
        zone = timezone(timedelta(minutes=draw(st.sampled_from(zones))))
        names.append(format_name(datetime.fromtimestamp(moment, zone)))
    junk = draw(st.lists(JUNK, max_size=3))
    return draw(st.permutations(names + junk))


COUNTS = st.one_of(st.none(), st.integers(0, 6))
DURATIONS = st.lists(
    st.tuples(st.integers(0, 90), st.sampled_from("smhdw")), min_size=1, max_size=2
).map(lambda parts: "".join(f"{n}{unit}" for n, unit in parts))
TABLES = st.builds(
    Retention, keep_last=COUNTS, keep_hourly=COUNTS, keep_daily=COUNTS, keep_weekly=COUNTS,
    keep_monthly=COUNTS, keep_yearly=COUNTS, keep_within=st.none() | DURATIONS,
)
RETENTIONS = st.none() | TABLES


def rules_on(retention: Retention) -> list[Retention]:
    """One table per rule of ``retention`` that keeps something, with only that rule."""
    single = [Retention(**{rule: getattr(retention, rule)}) for rule in RETENTION_COUNTS
              if (getattr(retention, rule) or 0) > 0]
    if retention.keep_within is not None and parse_duration(retention.keep_within) > 0:
        single.append(Retention(keep_within=retention.keep_within))
    return single


SETTINGS = settings(max_examples=150, deadline=None)


@SETTINGS
@given(histories(), RETENTIONS)
def test_the_newest_is_always_kept(names: list[str], retention: Retention | None) -> None:
    plan = plan_retention(names, retention)
    ordered = newest_first(names)
    if not ordered:
        assert plan == RetentionPlan(kept={}, deleted=[])
        return
    assert plan.kept[ordered[0]][0] == NEWEST
    assert [name for name, rules in plan.kept.items() if NEWEST in rules] == [ordered[0]]


@SETTINGS
@given(histories(), RETENTIONS)
def test_kept_and_deleted_partition_the_backup_names(
    names: list[str], retention: Retention | None
) -> None:
    plan = plan_retention(names, retention)
    assert set(plan.kept) | set(plan.deleted) == valid_names(names)
    assert not set(plan.kept) & set(plan.deleted)
    assert len(plan.deleted) == len(set(plan.deleted))
    # Both newest first, and each backup's rules named once, in RULE_ORDER.
    ordered = newest_first(names)
    assert list(plan.kept) == [name for name in ordered if name in plan.kept]
    assert plan.deleted == [name for name in ordered if name not in plan.kept]
    for rules in plan.kept.values():
        assert rules
        assert rules == sorted(set(rules), key=RULE_ORDER.index)
    if retention is None:
        assert plan.deleted == []


# The strongest property, so it gets the most examples.
@settings(max_examples=600, deadline=None)
@given(histories(), RETENTIONS)
def test_the_plan_matches_a_plain_restatement_of_the_spec(
    names: list[str], retention: Retention | None
) -> None:
    assert plan_retention(names, retention).kept == reference_plan(names, retention)


@SETTINGS
@given(histories(), st.data())
def test_keep_within_keeps_what_is_strictly_within(names: list[str], data: st.DataObject) -> None:
    ordered = newest_first(names)
    if len(ordered) < 2:
        return
    newest = parse_name(ordered[0])
    other = data.draw(st.sampled_from(ordered[1:]))
    moment = parse_name(other)
    assert newest is not None and moment is not None
    seconds = int((newest - moment).total_seconds())
    if seconds > 0:
        assert other not in plan_retention(names, Retention(keep_within=f"{seconds}s")).kept
    within = plan_retention(names, Retention(keep_within=f"{seconds + 1}s")).kept
    assert within[other] == [WITHIN]
    assert within[ordered[0]] == [NEWEST, WITHIN]


@SETTINGS
@given(histories(), RETENTIONS)
def test_applying_the_policy_to_what_it_keeps_deletes_nothing_more(
    names: list[str], retention: Retention | None
) -> None:
    plan = plan_retention(names, retention)
    again = plan_retention(plan.kept, retention)
    assert again.deleted == []
    assert again.kept == plan.kept


@SETTINGS
@given(histories(), TABLES)
def test_a_table_keeps_the_union_of_what_its_rules_keep_alone(
    names: list[str], retention: Retention
) -> None:
    single = rules_on(retention)
    if not single:
        return  # a table without rules keeps everything; see the golden cases
    together = plan_retention(names, retention).kept
    alone = [plan_retention(names, table).kept for table in single]
    for name in valid_names(names):
        expected = [rule for plan in alone for rule in plan.get(name, []) if rule != NEWEST]
        got = [rule for rule in together.get(name, []) if rule != NEWEST]
        assert got == sorted(expected, key=RULE_ORDER.index), name


@st.composite
def raised(draw: st.DrawFn) -> tuple[Retention, Retention]:
    """A table with at least one rule on, and the same with one rule raised."""
    retention = draw(TABLES.filter(lambda table: bool(rules_on(table))))
    rule = draw(st.sampled_from([*RETENTION_COUNTS, WITHIN]))
    more = draw(st.integers(1, 5))
    if rule == WITHIN:
        now = 0.0 if retention.keep_within is None else parse_duration(retention.keep_within)
        value: object = f"{int(now) + draw(st.integers(1, 200_000))}s"
    else:
        value = (getattr(retention, rule) or 0) + more
    return retention, msgspec.structs.replace(retention, **{rule: value})


@SETTINGS
@given(histories(), raised())
def test_raising_a_rule_never_deletes_more(
    names: list[str], tables: tuple[Retention, Retention]
) -> None:
    before, after = tables
    kept_before = set(plan_retention(names, before).kept)
    kept_after = set(plan_retention(names, after).kept)
    assert kept_before <= kept_after


@SETTINGS
@given(histories(), RETENTIONS, st.randoms(use_true_random=False))
def test_the_order_of_the_listing_does_not_matter(
    names: list[str], retention: Retention | None, random: Random
) -> None:
    shuffled = names * 2
    random.shuffle(shuffled)
    assert plan_retention(shuffled, retention) == plan_retention(names, retention)


# Strings shaped like a backup name with every field a little out of range, and
# sometimes non-ASCII digits (which parse_name's \d accepts), so that both ways
# of reading a name in the engine are held to parse_name's verdict and instant.
_DIGITS = {
    "ascii": "0123456789",
    "arabic-indic": "٠١٢٣٤٥٦٧٨٩",
    "fullwidth": "０１２３４５６７８９",
}


@st.composite
def name_like(draw: st.DrawFn) -> str:
    fields = [draw(st.integers(0, top)) for top in (9999, 13, 32, 25, 61, 61)]
    sign = draw(st.sampled_from("+-"))
    hours, minutes = draw(st.integers(0, 25)), draw(st.integers(0, 61))
    year, month, day, hour, minute, second = fields
    text = (f"{year:04d}-{month:02d}-{day:02d}t{hour:02d}-{minute:02d}-{second:02d}"
            f"{sign}{hours:02d}{minutes:02d}")
    digits = draw(st.sampled_from(sorted(_DIGITS)))
    part = draw(st.sampled_from([slice(None), slice(0, 4), slice(19, None)]))
    exotic = text[part].translate(str.maketrans(_DIGITS["ascii"], _DIGITS[digits]))
    return text[: part.start or 0] + exotic + text[part.stop or len(text):]


@settings(max_examples=300, deadline=None)
@given(st.lists(name_like(), max_size=12))
def test_names_are_read_exactly_as_parse_name_reads_them(names: list[str]) -> None:
    # keep_last over the whole list keeps everything in the walk order, which
    # exposes both which strings count and the instant each stands for.
    plan = plan_retention(names, Retention(keep_last=len(names) + 1))
    assert list(plan.kept) == newest_first(names)
    assert plan.deleted == []


# --- what retention never deletes: last_of_source and a clock jump (SPEC §3) --------------------

SOURCE_KEPT, PAUSED = "last_of_source", "paused"


def daily(first: datetime, days: int) -> list[str]:
    """``days`` backups a day apart from ``first`` on, newest first."""
    return [format_name(first + timedelta(days=i)) for i in reversed(range(days))]


def test_the_newest_backup_of_each_source_is_kept() -> None:
    # keep_last 1 keeps A alone; the laptop was away for A and B: C is its newest copy.
    # Holders name any backups that hold a source (at least the newest); names that are
    # not among the backups (gone, junk) count for nothing.
    a, b, c, d = ("2021-04-04t03-00-00+0200", "2021-04-03t03-00-00+0200",
                  "2021-04-02t03-00-00+0200", "2021-04-01t03-00-00+0200")
    holders = {"data": [a, b, c, d], "laptop": [d, c, "lost+found", "2021-05-01t00-00-00+0200"],
               "phone": [c], "gone": ["2020-01-01t00-00-00+0000"]}
    plan = guarded_plan([a, b, c, d], Retention(keep_last=1), holders)
    assert plan.kept == {a: [NEWEST, LAST], c: [SOURCE_KEPT]}
    assert plan.deleted == [b, d]
    assert plan.paused is None
    # No table keeps everything; the rule still says why too.
    assert guarded_plan([a, c], None, holders).kept == {a: [NEWEST, ALL], c: [SOURCE_KEPT, ALL]}
    # Held by the newest: the newest's own rule says it.
    assert guarded_plan([a, b], Retention(keep_last=1), {"data": [a, b]}).kept == {
        a: [NEWEST, LAST]}


def test_a_clock_ten_years_ahead_deletes_nothing_before_it() -> None:
    nights = daily(datetime(2025, 3, 1, 3, tzinfo=UTC), 8)
    ahead = "2035-03-09t03-00-00+0000"
    names = [ahead, *nights]
    # The rules alone: keep_within 14d of the newest keeps none of the real ones.
    assert plan_retention(names, Retention(keep_within="14d")).deleted == nights

    plan = guarded_plan(names, Retention(keep_within="14d"), {})

    assert plan.kept == {ahead: [NEWEST, WITHIN], **{n: [PAUSED] for n in nights}}
    assert plan.deleted == []
    assert plan.paused is not None
    # 2025-03-08 to 2035-03-09: ten years, two of them leap years, and a day.
    for said in (ahead, nights[0], "3653 days", "8 kept", "2035-04-08",
                 f"pibackup-async prune --discard {ahead}"):
        assert said in plan.paused, (said, plan.paused)


def test_a_machine_switched_off_for_two_months_keeps_its_old_backups_a_month_longer() -> None:
    winter = daily(datetime(2024, 12, 1, 3, tzinfo=UTC), 32)  # Dec 1 .. Jan 1
    rules = Retention(keep_within="14d")
    for days, paused in ((1, True), (10, True), (30, True), (31, False), (40, False)):
        spring = daily(datetime(2025, 3, 1, 3, tzinfo=UTC), days)  # from Mar 1, a jump
        names = spring + winter
        plan = guarded_plan(names, rules, {})
        plain = plan_retention(names, rules)
        if paused:
            # Span under 30 days (Mar 1 .. Mar 30 is 29): nothing of the winter goes;
            # the spring's backups go as the rules say.
            assert plan.deleted == [n for n in plain.deleted if n not in winter], days
            assert all(plan.kept[n] == [PAUSED] for n in winter), days
            assert plan.paused is not None and "2025-03-01t03-00-00+0000" in plan.paused
        else:
            # From Mar 31 the backups since the jump span 30 days: the rules as usual.
            assert plan == plain, days
            assert set(winter) <= set(plan.deleted), days


def test_only_more_than_thirty_days_is_a_jump_and_only_the_newest_jump_counts() -> None:
    rules = Retention(keep_last=1)
    start = datetime(2025, 1, 1, 3, tzinfo=UTC)
    # Exactly 30 days apart: no jump.
    exact = [format_name(start + timedelta(days=30)), format_name(start)]
    assert guarded_plan(exact, rules, {}) == plan_retention(exact, rules)
    # A second more is one.
    just = [format_name(start + timedelta(days=30, seconds=1)), format_name(start)]
    assert guarded_plan(just, rules, {}).kept[just[1]] == [PAUSED]
    # An old jump whose backups have since spanned 30 days no longer holds anything;
    # the newest jump holds only what is dated before it (its older neighbours too).
    old = [format_name(start)]
    middle = daily(start + timedelta(days=100), 40)
    recent = daily(start + timedelta(days=200), 3)
    plan = guarded_plan(recent + middle + old, rules, {})
    assert all(plan.kept[n] == [PAUSED] for n in middle + old)
    assert plan.paused is not None and recent[-1] in plan.paused and middle[0] in plan.paused
    assert "(and each of the 2 newer ones)" in plan.paused


def test_a_plan_that_pauses_round_trips_and_one_that_does_not_omits_it() -> None:
    names = ["2035-01-01t00-00-00+0000", "2025-01-01t00-00-00+0000"]
    plan = guarded_plan(names, Retention(keep_last=1), {})
    assert msgspec.json.decode(msgspec.json.encode(plan), type=RetentionPlan) == plan
    assert "paused" in msgspec.json.decode(msgspec.json.encode(plan))
    quiet = guarded_plan(names[:1], Retention(keep_last=1), {})
    assert "paused" not in msgspec.json.decode(msgspec.json.encode(quiet))


def has_jump(names: list[str]) -> bool:
    times = [moment for name in newest_first(names) if (moment := parse_name(name))]
    return any((newer - older).total_seconds() > 30 * 86400
               for newer, older in pairwise(times))


@st.composite
def holders_of(draw: st.DrawFn, names: list[str]) -> dict[str, list[str]]:
    pool = sorted(set(names)) or ["junk"]
    return draw(st.dictionaries(st.sampled_from(["data", "laptop", "phone"]),
                                st.lists(st.sampled_from(pool), max_size=4), max_size=3))


@SETTINGS
@given(histories(), RETENTIONS, st.data())
def test_the_guards_only_ever_keep_more(names: list[str], retention: Retention | None,
                                        data: st.DataObject) -> None:
    holders = data.draw(holders_of(names))
    plain = plan_retention(names, retention)
    guarded = guarded_plan(names, retention, holders)
    assert set(guarded.kept) >= set(plain.kept)
    assert set(guarded.kept) | set(guarded.deleted) == valid_names(names)
    assert not set(guarded.kept) & set(guarded.deleted)
    ordered = newest_first(names)
    for rules in guarded.kept.values():
        assert rules == sorted(set(rules), key=RULE_ORDER.index)
    for held in holders.values():
        mine = [name for name in ordered if name in set(held)]
        if mine:
            assert mine[0] in guarded.kept
            assert mine[0] == ordered[0] or SOURCE_KEPT in guarded.kept[mine[0]]
    # Without a jump and without holders the guards change nothing.
    if not has_jump(names):
        assert guarded.paused is None
        assert guarded_plan(names, retention, {}) == plain
    # What the pause keeps is dated before a jump, and is kept by nothing else.
    for name, rules in guarded.kept.items():
        if PAUSED in rules:
            assert rules == [PAUSED] and name in plain.deleted
            assert guarded.paused is not None
