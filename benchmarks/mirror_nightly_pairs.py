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
import contextlib
import random
import statistics
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import bench_mirror as bm
from benchkit import Ext4Filesystem, drop_caches

if TYPE_CHECKING:
    from collections.abc import Iterator

WORK = Path(__file__).resolve().parent / "work" / "mirror"


class Stage(NamedTuple):
    """The origin, and a mirror that holds every backup of it but the newest."""

    origin: Path
    names: list[str]  # the origin's backups, oldest first
    mirror: Path
    config: Path  # the mirror's configuration (``state_dir``: ``state``)
    state: Path
    newest: Path  # where the newest backup's copy goes
    hand: list[str]  # the hand ``rsync --link-dest`` of the newest backup into ``newest``

    def cold(self) -> None:
        """Back to the night before: the newest copy and the mirror's state gone, the
        page cache dropped."""
        subprocess.run(["rm", "-rf", str(self.newest), str(self.state)], check=True)
        subprocess.run(["sync"], check=True)
        drop_caches()


@contextlib.contextmanager
def nightly_stage(name: str) -> Iterator[Stage]:
    """``bench_mirror.py``'s origin (30 backups x 20,000 files, built on first use) and a
    fresh mirror of its 29 older backups, configured as ``<name>.toml``; both gone after."""
    origin_fs = Ext4Filesystem(WORK / "images" / "origin.img", WORK / "mnt" / "origin")
    bm.mount_origin(origin_fs, 2048)
    mirror_fs = Ext4Filesystem(WORK / "images" / "mirror.img", WORK / "mnt" / "mirror")
    try:
        origin = origin_fs.mount / "origin"
        origin.mkdir(exist_ok=True)
        bm.build_origin(WORK, origin, 20000, 30)
        names = bm.backups(origin)
        mirror = bm.fresh_mirror(mirror_fs, 1024, origin, names[:-1])
        state = WORK / f"state-{name}"
        config = bm.mirror_config(WORK / f"{name}.toml", mirror, state, str(origin))
        newest = mirror / names[-1]
        hand = [*bm.RSYNC, f"--link-dest={mirror / names[-2]}/", f"{origin / names[-1]}/",
                f"{newest}/"]
        yield Stage(origin, names, mirror, config, state, newest, hand)
    finally:
        mirror_fs.remove()
        bm.ofs_unmount(origin_fs)()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=7, help="cold pairs (default 7)")
    args = parser.parse_args()
    times: dict[str, list[float]] = {"hand": [], "mirror": []}
    with nightly_stage("pairs") as stage:
        for _ in range(args.pairs):
            order = list(times)
            random.shuffle(order)
            for which in order:
                stage.cold()
                started = time.perf_counter()
                subprocess.run(stage.hand if which == "hand" else bm.mirror_argv(stage.config),
                               check=True, stdout=subprocess.DEVNULL)
                times[which].append(time.perf_counter() - started)
                bm.check_copy(stage.origin, stage.mirror, [stage.names[-1]])
    for which, series in times.items():
        print(f"{which:7} " + " ".join(f"{s:.2f}" for s in series)
              + f"  median {statistics.median(series):.2f}")
    ratio = statistics.median(times["mirror"]) / statistics.median(times["hand"])
    print(f"ratio of medians {ratio:.3f}; paired ratios "
          + " ".join(f"{m / h:.2f}" for m, h in zip(times["mirror"], times["hand"], strict=True)))
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
