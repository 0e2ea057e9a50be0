"""Benchmark: the engine side by side with its peers on the same K local sources.

Run as root from the repository root, with the project's venv::

    .venv/bin/python benchmarks/bench_peers.py            # the full run (see RESULTS.md)
    .venv/bin/python benchmarks/bench_peers.py --quick    # K = 1, 4, tiny trees: < 1 min

Two suites, one invocation, every contender one after another:

**rsync sources** on one loop-mounted ext4 (all K), backed up to a fresh loop-mounted ext4
(one per shape, K and repetition; a folder per contender). Shapes: ``small`` — 20,000
files of 4 KiB in all (80 MiB), ``big`` — 100 files of 2 MiB (200 MiB); file ``j`` goes to
source ``j % K``. Contenders:

- ``engine -jJ``: ``pibackup-async -c CONF run --jobs J --no-report -q``, J in 1, 2, 4, K;
- ``shell seq`` / ``shell -PJ``: the exact rsync commands of the engine's ``run --dry-run``
  plan (made untimed just before each run, so ``--link-dest`` is the one the engine would
  use), run one after another by ``/bin/sh`` or by ``xargs -P J -L 1``, with the engine's
  ``mkdir`` of the in-progress folder and its final ``mv``;
- ``rsnapshot``: rsnapshot 1.4, ``link_dest 1``, one ``backup`` line per source,
  ``rsync_short_args -aHAX`` and ``--numeric-ids --sparse --stats`` added to its defaults.

**btrfs sources** (K = 1, 4; subvolumes on a loop btrfs, 4,000 files of 32 KiB in all, to
a loop btrfs of each contender's own): ``engine -j1`` (send/receive) against btrbk 0.32
(``snapshot_preserve_min all``, ``target send-receive``).

Three phases each, every contender once per phase before the next phase: ``first`` (the
page cache dropped before each run), ``unchanged`` (a re-run; ``sync`` before, cache
warm), ``changed`` (every 100th file rewritten with new bytes, once, between the phases:
the same change for everyone; for btrfs an incremental send). The contenders' order
rotates between repetitions. Figures per run:

- ``wall_s``: as seen by the caller, start-up included; ``sync_s``: the ``sync`` right
  after (untimed in ``wall_s``, shown for the write-back of big files);
- ``cpu_s``: user + system of the process and everything it reaped (``os.wait4``);
- ``rss_mib``: the engine's own peak (VmHWM of the CLI process, polled every 10 ms, rsync
  not counted); for the others the largest process of the tree (GNU time's ``%M``, the
  ``ru_maxrss`` of its child: rsync, perl or btrfs; ``-`` without /usr/bin/time);
- ``disk_mib``: what the backup added to the destination filesystem (``df`` used, after
  ``sync``): hard-linked or reflinked unchanged files cost nothing there;
- ``window_s``: the engine's ``snapshot_window_s`` from its JSON report.

Medians over ``--reps`` (default 3) are printed with ratios and written, with every raw
run, to ``--out`` (default ``benchmarks/results/peers.json``).
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bench_btrfs import btrbk_config, delete_subvolumes, subvolumes_below
from bench_btrfs import engine_config as btrfs_engine_config
from benchkit import Ext4Filesystem, Filesystem, drop_caches, measure, sh, used_bytes

REPO = Path(__file__).resolve().parent.parent
ENGINE = str(Path(sys.executable).parent / "pibackup-async")
KiB, MiB = 1024, 1024 * 1024
PHASES = ("first", "unchanged", "changed")


@dataclass(frozen=True)
class Shape:
    name: str
    files: int       # in all, split across the K sources
    size: int        # bytes per file
    ks: tuple[int, ...]


FULL = [Shape("small", 20_000, 4 * KiB, (1, 4, 16, 100)),
        Shape("big", 100, 2 * MiB, (1, 4, 16, 100))]
QUICK = [Shape("small", 400, 4 * KiB, (1, 4)), Shape("big", 8, 256 * KiB, (4,))]
BTRFS_FULL = Shape("btrfs", 4_000, 32 * KiB, (1, 4))
BTRFS_QUICK = Shape("btrfs", 80, 32 * KiB, (4,))


# --- the data ---------------------------------------------------------------------------


def content(j: int, size: int, version: int, block: bytes) -> bytes:
    return version.to_bytes(8, "little") + j.to_bytes(8, "little") + block[:size - 16]


def file_path(root: Path, i: int, k: int, j: int) -> Path:
    """File ``j`` of the shape lives in source ``j % k``, in folders of 200."""
    local = j // k
    return root / f"s{i:03d}" / f"d{local // 200:03d}" / f"f{j:06d}.dat"


def build_sources(root: Path, shape: Shape, k: int, block: bytes) -> list[Path]:
    sources = [root / f"s{i:03d}" for i in range(k)]
    for src in sources:
        src.mkdir(parents=True, exist_ok=True)
    for j in range(shape.files):
        path = file_path(root, j % k, k, j)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content(j, shape.size, 0, block))
    return sources


def change(root: Path, shape: Shape, k: int, rep: int, block: bytes) -> int:
    """Rewrite every 100th file (1 %) with new bytes, the same size; how many."""
    changed = 0
    for j in range(rep % 100, shape.files, 100):
        file_path(root, j % k, k, j).write_bytes(content(j, shape.size, rep + 1, block))
        changed += 1
    return changed


# --- the contenders ---------------------------------------------------------------------


def engine_config(path: Path, dest: Path, state: Path, sources: list[Path],
                  concurrency: int) -> Path:
    lines = [f"destination = {json.dumps(str(dest))}", f"state_dir = {json.dumps(str(state))}",
             f"concurrency = {concurrency}"]
    for src in sources:
        lines += ["", "[[sources]]", f"name = {json.dumps(src.name)}", 'type = "rsync"',
                  f"path = {json.dumps(str(src) + '/')}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def newest_report(state: Path) -> dict[str, object]:
    reports = sorted((state / "reports").glob("*.json"))
    if not reports:
        raise SystemExit(f"no report under {state}")
    report = dict(json.loads(reports[-1].read_text()))
    if report["status"] != "ok":
        raise SystemExit(f"{reports[-1]}: status {report['status']}: {report['failure']}")
    return report


@dataclass
class Contender:
    """One tool with its own destination folder; ``command`` prepares the next run
    (untimed) and returns what to time."""

    label: str
    kind: str
    jobs: int
    dest: Path
    work: Path
    config: Path | None = None
    argv: list[str] = field(default_factory=list)
    last_name: str = ""

    @property
    def state(self) -> Path:
        return self.work / "state"

    def command(self) -> list[str]:
        if self.kind != "shell":
            return self.argv
        assert self.config is not None
        name, commands = self._plan()
        if name == self.last_name:  # the engine names backups to the second
            time.sleep(max(0.0, 1.0 - time.time() % 1.0) + 0.01)
            name, commands = self._plan()
        self.last_name = name
        script = self.work / "run.sh"
        lines = ["#!/bin/sh", "set -e",
                 f"mkdir -p {shlex.quote(str(self.dest / (name + '.in-progress')))}"]
        if self.jobs == 1:
            lines += [shlex.join(argv) + " >/dev/null" for argv in commands]
        else:
            listing = self.work / "commands.txt"
            listing.write_text("".join(shlex.join(argv[1:]) + "\n" for argv in commands))
            lines.append(f"xargs -P {self.jobs} -L 1 rsync <{shlex.quote(str(listing))} "
                         ">/dev/null")
        lines.append(f"mv {shlex.quote(str(self.dest / (name + '.in-progress')))} "
                     f"{shlex.quote(str(self.dest / name))}")
        script.write_text("\n".join(lines) + "\n")
        return ["/bin/sh", str(script)]

    def _plan(self) -> tuple[str, list[list[str]]]:
        plan = sh([ENGINE, "-c", str(self.config), "run", "--dry-run"])
        name = plan.split("Backup name: ", 1)[1].split()[0]
        commands = []
        for line in plan.splitlines():
            at = line.find(": rsync ")
            if at < 0:
                continue
            argv = shlex.split(line[at + 2:])
            cut = next((i for i, a in enumerate(argv) if a.startswith("(")), len(argv))
            commands.append(argv[:cut])
        return name, commands

    def extras(self) -> dict[str, float]:
        if self.kind != "engine":
            return {}
        report = newest_report(self.state)
        extra = {"window_s": float(report["snapshot_window_s"]),  # type: ignore[arg-type]
                 "in_run_s": float(report["duration_s"])}  # type: ignore[arg-type]
        sources = report["sources"]
        assert isinstance(sources, dict)
        saves = [s["save"] for s in sources.values() if s.get("save")]
        if saves:
            commands = [s["command"] if isinstance(s["command"], list)
                        else str(s["command"]).split() for s in saves]
            extra["incremental"] = float(all("-p" in c for c in commands))
        return extra


def rsync_contenders(root: Path, work: Path, sources: list[Path], k: int) -> list[Contender]:
    found: list[Contender] = []
    for jobs in sorted({1, 2, 4, k} if k > 1 else {1}):
        if jobs > k:
            continue
        tag = f"engine-j{jobs}"
        c = Contender(f"engine -j{jobs}", "engine", jobs, root / tag, work / tag)
        c.config = engine_config(_mkdirs(c) / "config.toml", c.dest, c.state, sources, jobs)
        c.argv = [ENGINE, "-c", str(c.config), "run", "--jobs", str(jobs), "--no-report", "-q"]
        found.append(c)
    for jobs in sorted({1, 2, 4, k} if k > 1 else {1}):
        if jobs > k:
            continue
        tag = f"shell-p{jobs}"
        c = Contender("shell seq" if jobs == 1 else f"shell -P{jobs}", "shell", jobs,
                      root / tag, work / tag)
        c.config = engine_config(_mkdirs(c) / "config.toml", c.dest, c.state, sources, jobs)
        found.append(c)
    c = Contender("rsnapshot", "rsnapshot", 1, root / "rsnapshot", work / "rsnapshot")
    c.config = rsnapshot_config(_mkdirs(c) / "rsnapshot.conf", c.dest, sources,
                                c.work / "rsnapshot.pid")
    c.argv = ["rsnapshot", "-c", str(c.config), "daily"]
    found.append(c)
    return found


def _mkdirs(c: Contender) -> Path:
    c.dest.mkdir(parents=True, exist_ok=True)
    c.work.mkdir(parents=True, exist_ok=True)
    return c.work


def rsnapshot_config(path: Path, root: Path, sources: list[Path], lockfile: Path) -> Path:
    # rsnapshot wants tabs between fields and trailing slashes on folders.
    lines = [
        "config_version\t1.2",
        f"snapshot_root\t{root}/",
        "no_create_root\t0",
        f"cmd_rsync\t{shutil.which('rsync')}",
        "link_dest\t1",
        "retain\tdaily\t20",
        f"lockfile\t{lockfile}",
        "rsync_short_args\t-aHAX",
        "rsync_long_args\t--delete --numeric-ids --relative --delete-excluded --sparse --stats",
        "verbose\t1",
    ]
    lines += [f"backup\t{src}/\t{src.name}/" for src in sources]
    path.write_text("\n".join(lines) + "\n")
    return path


# --- running ----------------------------------------------------------------------------


@dataclass
class Run:
    suite: str
    shape: str
    k: int
    contender: str
    kind: str
    jobs: int
    phase: str
    rep: int
    wall_s: float
    sync_s: float
    cpu_s: float
    rss_mib: float | None
    disk_mib: float
    extra: dict[str, float]


def timed_run(c: Contender, suite: str, shape: str, k: int, phase: str, rep: int,
              fs_path: Path) -> Run:
    argv = c.command()
    if phase == "first":
        drop_caches()
    else:
        subprocess.run(["sync"], check=True)
    before = used_bytes(fs_path)
    m = measure(argv, own_rss=c.kind == "engine")
    t0 = time.monotonic()
    subprocess.run(["sync"], check=True)
    sync_s = time.monotonic() - t0
    disk = (used_bytes(fs_path) - before) / MiB
    rss_kib = m.own_rss_kib if c.kind == "engine" else m.tree_rss_kib
    rss = rss_kib / 1024 if rss_kib is not None else None
    run = Run(suite, shape, k, c.label, c.kind, c.jobs, phase, rep, m.wall_s, sync_s,
              m.cpu_s, rss, disk, c.extras())
    print(f"  {suite}/{shape} K={k:<3} rep {rep} {phase:<9} {c.label:<12} "
          f"{m.wall_s:7.2f}s cpu {m.cpu_s:6.2f}s rss {fmt(rss, 1):>5} MiB "
          f"disk {disk:7.1f} MiB", flush=True)
    return run


def rotate(items: list[Contender], rep: int) -> list[Contender]:
    shift = rep % len(items)
    return items[shift:] + items[:shift]


def rsync_suite(work: Path, shapes: list[Shape], reps: int, runs: list[Run]) -> None:
    block = os.urandom(max(s.size for s in shapes))
    for shape in shapes:
        total_mib = shape.files * shape.size / MiB
        src_fs = Ext4Filesystem(work / "images" / "src.img", work / "mnt" / "src")
        dest_fs = Ext4Filesystem(work / "images" / "dest.img", work / "mnt" / "dest")
        small = shape.size < 64 * KiB
        # The sources of every K, then one copy per contender plus the changes.
        src_mb = int(total_mib * len(shape.ks) * 1.3 + shape.files * len(shape.ks) * 0.01) + 200
        dest_mb = int(total_mib * 9 * 1.3 + shape.files * 9 * 0.01) + 300
        try:
            src_fs.make(src_mb, 4096 if small else 16384)
            print(f"building {shape.name}: {shape.files} files of {shape.size // KiB} KiB "
                  f"({total_mib:.0f} MiB) for K in {shape.ks} ...", flush=True)
            trees = {k: build_sources(src_fs.mount / f"k{k:03d}", shape, k, block)
                     for k in shape.ks}
            for k in shape.ks:
                for rep in range(reps):
                    dest_fs.make(dest_mb, 4096 if small else 16384)
                    rep_work = work / "runs" / f"{shape.name}-k{k}-r{rep}"
                    shutil.rmtree(rep_work, ignore_errors=True)
                    contenders = rsync_contenders(dest_fs.mount, rep_work, trees[k], k)
                    order = rotate(contenders, rep)
                    for phase in PHASES:
                        if phase == "changed":
                            change(src_fs.mount / f"k{k:03d}", shape, k, rep, block)
                        for c in order:
                            runs.append(timed_run(c, "rsync", shape.name, k, phase, rep,
                                                  dest_fs.mount))
                    dest_fs.remove()
        finally:
            dest_fs.remove()
            src_fs.remove()


def btrfs_suite(work: Path, shape: Shape, reps: int, runs: list[Run]) -> None:
    block = os.urandom(shape.size)
    total_mib = shape.files * shape.size / MiB
    for k in shape.ks:
        src_fs = Filesystem(work / "images" / "bsrc.img", work / "mnt" / "bsrc")
        # One destination filesystem each: btrbk takes any snapshot of the source that has
        # a received copy on its target as a parent, the engine's included.
        dest_fs = Filesystem(work / "images" / "bdest.img", work / "mnt" / "bdest")
        btrbk_fs = Filesystem(work / "images" / "bbtrbk.img", work / "mnt" / "bbtrbk")
        try:
            src_fs.make(int(total_mib * 3) + 400)
            print(f"building btrfs: {k} subvolumes, {shape.files} files of "
                  f"{shape.size // KiB} KiB in all ...", flush=True)
            subvolumes = [src_fs.mount / f"s{i:03d}" for i in range(k)]
            for sv in subvolumes:
                sh(["btrfs", "subvolume", "create", str(sv)])
            build_sources(src_fs.mount, shape, k, block)
            (src_fs.mount / ".btrbk").mkdir()
            for rep in range(reps):
                delete_subvolumes(subvolumes_below(src_fs.mount / ".btrbk"))
                delete_subvolumes(subvolumes_below(src_fs.mount / ".snap-engine"))
                dest_fs.make(int(total_mib * 4) + 400)
                btrbk_fs.make(int(total_mib * 4) + 400)
                rep_work = work / "runs" / f"btrfs-k{k}-r{rep}"
                shutil.rmtree(rep_work, ignore_errors=True)
                engine = Contender("engine -j1", "engine", 1, dest_fs.mount / "engine",
                                   rep_work / "engine")
                engine.config = btrfs_engine_config(
                    _mkdirs(engine) / "config.toml", engine.dest, engine.state,
                    src_fs.mount / ".snap-engine", subvolumes)
                engine.argv = [ENGINE, "-c", str(engine.config), "run", "--jobs", "1",
                               "--no-report", "-q"]
                btrbk = Contender("btrbk", "btrbk", 1, btrbk_fs.mount / "btrbk",
                                  rep_work / "btrbk")
                btrbk.config = btrbk_config(_mkdirs(btrbk) / "btrbk.conf", src_fs.mount,
                                            ".btrbk", btrbk.dest, subvolumes,
                                            btrbk.work / "btrbk.lock")
                btrbk.argv = ["btrbk", "-c", str(btrbk.config), "run"]
                order = rotate([engine, btrbk], rep)
                for phase in PHASES:
                    if phase == "changed":
                        change(src_fs.mount, shape, k, rep, block)
                    for c in order:
                        runs.append(timed_run(c, "btrfs", shape.name, k, phase, rep,
                                              c.dest.parent))
                dest_fs.remove()
                btrbk_fs.remove()
        finally:
            dest_fs.remove()
            btrbk_fs.remove()
            # Snapshots are subvolumes of the source filesystem: they go with its image.
            src_fs.remove()


# --- the summary ------------------------------------------------------------------------


def medians(runs: list[Run]) -> list[dict[str, object]]:
    groups: dict[tuple[str, str, int, str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.suite, r.shape, r.k, r.contender, r.phase), []).append(r)
    rows = []
    for (suite, shape, k, contender, phase), rs in groups.items():
        row: dict[str, object] = {
            "suite": suite, "shape": shape, "k": k, "contender": contender,
            "kind": rs[0].kind, "jobs": rs[0].jobs, "phase": phase, "n": len(rs)}
        for key in ("wall_s", "sync_s", "cpu_s", "rss_mib", "disk_mib"):
            values = [getattr(r, key) for r in rs if getattr(r, key) is not None]
            row[key] = statistics.median(values) if values else None
        for key in sorted({key for r in rs for key in r.extra}):
            row[key] = statistics.median(r.extra[key] for r in rs if key in r.extra)
        rows.append(row)
    return rows


def find(rows: list[dict[str, object]], **want: object) -> dict[str, object] | None:
    for row in rows:
        if all(row.get(key) == value for key, value in want.items()):
            return row
    return None


def wall(row: dict[str, object] | None) -> float | None:
    return float(row["wall_s"]) if row is not None else None  # type: ignore[arg-type]


def ratios(rows: list[dict[str, object]]) -> dict[str, object]:
    """The issue's goals, per shape, K and phase."""
    out: dict[str, object] = {}
    for suite, shape, k in sorted({(str(r["suite"]), str(r["shape"]), int(r["k"]))  # type: ignore[call-overload]
                                   for r in rows}):
        for phase in PHASES:
            mine = [r for r in rows if (r["suite"], r["shape"], r["k"], r["phase"])
                    == (suite, shape, k, phase)]
            key = f"{suite}/{shape}/K={k}/{phase}"
            entry: dict[str, object] = {}
            if suite == "rsync":
                per_j = {}
                for r in mine:
                    if r["kind"] == "engine":
                        shell = find(mine, kind="shell", jobs=r["jobs"])
                        if shell is not None:
                            per_j[f"j{r['jobs']}"] = wall(r) / wall(shell)  # type: ignore[operator]
                entry["engine_over_shell"] = per_j
                rsnap = wall(find(mine, kind="rsnapshot"))
                engines = [wall(r) for r in mine if r["kind"] == "engine"]
                shells = [wall(r) for r in mine if r["kind"] == "shell"]
                if rsnap and engines and shells:
                    best_e = rsnap / min(e for e in engines if e)
                    best_s = rsnap / min(s for s in shells if s)
                    entry.update(engine_best_speedup_over_rsnapshot=best_e,
                                 shell_best_speedup_over_rsnapshot=best_s,
                                 engine_best_vs_shell_best=best_e / best_s)
            else:
                e, b = wall(find(mine, kind="engine")), wall(find(mine, kind="btrbk"))
                if e and b:
                    entry["engine_j1_over_btrbk"] = e / b
            rss = [float(r["rss_mib"]) for r in mine  # type: ignore[arg-type]
                   if r["kind"] == "engine" and r["rss_mib"] is not None]
            if rss:
                entry["engine_peak_rss_mib"] = max(rss)
            out[key] = entry
    return out


