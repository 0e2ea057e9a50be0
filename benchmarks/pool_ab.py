"""Pool the first backup's A/B pairs of several ``bench_manifest.py`` outputs.

    python benchmarks/bench_manifest.py --reps 5 --work W > a.txt   # as often as wanted
    python benchmarks/pool_ab.py a.txt b.txt ...

One invocation gives 3 or 5 pairs, and on a shared machine a single noisy
pair moves its median by points. This reads the per-run lines every output
holds (``r<N> first backup[ (without manifests)]: run <s>s (CPU <s>s)``),
pairs each rep's two runs, and prints every pair's share (with minus
without, over without), their median, and the same for CPU time.
"""

from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path

_RUN = re.compile(r"\s+r(\d+) first backup( \(without manifests\))?: "
                  r"run ([\d.]+)s \(CPU ([\d.]+)s\)")


def pairs(text: str) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """((wall, CPU) with manifests, (wall, CPU) without) for each rep of one output."""
    reps: dict[int, dict[str, tuple[float, float]]] = {}
    for line in text.splitlines():
        found = _RUN.match(line)
        if found:
            side = "without" if found.group(2) else "with"
            reps.setdefault(int(found.group(1)), {})[side] = (float(found.group(3)),
                                                              float(found.group(4)))
    return [(rep["with"], rep["without"]) for rep in reps.values() if len(rep) == 2]


def main(paths: list[str]) -> int:
    pooled = []
    for path in paths:
        found = pairs(Path(path).read_text())
        print(f"{path}: {len(found)} pairs")
        pooled += found
    if not pooled:
        sys.exit("no first-backup pairs found")
    wall = sorted(100 * (on[0] - off[0]) / off[0] for on, off in pooled)
    cpu = sorted(100 * (on[1] - off[1]) / off[1] for on, off in pooled)
    print(f"{len(pooled)} pairs; wall share median {statistics.median(wall):.1f}%, "
          f"CPU share median {statistics.median(cpu):.1f}%")
    print("wall shares: " + " ".join(f"{share:.1f}" for share in wall))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
