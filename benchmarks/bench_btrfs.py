"""Benchmark: btrfs sources, the engine against btrbk, on the same subvolumes.

Run as root from the repository root::

    python benchmarks/bench_btrfs.py            # 4 subvolumes x 3,000 files (~96 MiB each)
    python benchmarks/bench_btrfs.py --quick    # 4 x 500 files (~16 MiB each): a smoke run

Everything lives on loop-mounted btrfs filesystems that the script makes
under its work folder and removes at the end (only the loop devices backing
its own images are detached): one source filesystem holding K = 4
subvolumes, and one fresh destination filesystem per contender, so no tool
sees another's backups:

- the engine, ``pibackup-async run --jobs 4`` and ``--jobs 1`` (its own
  ``snapshot_dir`` each, so their parents never mix);
- btrbk (``btrbk -c <cfg> run``: ``snapshot_dir``, ``target send-receive``,
  ``snapshot_preserve_min all`` / ``target_preserve_min all`` so it prunes
  nothing). btrbk sends its subvolumes one after another.

Each repetition makes a *full* backup with every contender, then changes
every subvolume (about 1 % of the files rewritten, some deleted, one new
4 MiB file) and makes an *incremental* one. Before every timed run the page
cache is dropped (``sync; echo 3 > /proc/sys/vm/drop_caches``); right after
it, ``sync`` is timed too (the received data is still being written back), and
``wall+sync`` shows the total. The contenders' order rotates between
repetitions. After each incremental run the newest copy of every subvolume is
checked against the source (file count and bytes).
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
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchkit import Filesystem, count_tree, drop_caches, sh

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "pibackup_async.cli"]
K = 4
KiB, MiB = 1024, 1024 * 1024
CONTENDERS = ("ours --jobs 4", "ours --jobs 1", "btrbk")


# --- loop-mounted btrfs -----------------------------------------------------------------


def subvolumes_below(folder: Path) -> list[Path]:
    """Subvolumes directly in ``folder`` or one level deeper (snapshot dirs' layouts)."""
    found = []
    if not folder.exists():
        return found
    for entry in sorted(folder.iterdir()):
        if not entry.is_dir() or entry.is_symlink():
            continue
        if entry.stat().st_ino == 256:
            found.append(entry)
        else:
            found += [e for e in sorted(entry.iterdir())
                      if e.is_dir() and not e.is_symlink() and e.stat().st_ino == 256]
    return found


def delete_subvolumes(paths: list[Path]) -> None:
    if paths:
        sh(["btrfs", "subvolume", "delete", *map(str, paths)])


# --- the data ---------------------------------------------------------------------------


def fill(subvolume: Path, files: int, seed: int) -> None:
    """``files`` files of 4-60 KiB (32 KiB on average) in folders of 200; distinct contents."""
    pool = os.urandom(MiB)
    for i in range(files):
        folder = subvolume / f"d{i // 200:03d}"
        if i % 200 == 0:
            folder.mkdir()
        size = 4 * KiB * (1 + i % 15)
        start = (i * 7919) % (len(pool) - size)
        header = seed.to_bytes(8, "little") + i.to_bytes(8, "little")
        with open(folder / f"f{i:05d}.dat", "wb") as f:
            f.write(header + pool[start + 16:start + size])


def change(subvolume: Path, files: int, round_: int) -> None:
    """Rewrite ~1 % of the files, delete a few, add one 4 MiB file."""
    step = 100
    for i in range(round_ % step, files, step):
        path = subvolume / f"d{i // 200:03d}" / f"f{i:05d}.dat"
        if path.exists():
            path.write_bytes(os.urandom(path.stat().st_size))
    for i in range(round_ % 37 + 50, files, files // 10 or 1):
        (subvolume / f"d{i // 200:03d}" / f"f{i:05d}.dat").unlink(missing_ok=True)
    (subvolume / f"new-{round_}.bin").write_bytes(os.urandom(4 * MiB))


# --- the contenders ---------------------------------------------------------------------


def engine_config(path: Path, dest: Path, state: Path, snapshot_dir: Path,
                  subvolumes: list[Path]) -> Path:
    lines = [f"destination = {json.dumps(str(dest))}", f"state_dir = {json.dumps(str(state))}"]
    for sv in subvolumes:
        lines += ["", "[[sources]]", f"name = {json.dumps(sv.name)}", 'type = "btrfs"',
                  f"path = {json.dumps(str(sv))}",
                  f"snapshot_dir = {json.dumps(str(snapshot_dir))}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def btrbk_config(path: Path, volume: Path, snapshot_dir: str, target: Path,
                 subvolumes: list[Path], lockfile: Path) -> Path:
    lines = [
        "timestamp_format        long-iso",
        "snapshot_create         always",
        "snapshot_preserve_min   all",
        "target_preserve_min     all",
        f"lockfile                {lockfile}",
        "",
        f"volume {volume}",
        f"  snapshot_dir {snapshot_dir}",
        f"  target send-receive {target}",
    ]
    lines += [f"  subvolume {sv.name}" for sv in subvolumes]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Timed:
    wall_s: float
    sync_s: float
    extra: dict[str, float] = field(default_factory=dict)


def timed(argv: list[str]) -> Timed:
    drop_caches()
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True)
    wall = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} exited {result.returncode}:\n"
                         f"{result.stdout}{result.stderr}")
    started = time.monotonic()
    subprocess.run(["sync"], check=True)
    timing = Timed(wall, time.monotonic() - started)
    # btrbk's summary marks incremental receives with ">>>", full ones with "***".
    marks = [line[:3] for line in result.stdout.splitlines()]  # not the legend (indented)
    timing.extra["incremental"] = float(">>>" in marks and "***" not in marks)
    return timing