def fmt(value: object, digits: int = 2) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"  # type: ignore[arg-type]


def print_tables(rows: list[dict[str, object]], summary: dict[str, object],
                 shapes: list[Shape], btrfs: Shape, reps: int) -> None:
    described = {s.name: s for s in [*shapes, btrfs]}
    blocks = sorted({(str(r["suite"]), str(r["shape"]), int(r["k"])) for r in rows},  # type: ignore[call-overload]
                    key=lambda b: (b[0] != "rsync", b[1] != "small", b[2]))
    print()
    print(f"{os.cpu_count()} CPUs, {platform.release()}, {time.strftime('%Y-%m-%d %H:%M %Z')}; "
          f"median of {reps}; wall includes start-up; ratio = wall / the reference's wall")
    for suite, shape, k in blocks:
        s = described[shape]
        print()
        print(f"== {suite} sources, {shape}: K={k}, {s.files} files of {s.size // KiB} KiB "
              f"in all ({s.files * s.size / MiB:.0f} MiB)")
        header = (f"{'contender':<13}{'phase':<10}{'wall s':>8}{'sync s':>8}{'cpu s':>8}"
                  f"{'RSS MiB':>9}{'disk MiB':>10}{'window s':>10}  {'ratio':<14}")
        print(header)
        print("-" * len(header))
        for phase in PHASES:
            mine = [r for r in rows if (r["suite"], r["shape"], r["k"], r["phase"])
                    == (suite, shape, k, phase)]
            mine.sort(key=lambda r: (["engine", "shell", "rsnapshot", "btrbk"].index(
                str(r["kind"])), int(r["jobs"])))  # type: ignore[call-overload]
            rsnap = wall(find(mine, kind="rsnapshot"))
            btrbk = wall(find(mine, kind="btrbk"))
            for r in mine:
                ratio = ""
                if r["kind"] == "engine" and suite == "rsync":
                    shell = wall(find(mine, kind="shell", jobs=r["jobs"]))
                    ratio = f"{wall(r) / shell:.2f} vs shell" if shell else ""  # type: ignore[operator]
                elif r["kind"] == "engine" and btrbk:
                    ratio = f"{wall(r) / btrbk:.2f} vs btrbk"  # type: ignore[operator]
                elif r["kind"] == "shell" and rsnap:
                    ratio = f"x{rsnap / wall(r):.2f} rsnap"  # type: ignore[operator]
                print(f"{r['contender']!s:<13}{phase:<10}{fmt(r['wall_s']):>8}"
                      f"{fmt(r['sync_s']):>8}{fmt(r['cpu_s']):>8}{fmt(r['rss_mib'], 1):>9}"
                      f"{fmt(r['disk_mib'], 1):>10}{fmt(r.get('window_s')):>10}  {ratio:<14}")
            entry = summary.get(f"{suite}/{shape}/K={k}/{phase}")
            if isinstance(entry, dict) and "engine_best_speedup_over_rsnapshot" in entry:
                print(f"{'':<13}{phase:<10} best speed-up over rsnapshot: engine "
                      f"x{entry['engine_best_speedup_over_rsnapshot']:.2f}, shell "
                      f"x{entry['shell_best_speedup_over_rsnapshot']:.2f} "
                      f"(ratio {entry['engine_best_vs_shell_best']:.2f}, goal >= 0.95)")


