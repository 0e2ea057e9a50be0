"""Benchmark: `diff` and `du` against the plain tools reading the same trees.

Run from the repository root, as root (to drop the page cache)::

    python benchmarks/bench_inspect.py                 # 100,000 files, 10 backups
    python benchmarks/bench_inspect.py --quick         # 5,000 files: a smoke run

The destination is built once under ``--work`` (reused by later
invocations): a first backup of ``--files`` files of 1 KiB in folders of 500,
then nine more made as ``--link-dest`` makes them (``cp -al`` of the previous
one, then 1% of the files rewritten as new inodes, 0.1% removed, 0.1% added),
named an hour apart. Every timed run starts with a cold page cache.

Measured side by side (median of ``--reps``):

- ``pibackup-async diff`` of the two newest backups (text to /dev/null) vs
  ``find OLD NEW -printf`` of every field diff compares (inode, type, size,
  mtime, mode, owner, link target) over both trees;
- ``pibackup-async du`` over the 10 backups vs ``du -s`` on the destination;
- the CLI's peak RSS (``ru_maxrss`` from ``wait4``; the CLI runs no child here).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from benchkit import drop_caches, sh

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "pibackup_async.cli"]
PER_FOLDER = 500
BACKUPS = 10


def _name(i: int) -> str:
    moment = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(hours=i)
    return moment.strftime("%Y-%m-%dt%H-%M-%S%z")


def _write(path: Path, tag: str) -> None:
    with open(path, "wb") as f:
        f.write(tag.encode().ljust(1024, b"."))


def build(work: Path, files: int) -> Path:
    """The destination with BACKUPS backups of one source ``data``; built once."""
    dest = work / f"dest-{files}"
    done = work / f"dest-{files}.complete"
    if done.exists():
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    first = dest / _name(0) / "data"
    for i in range(files):
        folder = first / f"d{i // PER_FOLDER:04d}"
        if i % PER_FOLDER == 0:
            folder.mkdir(parents=True)
        _write(folder / f"f{i:06d}.dat", f"0:{i}")
    for b in range(1, BACKUPS):
        previous, current = dest / _name(b - 1), dest / _name(b)
        sh(["cp", "-al", str(previous), str(current)])
        data = current / "data"
        for i in range(b, files, 100):                       # 1% rewritten: new inodes
            path = data / f"d{i // PER_FOLDER:04d}" / f"f{i:06d}.dat"
            if path.exists():
                path.unlink()
                _write(path, f"{b}:{i}")
        for i in range(b + 50, files, 1000):                 # 0.1% removed, 0.1% added
            (data / f"d{i // PER_FOLDER:04d}" / f"f{i:06d}.dat").unlink(missing_ok=True)
            _write(data / f"d{i // PER_FOLDER:04d}" / f"new{b}-{i:06d}.dat", f"{b}:{i}")
    done.write_text("ok\n")
    return dest


def timed(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of ``argv``, cold cache, stdout to /dev/null."""
    drop_caches()
    start = time.perf_counter()
    with open(os.devnull, "wb") as null:
        proc = subprocess.Popen(argv, stdout=null, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        said = proc.stderr.read().decode() if proc.stderr else ""
        raise SystemExit(f"{' '.join(argv)} failed: {said}")
    return wall, usage.ru_maxrss / 1024


def median_of(argv: list[str], reps: int) -> tuple[float, float, float, float]:
    runs = [timed(argv) for _ in range(reps)]
    walls = [w for w, _ in runs]
    return statistics.median(walls), min(walls), max(walls), max(r for _, r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5,000 files, for a smoke run")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work")
    parser.add_argument("--files", type=int, help="files per backup (default 100000)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions; the median is shown")
    args = parser.parse_args()
    files = args.files or (5000 if args.quick else 100_000)
    if os.geteuid() != 0:
        raise SystemExit("needs root (drop_caches)")
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dest = build(args.work, files)
    print(f"destination: {dest} ({BACKUPS} backups of {files} files; "
          f"built/reused in {time.perf_counter() - t0:.1f} s)")
    config = args.work / "inspect-config.toml"
    config.write_text(f'destination = "{dest}"\nstate_dir = "{args.work / "state"}"\n'
                      f'[[sources]]\nname = "data"\ntype = "rsync"\npath = "{args.work}"\n')
    old, new = dest / _name(BACKUPS - 2), dest / _name(BACKUPS - 1)
    pairs = [
        ("diff of the two newest", [*CLI, "diff", "-c", str(config)],
         ["find", str(old), str(new), "-printf", "%i %y %s %T@ %m %U %G %l %p\\n"]),
        (f"du over {BACKUPS} backups", [*CLI, "du", "-c", str(config)],
         ["du", "-s", str(dest)]),
    ]
    print(f"load average before: {os.getloadavg()[0]:.2f}; cold cache; median [min-max] "
          f"of {args.reps}")
    print(f"{'':28}{'engine s':>22}{'plain tool s':>22}{'ratio':>7}{'peak RSS MiB':>14}")
    for label, engine, plain in pairs:
        e_med, e_min, e_max, rss = median_of(engine, args.reps)
        p_med, p_min, p_max, _ = median_of(plain, args.reps)
        print(f"{label:28}{e_med:8.2f} [{e_min:.2f}-{e_max:.2f}]   "
              f"{p_med:8.2f} [{p_min:.2f}-{p_max:.2f}]   {e_med / p_med:5.2f}{rss:12.1f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print("commands:")
    for _, engine, plain in pairs:
        print("  " + " ".join(engine[2:]) + "   vs   " + " ".join(plain))


if __name__ == "__main__":
    main()
