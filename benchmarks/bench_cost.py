"""Benchmark: the engine's own cost per source, against ``xargs -P`` running its rsync commands.

Run from the repository root, with the project's venv (root for ``--cold``)::

    python benchmarks/bench_cost.py                  # K = 100 and K = 4 sources of 20 files
    python benchmarks/bench_cost.py --sources 100 --reps 7 --cold
    python benchmarks/bench_cost.py --quick          # K = 4 and 16, one rep: a smoke run
    python benchmarks/bench_cost.py --sources 100 --files 200 --jobs 1 \
        --engine before=/tmp/site-a --engine after=     # an interleaved A/B of two engines

For each K, K sources of ``--files`` small files (1 KiB) each, and two
contenders run one after the other, ``--reps`` times (the order alternating):

- the engine: ``pibackup-async run --jobs P -q --no-report`` into a fresh
  destination (its report is still written);
- the shell: the engine's own rsync commands, taken from ``run --dry-run``,
  run by ``xargs -P P -L 1 rsync`` (one command's arguments a line) into a fresh destination,
  after ``mkdir -p`` of the in-progress folder.

Wall time (start-up included) and CPU time (user + system of the process
and everything it waited for) are medians; the difference divided by K is
the engine's cost per source. ``--engine NAME=SITE`` (repeated) puts engines
side by side: SITE is a plain install of one (``pip install --no-deps
--target SITE <checkout>``) put first on PYTHONPATH, empty for the
checkout's own; the order of the contenders rotates from one repetition to
the next. Peak RSS is ``wait4``'s of the run: its largest process, the
engine's own (an rsync of small files stays well under it). With ``--cold``
the page cache is dropped before every timed run (the interpreter's own
files too): the start-up then costs what it costs after a reboot. The
import time of the command line (``python -X importtime``, warm) is printed
beside.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
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
    # wait4's ru_maxrss of the run: its largest process, in KiB.
    peak_kib: int = 0


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
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, **kwargs)  # type: ignore[call-overload]
        # wait4 rather than communicate: the run's own usage, its peak RSS with it.
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - t0
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{shlex.join(argv)[:200]} exited {process.returncode}:\n"
                             f"{err.read().decode(errors='replace')}")
    return Sample(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss)


def engine_run(work: Path, sources: list[tuple[str, Path]], jobs: int, rep: int,
               cold: bool, name: str = "engine", site: str = "") -> Sample:
    run = work / "runs" / f"{name}-{len(sources)}-{rep}"
    (run / "dest").mkdir(parents=True)
    config = engine_config(run / "config.toml", run / "dest", run / "state", sources)
    # An installed package has its byte code; a sandbox that forbids writing
    # it would charge the engine ~0.1 s of compiling on every run.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    if site:
        env["PYTHONPATH"] = site
    return timed([*CLI, "run", "-c", str(config), "--jobs", str(jobs), "-q", "--no-report"],
                 cold=cold, env=env)


def shell_run(work: Path, sources: list[tuple[str, Path]], jobs: int, rep: int,
              cold: bool, setsid: bool = False) -> Sample:
    run = work / "runs" / f"shell-{len(sources)}-{rep}"
    (run / "dest").mkdir(parents=True)
    config = engine_config(run / "config.toml", run / "dest", run / "state", sources)
    commands = planned_rsync_commands(config, sources)
    # xargs runs ``rsync`` with each line's arguments (no shell in between).
    assert all(argv[0] == "rsync" for argv in commands)
    (run / "commands").write_text("".join(shlex.join(argv[1:]) + "\n" for argv in commands))
    targets = sorted({os.path.dirname(argv[-1].rstrip("/")) for argv in commands})
    # With setsid each rsync has its own session, as the engine's do: under
    # CONFIG_SCHED_AUTOGROUP that is its own scheduler group, which a machine
    # busy with other sessions favours (RESULTS.md, issue 18's A/B).
    rsync = "setsid -w rsync" if setsid else "rsync"
    script = (f"mkdir -p {shlex.join(targets)} && "
              f"xargs -P {jobs} -L 1 {rsync} < {shlex.quote(str(run / 'commands'))} > /dev/null")
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
    parser.add_argument("--engine", action="append", default=[], metavar="NAME=SITE",
                        help="an engine to run (repeat for an A/B); SITE: a plain install "
                             "put first on PYTHONPATH, empty for the checkout's own")
    parser.add_argument("--shell-setsid", action="store_true",
                        help="each of the shell's rsyncs in a session of its own, as the "
                             "engine's: fair on a machine busy with other sessions")
    args = parser.parse_args()
    engines = dict(e.partition("=")[::2] for e in args.engine) or {"engine": ""}
    if args.quick:
        args.sources, args.reps = [4, 16], 1
    work = args.work.resolve()
    shutil.rmtree(work / "runs", ignore_errors=True)
    results: dict[int, dict[str, list[Sample]]] = {}
    load_before = os.getloadavg()
    try:
        for count in args.sources:
            sources = build_sources(work / "src", count, args.files)
            contenders = [*engines, "shell"]
            samples: dict[str, list[Sample]] = {name: [] for name in contenders}
            for rep in range(args.reps):
                at = rep % len(contenders)
                for name in contenders[at:] + contenders[:at]:
                    if name == "shell":
                        sample = shell_run(work, sources, args.jobs, rep, args.cold,
                                           args.shell_setsid)
                    else:
                        sample = engine_run(work, sources, args.jobs, rep, args.cold, name,
                                            engines[name])
                    samples[name].append(sample)
                    print(f"  K={count} rep {rep + 1} {name}: {sample.wall:.3f} s wall, "
                          f"{sample.cpu:.3f} s CPU", file=sys.stderr, flush=True)
            results[count] = samples
    finally:
        shutil.rmtree(work / "runs", ignore_errors=True)

    print(f"\n{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"{args.files} files of 1 KiB a source, --jobs {args.jobs} / xargs -P {args.jobs}, "
          f"{'cold' if args.cold else 'warm'} cache, medians of {args.reps}"
          f"{'; the shell runs setsid -w rsync' if args.shell_setsid else ''}")
    load_after = os.getloadavg()
    print("load average before " + " ".join(f"{x:.2f}" for x in load_before)
          + ", after " + " ".join(f"{x:.2f}" for x in load_after))
    print(f"{'K':>4} {'engine':<10}{'engine s [min-max]':>22}{'shell s [min-max]':>22}"
          f"{'wall x':>8}{'engine CPU':>12}{'shell CPU':>11}{'CPU x':>7}{'ms wall/src':>13}"
          f"{'ms CPU/src':>12}{'RSS MiB':>9}")
    for count, samples in results.items():
        for name in engines:
            ew, sw = _spread(samples[name]), _spread(samples["shell"])
            ewm = statistics.median(s.wall for s in samples[name])
            swm = statistics.median(s.wall for s in samples["shell"])
            ec = statistics.median(s.cpu for s in samples[name])
            sc = statistics.median(s.cpu for s in samples["shell"])
            rss = statistics.median(s.peak_kib for s in samples[name]) / 1024
            print(f"{count:>4} {name:<10}{ew:>22}{sw:>22}{ewm / swm:>8.3f}{ec:>12.3f}{sc:>11.3f}"
                  f"{ec / sc:>7.3f}{(ewm - swm) / count * 1e3:>13.2f}"
                  f"{(ec - sc) / count * 1e3:>12.2f}{rss:>9.1f}")
    print(f"imports of the command line (warm, -X importtime): {import_time() * 1e3:.0f} ms")
    return 0


def _spread(samples: list[Sample]) -> str:
    walls = [s.wall for s in samples]
    return f"{statistics.median(walls):.3f} [{min(walls):.2f}-{max(walls):.2f}]"


if __name__ == "__main__":
    raise SystemExit(main())
