"""Time plan_retention over 100,000 backups: ``python benchmarks/bench_retention.py``.

The history spans about six years of backups every half hour or so, named in
Europe/Berlin time (so the offset changes twice a year), listed in no
particular order as a directory listing would be, with a few foreign folders.
"""

from __future__ import annotations

import random
import statistics
import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from pibackup_async.engine.config import Retention
from pibackup_async.engine.names import format_name
from pibackup_async.engine.retention import plan_retention

BACKUPS = 100_000
RUNS = 5
RETENTION = Retention(
    keep_last=10, keep_hourly=48, keep_daily=14, keep_weekly=8, keep_monthly=24,
    keep_yearly=10, keep_within="3d",
)


def history(count: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    zone = ZoneInfo("Europe/Berlin")
    moment = datetime(2019, 1, 1, tzinfo=UTC)
    names = []
    for _ in range(count):
        # Irregular: a run takes a varying time, so starts drift within the half hour.
        moment += timedelta(minutes=30, seconds=rng.randint(-600, 600))
        names.append(format_name(moment.astimezone(zone)))
    names += ["lost+found", "notes.txt", f"{names[-1]}.in-progress"]
    rng.shuffle(names)
    return names


def main() -> None:
    names = history(BACKUPS)
    timings = []
    for _ in range(RUNS):
        start = time.perf_counter()
        plan = plan_retention(names, RETENTION)
        timings.append(time.perf_counter() - start)
    span = f"{plan.deleted[-1][:10]} .. {next(iter(plan.kept))[:10]}"
    print(
        f"plan_retention: {BACKUPS:,} backups ({span}), "
        f"kept {len(plan.kept)}, deleted {len(plan.deleted):,}: "
        f"median of {RUNS} {statistics.median(timings) * 1000:.0f} ms "
        f"(min {min(timings) * 1000:.0f} ms, max {max(timings) * 1000:.0f} ms)"
    )


if __name__ == "__main__":
    main()
