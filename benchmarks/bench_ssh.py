"""Benchmark: remote sources over SSH, the engine against plain OpenSSH commands.

Run as root from the repository root, with the project's venv::

    python benchmarks/bench_ssh.py               # the full run (a few minutes)
    python benchmarks/bench_ssh.py --quick       # small trees and streams: a smoke run

The "remote" host is this machine, reached through a private OpenSSH ``sshd``
on 127.0.0.1 that the script starts (the test kit ``tests/sshkit.py``: own
host key, client key, known_hosts, a quiet login shell). Two measurements,
medians of ``--reps`` (default 3), the contenders' order alternating between
repetitions:

(a) **Pull** of the same tree over loopback SSH into a fresh destination,
    page cache dropped (``sync; echo 3 > /proc/sys/vm/drop_caches``) before
    every timed run:

    - the engine: ``pibackup-async run --no-report -q`` with one rsync source
      with ``host =`` (its rsync runs over the run's OpenSSH master);
    - a script: ``rsync -aHAX --numeric-ids --sparse --stats -e "ssh …"
      root@127.0.0.1:/tree/ dest/``, the same rsync options and the same ssh
      options as the engine's (key, known_hosts, strict host key checking,
      batch mode), without a master.

    Trees: A = 20,000 files of 4 KiB in folders of 200; B = 8 files of 128 MiB.

(b) **Stream** throughput with a warm page cache (the source read once before
    every timed run; each run's connection set-up is included on both sides):

    - ``cat`` of a 1 GiB file: the engine's ``RemoteHost.run(…,
      stdout_sink=…)`` (asyncssh) with a sink that drops the data, against
      ``ssh host cat FILE > /dev/null`` (OpenSSH's default cipher) and, for
      reference, the same with ``-c aes128-gcm@openssh.com`` (the engine's
      first choice);
    - ``btrfs send`` of a 1 GiB read-only snapshot on a loop btrfs (mounted
      before the sshd starts, so the server's private mount namespace has it),
      full send into a fresh loop btrfs each run: the engine's
      ``sources.btrfs.send_receive`` on a remote ``Site`` (a local ``ssh`` on
      the host's OpenSSH master, spliced into a local ``btrfs receive``)
      against ``ssh host btrfs send SNAP | btrfs receive DIR``.

Everything lives under ``--work`` (default ``benchmarks/work/ssh``,
gitignored). Trees are built once and reused; copies and the destination
filesystems are removed at the end (untimed; ``--keep`` keeps the copies).
Only the loop devices backing the script's own images are detached.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from benchkit import Filesystem, count_tree, drop_caches, sh  # noqa: E402
from sshkit import ClientKey, Sshd  # noqa: E402  (the test kit, found through sys.path)

if TYPE_CHECKING:
    from collections.abc import Callable

CLI = [sys.executable, "-m", "pibackup_async.cli"]
KiB, MiB = 1024, 1024 * 1024
FILES_PER_DIR = 200


# --- helpers ------------------------------------------------------------------------------


def warm(paths: list[Path]) -> None:
    """Read files once so that the timed run reads them from the page cache."""
    subprocess.run(["sync"], check=True)
    for path in paths:
        with open(path, "rb") as f:
            while f.read(8 * MiB):
                pass


# --- the data -----------------------------------------------------------------------------


def build_small(root: Path, files: int) -> None:
    """``files`` files of 4 KiB in folders of 200; distinct contents."""
    done = root / ".complete"
    if done.exists() and done.read_text().strip() == str(files):
        return
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    block = os.urandom(4 * KiB - 8)
    for i in range(files):
        folder = root / f"d{i // FILES_PER_DIR:04d}"
        if i % FILES_PER_DIR == 0:
            folder.mkdir()
        with open(folder / f"f{i:06d}.dat", "wb") as f:
            f.write(i.to_bytes(8, "little") + block)
    (root / ".complete").write_text(f"{files}\n")


def write_big(path: Path, mib: int, seed: int) -> None:
    """``mib`` MiB of incompressible data, each MiB made unique by its index."""
    block = bytearray(os.urandom(MiB))
    with open(path, "wb") as f:
        for j in range(mib):
            block[:16] = f"{seed:08d}{j:08d}".encode()
            f.write(block)


def build_big(root: Path, files: int, mib: int) -> None:
    stamp = f"{files}x{mib}"
    if (root / ".complete").exists() and (root / ".complete").read_text().strip() == stamp:
        return
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for i in range(files):
        write_big(root / f"big{i}.bin", mib, i)
    (root / ".complete").write_text(f"{stamp}\n")


# --- contenders -----------------------------------------------------------------------------


@dataclass
class Sample:
    wall: float
    extra: dict[str, float] = field(default_factory=dict)


def ssh_options(server: Sshd) -> list[str]:
    """The engine's own ssh client options (engine/remote.py), without its master."""
    return ["-p", str(server.port), "-i", str(server.client.path), "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={server.known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"]


