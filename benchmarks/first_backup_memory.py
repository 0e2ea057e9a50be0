"""Benchmark: a first backup's memory, the engine and its manifest processes together.

Run from the repository root, as root, after ``bench_manifest.py`` built its trees::

    python benchmarks/first_backup_memory.py --work /tmp/ms/work-base
    python benchmarks/first_backup_memory.py --work /tmp/ms/work-base --jobs 4

A first backup writes each source's manifest in a process of its own
(``manifest_child``, one a CPU, within the run's ``concurrency``), so the
engine's own peak RSS (``bench_manifest.py``'s column) no longer says what
the run holds at once. This runs one first backup of ``bench_manifest.py``'s
four sources of 20,000 files into a fresh destination, cold cache, and
samples every 10 ms the resident memory (``VmRSS``) of the engine and of
each of its manifest processes: it prints the peak of their sum, the
engine's own peak and each child's (``VmHWM``), and how many children ran
at once.
rsync's processes are left out, as every tool compared has its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

from bench_manifest import CLI, built_trees, fresh_first_backup

CHILD = b"pibackup_async.engine.manifest_child"


def _status_kib(pid: int, key: str) -> int | None:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of a process, None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _is_manifest_child(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return CHILD in f.read().split(b"\0")
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="bench_manifest.py's --work")
    parser.add_argument("--jobs", type=int, default=2, help="concurrency (default 2, SPEC's)")
    args = parser.parse_args()
    sources = built_trees(args.work)
    runs = args.work / "memory-run"
    config = fresh_first_backup(runs, sources, args.jobs)
    engine = subprocess.Popen([*CLI, "run", "-c", str(config), "--no-report", "--no-progress"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak_sum = peak_engine = most_at_once = 0
    child_peaks: dict[int, int] = {}
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_sum, peak_engine, most_at_once
        while not done.is_set():
            mine = _status_kib(engine.pid, "VmRSS") or 0
            kids = [p for p in _children(engine.pid) if _is_manifest_child(p)]
            sizes = {p: _status_kib(p, "VmRSS") or 0 for p in kids}
            for p in kids:
                child_peaks[p] = max(child_peaks.get(p, 0), _status_kib(p, "VmHWM") or 0)
            peak_engine = max(peak_engine, _status_kib(engine.pid, "VmHWM") or 0)
            peak_sum = max(peak_sum, mine + sum(sizes.values()))
            most_at_once = max(most_at_once, len(kids))
            done.wait(0.01)

    watcher = threading.Thread(target=sample, daemon=True)
    started = time.monotonic()
    watcher.start()
    code = engine.wait()
    done.set()
    watcher.join()
    wall = time.monotonic() - started
    report = json.loads(sorted((runs / "state" / "reports").glob("*.json"))[-1].read_text())
    print(f"first backup, 4 x 20,000 files, concurrency {args.jobs}, {os.cpu_count()} CPUs: "
          f"exit {code}, status {report['status']}, {wall:.2f} s")
    print(f"peak of engine + manifest processes: {peak_sum / 1024:.1f} MiB")
    print(f"engine alone, peak: {peak_engine / 1024:.1f} MiB")
    print(f"manifest processes: {len(child_peaks)}, at most {most_at_once} at once, peaks "
          + " ".join(f"{kib / 1024:.1f}" for kib in child_peaks.values()) + " MiB")
    shutil.rmtree(runs, ignore_errors=True)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