@dataclass
class Contender:
    name: str
    dest: Filesystem
    argv: list[str]
    state: Path | None = None       # the engine's state_dir (reports)
    snapshots: Path | None = None   # its snapshot_dir on the source filesystem

    def run(self) -> Timed:
        result = timed(self.argv)
        if self.state is not None:
            reports = sorted((self.state / "reports").glob("*.json"))
            report = json.loads(reports[-1].read_text())
            if report["status"] != "ok":
                raise SystemExit(f"{self.name}: the run's status is {report['status']}: "
                                 f"{report['failure']}")
            # The run's own time, from its first event to its last: start-up is
            # issue 20's accepted floor.
            result.extra["in_run_s"] = float(report["duration_s"])
            result.extra["stream_mib"] = sum(s["bytes"] for s in report["sources"].values()) / MiB
            sends = [s["save"]["command"] for s in report["sources"].values()]
            result.extra["incremental"] = float(all("-p" in c for c in sends))
            if os.environ.get("BENCH_DEBUG"):
                for name, s in report["sources"].items():
                    print(f"    {name}: snapshot {s['snapshot']['start'][11:23]} "
                          f"{s['snapshot']['duration_s']:.3f}s, save {s['save']['start'][11:23]}"
                          f" {s['save']['duration_s']:.3f}s")
                print(f"    run {report['start'][11:23]} - {report['end'][11:23]}")
        return result

    def newest_copy(self, subvolume: str) -> Path:
        root = self.dest.mount
        if self.state is not None:  # the engine: <dest>/<newest backup>/<source>
            names = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
            return root / names[-1] / subvolume
        copies = sorted(root.glob(f"{subvolume}.*"), key=lambda p: p.stat().st_mtime_ns)
        return copies[-1]  # btrbk: <target>/<subvolume>.<timestamp>[_N]