def engine_pull(server: Sshd, tree: Path, run_dir: Path) -> Sample:
    dest, state = run_dir / "dest", run_dir / "state"
    dest.mkdir(parents=True)
    config = run_dir / "config.toml"
    config.write_text(
        f'destination = "{dest}"\nstate_dir = "{state}"\n\n'
        + server.host_toml("bench")
        + f'\n[[sources]]\nname = "tree"\ntype = "rsync"\npath = "{tree}/"\nhost = "bench"\n')
    drop_caches()
    t0 = time.perf_counter()
    result = subprocess.run([*CLI, "run", "-c", str(config), "--no-report", "-q"],
                            capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if result.returncode != 0:
        raise SystemExit(f"the engine failed ({result.returncode}):\n{result.stderr}")
    [report_path] = sorted((state / "reports").glob("*.json"))
    report = json.loads(report_path.read_text())
    [backup] = list(dest.iterdir())
    check_copy(tree, backup / "tree")
    return Sample(wall, {"in_run": report["duration_s"],
                         "rsync": report["sources"]["tree"]["snapshot"]["duration_s"]})


def script_pull(server: Sshd, tree: Path, run_dir: Path) -> Sample:
    dest = run_dir / "dest"
    dest.mkdir(parents=True)
    shell = shlex.join(["ssh", *ssh_options(server)])
    argv = ["rsync", "-aHAX", "--numeric-ids", "--sparse", "--stats", "-e", shell,
            f"root@127.0.0.1:{tree}/", f"{dest}/"]
    drop_caches()
    t0 = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if result.returncode != 0:
        raise SystemExit(f"rsync failed ({result.returncode}):\n{result.stderr}")
    check_copy(tree, dest)
    return Sample(wall)


def check_copy(tree: Path, copy: Path) -> None:
    want, got = count_tree(tree), count_tree(copy)
    if want != got:
        raise SystemExit(f"{copy} holds {got} (files, bytes), expected {want}")


def engine_host(server: Sshd) -> object:
    from pibackup_async.engine.config import Host

    return Host(address="127.0.0.1", port=server.port, user="root",
                identity_file=str(server.client.path), known_hosts=str(server.known_hosts))


async def _engine_cat(server: Sshd, path: Path) -> tuple[float, int]:
    from pibackup_async.engine.remote import RemoteHost

    received = 0

    async def discard(chunk: bytes) -> None:
        nonlocal received
        received += len(chunk)

    with tempfile.TemporaryDirectory(prefix="bench-ssh-") as control:
        remote = RemoteHost("bench", engine_host(server), control)  # type: ignore[arg-type]
        try:
            t0 = time.perf_counter()
            finished = await remote.run(shlex.join(["cat", str(path)]), {},
                                        stdout_sink=discard)
            wall = time.perf_counter() - t0
        finally:
            await remote.aclose()
    if finished.exit_code != 0:
        raise SystemExit(f"remote cat exited {finished.exit_code}: {finished.stderr.text()}")
    return wall, received


def engine_cat(server: Sshd, path: Path) -> Sample:
    import anyio

    warm([path])
    wall, received = anyio.run(_engine_cat, server, path, backend="asyncio")
    if received != path.stat().st_size:
        raise SystemExit(f"remote cat gave {received} bytes, expected {path.stat().st_size}")
    return Sample(wall, {"bytes": received})


def ssh_cat(server: Sshd, path: Path, cipher: str | None = None) -> Sample:
    argv = ["ssh", *ssh_options(server), *(["-c", cipher] if cipher else []),
            "root@127.0.0.1", shlex.join(["cat", str(path)])]
    warm([path])
    t0 = time.perf_counter()
    result = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t0
    if result.returncode != 0:
        raise SystemExit(f"ssh cat exited {result.returncode}: {result.stderr!r}")
    return Sample(wall, {"bytes": path.stat().st_size})


async def _engine_send(server: Sshd, snapshot: Path, folder: Path) -> tuple[float, int]:
    from pibackup_async.engine.remote import RemoteHost
    from pibackup_async.engine.sources import btrfs

    with tempfile.TemporaryDirectory(prefix="bench-ssh-") as control:
        remote = RemoteHost("bench", engine_host(server), control)  # type: ignore[arg-type]
        try:
            t0 = time.perf_counter()
            size = (await btrfs.send_receive(btrfs.Site(remote), str(snapshot), None,
                                             str(folder))).bytes
            wall = time.perf_counter() - t0
        finally:
            await remote.aclose()
    return wall, size


def engine_send(server: Sshd, snapshot: Path, dest: Filesystem, size_mb: int) -> Sample:
    import anyio

    dest.make(size_mb)
    try:
        warm(sorted(p for p in snapshot.rglob("*") if p.is_file()))
        wall, stream = anyio.run(_engine_send, server, snapshot, dest.mount, backend="asyncio")
        check_copy(snapshot, dest.mount / snapshot.name)
    finally:
        dest.remove()
    # The rate counts the subvolume's file bytes on both sides (the stream is a little more).
    return Sample(wall, {"bytes": count_tree(snapshot)[1], "stream": stream})


def ssh_send(server: Sshd, snapshot: Path, dest: Filesystem, size_mb: int,
             cipher: str | None = None) -> Sample:
    dest.make(size_mb)
    try:
        ssh = shlex.join(["ssh", *ssh_options(server), *(["-c", cipher] if cipher else []),
                          "root@127.0.0.1",
                          shlex.join(["btrfs", "send", str(snapshot)])])
        script = f"set -o pipefail; {ssh} | btrfs receive {shlex.quote(str(dest.mount))}"
        warm(sorted(p for p in snapshot.rglob("*") if p.is_file()))
        t0 = time.perf_counter()
        result = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if result.returncode != 0:
            raise SystemExit(f"ssh btrfs send | receive failed: {result.stderr}")
        check_copy(snapshot, dest.mount / snapshot.name)
        size = count_tree(snapshot)[1]
    finally:
        dest.remove()
    return Sample(wall, {"bytes": size})


# --- the run --------------------------------------------------------------------------------


def median(samples: list[Sample], key: str = "wall") -> float:
    values = [s.wall if key == "wall" else s.extra[key] for s in samples]
    return statistics.median(values)


def rotate(reps: int, contenders: dict[str, Callable[[int], Sample]],
           label: str) -> dict[str, list[Sample]]:
    """Run every contender ``reps`` times; who goes first rotates between repetitions."""
    names = list(contenders)
    samples: dict[str, list[Sample]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            sample = contenders[name](rep)
            samples[name].append(sample)
            print(f"  {label} rep {rep + 1} {name}: {sample.wall:.2f} s",
                  file=sys.stderr, flush=True)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "ssh")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--files", type=int, default=20_000, help="tree A: files of 4 KiB")
    parser.add_argument("--big-files", type=int, default=8, help="tree B: number of big files")
    parser.add_argument("--big-mib", type=int, default=128, help="tree B: MiB per big file")
    parser.add_argument("--stream-mib", type=int, default=1024, help="size of the streams")
    parser.add_argument("--quick", action="store_true", help="2,000 files, 4 x 16 MiB, 128 MiB")
    parser.add_argument("--keep", action="store_true", help="keep the copies under WORK/runs")
    args = parser.parse_args()
    if args.quick:
        args.files, args.big_files, args.big_mib, args.stream_mib = 2000, 4, 16, 128
    if os.geteuid() != 0:
        raise SystemExit("run as root (caches are dropped, loop btrfs mounted, sshd as root)")
    for tool in ("rsync", "ssh", "sshd", "btrfs", "mkfs.btrfs", "losetup"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            raise SystemExit(f"{tool} is not installed")

    # The engine's in-process calls in (b) log through structlog: keep the table readable.
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    work = args.work.resolve()
    runs = work / "runs"
    if runs.exists():
        shutil.rmtree(runs)
    runs.mkdir(parents=True)
    shutil.rmtree(work / "sshd", ignore_errors=True)  # fresh keys (ssh-keygen will not overwrite)
    print(f"building trees under {work} …", file=sys.stderr, flush=True)
    tree_a, tree_b = work / "trees" / "a", work / "trees" / "b"
    build_small(tree_a, args.files)
    build_big(tree_b, args.big_files, args.big_mib)
    stream = work / "trees" / "stream.bin"
    if not stream.exists() or stream.stat().st_size != args.stream_mib * MiB:
        write_big(stream, args.stream_mib, 99)

    fs_mb = args.stream_mib * 2 + 512
    source_fs = Filesystem(work / "images" / "source.img", work / "mnt" / "source")
    dest_fs = Filesystem(work / "images" / "dest.img", work / "mnt" / "dest")
    server: Sshd | None = None
    try:
        # The source btrfs is mounted before the sshd starts: the server runs in a
        # private mount namespace (tests/sshkit.py) that only has what existed then.
        source_fs.make(fs_mb)
        volume = source_fs.mount / "vol"
        sh(["btrfs", "subvolume", "create", str(volume)])
        for i in range(8):
            write_big(volume / f"part{i}.bin", args.stream_mib // 8, 100 + i)
        (source_fs.mount / "snap").mkdir()
        snapshot = source_fs.mount / "snap" / "vol"
        sh(["btrfs", "subvolume", "snapshot", "-r", str(volume), str(snapshot)])
        sh(["btrfs", "filesystem", "sync", str(source_fs.mount)])
        server = Sshd(work / "sshd", ClientKey(work / "sshd" / "client")).start()

        gcm = "aes128-gcm@openssh.com"
        results: dict[str, dict[str, list[Sample]]] = {}
        for key, tree in (("A", tree_a), ("B", tree_b)):
            results[f"pull {key}"] = rotate(args.reps, {
                "engine": lambda rep, t=tree, k=key: engine_pull(
                    server, t, runs / f"engine-{k}-{rep}"),
                "script": lambda rep, t=tree, k=key: script_pull(
                    server, t, runs / f"script-{k}-{rep}"),
            }, f"pull {key}")
        results["cat"] = rotate(args.reps, {
            "engine": lambda rep: engine_cat(server, stream),
            "ssh": lambda rep: ssh_cat(server, stream),
            "ssh gcm": lambda rep: ssh_cat(server, stream, gcm),
        }, "cat")
        results["send"] = rotate(args.reps, {
            "engine": lambda rep: engine_send(server, snapshot, dest_fs, fs_mb),
            "ssh": lambda rep: ssh_send(server, snapshot, dest_fs, fs_mb),
            "ssh gcm": lambda rep: ssh_send(server, snapshot, dest_fs, fs_mb, gcm),
        }, "btrfs send")
    finally:
        if server is not None:
            server.stop()
        dest_fs.remove()
        source_fs.remove()
        if not args.keep:
            shutil.rmtree(runs, ignore_errors=True)

    print_table(args, results)
    return 0


def spread(samples: list[Sample]) -> str:
    walls = [s.wall for s in samples]
    return f"{min(walls):.2f}-{max(walls):.2f}"


def print_table(args: argparse.Namespace, results: dict[str, dict[str, list[Sample]]]) -> None:
    ssh_version = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    rsync_version = " ".join(subprocess.run(["rsync", "--version"], capture_output=True,
                                            text=True).stdout.split()[:3])
    print(f"\n{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{ssh_version}, {rsync_version}; medians of {args.reps} (min-max in brackets)")

    print("\n(a) pull over loopback SSH, cold cache, fresh destination "
          "(rsync -aHAX --numeric-ids --sparse --stats)")
    print(f"{'tree':<24}{'engine s':>20}{'in-run s':>10}{'rsync s':>9}{'script s':>20}"
          f"{'engine/script':>15}{'rsync/script':>14}")
    names = {"pull A": f"A: {args.files:,} x 4 KiB",
             "pull B": f"B: {args.big_files} x {args.big_mib} MiB"}
    for key, label in names.items():
        ours, theirs = results[key]["engine"], results[key]["script"]
        e, s, r = median(ours), median(theirs), median(ours, "rsync")
        print(f"{label:<24}{f'{e:.2f} [{spread(ours)}]':>20}{median(ours, 'in_run'):>10.2f}"
              f"{r:>9.2f}{f'{s:.2f} [{spread(theirs)}]':>20}{e / s:>15.3f}{r / s:>14.3f}")

    print(f"\n(b) stream over loopback SSH, warm cache, {args.stream_mib} MiB, "
          "connection set-up included; throughput ratios engine/openssh")
    print(f"{'stream':<46}{'s':>20}{'MB/s':>7}{'vs ssh':>8}{'vs ssh gcm':>12}")
    rows = {
        "cat": ("ssh host cat FILE > /dev/null", "engine RemoteHost.run(cat, stdout_sink)"),
        "send": ("ssh host btrfs send SNAP | btrfs receive", "engine send_receive (remote Site)"),
    }
    for key, (theirs, ours) in rows.items():
        got = results[key]
        rate = {name: got[name][0].extra["bytes"] / median(got[name]) / 1e6 for name in got}
        for name, label in (("ssh", theirs), ("ssh gcm", "  same, ssh -c aes128-gcm@openssh.com"),
                            ("engine", ours)):
            ratios = ""
            if name == "engine":
                ratios = f"{rate['engine'] / rate['ssh']:>8.3f}"
                ratios += f"{rate['engine'] / rate['ssh gcm']:>12.3f}"
            print(f"{label:<46}{f'{median(got[name]):.2f} [{spread(got[name])}]':>20}"
                  f"{rate[name]:>7.0f}{ratios}")


if __name__ == "__main__":
    raise SystemExit(main())
