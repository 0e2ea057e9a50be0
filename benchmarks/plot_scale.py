"""Plots of the peers and fleet harnesses' JSON: wall time against ``--jobs``.

Run from the repository root, with the ``bench`` extra installed (matplotlib)::

    .venv/bin/python benchmarks/plot_scale.py     # benchmarks/results/{peers,fleet}.json

Writes ``benchmarks/scale-small.png`` and ``scale-big.png`` (local sources, one line per
K; panels: the first copy and the re-run after 1 % changed) and ``scale-fleet.png`` (one
line per N hosts). The engine is a solid line, the shell script running the same rsync
commands a dashed one of the same colour, rsnapshot (sequential) a cross at ``--jobs 1``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def series(rows: list[dict[str, Any]], kind: str, k: int, phase: str) -> tuple[list[int],
                                                                              list[float]]:
    mine = sorted((r for r in rows if r["kind"] == kind and r["k"] == k and r["phase"] == phase),
                  key=lambda r: r["jobs"])
    return [r["jobs"] for r in mine], [r["wall_s"] for r in mine]


def panel(ax: Any, rows: list[dict[str, Any]], phase: str, title: str, unit: str) -> None:
    ks = sorted({r["k"] for r in rows})
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for k, colour in zip(ks, colours, strict=False):
        x, y = series(rows, "engine", k, phase)
        ax.plot(x, y, "o-", color=colour, label=f"engine, {unit}={k}")
        x, y = series(rows, "shell", k, phase)
        if x:
            ax.plot(x, y, "s--", color=colour, alpha=0.6, label=f"shell, {unit}={k}")
        x, y = series(rows, "rsnapshot", k, phase)
        if x:
            ax.plot(x, y, "x", color=colour, markersize=11, markeredgewidth=2,
                    label=f"rsnapshot, {unit}={k}")
    ax.set_xscale("log", base=2)
    jobs = sorted({r["jobs"] for r in rows})
    ax.set_xticks(jobs)
    ax.set_xticklabels([str(j) for j in jobs])
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter  # loaded with matplotlib by main()

    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xlabel("--jobs (shell: xargs -P)")
    ax.set_ylabel("wall time, s (log)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=Path, default=RESULTS / "peers.json")
    parser.add_argument("--fleet", type=Path, default=RESULTS / "fleet.json")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks",
                        help="folder for the PNGs (default benchmarks/)")
    args = parser.parse_args()
    import matplotlib  # the optional `bench` extra: only this script needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if args.peers.exists():
        peers = json.loads(args.peers.read_text())
        meta = peers["meta"]
        for shape in ("small", "big"):
            rows = [r for r in peers["medians"] if r["suite"] == "rsync" and r["shape"] == shape]
            if not rows:
                continue
            info = next(s for s in meta["shapes"] if s["name"] == shape)
            fig, axes = plt.subplots(1, 2, figsize=(12, 5))
            panel(axes[0], rows, "first", "first copy (cold cache)", "K")
            panel(axes[1], rows, "changed", "re-run after 1 % of files changed", "K")
            fig.suptitle(f"K local sources, {info['files']} files of {info['size'] // 1024} KiB "
                         f"in all; {meta['cpus']} CPUs, median of {meta['reps']}")
            fig.tight_layout()
            path = args.out / f"scale-{shape}.png"
            fig.savefig(path, dpi=90)
            plt.close(fig)
            written.append(path)
    if args.fleet.exists():
        fleet = json.loads(args.fleet.read_text())
        meta = fleet["meta"]
        info = meta["fleet"]
        fig, ax = plt.subplots(figsize=(7, 5))
        panel(ax, fleet["medians"], "first", "fleet of N SSH hosts, first copy", "N")
        ax.set_title(f"N hosts x {info['files'] * info['size'] / 1048576:g} MiB, rsync "
                     f"{info['bwlimit']}; {meta['cpus']} CPUs")
        fig.tight_layout()
        path = args.out / "scale-fleet.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    for path in written:
        print(path)
    if not written:
        raise SystemExit(f"nothing to plot: neither {args.peers} nor {args.fleet} exists")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