def machine() -> dict[str, object]:
    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True).stdout
        except OSError:
            return "?"
        return out.splitlines()[0] if out else "?"

    return {"cpus": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "rsync": first_line(["rsync", "--version"]),
            "btrbk": first_line(["btrbk", "--version"]),
            "rsnapshot": first_line(["rsnapshot", "version"]),
            "loadavg_at_start": os.getloadavg()[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="K = 1, 4, tiny trees, one repetition: a smoke run")
    parser.add_argument("--reps", type=int, help="repetitions (default 3; 1 with --quick)")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "peers",
                        help="images, mounts and configs (default benchmarks/work/peers)")
    parser.add_argument("--out", type=Path, help="the JSON results (default "
                        "benchmarks/results/peers.json; peers-quick.json with --quick)")
    parser.add_argument("--suite", choices=("all", "rsync", "btrfs"), default="all")
    parser.add_argument("--ks", type=lambda v: tuple(int(x) for x in v.split(",")),
                        help="only these K, comma-separated (to try a part)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: it mounts loop devices and drops the page cache")
    for tool in ("rsync", "rsnapshot", "btrbk", "btrfs", "mkfs.ext4", "mkfs.btrfs", "xargs"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    reps = args.reps or (1 if args.quick else 3)
    shapes, btrfs = (QUICK, BTRFS_QUICK) if args.quick else (FULL, BTRFS_FULL)
    if args.ks:
        shapes = [replace(s, ks=tuple(k for k in s.ks if k in args.ks)) for s in shapes]
        btrfs = replace(btrfs, ks=tuple(k for k in btrfs.ks if k in args.ks))
    out: Path = args.out or (REPO / "benchmarks" / "results" /
                             ("peers-quick.json" if args.quick else "peers.json"))
    work: Path = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    started = time.time()
    meta = {**machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "reps": reps,
            "quick": args.quick, "command": shlex.join(sys.argv),
            "shapes": [asdict(s) for s in [*shapes, btrfs]]}
    runs: list[Run] = []
    try:
        if args.suite in ("all", "rsync"):
            rsync_suite(work, shapes, reps, runs)
        if args.suite in ("all", "btrfs"):
            btrfs_suite(work, btrfs, reps, runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = medians(runs)
    summary = ratios(rows)
    meta["duration_s"] = time.time() - started
    print_tables(rows, summary, shapes, btrfs, reps)
    print(f"\ntook {meta['duration_s']:.0f} s; results in {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "medians": rows, "ratios": summary,
                               "runs": [asdict(r) for r in runs]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
