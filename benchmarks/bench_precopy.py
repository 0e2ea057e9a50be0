"""The snapshot window with and without the precopy (issue 20), beside rsnapshot and btrfs.

A "service" (a thread here) rewrites pages of a 50 MB database file in place
while it runs; the snapshot hook's pre stops it, the post starts it again.
Sources: ``files`` (FILES small files), ``db`` (the database file),
``photos`` (empty on the first night; PHOTOS_MB of new files arrive before
the second). Two nights, each run with ``precopy = true`` and ``false`` from
the same state (the new backup removed between the two):

1. a first backup: window with precopy / window without (goal <= 5%);
2. a nightly run after PHOTOS_MB arrived in ``photos``: the same ratio (goal <= 10%).

Beside them: rsnapshot with the same hooks (cmd_preexec / cmd_postexec: its
window is its whole run) on night 2, and a btrfs source holding the same data
(its window: an instant snapshot). The window is the report's
``snapshot_window_s`` (first pre start to last post end). Caches are dropped
before each timed run. At the issue's scale by default (20,000 files of 100 KiB plus the
database: 2 GB; 1 GB of photos), with and without precopy interleaved, each figure the
median of --reps; the load average is printed before and after (a shared machine).

    python benchmarks/bench_precopy.py [--files 20000] [--file-kib 100] [--photos-mb 1024]
                                       [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchkit import Filesystem, build_tree, drop_caches, sh

ROOT = Path("/var/tmp/pibackup-bench-precopy")
CLI = [sys.executable, "-m", "pibackup_async.cli"]
DB_MB = 50
PAGE = 4096


class Service:
    """Rewrites random pages of ``db`` in place until stopped by the hook's STOP file."""

    def __init__(self, db: Path, control: Path) -> None:
        self.db, self.stop_file, self.stopped_file = db, control / "STOP", control / "STOPPED"
        self.quit = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        pages = DB_MB * 1024 * 1024 // PAGE
        fd = os.open(self.db, os.O_WRONLY)
        n = 0
        try:
            while not self.quit.is_set():
                if self.stop_file.exists():
                    self.stopped_file.touch()
                    while self.stop_file.exists() and not self.quit.is_set():
                        time.sleep(0.005)
                    self.stopped_file.unlink(missing_ok=True)
                    continue
                n += 1
                os.pwrite(fd, os.urandom(PAGE), (n * 7919 % pages) * PAGE)
                if n % 50 == 0:
                    time.sleep(0.005)  # a few thousand pages a second, not a disk hog
        finally:
            os.close(fd)

    def __enter__(self) -> Service:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.quit.set()
        self.thread.join()


def hook_commands(control: Path) -> tuple[str, str]:
    stop, stopped = control / "STOP", control / "STOPPED"
    pre = f"touch {stop}; while [ ! -e {stopped} ]; do sleep 0.005; done"
    return pre, f"rm -f {stop}"


def write_config(path: Path, dest: Path, state: Path, control: Path,
                 sources: list[tuple[str, str, Path]], precopy: bool) -> None:
    pre, post = hook_commands(control)
    text = (f'destination = "{dest}"\nstate_dir = "{state}"\nconcurrency = 2\n\n'
            f'[[snapshot_hooks]]\nname = "stop db"\npre = "{pre}"\npost = "{post}"\n')
    for name, kind, src in sources:
        text += f'\n[[sources]]\nname = "{name}"\ntype = "{kind}"\npath = "{src}"\n'
        if kind == "rsync":
            text += f"precopy = {'true' if precopy else 'false'}\n"
    path.write_text(text)


