"""Benchmark: what live progress costs (SPEC §8: at most 2% on runs of 5 s or more).

Run from the repository root, as root (cold page cache)::

    python benchmarks/bench_progress.py            # 4 sources x 20,000 files of 4 KiB
    python benchmarks/bench_progress.py --quick    # 4 x 2,000 files: a smoke run

The same ``pibackup-async run --jobs 4`` three ways, interleaved, each into a
fresh destination with a cold page cache:

- ``drawn``: stderr is a pseudo-terminal, progress is drawn (rich, redrawn twice a second);
- ``--no-progress``: the same terminal, nothing drawn;
- ``pipe``: stderr is a pipe (a timer's journal): the heartbeat instead.

Progress reads what rsync has written from /proc; rsync's own
``--info=progress2``, which the engine no longer asks for, is shown apart for
the record: plain rsync of one source with and without it. Also: ``--help``
wall time and whether it imports rich, httpx or prometheus_client.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pty
import select
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench_run import REPO, drop_caches, engine_config
from benchkit import build_tree

CLI = [sys.executable, "-m", "pibackup_async.cli"]
MODES = ("drawn", "--no-progress", "pipe")


def _drain(fd: int, stop: threading.Event, seen: bytearray) -> None:
    while not stop.is_set():
        ready, _, _ = select.select([fd], [], [], 0.05)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                return
            if not chunk:
                return
            seen += chunk


def timed_run(config: Path, mode: str) -> tuple[float, float, int]:
    """Wall and CPU seconds (the engine and every child it reaped) and bytes of stderr."""
    argv = [*CLI, "run", "--jobs", "4", "--no-report", "-c", str(config)]
    if mode == "--no-progress":
        argv.append("--no-progress")
    seen = bytearray()
    stop = threading.Event()
    if mode == "pipe":
        master, slave = os.pipe()
    else:
        master, slave = pty.openpty()
    reader = threading.Thread(target=_drain, args=(master, stop, seen), daemon=True)
    reader.start()
    started = time.monotonic()
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=slave, close_fds=True)
    os.close(slave)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    reader.join(5)
    stop.set()
    os.close(master)
    if process.returncode != 0:
        raise SystemExit(f"{mode}: exit {process.returncode}:\n{seen.decode(errors='replace')}")
    return wall, usage.ru_utime + usage.ru_stime, len(seen)


def rsync_feed_cost(source: Path, work: Path, reps: int) -> dict[str, float]:
    """Median wall of plain rsync of one source, with and without --info=progress2."""
    base = ["rsync", "-aHAX", "--numeric-ids", "--sparse", "--stats"]
    times: dict[str, list[float]] = {"without": [], "with": []}
    for rep in range(reps):
        for label in (("without", "with") if rep % 2 == 0 else ("with", "without")):
            dest = work / f"rsync-{label}-{rep}"
            argv = [*base, *(["--info=progress2"] if label == "with" else []),
                    f"{source}/", f"{dest}/"]
            drop_caches()
            t0 = time.monotonic()
            subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)
            times[label].append(time.monotonic() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def help_startup(reps: int = 10) -> tuple[float, list[str]]:
    """Median wall of ``--help`` (warm) and the heavy modules it imports, if any."""
    walls = []
    for _ in range(reps):
        t0 = time.monotonic()
        subprocess.run([*CLI, "--help"], stdout=subprocess.DEVNULL, check=True)
        walls.append(time.monotonic() - t0)
    trace = subprocess.run([sys.executable, "-X", "importtime", "-m", "pibackup_async.cli",
                            "--help"], capture_output=True, text=True, check=True).stderr
    heavy = sorted({line.rsplit("|", 1)[-1].strip().split(".")[0]
                    for line in trace.splitlines()
                    if line.rsplit("|", 1)[-1].strip().split(".")[0]
                    in ("rich", "httpx", "prometheus_client")})
    return statistics.median(walls), heavy


def frame_cost(frames: int = 200) -> None:
    """What drawing costs, counted rather than timed: rich's import, then CPU per frame.

    Four process trees like rsync's (a shell and two children each) stand for
    running sources; every frame reads them from /proc and draws six lines.
    """
    import io

    t0 = time.perf_counter()
    from rich.console import Console, Group
    from rich.live import Live
    from rich.text import Text
    imported = time.perf_counter() - t0
    from pibackup_async.cli.progress import REFRESH_S, Rates, run_line, step_line
    from pibackup_async.engine import heartbeat
    from pibackup_async.engine.proc_io import most_written

    trees = [subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"]) for _ in range(4)]
    try:
        with contextlib.ExitStack() as steps:
            for i, tree in enumerate(trees):
                beat = steps.enter_context(heartbeat.beating("snapshot", source=f"s{i}"))
                beat.probe = (lambda pid: lambda b: setattr(b, "bytes", most_written(pid)))(
                    tree.pid)
            rates, started = Rates(), time.monotonic()

            def frame() -> Group:
                now, beats = time.monotonic(), heartbeat.running()
                for beat in beats:
                    beat.refresh()
                rate = rates.sample(beats, now)
                lines = [run_line("run", beats, started, now)]
                lines += ["  " + step_line(b, rate[id(b)], now) for b in beats]
                return Group(*(Text(line, no_wrap=True) for line in lines))

            console = Console(file=io.StringIO(), force_terminal=True, width=100)
            with Live(frame(), console=console, auto_refresh=False, transient=True) as live:
                c0 = time.process_time()
                for _ in range(frames):
                    live.update(frame(), refresh=True)
                per = (time.process_time() - c0) / frames
    finally:
        for tree in trees:
            tree.kill()
            tree.wait()
    print(f"rich imported in {imported * 1000:.0f} ms; a frame (4 trees read from /proc, "
          f"6 lines drawn) {per * 1000:.2f} ms of CPU: {per / REFRESH_S * 100:.2f}% of one "
          f"CPU at {1 / REFRESH_S:.0f} frames a second")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small trees, for a smoke run")
    parser.add_argument("--frames", action="store_true",
                        help="only count what drawing costs (rich's import, CPU a frame)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions of each mode")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "progress")
    args = parser.parse_args()
    if args.frames:
        frame_cost()
        return 0
    files = 2000 if args.quick else 20000
    reps = 1 if args.quick else args.reps
    work: Path = args.work
    sources = []
    for i in range(4):
        root = work / "src" / f"{files}" / f"s{i}"
        build_tree(root, files, size=4096, seed=i)
        sources.append((f"s{i}", root))
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    results: dict[str, list[tuple[float, float, int]]] = {m: [] for m in MODES}
    try:
        for rep in range(reps):
            # Rotate the order, so no mode always follows the same one.
            order = MODES[rep % 3:] + MODES[:rep % 3]
            for mode in order:
                slug = mode.strip("-")
                dest = runs / f"{slug}-{rep}" / "dest"
                dest.mkdir(parents=True)
                config = engine_config(runs / f"{slug}-{rep}" / "config.toml", dest,
                                       runs / f"{slug}-{rep}" / "state", sources, 4)
                drop_caches()
                results[mode].append(timed_run(config, mode))
                print(f"rep {rep + 1}/{reps} {mode:>14}: {results[mode][-1][0]:.2f} s",
                      file=sys.stderr)
        feed = rsync_feed_cost(sources[0][1], runs, reps)
        help_wall, heavy = help_startup()
    finally:
        shutil.rmtree(runs, ignore_errors=True)

    def median(mode: str, i: int) -> float:
        return statistics.median(r[i] for r in results[mode])

    print(f"4 sources x {files:,} files of 4 KiB, run --jobs 4, cold cache, "
          f"median of {reps}; {os.cpu_count()} cores")
    print(f"{'mode':<15} {'wall s':>8} {'cpu s':>8} {'stderr':>9}  vs --no-progress")
    for mode in MODES:
        ratio = median(mode, 0) / median("--no-progress", 0)
        print(f"{mode:<15} {median(mode, 0):>8.2f} {median(mode, 1):>8.2f} "
              f"{int(median(mode, 2)):>9,}  {ratio:.3f}×")
    print(f"rsync of one source, --info=progress2: {feed['with']:.2f} s, without "
          f"{feed['without']:.2f} s ({feed['with'] / feed['without']:.3f}×)")
    print(f"--help: {help_wall * 1000:.0f} ms (median of 10, warm); imports "
          f"{', '.join(heavy) if heavy else 'none of rich, httpx, prometheus_client'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
