"""Benchmark: the engine against the same rsync commands run by a plain shell script.

Run from the repository root::

    python benchmarks/bench_run.py            # 4 sources x 20,000 files of 4 KiB
    python benchmarks/bench_run.py --quick    # 4 x 2,000 files: a smoke run

Every timed run copies into a fresh destination folder with a cold page
cache (``sync; echo 3 > /proc/sys/vm/drop_caches``, which needs root).
Destinations are only deleted at the very end: creating files right after
``rm -rf`` of a large tree is several times slower on some filesystems
(NOTES pitfall 10), which would skew whichever run came next.

Measured side by side:

- the engine, ``pibackup-async run --jobs N`` for N = 1, 2, 4: wall time, the
  report's snapshot window, the engine process's own peak RSS (VmHWM of the
  CLI process, polled from /proc, so rsync children are not counted);
- the exact rsync commands of the engine's ``run --dry-run`` plan, run by a
  shell script sequentially (P1) and in parallel (P2, P4: ``&`` / ``wait``);
- rsnapshot (if installed) on the same sources, as a peer (it runs its
  backup points one after another);
- the engine's peak RSS with 16 sources, and ``pibackup-async --help`` time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchkit import build_tree, vm_hwm

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "pibackup_async.cli"]
FILE_SIZE = 4096


# --- the data ---------------------------------------------------------------------------


def drop_caches() -> bool:
    """Flush dirty pages, then drop the page cache; False when not allowed."""
    subprocess.run(["sync"], check=True)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


# --- configs ----------------------------------------------------------------------------


def engine_config(path: Path, dest: Path, state: Path, sources: list[tuple[str, Path]],
                  concurrency: int = 1) -> Path:
    lines = [f"destination = {json.dumps(str(dest))}",
             f"state_dir = {json.dumps(str(state))}",
             f"concurrency = {concurrency}"]
    for name, src in sources:
        lines += ["", "[[sources]]", f"name = {json.dumps(name)}", 'type = "rsync"',
                  f"path = {json.dumps(str(src))}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def planned_rsync_commands(config: Path, sources: list[tuple[str, Path]]) -> list[list[str]]:
    """The rsync argv of each source, as ``run --dry-run`` prints it."""
    plan = subprocess.run([*CLI, "run", "--dry-run", "-c", str(config)],
                          capture_output=True, text=True, check=True).stdout
    commands = []
    for _, src in sources:
        wanted = str(src).rstrip("/") + "/"
        for line in plan.splitlines():
            at = line.find("rsync ")
            if at < 0:
                continue
            argv = shlex.split(line[at:])
            # Cut a trailing remark such as "(--link-dest decided at run time)".
            cut = next((i for i, a in enumerate(argv) if a.startswith("(")), len(argv))
            argv = argv[:cut]
            if wanted in argv:
                commands.append(argv)
                break
        else:
            raise SystemExit(f"no rsync command for {src} in the dry-run plan:\n{plan}")
    return commands


def shell_script(path: Path, commands: list[list[str]], parallel: int) -> Path:
    """Run ``commands`` in ``parallel`` lanes (``&`` / ``wait``), each lane in order."""
    targets = {os.path.dirname(argv[-1].rstrip("/")) for argv in commands}
    lines = ["#!/bin/sh", "set -e"]
    lines += [f"mkdir -p {shlex.quote(t)}" for t in sorted(targets)]
    lanes: list[list[str]] = [[] for _ in range(parallel)]
    for i, argv in enumerate(commands):
        lanes[i % parallel].append(shlex.join(argv) + " >/dev/null")
    if parallel == 1:
        lines += lanes[0]
    else:
        # Each lane's pid, waited for one by one (its failure fails the script):
        # dash runs ``$(jobs -p)`` in a subshell that has no jobs, so a loop over
        # it waited for nothing and the script ended with its lanes running.
        lines.append("pids=")
        for lane in lanes:
            lines.append("( " + " && ".join(lane) + ' ) & pids="$pids $!"')
        lines.append("for pid in $pids; do wait $pid; done")
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    return path


def rsnapshot_config(path: Path, root: Path, sources: list[tuple[str, Path]],
                     lockfile: Path) -> Path:
    # rsnapshot wants tabs between fields and trailing slashes on folders.
    lines = [
        "config_version\t1.2",
        f"snapshot_root\t{root}/",
        "no_create_root\t0",
        f"cmd_rsync\t{shutil.which('rsync')}",
        "retain\talpha\t3",
        f"lockfile\t{lockfile}",
        "rsync_short_args\t-aHAX",
        "rsync_long_args\t--delete --numeric-ids --relative --delete-excluded --sparse",
        "verbose\t1",
    ]
    lines += [f"backup\t{src}/\t{name}/" for name, src in sources]
    path.write_text("\n".join(lines) + "\n")
    return path


# --- measuring --------------------------------------------------------------------------


@dataclass
class Timed:
    wall_s: float
    peak_rss_kib: int | None = None
    extra: dict[str, float] = field(default_factory=dict)


def timed(argv: list[str], *, watch_rss: bool = False) -> Timed:
    """Run ``argv``; its wall time and, if asked, its own peak RSS (not its children's)."""
    started = time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    peak: list[int] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            value = vm_hwm(process.pid)
            if value is not None:
                peak.append(value)
            done.wait(0.01)

    watcher = threading.Thread(target=poll, daemon=True) if watch_rss else None
    if watcher:
        watcher.start()
    _, stderr = process.communicate()
    wall = time.monotonic() - started
    done.set()
    if watcher:
        watcher.join()
    if process.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} exited {process.returncode}:\n{stderr}")
    return Timed(wall, max(peak) if peak else None)