def engine_run(config: Path, state: Path) -> dict[str, object]:
    drop_caches()
    result = subprocess.run([*CLI, "run", "-c", str(config)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"run failed ({result.returncode}):\n{result.stderr}")
    reports = sorted((state / "reports").glob("*.json"), key=lambda p: p.stat().st_mtime)
    return dict(json.loads(reports[-1].read_text()))


def newest(dest: Path) -> Path:
    return sorted(p for p in dest.iterdir() if not p.name.startswith("."))[-1]


def night(work: Path, sources: list[tuple[str, str, Path]], control: Path,
          reps: int, *, base: bool) -> dict[str, float]:
    """The window of this night's run with and without precopy, from the same state."""
    dest, state = work / "dest", work / "state"
    windows: dict[str, list[float]] = {"precopy": [], "plain": []}
    for _ in range(reps):
        for mode in ("plain", "precopy"):
            config = work / f"{mode}.toml"
            write_config(config, dest, state, control, sources, mode == "precopy")
            report = engine_run(config, state)
            assert report["status"] == "ok", report
            windows[mode].append(float(str(report["snapshot_window_s"])))
            windows.setdefault(f"{mode}_run", []).append(float(str(report["duration_s"])))
            shutil.rmtree(newest(dest))  # back to the night's starting state
    if base:  # leave this night's backup for the next one
        engine_run(work / "precopy.toml", state)
    print(json.dumps(windows), flush=True)
    return {mode: statistics.median(v) for mode, v in windows.items()}


def rsnapshot_night(work: Path, sources: list[tuple[str, str, Path]], control: Path) -> float:
    """rsnapshot's run on night 2 (a first run made before): its whole run is its window."""
    root = work / "rsnapshot"
    pre, post = hook_commands(control)
    (work / "pre.sh").write_text(f"#!/bin/sh\n{pre}\n")
    (work / "post.sh").write_text(f"#!/bin/sh\n{post}\n")
    for script in ("pre.sh", "post.sh"):
        (work / script).chmod(0o755)
    lines = ["config_version\t1.2", f"snapshot_root\t{root}/", "cmd_cp\t/bin/cp",
             "cmd_rm\t/bin/rm", f"cmd_rsync\t{shutil.which('rsync')}",
             "retain\tdaily\t7", "rsync_long_args\t--delete --numeric-ids --relative "
             "--delete-excluded -HAX", f"cmd_preexec\t{work / 'pre.sh'}",
             f"cmd_postexec\t{work / 'post.sh'}", f"lockfile\t{work / 'rsnapshot.pid'}"]
    lines += [f"backup\t{src}/\tlocalhost/{name}/" for name, _, src in sources]
    conf = work / "rsnapshot.conf"
    conf.write_text("\n".join(lines) + "\n")
    sh(["rsnapshot", "-c", str(conf), "daily"])  # the earlier night
    drop_caches()
    t0 = time.monotonic()
    sh(["rsnapshot", "-c", str(conf), "daily"])
    return time.monotonic() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--file-kib", type=int, default=100)
    parser.add_argument("--photos-mb", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}", flush=True)
    if ROOT.exists():
        shutil.rmtree(ROOT)
    control = ROOT / "control"
    control.mkdir(parents=True)
    src = ROOT / "src"
    build_tree(src / "files", args.files, size=args.file_kib * 1024)
    (src / "photos").mkdir()
    db = src / "db" / "db.ibd"
    db.parent.mkdir()
    db.write_bytes(os.urandom(DB_MB * 1024 * 1024))
    sources = [("files", "rsync", src / "files"), ("db", "rsync", src / "db"),
               ("photos", "rsync", src / "photos")]
    work = ROOT / "engine"
    work.mkdir()
    (work / "dest").mkdir()
    results: dict[str, object] = {"files": args.files, "file_kib": args.file_kib, "db_mb": DB_MB,
                                  "photos_mb": args.photos_mb, "reps": args.reps}
    with Service(db, control):
        first = night(work, sources, control, args.reps, base=True)
        build_tree(src / "photos", args.photos_mb, size=1024 * 1024, seed=7, per_folder=50)
        nightly = night(work, sources, control, args.reps, base=False)
        rsnap = rsnapshot_night(ROOT, sources, control)
        print(f"rsnapshot nightly: {rsnap:.2f} s", flush=True)
    results["first"] = first
    results["nightly"] = nightly
    results["rsnapshot_nightly_window_s"] = rsnap
    # btrfs: the same data in a subvolume; the window holds a snapshot only.
    fs = Filesystem(ROOT / "btrfs.img", ROOT / "btrfs").make(
        # The source, its received copy, and room for the snapshots' copy-on-write.
        (args.files * (args.file_kib + 4) // 1024 + DB_MB + args.photos_mb) * 3 + 1024)
    try:
        volume = fs.mount / "data"
        sh(["btrfs", "subvolume", "create", str(volume)])
        sh(["cp", "-a", f"{src}/.", f"{volume}/"])
        bdest, bstate = fs.mount / "dest", ROOT / "btrfs-state"
        bdest.mkdir()
        config = ROOT / "btrfs.toml"
        bcontrol = ROOT / "bcontrol"
        bcontrol.mkdir()
        write_config(config, bdest, bstate, bcontrol, [("data", "btrfs", volume)], False)
        with Service(volume / "db" / "db.ibd", bcontrol):
            engine_run(config, bstate)
            report = engine_run(config, bstate)
        results["btrfs_nightly_window_s"] = report["snapshot_window_s"]
    finally:
        fs.remove()
    first_ratio = first["precopy"] / first["plain"]
    nightly_ratio = nightly["precopy"] / nightly["plain"]
    results["first_ratio"] = first_ratio
    results["nightly_ratio"] = nightly_ratio
    results["load_average_after"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    print(f"first backup: window {first['precopy']:.2f} s with precopy, {first['plain']:.2f} s "
          f"without: {first_ratio:.1%} (goal <= 5%: {'met' if first_ratio <= 0.05 else 'not met'})")
    print(f"nightly, {args.photos_mb} MB new: {nightly['precopy']:.2f} s vs "
          f"{nightly['plain']:.2f} s: {nightly_ratio:.1%} (goal <= 10%: "
          f"{'met' if nightly_ratio <= 0.10 else 'not met'})")
    print(f"rsnapshot nightly (its whole run): {rsnap:.2f} s; btrfs nightly window: "
          f"{float(str(results['btrfs_nightly_window_s'])):.2f} s")
    shutil.rmtree(ROOT, ignore_errors=True)


if __name__ == "__main__":
    main()
