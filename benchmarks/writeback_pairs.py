"""Benchmark: nightly runs with and without the writeback's head start, in cold pairs.

Run from the repository root, as root (the page cache is dropped)::

    python benchmarks/writeback_pairs.py              # 6 pairs, 4 x 20,000 files
    python benchmarks/writeback_pairs.py --pairs 3 --files 2000

Since the snapshot window's end starts the copies' writeback (a ``syncfs`` in a
thread, ``Destination.start_writeback``), step 6's flush finds little left. A
mirror's nightly copy was slower for the same head start (RESULTS.md: reverted
there); this checks a run's. Two destinations, each given a first backup of
``bench_manifest.py``'s four trees, then ``--pairs`` nightly runs with nothing
changed into each, in shuffled order: the engine as it is, and the same engine
through ``writeback_off.py``. Prints both series, their medians and each pair's
ratio.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_manifest import CLI, FILE_SIZE, NAMES, engine_config
from benchkit import build_tree, drop_caches

HERE = Path(__file__).resolve().parent
CLI_OFF = [sys.executable, str(HERE / "writeback_off.py")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=6, help="cold pairs (default 6)")
    parser.add_argument("--files", type=int, default=20000, help="files a source")
    parser.add_argument("--work", type=Path, default=HERE / "work",
                        help="work folder (default: benchmarks/work, gitignored)")
    args = parser.parse_args()
    sources = []
    for i, name in enumerate(NAMES):
        tree = args.work / "trees" / f"manifest-{name}-{args.files}"
        build_tree(tree, args.files, size=FILE_SIZE, seed=200 + i)
        sources.append((name, tree))
    runs = args.work / "writeback-runs"
    shutil.rmtree(runs, ignore_errors=True)
    commands = {"with": CLI, "without": CLI_OFF}
    configs = {}
    for which, cli in commands.items():
        (runs / which).mkdir(parents=True)
        configs[which] = engine_config(runs / f"{which}.toml", runs / which,
                                       runs / f"{which}-state", sources, 4)
        subprocess.run([*cli, "-c", str(configs[which]), "-q", "run", "--no-progress"],
                       check=True)
    times: dict[str, list[float]] = {which: [] for which in commands}
    for _ in range(args.pairs):
        order = list(commands)
        random.shuffle(order)
        for which in order:
            time.sleep(1.1)  # a backup name of its own
            subprocess.run(["sync"], check=True)
            drop_caches()
            started = time.perf_counter()
            subprocess.run([*commands[which], "-c", str(configs[which]), "-q", "run",
                            "--no-progress"], check=True)
            times[which].append(time.perf_counter() - started)
    shutil.rmtree(runs)
    for which, series in times.items():
        print(f"{which:8} " + " ".join(f"{s:.2f}" for s in series)
              + f"  median {statistics.median(series):.2f}")
    print("paired with/without " + " ".join(
        f"{a / b:.3f}" for a, b in zip(times["with"], times["without"], strict=True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
