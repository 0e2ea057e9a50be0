"""Benchmark: ``verify`` against ``find -type f -print0 | xargs -0 cat > /dev/null`` and
the standard checker, ``sha256sum --check``, over the same backup.

Run from the repository root (as root: it drops the page cache)::

    python benchmarks/bench_verify.py             # 100,000 small files + 4 x 128 MiB
    python benchmarks/bench_verify.py --quick     # 10,000 files + 2 x 16 MiB: a smoke run
    python benchmarks/bench_verify.py --files 80000 --sources 4 --big 0   # 4 x 20,000

The source tree is built once under ``--work`` and backed up once by the
engine (``run``); every timed run then reads that backup with a cold page
cache (``sync; echo 3 > /proc/sys/vm/drop_caches``), the rows interleaved
rep by rep so that a drift of the shared machine hits them alike:

- ``find | xargs cat``: the plain reading of the backup, the goal's yardstick;
- ``sha256sum --check``: coreutils checking every source's manifest
  (``.pibackup/<source>.sha256``, SPEC §9) from inside the backup, one after the
  other, as a rescue system would; ``verify`` reads and hashes the same files
  (goal: at least 0.9 of its speed). A backup without manifests (an engine
  before them) gets them from ``sha256sum`` itself first;
- ``verify``: ``pibackup-async verify -q`` (the engine's readers as shipped),
  its wall time, throughput, ratio to the yardstick (goal: >= 0.90 of its
  throughput) and its peak RSS (``ru_maxrss`` from ``wait4``; goal <= 60 MB);
- ``verify, N readers``: the same with ``engine.verify.READERS`` set to N (the
  number of reader threads beside the walker), to show what the choice buys;
- ``verify --against-source`` beside ``find | xargs cat`` of the backup and
  the source (it reads both).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchkit import drop_caches, sh

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "pibackup_async.cli"]
# The CLI with the engine's reader count changed (what the rows "N readers" run).
WITH_READERS = [sys.executable, "-c",
                "import sys; import pibackup_async.engine.verify as v; "
                "v.READERS = int(sys.argv.pop(1)); "
                "from pibackup_async.cli.main import main; sys.exit(main(sys.argv[1:]))"]
SIZES = (1024, 4096, 16384)  # small files cycle through these
PER_DIR = 200
MiB = 1024 * 1024


def build_source(root: Path, files: int, big: int, big_mib: int) -> None:
    """``files`` small files in folders of 200 (1, 4, 16 KiB), ``big`` files of ``big_mib``."""
    marker = root / ".complete"
    if marker.exists() and marker.read_text() == f"{files} {big} {big_mib}\n":
        return
    sh(["rm", "-rf", str(root)])
    root.mkdir(parents=True)
    noise = os.urandom(max(SIZES))
    for i in range(files):
        folder = root / f"d{i // PER_DIR:04d}"
        if i % PER_DIR == 0:
            folder.mkdir()
        size = SIZES[i % len(SIZES)]
        with open(folder / f"f{i:06d}", "wb") as f:
            f.write(i.to_bytes(8, "little") + noise[: size - 8])
    block = bytearray(os.urandom(MiB))
    for n in range(big):
        with open(root / f"big{n}.bin", "wb") as f:
            for j in range(big_mib):
                block[:16] = f"{n:08d}{j:08d}".encode()
                f.write(block)
    marker.write_text(f"{files} {big} {big_mib}\n")


def source_names(sources: int) -> list[str]:
    return ["data"] if sources == 1 else [f"data{k}" for k in range(sources)]


def backed_up(work: Path, source: Path, sources: int = 1) -> tuple[Path, Path]:
    """The engine's config and the backup of ``source`` (made once, by ``run``); with
    several sources, each is a folder of ``source``."""
    dest, state, config = work / "dest", work / "state", work / "config.toml"
    stamp = work / "backup.source"
    names = source_names(sources)
    roots = [source] if sources == 1 else [source / n for n in names]
    marker = "".join((r / ".complete").read_text() for r in roots) + f"{sources}\n"
    if not (stamp.exists() and stamp.read_text() == marker):
        sh(["rm", "-rf", str(dest), str(state)])
        dest.mkdir()
        tables = "".join(f"[[sources]]\nname = \"{n}\"\ntype = \"rsync\"\n"
                         f"path = {json.dumps(str(r))}\n\n"
                         for n, r in zip(names, roots, strict=True))
        config.write_text(f"destination = {json.dumps(str(dest))}\n"
                          f"state_dir = {json.dumps(str(state))}\n\n" + tables)
        print("backing the tree up once (pibackup-async run) ...", flush=True)
        sh([*CLI, "run", "-q", "--no-report", "-c", str(config)])
        stamp.write_text(marker)
    [backup] = [p for p in dest.iterdir() if "." not in p.name]
    with_manifests(backup, names)
    return config, backup


def with_manifests(backup: Path, names: list[str]) -> None:
    """``.pibackup/<source>.sha256`` and ``SOURCES``, by sha256sum, where the run left none."""
    folder = backup / ".pibackup"
    if all((folder / f"{n}.sha256").exists() for n in names):
        return
    print("writing the manifests with sha256sum (the engine wrote none) ...", flush=True)
    folder.mkdir(exist_ok=True)
    for name in names:
        sh(["sh", "-c", f'cd "$1" && find {name} -type f -print0 | sort -z '
                        f"| xargs -0 sha256sum > .pibackup/{name}.sha256", "-", str(backup)])
    (folder / "SOURCES").write_text("".join(f"{n}\n" for n in names))


@dataclass
class Timed:
    wall_s: float
    rss_kib: int
    stdout: str


def timed(argv: list[str], scratch: Path) -> Timed:
    """Run ``argv`` after dropping the page cache: wall time, peak RSS (``wait4``), stdout."""
    drop_caches()
    with open(os.devnull, "wb") as null, open(scratch, "w+b") as out:
        started = time.monotonic()
        process = subprocess.Popen(argv, stdout=out, stderr=null)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.monotonic() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode()
    if process.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} exited {process.returncode}:\n{text}")
    return Timed(wall, usage.ru_maxrss, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small tree, for a smoke run")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "verify",
                        help="work folder (default: benchmarks/work/verify, gitignored)")
    parser.add_argument("--files", type=int, help="small files (default 100000; quick 10000)")
    parser.add_argument("--big", type=int, help="big files (default 4; quick 2)")
    parser.add_argument("--big-mib", type=int, help="MiB per big file (default 128; quick 16)")
    parser.add_argument("--sources", type=int, default=1,
                        help="split the files into this many sources (default 1)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions; medians are shown")
    parser.add_argument("--readers", default="1,2,4", help="extra rows: these reader counts")
    parser.add_argument("--no-against", action="store_true",
                        help="leave out the --against-source rows")
    args = parser.parse_args()

    files = args.files or (10_000 if args.quick else 100_000)
    big = args.big if args.big is not None else (2 if args.quick else 4)
    big_mib = args.big_mib or (16 if args.quick else 128)
    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    source = work / f"source-{files}"
    print(f"building {files} files of 1/4/16 KiB and {big} x {big_mib} MiB under {work} ...",
          flush=True)
    if args.sources == 1:
        build_source(source, files, big, big_mib)
    else:
        source = work / f"source-{files}-{args.sources}"
        for k, name in enumerate(source_names(args.sources)):
            build_source(source / name, files // args.sources, big if k == 0 else 0, big_mib)
    config, backup = backed_up(work, source, args.sources)
    total = sum(os.lstat(os.path.join(d, n)).st_size
                for d, _, names in os.walk(backup) for n in names)

    cat = ["sh", "-c", 'find "$1" -type f -print0 | xargs -0 cat > /dev/null', "-"]
    verify = [*CLI, "verify", "-q", "-c", str(config)]
    rows: dict[str, list[Timed]] = {}
    # coreutils' checker over every manifest of the backup, from inside it.
    check = ["sh", "-c", 'cd "$1" && for m in .pibackup/*.sha256; do '
             'sha256sum --check --quiet "$m" || exit 1; done', "-", str(backup)]
    plan: list[tuple[str, list[str], bool]] = [
        ("find | xargs cat", [*cat, str(backup)], False),
        ("sha256sum --check", check, False),
        ("verify", verify, True),
    ]
    for n in (int(x) for x in args.readers.split(",") if x):
        plan.append((f"verify, {n} readers",
                     [*WITH_READERS, str(n), "verify", "-q", "-c", str(config)], True))
    plan += [] if args.no_against else [
        ("find | xargs cat, backup + source",
         ["sh", "-c", 'find "$1" "$2" -type f -print0 | xargs -0 cat > /dev/null', "-",
          str(backup), str(source)], False),
        ("verify --against-source", [*verify, "--against-source"], True),
    ]
    load_before = os.getloadavg()
    for rep in range(args.reps):
        for label, argv, rss in plan:
            result = timed(argv, work / "stdout.txt")
            if not rss:
                result.rss_kib = 0  # a shell's: not the engine's
            rows.setdefault(label, []).append(result)
            print(f"  r{rep} {label}: {result.wall_s:.2f}s", flush=True)
    load_after = os.getloadavg()

    print()
    print(f"{files} files + {big} x {big_mib} MiB, {total / MiB:.0f} MiB in the backup; "
          f"cold cache; median [min-max] of {args.reps}; "
          f"load {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    base = statistics.median(r.wall_s for r in rows["find | xargs cat"])
    base2 = statistics.median(r.wall_s for r in rows.get("find | xargs cat, backup + source",
                                                         rows["find | xargs cat"]))
    checker = statistics.median(r.wall_s for r in rows["sha256sum --check"])
    print(f"{'':34} {'wall s':>18} {'MiB/s':>7} {'vs cat':>7} {'vs sha256sum':>13} "
          f"{'peak RSS MiB':>13}")
    for label, results in rows.items():
        walls = [r.wall_s for r in results]
        wall = statistics.median(walls)
        yardstick = base2 if "source" in label else base
        size = total * (2 if "source" in label else 1)
        rss = statistics.median(r.rss_kib for r in results) / 1024 if results[0].rss_kib else None
        print(f"{label:34} {wall:6.2f} [{min(walls):.2f}-{max(walls):.2f}] "
              f"{size / MiB / wall:7.0f} {yardstick / wall:7.2f} "
              f"{checker / wall if 'source' not in label else float('nan'):13.2f} "
              f"{f'{rss:.1f}' if rss is not None else '-':>13}")
    last = rows["verify"][-1].stdout.strip().splitlines()[-1]
    print(f"\nverify's summary: {last}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
