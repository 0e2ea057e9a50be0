"""Benchmark: the nightly mirror of one backup against the hand copy, in cold pairs.

Run from the repository root, as root (loop devices, the page cache dropped)::

    python benchmarks/mirror_nightly_pairs.py            # 7 pairs
    python benchmarks/mirror_nightly_pairs.py --pairs 3

``bench_mirror.py`` times each row once; the nightly row's allowance at 1.1×
(0.3 s) is smaller than the row's own spread. This takes ``bench_mirror.py``'s
origin (its kept image, 30 backups × 20,000 files, built on first use) and a
mirror holding the 29 older backups, then times, ``--pairs`` times in a
shuffled order, the hand ``rsync -aHAX --numeric-ids --link-dest`` of the
newest backup and ``pibackup-async mirror`` doing the same, the copy removed
and the page cache dropped before each. It prints both series, the ratio of
their medians and each pair's ratio.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import time
from pathlib import Path

import bench_mirror as bm
from benchkit import Ext4Filesystem, drop_caches

WORK = Path(__file__).resolve().parent / "work" / "mirror"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=7, help="cold pairs (default 7)")
    args = parser.parse_args()
    origin_fs = Ext4Filesystem(WORK / "images" / "origin.img", WORK / "mnt" / "origin")
    bm.mount_origin(origin_fs, 2048)
    origin = origin_fs.mount / "origin"
    origin.mkdir(exist_ok=True)
    bm.build_origin(WORK, origin, 20000, 30)
    names = bm.backups(origin)
    mirror_fs = Ext4Filesystem(WORK / "images" / "mirror.img", WORK / "mnt" / "mirror")
    times: dict[str, list[float]] = {"hand": [], "mirror": []}
    try:
        mirror = bm.fresh_mirror(mirror_fs, 1024, origin, names[:-1])
        state = WORK / "state-pairs"
        config = bm.mirror_config(WORK / "pairs.toml", mirror, state, str(origin))
        newest = mirror / names[-1]
        hand = [*bm.RSYNC, f"--link-dest={mirror / names[-2]}/", f"{origin / names[-1]}/",
                f"{newest}/"]
        for _ in range(args.pairs):
            order = list(times)
            random.shuffle(order)
            for which in order:
                subprocess.run(["rm", "-rf", str(newest), str(state)], check=True)
                subprocess.run(["sync"], check=True)
                drop_caches()
                started = time.perf_counter()
                subprocess.run(hand if which == "hand" else bm.mirror_argv(config), check=True,
                               stdout=subprocess.DEVNULL)
                times[which].append(time.perf_counter() - started)
                bm.check_copy(origin, mirror, [names[-1]])
    finally:
        mirror_fs.remove()
        bm.ofs_unmount(origin_fs)()
    for which, series in times.items():
        print(f"{which:7} " + " ".join(f"{s:.2f}" for s in series)
              + f"  median {statistics.median(series):.2f}")
    ratio = statistics.median(times["mirror"]) / statistics.median(times["hand"])
    print(f"ratio of medians {ratio:.3f}; paired ratios "
          + " ".join(f"{m / h:.2f}" for m, h in zip(times["mirror"], times["hand"], strict=True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
