"""Benchmark: what the manifests (SPEC §9) cost a run, and SHA-256's speed here.

Run from the repository root (root: to drop the page cache)::

    python benchmarks/bench_manifest.py             # 4 sources x 20,000 files of 4 KiB
    python benchmarks/bench_manifest.py --quick     # 4 x 2,000: a smoke run

Three runs of the engine into one destination, in order:

- **first**: a fresh destination, cold page cache: every file is copied and
  every file is read once to hash it;
- **nightly, nothing changed**: cold cache again (a night later nothing of it
  is cached); every file is linked, nothing is read, the digests come from
  the first backup's manifest;
- **nightly, 1% changed**: 1% of each source's files rewritten (same size,
  new contents and mtime), cold cache: only those are read.

For each: the run's ``duration_s`` (report), step 5's wall time (the
"saves finished" log event: the sources' saves are their manifests, run
concurrently), the sum of the sources' ``save.duration_s``, the report's
``hashed_bytes``, and the engine process's own peak RSS (VmHWM of the CLI,
not its rsync children). SPEC §9's goals: the manifests cost at most 10% of
a first backup, at most 3% of a nightly re-run; RSS under 60 MB.

What they cost is measured two ways. "step 5 %": step 5's wall time over
the run's. "A/B": the same three runs into a second destination by the
same engine with the manifest step stubbed out (``manifest_off.py``, a
benchmark-only wrapper), each run with manifests next to the same run
without, in alternating order, ``--reps`` times; the cost is the median of
the paired differences of the runs' ``duration_s`` over the median run
without manifests (the spread: the smallest and largest paired share).
Beside it, the same paired share of the CPU time the run used (the engine
and its rsync children): a busy machine stretches wall times far more.
The load average is printed with every run: the machine may be shared.

Also: hashlib's SHA-256 throughput on this machine (MB/s, 1 MiB blocks in
memory), to set against published Raspberry Pi 4 figures (README "Manifests").

``--per-file``: instead of runs, the CPU time (``process_time``, best of 5)
that ``write_manifest`` spends per file on one source of ``--files`` files,
in this process, warm cache — a first backup, a nightly one with nothing
changed, one with 1% changed — beside the floors no Python manifest goes
under (listing both copies' folders; open, fstat, read, hash, close of
each file) and coreutils ``sha256sum``'s own CPU time per file over the
same files (the child process a manifest could hand its files to). CPU
time is what a loaded machine sways least. Then wall times: the first
backup's ``write_manifest`` beside its reads handed to 1, 2 and 3 worker
processes (``hash_pool_probe.py``): what a second CPU could take off it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from benchkit import build_tree, drop_caches, measure
from hash_pool_probe import pool_wall_s

if TYPE_CHECKING:
    from collections.abc import Callable

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "pibackup_async.cli"]
# The same CLI with the manifest step stubbed out (the A/B's "without").
CLI_OFF = [sys.executable, str(Path(__file__).resolve().parent / "manifest_off.py")]
LABELS = ("first backup", "nightly, nothing changed", "nightly, 1% changed")
FILE_SIZE = 4096
NAMES = ["alpha", "beta", "gamma", "delta"]


def engine_config(path: Path, dest: Path, state: Path, sources: list[tuple[str, Path]],
                  jobs: int) -> Path:
    lines = [f"destination = {json.dumps(str(dest))}",
             f"state_dir = {json.dumps(str(state))}",
             f"concurrency = {jobs}"]
    for name, src in sources:
        lines += ["", "[[sources]]", f"name = {json.dumps(name)}", 'type = "rsync"',
                  f"path = {json.dumps(str(src))}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def built_trees(work: Path, files: int = 20000) -> list[tuple[str, Path]]:
    """The four sources' trees a run of this script built under ``work``; exits when
    there are none (for the scripts that reuse them)."""
    sources = [(name, work / "trees" / f"manifest-{name}-{files}") for name in NAMES]
    if not all(tree.is_dir() for _, tree in sources):
        sys.exit(f"no trees under {work}/trees: run bench_manifest.py --work {work} first")
    return sources


def fresh_first_backup(runs: Path, sources: list[tuple[str, Path]], jobs: int) -> Path:
    """An empty destination under ``runs`` (what was there removed), its configuration,
    and the page cache dropped: the configuration of a cold first backup."""
    shutil.rmtree(runs, ignore_errors=True)
    (runs / "dest").mkdir(parents=True)
    config = engine_config(runs / "config.toml", runs / "dest", runs / "state", sources, jobs)
    subprocess.run(["sync"], check=True)
    drop_caches()
    return config


def change_one_percent(tree: Path, rep: int) -> int:
    """Rewrite every 100th file with new contents of the same size and a new mtime."""
    changed = 0
    for folder in sorted(p for p in tree.iterdir() if p.is_dir()):
        for i, f in enumerate(sorted(folder.iterdir())):
            if i % 100 == 0:
                f.write_bytes(os.urandom(f.stat().st_size))
                stamp = time.time() - 3600 + rep
                os.utime(f, (stamp, stamp))
                changed += 1
    return changed


def one_run(config: Path, state: Path, cli: list[str] = CLI) -> dict[str, float]:
    load = os.getloadavg()[0]
    measured = measure([*cli, "run", "-c", str(config), "--no-report", "--no-progress",
                        "--log-format", "json"], own_rss=True)
    reports = sorted((state / "reports").glob("*.json"))
    report = json.loads(reports[-1].read_text())
    assert report["status"] == "ok", report
    saves = [json.loads(line) for line in measured.stderr.splitlines()
             if line.startswith("{") and '"saves finished"' in line]
    sources = report["sources"].values()
    return {
        "wall_s": measured.wall_s,
        # The engine's and its children's CPU time: less swayed by a loaded machine.
        "cpu_s": measured.cpu_s,
        "run_s": float(report["duration_s"]),
        "step5_s": float(saves[-1]["duration_s"]) if saves else float("nan"),
        "saves_sum_s": sum(float(s["save"]["duration_s"]) for s in sources),
        "snapshots_sum_s": sum(float(s["snapshot"]["duration_s"]) for s in sources),
        "hashed_mib": sum(int(s["hashed_bytes"]) for s in sources) / 2**20,
        "rss_mib": (measured.own_rss_kib or 0) / 1024,
        "load": load,
    }


def _best_cpu(work: Callable[[], object], times: int = 5,
              clock: Callable[[], float] = time.process_time) -> float:
    """The least ``clock`` time of ``times`` calls of ``work`` (CPU time, unless told)."""
    best = float("inf")
    for _ in range(times):
        started = clock()
        work()
        best = min(best, clock() - started)
    return best


def per_file(work: Path, files: int) -> None:
    """CPU time per file of write_manifest and of its floors (``--per-file``)."""
    from pibackup_async.engine.manifest import write_manifest

    root = work / "manifest-per-file"
    shutil.rmtree(root, ignore_errors=True)
    src = root / "src"
    build_tree(src, files, size=FILE_SIZE, seed=300)
    copies = [root / f"b{i}" for i in range(3)]
    for i, backup in enumerate(copies):
        if i == 2:
            change_one_percent(src, 0)
        link = [f"--link-dest={copies[i - 1] / 'data'}"] if i else []
        backup.mkdir()
        subprocess.run(["rsync", "-aHAX", "--numeric-ids", *link, f"{src}/",
                        f"{backup / 'data'}/"], check=True)
    b0, b1, b2 = (str(c) for c in copies)
    write_manifest(b0, "data", None)
    write_manifest(b1, "data", f"{b0}/data")
    count = files + 1  # the tree's marker file
    rows = [
        ("first backup (every file read)",
         _best_cpu(lambda: write_manifest(b0, "data", None))),
        ("nightly, nothing changed",
         _best_cpu(lambda: write_manifest(b1, "data", f"{b0}/data"))),
        ("nightly, 1% changed",
         _best_cpu(lambda: write_manifest(b2, "data", f"{b1}/data"))),
    ]
    folders = sorted(p.name for p in (copies[1] / "data").iterdir() if p.is_dir())

    def listings() -> None:
        for name in folders:
            for top in (copies[1], copies[0]):
                with os.scandir(top / "data" / name) as entries:
                    {e.name: e.inode() for e in entries if e.is_file(follow_symlinks=False)}

    def reads() -> None:
        for name in folders:
            folder = os.open(copies[0] / "data" / name, os.O_RDONLY | os.O_DIRECTORY)
            for file in os.listdir(folder):
                fd = os.open(file, os.O_RDONLY | os.O_NOATIME, dir_fd=folder)
                os.fstat(fd)
                hashlib.sha256(os.read(fd, FILE_SIZE + 1)).hexdigest()
                os.close(fd)
            os.close(folder)

    rows += [("floor: both copies' listings", _best_cpu(listings)),
             ("floor: open/fstat/read/hash/close", _best_cpu(reads))]
    names = [f"{f}/{n}" for f in folders for n in sorted(os.listdir(copies[0] / "data" / f))]
    best = float("inf")
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        for at in range(0, len(names), 2000):
            subprocess.run(["sha256sum", "-z", "--", *names[at:at + 2000]], check=True,
                           cwd=copies[0] / "data", stdout=subprocess.DEVNULL)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        best = min(best, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    rows.append(("sha256sum -z, 2,000 names a call (its CPU)", best))
    print(f"one source of {files} x 4 KiB, warm cache, CPU time, best of 5; "
          f"load average {os.getloadavg()[0]:.1f}")
    for label, seconds in rows:
        print(f"  {label:<46}{seconds * 1e3:>8.1f} ms{seconds / count * 1e6:>8.1f} us a file")
    # Wall time, not CPU: what a second CPU could take off a first backup's manifest.
    walls = [("write_manifest, first backup",
              _best_cpu(lambda: write_manifest(b0, "data", None), 4, time.perf_counter))]
    walls += [(f"floor in {n} worker process{'es' if n > 1 else ''} (hash_pool_probe)",
               pool_wall_s(str(copies[0] / "data"), n)) for n in (1, 2, 3)]
    print(f"the same, wall time, best of 4, {os.cpu_count()} CPUs")
    for label, seconds in walls:
        print(f"  {label:<46}{seconds * 1e3:>8.1f} ms{seconds / count * 1e6:>8.1f} us a file")
    shutil.rmtree(root)


def sha256_throughput(total_mib: int = 512) -> float:
    """MB/s (10^6 bytes) of hashlib.sha256 over 1 MiB blocks already in memory."""
    block = os.urandom(1 << 20)
    best = 0.0
    for _ in range(3):
        digest = hashlib.sha256()
        started = time.perf_counter()
        for _ in range(total_mib):
            digest.update(block)
        best = max(best, total_mib * (1 << 20) / (time.perf_counter() - started) / 1e6)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 x 2,000 files: a smoke run")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work",
                        help="work folder (default: benchmarks/work, gitignored)")
    parser.add_argument("--files", type=int, help="files per source (default 20000)")
    parser.add_argument("--jobs", type=int, default=4, help="the run's concurrency (default 4)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions; medians are shown")
    parser.add_argument("--no-ab", dest="ab", action="store_false",
                        help="skip the runs without manifests (the A/B)")
    parser.add_argument("--per-file", action="store_true",
                        help="CPU time per file of write_manifest in this process, no runs")
    args = parser.parse_args()

    files = args.files or (2000 if args.quick else 20000)
    work: Path = args.work.resolve()
    if args.per_file:
        per_file(work, files)
        return 0
    runs = work / "manifest-runs"
    if runs.exists():
        shutil.rmtree(runs)
    runs.mkdir(parents=True)
    print(f"building 4 sources of {files} x 4 KiB under {work} ...", flush=True)
    sources = []
    for i, name in enumerate(NAMES):
        # Trees of their own: the 1% run rewrites them (bench_run's stay as they are).
        tree = work / "trees" / f"manifest-{name}-{files}"
        build_tree(tree, files, size=FILE_SIZE, seed=200 + i)
        sources.append((name, tree))
    cold = drop_caches_ok()

    results: dict[str, list[dict[str, float]]] = {}
    without: dict[str, list[dict[str, float]]] = {}
    for rep in range(args.reps):
        config = _destination(runs, f"r{rep}", sources, args.jobs)
        config_off = _destination(runs, f"r{rep}-off", sources, args.jobs) if args.ab else None
        for label in LABELS:
            if label.endswith("1% changed"):
                for _, tree in sources:
                    change_one_percent(tree, rep)
            # Alternate which goes first: neither always gets the quieter moment.
            order = [(config, CLI, results), (config_off, CLI_OFF, without)]
            if rep % 2:
                order.reverse()
            for cfg, cli, into in order:
                if cfg is None:
                    continue
                if cold:
                    drop_caches()
                row = one_run(cfg, cfg.parent / f"{cfg.stem}-state", cli)
                into.setdefault(label, []).append(row)
                print(f"  r{rep} {label}{'' if cli is CLI else ' (without manifests)'}: "
                      f"run {row['run_s']:.2f}s (CPU {row['cpu_s']:.2f}s), "
                      f"step 5 {row['step5_s']:.3f}s, "
                      f"hashed {row['hashed_mib']:.1f} MiB, RSS {row['rss_mib']:.1f} MiB, "
                      f"load {row['load']:.1f}", flush=True)

    throughput = sha256_throughput()
    print()
    print(f"4 sources x {files} files x 4 KiB, --jobs {args.jobs}, "
          f"{'cold cache before each run' if cold else 'WARM (page cache not dropped)'}; "
          f"median of {args.reps} [min-max]; {os.cpu_count()} CPUs, {platform.release()}")
    header = (f"{'run':<26}{'run s':>22}{'step 5 s':>10}{'step 5 %':>10}{'saves sum s':>13}"
              f"{'hashed MiB':>12}{'RSS MiB':>9}{'load':>6}{'goal':>6}")
    print(header)
    print("-" * len(header))
    for label, rows in results.items():
        def med(key: str, rows: list[dict[str, float]] = rows) -> float:
            return statistics.median(r[key] for r in rows)
        share = 100 * med("step5_s") / med("run_s")
        goal = "10%" if label == "first backup" else "3%"
        print(f"{label:<26}{_spread([r['run_s'] for r in rows]):>22}{med('step5_s'):>10.3f}"
              f"{share:>9.1f}%{med('saves_sum_s'):>13.3f}{med('hashed_mib'):>12.1f}"
              f"{max(r['rss_mib'] for r in rows):>9.1f}{med('load'):>6.1f}{goal:>6}")
    if without:
        print()
        print("A/B: the same runs without the manifest step (manifest_off.py), paired by rep")
        header = (f"{'run':<26}{'with s':>22}{'without s':>22}{'cost s':>8}"
                  f"{'cost %':>22}{'goal':>6}{'CPU cost %':>22}")
        print(header)
        print("-" * len(header))
        for label, rows in results.items():
            off = without[label]
            costs = [a["run_s"] - b["run_s"] for a, b in zip(rows, off, strict=True)]
            shares = [100 * (a["run_s"] - b["run_s"]) / b["run_s"]
                      for a, b in zip(rows, off, strict=True)]
            share = 100 * statistics.median(costs) / statistics.median(r["run_s"] for r in off)
            goal = "10%" if label == "first backup" else "3%"
            cpu = [100 * (a["cpu_s"] - b["cpu_s"]) / b["cpu_s"]
                   for a, b in zip(rows, off, strict=True)]
            print(f"{label:<26}{_spread([r['run_s'] for r in rows]):>22}"
                  f"{_spread([r['run_s'] for r in off]):>22}{statistics.median(costs):>8.2f}"
                  f"{f'{share:.1f}% [{min(shares):.1f} {max(shares):.1f}]':>22}{goal:>6}"
                  f"{f'{statistics.median(cpu):.1f}% [{min(cpu):.1f} {max(cpu):.1f}]':>22}")
    print()
    print(f"hashlib sha256 ({hashlib.sha256().name}, OpenSSL), 1 MiB blocks in memory: "
          f"{throughput:.0f} MB/s ({platform.machine()})")
    shutil.rmtree(runs)
    return 0


def _destination(runs: Path, name: str, sources: list[tuple[str, Path]], jobs: int) -> Path:
    dest = runs / f"{name}-dest"
    dest.mkdir()
    return engine_config(runs / f"{name}.toml", dest, runs / f"{name}-state", sources, jobs)


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def drop_caches_ok() -> bool:
    try:
        drop_caches()
    except OSError:
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
