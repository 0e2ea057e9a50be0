"""Benchmark: the engine's own cost per source, against ``xargs -P`` running its rsync commands.

Run from the repository root, with the project's venv (root for ``--cold``)::

    python benchmarks/bench_cost.py                  # K = 100 and K = 4 sources of 20 files
    python benchmarks/bench_cost.py --sources 100 --reps 7 --cold
    python benchmarks/bench_cost.py --quick          # K = 4 and 16, one rep: a smoke run

For each K, K sources of ``--files`` small files (1 KiB) each, and two
contenders run one after the other, ``--reps`` times (the order alternating):

- the engine: ``pibackup-async run --jobs P -q --no-report`` into a fresh
  destination (its report is still written);
- the shell: the engine's own rsync commands, taken from ``run --dry-run``,
  run by ``xargs -P P -L 1 rsync`` (one command's arguments a line) into a fresh destination,
  after ``mkdir -p`` of the in-progress folder.

Wall time (start-up included) and CPU time (user + system of the process
and everything it waited for) are medians; the difference divided by K is
the engine's cost per source. With ``--cold`` the page cache is dropped
before every timed run (the interpreter's own files too): the start-up then
costs what it costs after a reboot. The import time of the command line
(``python -X importtime``, warm) is printed beside.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench_run import drop_caches, engine_config, planned_rsync_commands

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "pibackup_async.cli"]


@dataclass
class Sample:
    wall: float
    cpu: float


def build_sources(root: Path, count: int, files: int) -> list[tuple[str, Path]]:
    sources = []
    for i in range(count):
        folder = root / f"s{i:03d}"
        if not folder.is_dir() or len(os.listdir(folder)) != files:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            for j in range(files):
                (folder / f"f{j:03d}").write_bytes(os.urandom(1024))
        sources.append((f"s{i:03d}", folder))
    return sources


def timed(argv: list[str], *, cold: bool, **kwargs: object) -> Sample:
    if cold:
        drop_caches()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)[:200]} exited {result.returncode}:\n{result.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Sample(wall, cpu)


def engine_run(work: Path, sources: list[tuple[str, Path]], jobs: int, rep: int,
               cold: bool) -> Sample:
    run = work / "runs" / f"engine-{len(sources)}-{rep}"
    (run / "dest").mkdir(parents=True)
    config = engine_config(run / "config.toml", run / "dest", run / "state", sources)
    # An installed package has its byte code; a sandbox that forbids writing
    # it would charge the engine ~0.1 s of compiling on every run.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return timed([*CLI, "run", "-c", str(config), "--jobs", str(jobs), "-q", "--no-report"],
                 cold=cold, env=env)


def shell_run(work: Path, sources: list[tuple[str, Path]], jobs: int, rep: int,
              cold: bool) -> Sample:
    run = work / "runs" / f"shell-{len(sources)}-{rep}"
    (run / "dest").mkdir(parents=True)
    config = engine_config(run / "config.toml", run / "dest", run / "state", sources)
    commands = planned_rsync_commands(config, sources)
    # xargs runs ``rsync`` with each line's arguments (no shell in between).
    assert all(argv[0] == "rsync" for argv in commands)
    (run / "commands").write_text("".join(shlex.join(argv[1:]) + "\n" for argv in commands))
    targets = sorted({os.path.dirname(argv[-1].rstrip("/")) for argv in commands})
    script = (f"mkdir -p {shlex.join(targets)} && "
              f"xargs -P {jobs} -L 1 rsync < {shlex.quote(str(run / 'commands'))} > /dev/null")
    return timed(["sh", "-c", script], cold=cold)


def import_time() -> float:
    """Seconds a run's imports take (``-X importtime``, warm; its own overhead included)."""
    totals = []
    for _ in range(5):
        result = subprocess.run([sys.executable, "-X", "importtime", "-c",
                                 "import pibackup_async.cli.main, pibackup_async.cli.commands"],
                                capture_output=True, text=True, check=True)
        # Top-level imports (one space before the name) carry everything below them.
        rows = [line.split("|") for line in result.stderr.splitlines() if line.count("|") == 2]
        totals.append(sum(int(row[1]) for row in rows[1:]
                          if not row[2].startswith("  ")) / 1e6)
    return statistics.median(totals)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "cost")
    parser.add_argument("--sources", type=int, nargs="+", default=[100, 4], help="values of K")
    parser.add_argument("--files", type=int, default=20, help="files of 1 KiB per source")
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--cold", action="store_true", help="drop the page cache first (root)")
    parser.add_argument("--quick", action="store_true", help="K = 4 and 16, one rep")
    args = parser.parse_args()
    if args.quick:
        args.sources, args.reps = [4, 16], 1
    work = args.work.resolve()
    shutil.rmtree(work / "runs", ignore_errors=True)
    results: dict[int, dict[str, list[Sample]]] = {}
    try:
        for count in args.sources:
            sources = build_sources(work / "src", count, args.files)
            contenders = {"engine": engine_run, "shell": shell_run}
            samples: dict[str, list[Sample]] = {name: [] for name in contenders}
            for rep in range(args.reps):
                order = list(contenders) if rep % 2 == 0 else list(reversed(contenders))
                for name in order:
                    sample = contenders[name](work, sources, args.jobs, rep, args.cold)
                    samples[name].append(sample)
                    print(f"  K={count} rep {rep + 1} {name}: {sample.wall:.3f} s wall, "
                          f"{sample.cpu:.3f} s CPU", file=sys.stderr, flush=True)
            results[count] = samples
    finally:
        shutil.rmtree(work / "runs", ignore_errors=True)

    print(f"\n{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"{args.files} files of 1 KiB a source, --jobs {args.jobs} / xargs -P {args.jobs}, "
          f"{'cold' if args.cold else 'warm'} cache, medians of {args.reps}")
    print(f"{'K':>4}{'engine s':>10}{'shell s':>9}{'wall x':>8}{'engine CPU':>12}"
          f"{'shell CPU':>11}{'CPU x':>7}{'ms wall/src':>13}{'ms CPU/src':>12}")
    for count, samples in results.items():
        ew = statistics.median(s.wall for s in samples["engine"])
        sw = statistics.median(s.wall for s in samples["shell"])
        ec = statistics.median(s.cpu for s in samples["engine"])
        sc = statistics.median(s.cpu for s in samples["shell"])
        print(f"{count:>4}{ew:>10.3f}{sw:>9.3f}{ew / sw:>8.3f}{ec:>12.3f}{sc:>11.3f}"
              f"{ec / sc:>7.3f}{(ew - sw) / count * 1e3:>13.2f}{(ec - sc) / count * 1e3:>12.2f}")
    print(f"imports of the command line (warm, -X importtime): {import_time() * 1e3:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