def newest_report(state: Path) -> dict[str, object]:
    reports = sorted((state / "reports").glob("*.json"))
    return dict(json.loads(reports[-1].read_text()))


# --- the benchmark ----------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small trees, for a smoke run")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work",
                        help="work folder (default: benchmarks/work, gitignored)")
    parser.add_argument("--files", type=int, help="files per source (default 20000; 2000 quick)")
    parser.add_argument("--reps", type=int, default=1, help="repetitions; the median is shown")
    parser.add_argument("--keep", action="store_true", help="keep the copies at the end")
    args = parser.parse_args()

    files = args.files or (2000 if args.quick else 20000)
    rss_files = max(files // 20, 50)
    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    runs = work / "runs"
    if runs.exists():
        # Copies kept by an earlier --keep: deleting them now would slow the
        # timed runs that follow (pitfall 10), so they go at the end instead.
        runs.rename(work / f"runs.old-{time.time_ns()}")
    runs.mkdir()

    names = ["alpha", "beta", "gamma", "delta"]
    print(f"building 4 sources of {files} x 4 KiB and 16 of {rss_files} under {work} ...",
          flush=True)
    sources = []
    for i, name in enumerate(names):
        tree = work / "trees" / f"{name}-{files}"
        build_tree(tree, files, size=FILE_SIZE, seed=i)
        sources.append((name, tree))
    rss_sources = []
    for i in range(16):
        tree = work / "trees" / f"small{i:02d}-{rss_files}"
        build_tree(tree, rss_files, size=FILE_SIZE, seed=100 + i)
        rss_sources.append((f"s{i:02d}", tree))

    cold = drop_caches()
    notes = [] if cold else ["page cache NOT dropped (needs root): every run is warm"]

    results: dict[str, list[Timed]] = {}
    have_rsnapshot = shutil.which("rsnapshot") is not None
    if not have_rsnapshot:
        notes.append("rsnapshot is not installed: no peer row")

    for rep in range(args.reps):
        for jobs in (1, 2, 4):
            tag = f"engine-j{jobs}-r{rep}"
            dest, state = runs / f"{tag}-dest", runs / f"{tag}-state"
            dest.mkdir()
            config = engine_config(runs / f"{tag}.toml", dest, state, sources)
            drop_caches()
            result = timed([*CLI, "run", "-c", str(config), "--jobs", str(jobs),
                            "--no-report", "-q"], watch_rss=True)
            report = newest_report(state)
            assert report["status"] == "ok", report
            result.extra["window_s"] = float(report["snapshot_window_s"])  # type: ignore[arg-type]
            result.extra["run_s"] = float(report["duration_s"])  # type: ignore[arg-type]
            results.setdefault(f"engine --jobs {jobs}", []).append(result)
            print(f"  {tag}: {result.wall_s:.2f}s", flush=True)

        for parallel in (1, 2, 4):
            tag = f"shell-p{parallel}-r{rep}"
            dest = runs / f"{tag}-dest"
            dest.mkdir()
            config = engine_config(runs / f"{tag}.toml", dest, runs / f"{tag}-state", sources)
            commands = planned_rsync_commands(config, sources)
            script = shell_script(runs / f"{tag}.sh", commands, parallel)
            drop_caches()
            result = timed(["/bin/sh", str(script)])
            results.setdefault(f"shell P{parallel}", []).append(result)
            print(f"  {tag}: {result.wall_s:.2f}s", flush=True)

        if have_rsnapshot:
            tag = f"rsnapshot-r{rep}"
            config = rsnapshot_config(runs / f"{tag}.conf", runs / f"{tag}-root", sources,
                                      runs / f"{tag}.pid")
            drop_caches()
            result = timed(["rsnapshot", "-c", str(config), "alpha"])
            results.setdefault("rsnapshot (sequential)", []).append(result)
            print(f"  {tag}: {result.wall_s:.2f}s", flush=True)

    # Peak RSS of the engine with 16 sources (4 at a time).
    dest, state = runs / "rss16-dest", runs / "rss16-state"
    dest.mkdir()
    config = engine_config(runs / "rss16.toml", dest, state, rss_sources)
    drop_caches()
    rss16 = timed([*CLI, "run", "-c", str(config), "--jobs", "4", "--no-report", "-q"],
                  watch_rss=True)

    # Start-up time: `--help` imports nothing heavy.
    entry = Path(sys.executable).parent / "pibackup-async"
    help_argv = [str(entry), "--help"] if entry.exists() else [*CLI, "--help"]
    help_times = [timed(help_argv).wall_s for _ in range(10)]

    print_table(results, files, notes)
    print()
    print(f"engine peak RSS, 16 sources x {rss_files} files, --jobs 4: "
          f"{(rss16.peak_rss_kib or 0) / 1024:.1f} MiB (wall {rss16.wall_s:.2f}s)")
    print(f"`{' '.join(Path(a).name if i == 0 else a for i, a in enumerate(help_argv))}` "
          f"median of 10: {statistics.median(help_times) * 1000:.0f} ms")

    for stale in sorted(work.glob("runs.old-*")):
        shutil.rmtree(stale)
    if not args.keep:
        shutil.rmtree(runs)
    return 0


def print_table(results: dict[str, list[Timed]], files: int, notes: list[str]) -> None:
    def median(key: str, attr: str = "wall_s") -> float | None:
        rows = results.get(key)
        if not rows:
            return None
        if attr == "wall_s":
            return statistics.median(r.wall_s for r in rows)
        if attr == "rss":
            values = [r.peak_rss_kib for r in rows if r.peak_rss_kib is not None]
            return statistics.median(values) / 1024 if values else None
        values = [r.extra[attr] for r in rows if attr in r.extra]
        return statistics.median(values) if values else None

    reps = len(next(iter(results.values())))
    print()
    print(f"4 sources x {files} files x 4 KiB, fresh destination, cold cache; "
          f"median of {reps}; {os.cpu_count()} CPUs, {platform.release()}, "
          f"{rsync_version()}")
    for note in notes:
        print(f"NOTE: {note}")
    print("wall: as seen by the caller (engine: includes Python start-up); in-run: the "
          "report's duration_s; window: the report's snapshot_window_s")
    header = (f"{'run':<24}{'wall s':>8}{'in-run s':>10}{'window s':>10}{'peak RSS MiB':>14}"
              f"{'vs shell same N':>17}{'vs N=1':>9}")
    print(header)
    print("-" * len(header))
    for key in results:
        wall = median(key)
        window = median(key, "window_s")
        in_run = median(key, "run_s")
        rss = median(key, "rss")
        vs_shell = vs_one = ""
        if key.startswith("engine --jobs "):
            n = key.rsplit(" ", 1)[1]
            shell = median(f"shell P{n}")
            one = median("engine --jobs 1")
            vs_shell = f"{wall / shell:.2f}" if shell and wall else ""
            vs_one = f"{wall / one:.2f}" if one and wall else ""
        elif key.startswith("shell P"):
            one = median("shell P1")
            vs_one = f"{wall / one:.2f}" if one and wall else ""
        elif key.startswith("rsnapshot"):
            shell = median("shell P1")
            vs_shell = f"{wall / shell:.2f} (P1)" if shell and wall else ""
        print(f"{key:<24}{wall or 0:>8.2f}"
              f"{(f'{in_run:.2f}' if in_run is not None else '-'):>10}"
              f"{(f'{window:.2f}' if window is not None else '-'):>10}"
              f"{(f'{rss:.1f}' if rss is not None else '-'):>14}"
              f"{vs_shell:>17}{vs_one:>9}")


def rsync_version() -> str:
    out = subprocess.run(["rsync", "--version"], capture_output=True, text=True).stdout
    return " ".join(out.splitlines()[0].split()[:3]) if out else "rsync ?"


if __name__ == "__main__":
    raise SystemExit(main())
