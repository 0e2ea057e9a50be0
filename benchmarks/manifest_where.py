"""Benchmark: where a first backup's manifests are best written, in cold rounds.

Run from the repository root, as root, after ``bench_manifest.py`` built its trees::

    python benchmarks/manifest_where.py --work /tmp/ms/work-base --rounds 6

Three engines make the same first backup of ``bench_manifest.py``'s four
sources of 20,000 files (``--jobs 4``), cold cache, in a shuffled order each
round: the engine as it is (one manifest in its thread, the next in a
process of its own, one a CPU); the same with every first-backup manifest in
a process of its own (patched in below: the design first built, ``5cc79f1``);
and no manifests at all (``manifest_off.py``). It prints each run's time,
step 5 and CPU, then their medians. The memory of the first two is
``first_backup_memory.py``'s.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
from pathlib import Path

from bench_manifest import CLI, CLI_OFF, built_trees, fresh_first_backup, one_run

# The engine with every manifest that reads every file in a child (benchmark-only).
CHILDREN_ONLY = """
import runpy
from pibackup_async.engine import destination

_here = destination.LocalDestination._manifest_here


async def _in_child(self, folder, source, earlier, files_so_far):
    if earlier is None:
        return await self._manifest_in_child(folder, source, files_so_far)
    return await _here(self, folder, source, earlier, files_so_far)


destination.LocalDestination._manifest_here = _in_child
runpy.run_module("pibackup_async.cli", run_name="__main__", alter_sys=True)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="bench_manifest.py's --work")
    parser.add_argument("--rounds", type=int, default=6, help="rounds (default 6)")
    args = parser.parse_args()
    sources = built_trees(args.work)
    runs = args.work / "where-runs"
    engines = {"thread, then a child": CLI,
               "children only": [sys.executable, "-c", CHILDREN_ONLY],
               "no manifests": CLI_OFF}
    series: dict[str, dict[str, list[float]]] = {
        name: {"run_s": [], "step5_s": [], "cpu_s": []} for name in engines}
    for round_ in range(args.rounds):
        order = list(engines)
        random.shuffle(order)
        for name in order:
            config = fresh_first_backup(runs, sources, 4)
            measured = one_run(config, runs / "state", engines[name])
            for key, values in series[name].items():
                values.append(measured[key])
            print(f"  round {round_} {name}: run {measured['run_s']:.2f} s, step 5 "
                  f"{measured['step5_s']:.3f} s, CPU {measured['cpu_s']:.2f} s", flush=True)
    shutil.rmtree(runs, ignore_errors=True)
    for name, values in series.items():
        print(f"{name:22} " + ", ".join(f"{key} {statistics.median(v):.3f}"
                                        for key, v in values.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
