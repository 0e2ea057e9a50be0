"""The peers and fleet harnesses' smoke modes, run as the user runs them, so they cannot rot.

No timing is asserted (issue 12: the harness is run by hand, its output committed); what
is checked is that every contender ran every phase, copied something, and that the
harness left no mount, loop device or server behind.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_root, processes_mentioning, wait_for

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
PHASES = {"first", "unchanged", "changed"}

pytestmark = [
    pytest.mark.slow,
    needs_root,
    pytest.mark.skipif(any(shutil.which(t) is None for t in ("rsync", "rsnapshot", "btrbk")),
                       reason="rsync, rsnapshot and btrbk are needed (.ci/run installs them)"),
]


def run_harness(script: str, tmp_path: Path) -> dict[str, object]:
    out = tmp_path / "results.json"
    work = tmp_path / "work"
    result = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", "--work", str(work), "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "took" in result.stdout  # the table was printed to the end
    # Nothing left behind: no mount, no loop device on its images, no server.
    with open("/proc/self/mountinfo") as f:
        assert str(tmp_path) not in f.read()
    # A loop device detached while something still held it (udev's probe of the
    # filesystem, on a busy machine) goes a moment later, on its own (autoclear).
    wait_for(lambda: str(tmp_path) not in subprocess.run(
        ["losetup", "-a"], capture_output=True, text=True).stdout, 15, "loop devices detached")
    assert processes_mentioning(str(work)) == []
    return dict(json.loads(out.read_text()))


def test_peers_quick_runs_every_contender_and_phase(tmp_path: Path) -> None:
    data = run_harness("bench_peers.py", tmp_path)
    runs = data["runs"]
    assert isinstance(runs, list)
    seen: dict[tuple[str, str], set[str]] = {}
    for run in runs:
        seen.setdefault((run["suite"], run["kind"]), set()).add(run["phase"])
        if run["phase"] == "first":
            assert run["disk_mib"] > 0, run  # a first copy takes room on the destination
        assert run["wall_s"] > 0 and run["cpu_s"] > 0, run
        if run["kind"] == "engine":
            assert run["extra"]["window_s"] >= 0 and run["rss_mib"] > 0, run
    assert set(seen) == {("rsync", "engine"), ("rsync", "shell"), ("rsync", "rsnapshot"),
                         ("btrfs", "engine"), ("btrfs", "btrbk")}
    assert all(phases == PHASES for phases in seen.values()), seen
    # The engine's btrfs re-run after the change is an incremental send.
    [changed] = [r for r in runs if r["suite"] == "btrfs" and r["kind"] == "engine"
                 and r["phase"] == "changed"]
    assert changed["extra"]["incremental"] == 1.0
    ratios = data["ratios"]
    assert isinstance(ratios, dict)
    assert "j4" in ratios["rsync/small/K=4/first"]["engine_over_shell"]
    assert "engine_j1_over_btrbk" in ratios["btrfs/btrfs/K=4/changed"]


def test_fleet_quick_pulls_every_host_with_every_contender(tmp_path: Path) -> None:
    data = run_harness("bench_fleet.py", tmp_path)
    runs = data["runs"]
    assert isinstance(runs, list)
    at_two = {r["contender"] for r in runs if r["k"] == 2}
    assert at_two == {"engine -j1", "engine -j2", "shell -P2", "rsnapshot"}
    for run in runs:
        assert run["disk_mib"] > 0, run  # every host's tree was pulled
    ratios = data["ratios"]
    assert isinstance(ratios, dict)
    assert "engine_jN_speedup_over_rsnapshot" in ratios["N=2"]


def test_startup_quick_times_every_layer_and_both_one_file_runs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH / "bench_startup.py"), "--quick", "--work",
         str(tmp_path / "work"), "--peers", str(tmp_path / "absent.json")],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    rows = {line[:54].strip(): line[54:].split() for line in result.stdout.splitlines()
            if line[:1] in ("+", "s", "p", "b") and len(line[54:].split()) == 2}
    for row in ("sh -c true (the shell's start)", "+ msgspec (every library a run loads)",
                "pibackup-async run: 1 source, 1 file", "sh running a run's rsync: 1 file"):
        assert float(rows[row][0]) > 0, result.stdout
    assert "took" in result.stdout
    assert not (tmp_path / "work").exists()  # its runs' folders are removed
