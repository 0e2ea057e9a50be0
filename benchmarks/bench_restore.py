"""Benchmark: ``restore`` of a whole source against the plain rsync command it stands for.

Run from the repository root (as root: it drops the page cache)::

    python benchmarks/bench_restore.py                 # 100,000 files of 1 KiB
    python benchmarks/bench_restore.py --quick         # 5,000 files: a smoke run

The source tree and one backup of it (``pibackup-async run``) are built once
under ``--work``. Each timed run restores into a fresh folder with a cold page
cache; the engine (``restore latest data --to T``) and the plain command
(``rsync -aHAX --numeric-ids --sparse --stats BACKUP/data/ T/``) alternate,
so drift in the machine's load hits both alike. Targets are deleted only at
the end (NOTES pitfall 10). Peak RSS is the CLI process's own VmHWM
(rsync's processes are the same in both columns and not counted).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import sys
from pathlib import Path

from bench_run import CLI, timed
from benchkit import build_tree, count_tree, drop_caches

FILE_SIZE = 1024


def prepare(work: Path, files: int) -> tuple[Path, Path, Path]:
    """The source, the config and the backup's copy of the source (made once)."""
    source, dest, state = work / "source", work / "dest", work / "state"
    build_tree(source, files, size=FILE_SIZE)
    config = work / "config.toml"
    config.write_text(f'destination = "{dest}"\nstate_dir = "{state}"\n'
                      f'[[sources]]\nname = "data"\ntype = "rsync"\npath = "{source}"\n')
    dest.mkdir(exist_ok=True)
    backups = sorted(p for p in dest.iterdir() if not p.name.endswith((".in-progress",
                                                                       ".deleting")))
    if not backups:
        timed([*CLI, "run", "-q", "-c", str(config)])
        backups = sorted(dest.iterdir())
    return source, config, backups[-1] / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/pibackup-bench-restore"))
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    files = 5_000 if args.quick else args.files
    work = args.work / f"{files}"
    source, config, copy = prepare(work, files)
    want = count_tree(source)
    targets = work / "targets"
    if targets.exists():
        shutil.rmtree(targets)
    targets.mkdir()

    engine_argv = [*CLI, "restore", "-q", "-c", str(config), "latest", "data", "--to"]
    plain_argv = ["rsync", "-aHAX", "--numeric-ids", "--sparse", "--stats", f"{copy}/"]
    engine, plain, rss = [], [], []
    for i in range(args.runs):
        target = targets / f"engine{i}"
        drop_caches()
        run = timed([*engine_argv, str(target)], watch_rss=True)
        engine.append(run.wall_s)
        rss.append((run.peak_rss_kib or 0) / 1024)
        assert count_tree(target) == want, "the engine's restore is incomplete"
        target = targets / f"plain{i}"
        drop_caches()
        plain.append(timed([*plain_argv, f"{target}/"]).wall_s)
        assert count_tree(target) == want, "the plain rsync copy is incomplete"
    shutil.rmtree(targets)

    def show(values: list[float]) -> str:
        return f"{statistics.median(values):6.2f} [{min(values):.2f}-{max(values):.2f}]"

    ratio = statistics.median(engine) / statistics.median(plain)
    print(f"restore of a whole source, {files:,} files of {FILE_SIZE} B, cold cache, "
          f"median [min-max] of {args.runs}; load {os.getloadavg()[0]:.2f}")
    print(f"  plain rsync s       {show(plain)}   {shlex.join(plain_argv)} T/")
    print(f"  restore s           {show(engine)}   pibackup-async restore latest data --to T")
    print(f"  ratio               {ratio:6.3f}   (goal <= 1.05)")
    print(f"  CLI peak RSS MiB    {max(rss):6.1f}   (goal <= 60)")


if __name__ == "__main__":
    sys.exit(main())
