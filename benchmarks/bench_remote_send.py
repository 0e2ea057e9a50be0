"""Benchmark: a remote btrfs send, the engine against a tuned ``ssh … | btrfs receive`` pipe.

Run as root from the repository root::

    python benchmarks/bench_remote_send.py              # 1 GiB, 5 repetitions
    python benchmarks/bench_remote_send.py --mib 128 --reps 1

The stream part of ``bench_ssh.py`` alone: a read-only snapshot on a loop
btrfs, served by a private sshd on 127.0.0.1, received into a fresh loop
btrfs each run. Contenders, order rotating: the engine's
``sources.btrfs.send_receive`` on a remote site (a local ``ssh`` on the
host's OpenSSH master joined to ``btrfs receive`` by splice), ``ssh host
btrfs send | btrfs receive`` with OpenSSH's default cipher, and the same with
``-c aes128-gcm@openssh.com``. Connection set-up is included on every side.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

import bench_ssh as b
import structlog


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="size of the stream")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--work", type=Path, default=b.REPO / "benchmarks" / "work" / "send")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    work: Path = args.work
    shutil.rmtree(work, ignore_errors=True)
    fs_mb = args.mib * 2 + 512
    src = b.Filesystem(work / "images" / "source.img", work / "mnt" / "source")
    dst = b.Filesystem(work / "images" / "dest.img", work / "mnt" / "dest")
    server = None
    try:
        src.make(fs_mb)
        volume = src.mount / "vol"
        b.sh(["btrfs", "subvolume", "create", str(volume)])
        for i in range(8):
            b.write_big(volume / f"part{i}.bin", args.mib // 8, 100 + i)
        (src.mount / "snap").mkdir()
        snapshot = src.mount / "snap" / "vol"
        b.sh(["btrfs", "subvolume", "snapshot", "-r", str(volume), str(snapshot)])
        b.sh(["btrfs", "filesystem", "sync", str(src.mount)])
        server = b.Sshd(work / "sshd", b.ClientKey(work / "sshd" / "client")).start()
        gcm = "aes128-gcm@openssh.com"
        results = b.rotate(args.reps, {
            "engine": lambda r: b.engine_send(server, snapshot, dst, fs_mb),
            "ssh": lambda r: b.ssh_send(server, snapshot, dst, fs_mb),
            "ssh gcm": lambda r: b.ssh_send(server, snapshot, dst, fs_mb, gcm),
        }, "send")
    finally:
        if server is not None:
            server.stop()
        dst.remove()
        src.remove()
    print(f"remote btrfs full send of {args.mib} MiB over loopback ssh, median of {args.reps}")
    for name, samples in results.items():
        wall = b.median(samples)
        rate = samples[0].extra["bytes"] / wall / 1e6
        print(f"  {name:8} {wall:6.2f} s  [{b.spread(samples)}]  {rate:5.0f} MB/s")
    engine = b.median(results["engine"])
    tuned, plain = b.median(results["ssh gcm"]), b.median(results["ssh"])
    print(f"  engine throughput / ssh -c aes128-gcm pipe: {tuned / engine:.3f} (goal >= 0.95);"
          f" / ssh default cipher: {plain / engine:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