# --- the benchmark ----------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 x 500 files: a smoke run")
    parser.add_argument("--files", type=int, help="files per subvolume (default 3000; 500 quick)")
    parser.add_argument("--reps", type=int, default=1, help="repetitions; medians are shown")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "btrfs",
                        help="work folder for images and mounts (default benchmarks/work/btrfs)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: it mounts loop devices and drops the page cache")
    for tool in ("mkfs.btrfs", "losetup", "btrfs", "btrbk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")

    files = args.files or (500 if args.quick else 3000)
    work: Path = args.work.resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    mb_per_sv = files * 32 * KiB / MiB
    size_mb = max(400, int(K * (mb_per_sv + 4 * (args.reps + 1)) * 2.5) + 300)
    src = Filesystem(work / "images" / "src.img", work / "mnt" / "src")
    dests = {c: Filesystem(work / "images" / f"dest-{i}.img", work / "mnt" / f"dest-{i}")
             for i, c in enumerate(CONTENDERS)}
    try:
        src.make(size_mb * 2)
        subvolumes = []
        print(f"building {K} subvolumes of {files} files (~{mb_per_sv:.0f} MiB each) ...",
              flush=True)
        for i in range(K):
            sv = src.mount / f"sv{i}"
            sh(["btrfs", "subvolume", "create", str(sv)])
            fill(sv, files, seed=i)
            subvolumes.append(sv)
        (src.mount / ".btrbk").mkdir()
        contenders = {}
        for jobs in (4, 1):
            name = f"ours --jobs {jobs}"
            state, snaps = work / f"state-j{jobs}", src.mount / f".snap-j{jobs}"
            config = engine_config(work / f"engine-j{jobs}.toml", dests[name].mount, state, snaps,
                                   subvolumes)
            contenders[name] = Contender(name, dests[name], [
                *CLI, "run", "-c", str(config), "--jobs", str(jobs), "--no-report", "-q"],
                state=state, snapshots=snaps)
        config = btrbk_config(work / "btrbk.conf", src.mount, ".btrbk", dests["btrbk"].mount,
                              subvolumes, work / "btrbk.lock")
        contenders["btrbk"] = Contender("btrbk", dests["btrbk"],
                                        ["btrbk", "-c", str(config), "run"],
                                        snapshots=src.mount / ".btrbk")

        results: dict[tuple[str, str], list[Timed]] = {}
        for rep in range(args.reps):
            # Fresh destinations and no old snapshots: the first run is a full one.
            for c in contenders.values():
                c.dest.make(size_mb)
                if c.snapshots is not None:
                    delete_subvolumes(subvolumes_below(c.snapshots))
                if c.state is not None and c.state.exists():
                    shutil.rmtree(c.state)
            shift = rep % len(CONTENDERS)
            order = list(CONTENDERS[shift:] + CONTENDERS[:shift])
            for phase in ("full", "incremental"):
                if phase == "incremental":
                    for sv in subvolumes:
                        change(sv, files, rep)
                for name in order:
                    result = contenders[name].run()
                    results.setdefault((name, phase), []).append(result)
                    print(f"  rep {rep} {phase:<12} {name:<14} {result.wall_s:6.2f}s "
                          f"(+ sync {result.sync_s:.2f}s)", flush=True)
            for name in order:  # the newest copies match the sources
                for sv in subvolumes:
                    want, got = count_tree(sv), count_tree(contenders[name].newest_copy(sv.name))
                    if want != got:
                        raise SystemExit(f"{name}: {sv.name} has {got} (files, bytes), "
                                         f"the source {want}")
        print_table(results, files, mb_per_sv, args.reps)
    finally:
        for fs in [*dests.values(), src]:
            fs.remove()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def print_table(results: dict[tuple[str, str], list[Timed]], files: int, mb: float,
                reps: int) -> None:
    def med(name: str, phase: str, what: str) -> float | None:
        rows = results.get((name, phase), [])
        if what == "wall":
            values = [r.wall_s for r in rows]
        elif what == "total":
            values = [r.wall_s + r.sync_s for r in rows]
        else:
            values = [r.extra[what] for r in rows if what in r.extra]
        return statistics.median(values) if values else None

    def fmt(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    version = sh(["btrbk", "--version"]).split("version")[-1].strip()
    progs = sh(["btrfs", "--version"]).split()[-1]
    print()
    print(f"{K} subvolumes x {files} files (~{mb:.0f} MiB each), loop-mounted btrfs, "
          f"cold cache; median of {reps}; {os.cpu_count()} CPUs, Linux {platform.release()}, "
          f"btrfs-progs {progs}, btrbk {version}")
    print("wall: as seen by the caller (ours includes Python start-up); +sync: wall plus the "
          "`sync` right after; in-run: the report's duration_s; stream: the send streams' size;"
          " in-run vs btrbk: ours inside the run against btrbk's whole run (issue 20's goal)")
    header = (f"{'backup':<13}{'contender':<15}{'wall s':>8}{'wall+sync s':>13}{'in-run s':>10}"
              f"{'stream MiB':>12}{'vs btrbk':>10}{'vs btrbk +sync':>16}"
              f"{'in-run vs btrbk':>17}")
    print(header)
    print("-" * len(header))
    for phase in ("full", "incremental"):
        base, base_total = med("btrbk", phase, "wall"), med("btrbk", phase, "total")
        for name in CONTENDERS:
            wall, total = med(name, phase, "wall"), med(name, phase, "total")
            ratio = f"{wall / base:.2f}" if wall and base else "-"
            ratio_total = f"{total / base_total:.2f}" if total and base_total else "-"
            in_run = med(name, phase, "in_run_s")
            ratio_in_run = f"{in_run / base:.2f}" if in_run and base else "-"
            print(f"{phase:<13}{name:<15}{fmt(wall):>8}{fmt(total):>13}"
                  f"{fmt(med(name, phase, 'in_run_s')):>10}"
                  f"{fmt(med(name, phase, 'stream_mib'), 1):>12}{ratio:>10}{ratio_total:>16}"
                  f"{ratio_in_run:>17}")
    for name in CONTENDERS:
        if not all(r.extra.get("incremental") for r in results.get((name, "incremental"), [])):
            print(f"WARNING: an incremental-phase run of {name} was not incremental")


if __name__ == "__main__":
    raise SystemExit(main())
