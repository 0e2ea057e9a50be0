"""Benchmark: what a run costs before and after its work — the floor under issue 12's ratios.

Run from the repository root, with the project's venv::

    python benchmarks/bench_startup.py            # medians of 15, warm
    python benchmarks/bench_startup.py --quick    # medians of 3: a smoke run

Each row is a fresh process, timed from spawn to reaping (wall) with the CPU of
everything it waited for. The rows build up, one layer each, from what the shell
and btrbk pay to what ``pibackup-async run`` pays: the interpreter, then each
library the engine is built on (anyio's asyncio backend, structlog, msgspec),
then the engine's own modules, then whole commands — a ``run`` of one source of
one file (a fresh destination each time, so no backup name is waited for)
against the same rsync command run by ``sh``.

With ``--peers FILE`` (the JSON of ``bench_peers.py``), the floor is set beside
the 5% that issue 12's goals allow on each of that run's shell and btrbk times.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

from bench_cost import timed
from bench_run import planned_rsync_commands

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
ENGINE = str(Path(PY).parent / "pibackup-async")
_NO_RICH = "import sys; sys.modules['rich'] = None; "  # as the CLI imports structlog
LAYERS = [
    ("python -I -c pass (the interpreter, no site)", [PY, "-I", "-c", "pass"]),
    ("python -c pass (with the venv's site)", [PY, "-c", "pass"]),
    ("+ asyncio", [PY, "-c", "import asyncio"]),
    ("+ anyio and its asyncio backend", [PY, "-c", "import anyio, anyio._backends._asyncio"]),
    ("+ structlog (without rich)",
     [PY, "-c", _NO_RICH + "import anyio, anyio._backends._asyncio, structlog"]),
    ("+ msgspec (every library a run loads)",
     [PY, "-c", _NO_RICH + "import anyio, anyio._backends._asyncio, structlog, msgspec"]),
    ("+ the engine's modules (a run's imports)",
     [PY, "-c", "from pibackup_async.cli.main import _structlog_without_rich as s; s(); "
                "import pibackup_async.cli.commands"]),
]


def one_file_run(work: Path, rep: int) -> tuple[list[str], list[str]]:
    """A config of one source of one file, into a fresh destination; the shell's equivalent."""
    run = work / f"run-{rep}"
    shutil.rmtree(run, ignore_errors=True)
    (run / "dest").mkdir(parents=True)
    (run / "sh-dest").mkdir()
    config = run / "config.toml"
    config.write_text(f'destination = "{run / "dest"}"\nstate_dir = "{run / "state"}"\n'
                      f'[[sources]]\nname = "one"\ntype = "rsync"\npath = "{work / "src"}"\n')
    engine = [ENGINE, "-c", str(config), "run", "-q", "--no-report", "--no-progress"]
    [argv] = planned_rsync_commands(config, [("one", work / "src")])
    argv[-1] = f"{run / 'sh-dest'}/"  # the same command into a folder of its own
    return engine, ["sh", "-c", shlex.join(argv) + " > /dev/null"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, help="repetitions (default 15; 3 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "startup")
    parser.add_argument("--peers", type=Path,
                        default=REPO / "benchmarks" / "results" / "peers.json",
                        help="bench_peers.py's JSON, for the 5%% budgets (skipped if absent)")
    args = parser.parse_args()
    reps = args.reps or (3 if args.quick else 15)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    started = time.monotonic()
    shutil.rmtree(args.work, ignore_errors=True)
    (args.work / "src").mkdir(parents=True)
    (args.work / "src" / "file").write_bytes(os.urandom(4096))

    rows: list[tuple[str, list[str] | None]] = [("sh -c true (the shell's start)",
                                                 ["sh", "-c", "true"])]
    if shutil.which("perl"):
        rows.append(("perl -e 1 (btrbk's interpreter)", ["perl", "-e", "1"]))
    if shutil.which("btrbk"):
        rows.append(("btrbk --version (its modules loaded)", ["btrbk", "--version"]))
    rows += [(name, argv) for name, argv in LAYERS]
    rows += [("pibackup-async --help", [ENGINE, "--help"]),
             ("sh running a run's rsync: 1 file", None),
             ("pibackup-async run: 1 source, 1 file", None)]
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in rows}
    for rep in range(reps):
        engine, shell = one_file_run(args.work, rep)
        for name, argv in rows:
            if argv is None:
                argv = shell if name.startswith("sh running") else engine
            sample = timed(argv, cold=False, env=env)
            samples[name].append((sample.wall, sample.cpu))
    shutil.rmtree(args.work, ignore_errors=True)

    medians = {name: (statistics.median(w for w, _ in s), statistics.median(c for _, c in s))
               for name, s in samples.items()}
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, warm, medians of {reps}")
    print(f"{'':54} {'wall ms':>8} {'CPU ms':>8}")
    for name, (wall, cpu) in medians.items():
        print(f"{name:54} {wall * 1000:8.1f} {cpu * 1000:8.1f}")
    floor = medians["+ msgspec (every library a run loads)"][0]
    run_cost = (medians["pibackup-async run: 1 source, 1 file"][0]
                - medians["sh running a run's rsync: 1 file"][0])
    print(f"\nthe libraries' floor: {floor * 1000:.0f} ms; a run's cost over the shell's "
          f"(one file): {run_cost * 1000:.0f} ms")
    if args.peers.is_file():
        budgets(json.loads(args.peers.read_text()), floor, run_cost)
    print(f"took {time.monotonic() - started:.0f} s")
    return 0


def budgets(peers: dict[str, object], floor: float, run_cost: float) -> None:
    """Issue 12's 5% (10% for btrbk's incremental) of each reference time, beside the floor."""
    runs = peers.get("runs")
    if not isinstance(runs, list):
        return
    walls: dict[tuple[str, int, str, str], list[float]] = {}
    for run in runs:
        if run.get("kind") in ("shell", "btrbk"):
            key = (str(run["shape"]), int(run["k"]), str(run["phase"]), str(run["contender"]))
            walls.setdefault(key, []).append(float(run["wall_s"]))
    print("\nreference wall (median) and what a goal allows the engine above it:")
    for (shape, k, phase, label), w in sorted(walls.items()):
        if label.startswith("shell") and (shape != "small" or k not in (4, 100)):
            continue  # the goals' shapes: small files at K = 4 and 100; btrbk
        wall = statistics.median(w)
        allowed = wall * (0.10 if label == "btrbk" and phase == "changed" else 0.05)
        fits = ("fits" if run_cost <= allowed else
                "the libraries alone exceed it" if floor > allowed else "a run's cost exceeds it")
        print(f"  {shape:6} K={k:<3} {phase:9} {label:10} {wall:6.2f} s: allows "
              f"{allowed * 1000:5.0f} ms (floor {floor * 1000:.0f}, a run's cost "
              f"{run_cost * 1000:.0f}): {fits}")


if __name__ == "__main__":
    raise SystemExit(main())
