"""Benchmark: a fleet of N bandwidth-limited SSH hosts, the engine against rsnapshot and xargs.

Run as root from the repository root, with the project's venv::

    .venv/bin/python benchmarks/bench_fleet.py            # N = 1, 5, 20 (about 15 min)
    .venv/bin/python benchmarks/bench_fleet.py --quick    # N = 1, 2, tiny trees: a smoke run

N real OpenSSH servers (the test kit ``tests/sshkit.py``: each its own port on 127.0.0.1,
its own host key, the same client key), one source each: a tree of 64 files of 128 KiB
(8 MiB) of its own. The kernel has no netem (NOTES 15), so a Pi-over-WiFi link is
emulated by rsync's ``--bwlimit=2000`` (KiB/s, about 2 MB/s: 4 s per host), put into each
source's ``rsync_args`` and into the peers' rsync options alike. Each run pulls every host
into a fresh folder of one loop-mounted ext4 (fresh per N and repetition), page cache
dropped first (a first copy: what the bandwidth limits). Contenders:

- ``engine -jJ``: ``pibackup-async run --jobs J --no-report -q``, J in 1, 2, 5, 10, 20
  (<= N); one source per host, so the hosts' default ``max_sessions`` (2) never binds;
- ``shell -PJ``: the rsync commands of the engine's ``run --dry-run`` plan (their ``-e
  ssh …`` finds no master and connects by itself) through ``xargs -P J -L 1``, J >= 2;
- ``rsnapshot``: rsnapshot 1.4's sequential pull, ``backup root@127.0.0.1:/tree/ hNN/
  +ssh_args=-p PORT``, the same key and known_hosts, ``--bwlimit=2000``.

Figures as ``bench_peers.py`` measures them (wall with start-up, CPU of the tree, the
engine's own peak RSS). Medians of ``--reps`` (default 3), except the sequential runs
(``engine -j1`` and rsnapshot) at N > 1: ``--seq-reps`` (default 1), since a transfer
bounded by ``--bwlimit`` hardly varies and each takes N x 4 s. Results go to ``--out``
(default ``benchmarks/results/fleet.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from bench_peers import (  # noqa: E402
    ENGINE,
    Contender,
    Run,
    _mkdirs,
    find,
    fmt,
    machine,
    medians,
    rotate,
    timed_run,
    wall,
)
from benchkit import Ext4Filesystem, build_tree  # noqa: E402
from sshkit import ClientKey, Sshd  # noqa: E402  (the test kit, found through sys.path)

KiB, MiB = 1024, 1024 * 1024
BWLIMIT = "--bwlimit=2000"


@dataclass(frozen=True)
class Fleet:
    ns: tuple[int, ...]
    jobs: tuple[int, ...]
    files: int
    size: int


FULL = Fleet((1, 5, 20), (1, 2, 5, 10, 20), 64, 128 * KiB)
QUICK = Fleet((1, 2), (1, 2), 8, 32 * KiB)


def engine_config(path: Path, dest: Path, state: Path, servers: list[Sshd], trees: list[Path],
                  concurrency: int) -> Path:
    lines = [f"destination = {json.dumps(str(dest))}", f"state_dir = {json.dumps(str(state))}",
             f"concurrency = {concurrency}", ""]
    for i, server in enumerate(servers):
        lines.append(server.host_toml(f"h{i:02d}"))
    for i, tree in enumerate(trees):
        lines += ["[[sources]]", f'name = "h{i:02d}"', 'type = "rsync"',
                  f"path = {json.dumps(str(tree) + '/')}", f'host = "h{i:02d}"',
                  f'rsync_args = ["{BWLIMIT}"]', ""]
    path.write_text("\n".join(lines))
    return path


def rsnapshot_config(path: Path, root: Path, servers: list[Sshd], trees: list[Path],
                     lockfile: Path) -> Path:
    known = path.with_name("known_hosts")
    known.write_text("".join(s.known_hosts.read_text() for s in servers))
    client = servers[0].client.path
    lines = [
        "config_version\t1.2",
        f"snapshot_root\t{root}/",
        "no_create_root\t0",
        f"cmd_rsync\t{shutil.which('rsync')}",
        f"cmd_ssh\t{shutil.which('ssh')}",
        "link_dest\t1",
        "retain\tdaily\t20",
        f"lockfile\t{lockfile}",
        "rsync_short_args\t-aHAX",
        "rsync_long_args\t--delete --numeric-ids --relative --delete-excluded --sparse "
        f"--stats {BWLIMIT}",
        f"ssh_args\t-i {client} -o IdentitiesOnly=yes -o UserKnownHostsFile={known} "
        "-o StrictHostKeyChecking=yes -o BatchMode=yes",
        "verbose\t1",
    ]
    lines += [f"backup\troot@127.0.0.1:{tree}/\th{i:02d}/\t+ssh_args=-p {server.port}"
              for i, (server, tree) in enumerate(zip(servers, trees, strict=True))]
    path.write_text("\n".join(lines) + "\n")
    return path


def contenders(fleet: Fleet, n: int, root: Path, work: Path, servers: list[Sshd],
               trees: list[Path]) -> list[Contender]:
    found: list[Contender] = []
    jobs = [j for j in fleet.jobs if j <= n]
    for j in jobs:
        c = Contender(f"engine -j{j}", "engine", j, root / f"engine-j{j}", work / f"engine-j{j}")
        c.config = engine_config(_mkdirs(c) / "config.toml", c.dest, c.state, servers, trees, j)
        c.argv = [ENGINE, "-c", str(c.config), "run", "--jobs", str(j), "--no-report", "-q"]
        found.append(c)
    for j in jobs:
        if j == 1:
            continue
        c = Contender(f"shell -P{j}", "shell", j, root / f"shell-p{j}", work / f"shell-p{j}")
        c.config = engine_config(_mkdirs(c) / "config.toml", c.dest, c.state, servers, trees, j)
        found.append(c)
    c = Contender("rsnapshot", "rsnapshot", 1, root / "rsnapshot", work / "rsnapshot")
    c.config = rsnapshot_config(_mkdirs(c) / "rsnapshot.conf", c.dest, servers, trees,
                                c.work / "rsnapshot.pid")
    c.argv = ["rsnapshot", "-c", str(c.config), "daily"]
    found.append(c)
    return found


def print_table(rows: list[dict[str, object]], fleet: Fleet, reps: int) -> dict[str, object]:
    mib = fleet.files * fleet.size / MiB
    print()
    print(f"fleet: N hosts x {fleet.files} files of {fleet.size // KiB} KiB ({mib:.0f} MiB) "
          f"each, rsync {BWLIMIT}; first copy, cold cache; median of {reps} "
          f"(sequential runs at N > 1: fewer, see --seq-reps)")
    header = (f"{'N':>3}  {'contender':<13}{'wall s':>8}{'cpu s':>8}{'RSS MiB':>9}"
              f"{'disk MiB':>10}{'window s':>10}  {'ratio':<22}")
    print(header)
    print("-" * len(header))
    goals: dict[str, object] = {}
    for n in fleet.ns:
        mine = [r for r in rows if r["k"] == n]
        mine.sort(key=lambda r: (["engine", "shell", "rsnapshot"].index(str(r["kind"])),
                                 int(r["jobs"])))  # type: ignore[call-overload]
        rsnap = wall(find(mine, kind="rsnapshot"))
        for r in mine:
            parts = []
            if rsnap and r["kind"] != "rsnapshot":
                parts.append(f"x{rsnap / wall(r):.2f} rsnap")  # type: ignore[operator]
            if r["kind"] == "engine":
                shell = wall(find(mine, kind="shell", jobs=r["jobs"]))
                if shell:
                    parts.append(f"{wall(r) / shell:.2f} vs shell")  # type: ignore[operator]
            print(f"{n:>3}  {r['contender']!s:<13}{fmt(r['wall_s']):>8}{fmt(r['cpu_s']):>8}"
                  f"{fmt(r['rss_mib'], 1):>9}{fmt(r['disk_mib'], 1):>10}"
                  f"{fmt(r.get('window_s')):>10}  {', '.join(parts):<22}")
        top = find(mine, kind="engine", jobs=n)
        if rsnap and top:
            goals[f"N={n}"] = {"engine_jN_speedup_over_rsnapshot": rsnap / wall(top),  # type: ignore[operator]
                               "engine_jN_peak_rss_mib": top["rss_mib"]}
    last = goals.get(f"N={max(fleet.ns)}")
    if isinstance(last, dict):
        print(f"\n--jobs {max(fleet.ns)} over rsnapshot at N={max(fleet.ns)}: "
              f"x{last['engine_jN_speedup_over_rsnapshot']:.1f} (goal >= 10); engine peak RSS "
              f"{fmt(last['engine_jN_peak_rss_mib'], 1)} MiB (goal <= 60)")
    return goals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 1, 2, tiny trees: a smoke run")
    parser.add_argument("--reps", type=int, help="repetitions (default 3; 1 with --quick)")
    parser.add_argument("--seq-reps", type=int, default=1,
                        help="repetitions of the sequential runs at N > 1 (default 1)")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "fleet",
                        help="trees, servers, images (default benchmarks/work/fleet)")
    parser.add_argument("--out", type=Path, help="the JSON results (default "
                        "benchmarks/results/fleet.json; fleet-quick.json with --quick)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: it mounts a loop device and drops the page cache")
    for tool in ("rsync", "rsnapshot", "ssh", "mkfs.ext4", "xargs", "/usr/sbin/sshd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    fleet = QUICK if args.quick else FULL
    reps = args.reps or (1 if args.quick else 3)
    out: Path = args.out or (REPO / "benchmarks" / "results" /
                             ("fleet-quick.json" if args.quick else "fleet.json"))
    work: Path = args.work.resolve()
    shutil.rmtree(work / "runs", ignore_errors=True)
    shutil.rmtree(work / "servers", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)

    started = time.time()
    meta = {**machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "reps": reps,
            "seq_reps": args.seq_reps, "quick": args.quick, "command": shlex.join(sys.argv),
            "fleet": {"ns": fleet.ns, "jobs": fleet.jobs, "files": fleet.files,
                      "size": fleet.size, "bwlimit": BWLIMIT}}
    n_max = max(fleet.ns)
    trees = [work / "trees" / f"h{i:02d}-{fleet.files}x{fleet.size}" for i in range(n_max)]
    for i, tree in enumerate(trees):
        build_tree(tree, fleet.files, size=fleet.size, seed=1000 + i)
    client = ClientKey(work / "servers" / "client")
    servers: list[Sshd] = []
    dest_fs = Ext4Filesystem(work / "images" / "dest.img", work / "mnt" / "dest")
    runs: list[Run] = []
    try:
        print(f"starting {n_max} sshd ...", flush=True)
        for i in range(n_max):
            servers.append(Sshd(work / "servers" / f"h{i:02d}", client).start())
        mib = fleet.files * fleet.size / MiB
        for n in fleet.ns:
            for rep in range(reps):
                dest_fs.make(int(n * mib * 2 * (len(fleet.jobs) * 2 + 1)) + 300)
                rep_work = work / "runs" / f"n{n}-r{rep}"
                found = contenders(fleet, n, dest_fs.mount, rep_work, servers[:n], trees[:n])
                for c in rotate(found, rep):
                    if n > 1 and c.jobs == 1 and rep >= args.seq_reps:
                        continue
                    runs.append(timed_run(c, "fleet", "fleet", n, "first", rep, dest_fs.mount))
                dest_fs.remove()
    finally:
        dest_fs.remove()
        for server in servers:
            server.stop()
        shutil.rmtree(work / "runs", ignore_errors=True)
        shutil.rmtree(work / "servers", ignore_errors=True)
    rows = medians(runs)
    goals = print_table(rows, fleet, reps)
    meta["duration_s"] = time.time() - started
    print(f"\ntook {meta['duration_s']:.0f} s; results in {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "medians": rows, "ratios": goals,
                               "runs": [r.__dict__ for r in runs]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
