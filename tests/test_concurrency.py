"""Sources are snapshotted concurrently, never more than ``--jobs``/``concurrency`` at once.

Each source is one 1.8 MB file copied with ``--bwlimit=1000`` (KiB/s), so a
copy takes about 1.8 s whatever the machine: wall time then shows whether
copies ran side by side, and the report's snapshot times show how many did.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import pytest
from conftest import needs_rsync
from datakit import (
    complete_backups,
    max_overlap,
    rsync_source,
    snapshot_intervals,
    write_raw_config,
)

if TYPE_CHECKING:
    from typing import Any

    from conftest import Workspace

pytestmark = [needs_rsync, pytest.mark.slow]

SOURCES = ["s1", "s2", "s3", "s4"]
SIZE = 1_800_000


def setup_sources(ws: Workspace) -> None:
    for name in SOURCES:
        path = ws.src / name
        path.mkdir()
        (path / "blob").write_bytes(os.urandom(SIZE))


def configure(ws: Workspace, dest_name: str, concurrency: int | None = None) -> None:
    """A config with a fresh destination, so no run links against an earlier one."""
    dest = ws.root / dest_name
    dest.mkdir()
    text = f'destination = "{dest}"\nstate_dir = "{ws.state}"\n'
    if concurrency is not None:
        text += f"concurrency = {concurrency}\n"
    for name in SOURCES:
        text += rsync_source(name, ws.src / name, rsync_args=["--bwlimit=1000"])
    write_raw_config(ws, text)


def timed_run(ws: Workspace, *args: str) -> tuple[float, dict[str, Any]]:
    started = time.monotonic()
    result = ws.run("run", *args)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    report = ws.report()
    assert report["status"] == "ok"
    return elapsed, report


def test_jobs_bound_and_speed_up_the_snapshots(ws: Workspace) -> None:
    setup_sources(ws)

    configure(ws, "dest-jobs1", concurrency=2)  # --jobs overrides the config
    wall1, report1 = timed_run(ws, "--jobs", "1")
    configure(ws, "dest-jobs4", concurrency=2)
    wall4, report4 = timed_run(ws, "--jobs", "4")
    configure(ws, "dest-jobs2", concurrency=3)
    _, report2 = timed_run(ws, "--jobs", "2")

    for report, jobs in ((report1, 1), (report4, 4), (report2, 2)):
        assert report["concurrency"] == jobs
        intervals = snapshot_intervals(report)
        assert sorted(intervals) == SOURCES
        peak = max_overlap(intervals.values())
        assert peak == jobs, f"--jobs {jobs}: {peak} snapshots overlapped: {intervals}"
        for start, end in intervals.values():
            # Each copy really was slowed, so the overlaps above are meaningful.
            assert (end - start).total_seconds() > 1.0
    assert wall4 < 0.6 * wall1, f"--jobs 4 took {wall4:.2f}s, --jobs 1 took {wall1:.2f}s"
    # --jobs 1: each source waited for its slot as long as the ones before it ran
    # (SPEC §6 waited_s).
    intervals = snapshot_intervals(report1)
    order = sorted(SOURCES, key=lambda s: intervals[s][0])
    first_start = intervals[order[0]][0]
    for source in order:
        ran_before = (intervals[source][0] - first_start).total_seconds()
        waited = report1["sources"][source]["waited_s"]
        assert abs(waited - ran_before) < 0.3, (source, waited, ran_before)
    # Four sequential copies of ~1.8 s each.
    assert report1["snapshot_window_s"] > 4 * 1.0
    for dest in ("dest-jobs1", "dest-jobs4", "dest-jobs2"):
        [name] = complete_backups(ws.root / dest)
        for source in SOURCES:
            assert (ws.root / dest / name / source / "blob").stat().st_size == SIZE


def test_config_concurrency_applies_without_jobs(ws: Workspace) -> None:
    setup_sources(ws)
    configure(ws, "dest-config2", concurrency=2)

    _, report = timed_run(ws)

    assert report["concurrency"] == 2
    assert max_overlap(snapshot_intervals(report).values()) == 2
    # Two of the four sources waited for a slot about as long as a copy takes;
    # the first two did not wait at all (SPEC §6 waited_s).
    waited = sorted(report["sources"][s]["waited_s"] for s in SOURCES)
    assert waited[0] < 0.2 and waited[1] < 0.2, waited
    assert waited[2] > 1.0 and waited[3] > 1.0, waited
