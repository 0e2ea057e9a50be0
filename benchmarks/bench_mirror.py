"""Benchmark: ``pibackup-async mirror`` against copying a destination by hand (issue 21).

Run as root from the repository root::

    python benchmarks/bench_mirror.py                 # 30 backups x 20,000 files, all parts
    python benchmarks/bench_mirror.py --quick         # 5 x 2,000 files, 20 MiB: a smoke run
    python benchmarks/bench_mirror.py --only local,btrfs

Everything lives on loop filesystems under ``--work`` that the script makes
and removes (only its own images' loop devices are detached). The origin is
built by the engine itself (real ``run``s, so its manifests are the engine's
own): ``--backups`` runs of one rsync source of ``--files`` files of 2 KiB,
1 % of them rewritten between runs. It is built once and reused by later
invocations (``origin.complete``); ``--rebuild`` starts over. The page cache
is dropped before every timed run (``sync; echo 3 > /proc/sys/vm/drop_caches``)
and every timed copy goes into a fresh ext4 mirror (the nightly cases first get
the older backups by ``cp -a``, untimed).

Parts (``--only``):

- ``local``: an ext4 origin, an ext4 mirror, no network. Rows: the newest
  backup by hand, ``rsync -aHAX --numeric-ids --link-dest=<previous>`` (the
  nightly yardstick), and by ``mirror`` (goal: within 1.1x; the manifest check
  is timed apart as ``sha256sum --check`` of the copy, what it costs); every
  backup by hand, oldest first, one ``--link-dest`` copy each (the first-mirror
  yardstick), and by ``mirror`` (goal: within 1.1x); ``rsync -aH`` of the whole
  tree in one go (no goal: the way issue 21 says not to copy, shown for how far
  it is). Peak RSS: the ``mirror`` process's own (goal <= 60 MB), and the
  largest process of its tree (rsync's).
- ``ssh``: the same origin read through the test sshd (tests/sshkit.py) on
  127.0.0.1, reached through a relay in this script that passes at most
  ``--link-mib`` MiB/s towards the mirror (a 2 MiB/s uplink; the kernel here
  has no netem) and counts the bytes on the wire both ways. The engine's key is
  restricted to ``pibackup-async serve --read-only <origin>`` in
  ``authorized_keys``; the hand rsync uses an unrestricted key. Rows: the
  nightly copy by hand and by ``mirror`` (goal: wire bytes within 5 % of the
  changed data plus rsync's file list, i.e. of the hand copy's); a 200 MiB
  backup copied whole, and cut by SIGTERM half way then resumed (goal: at most
  5 % of it sent twice).
- ``btrfs``: a btrfs source backed up by ``run`` into a btrfs origin (each
  backup's source folder a received subvolume), mirrored onto a btrfs mirror.
  Rows: the first backup (full send) and the newest (incremental on its
  previous one) by hand, ``btrfs send [-p] | btrfs receive`` and ``ssh … btrfs
  send [-p] | btrfs receive``, and by ``mirror`` (local origin and through
  ``serve``; goal: at least 0.95x the hand pipe's speed).

Rows whose engine part is missing (no ``mirror`` command yet, no ``serve``)
are printed as skipped with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from benchkit import (  # noqa: E402
    Ext4Filesystem,
    Filesystem,
    count_tree,
    drop_caches,
    measure,
    sh,
)
from sshkit import ClientKey, Sshd, known_hosts_line  # noqa: E402  (the test kit)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

CLI = [sys.executable, "-m", "pibackup_async.cli"]
SERVE = str(REPO / ".venv" / "bin" / "pibackup-async")
KiB, MiB = 1024, 1024 * 1024
FILE_SIZE = 2 * KiB
PER_DIR = 200
RSYNC = ["rsync", "-aHAX", "--numeric-ids"]


# --- rows -------------------------------------------------------------------------------


@dataclass
class Row:
    part: str
    name: str
    wall_s: float | None = None
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)
    skipped: str = ""


ROWS: list[Row] = []


def row(part: str, name: str, wall: float | None = None, note: str = "",
        **extra: float) -> Row:
    r = Row(part, name, wall, note, dict(extra))
    ROWS.append(r)
    shown = f"{wall:.2f} s" if wall is not None else ""
    more = " ".join(f"{k}={v:,.1f}" for k, v in extra.items())
    print(f"  [{part}] {name}: {shown} {more} {note}", file=sys.stderr, flush=True)
    return r


def skip(part: str, name: str, reason: str) -> None:
    ROWS.append(Row(part, name, skipped=reason))
    print(f"  [{part}] {name}: skipped ({reason})", file=sys.stderr, flush=True)


def timed(argv: list[str], *, env: dict[str, str] | None = None) -> tuple[float, str]:
    drop_caches()
    t0 = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if result.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} exited {result.returncode}:\n"
                         f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return wall, result.stdout


def timed_shell(script: str) -> float:
    return timed(["bash", "-c", "set -o pipefail; " + script])[0]


# --- the engine: is mirror there? ------------------------------------------------------------


def engine_has(command: str) -> str | None:
    """None when the CLI has ``command``, else why not."""
    result = subprocess.run([*CLI, command, "--help"], capture_output=True, text=True)
    if result.returncode != 0:
        return f"no `{command}` command in the engine yet"
    return None


def serve_missing() -> str | None:
    if not os.access(SERVE, os.X_OK):
        return f"{SERVE} is missing"
    result = subprocess.run([SERVE, "serve", "--help"], capture_output=True, text=True)
    return None if result.returncode == 0 else "no `serve` command in the engine yet"


def mirror_config(path: Path, mirror: Path, state: Path, origin: str, *,
                  host_toml: str = "", host: str | None = None,
                  bwlimit: str | None = None) -> Path:
    """A mirror's configuration (SPEC §10): ``destination``, ``state_dir``, ``[origin]``."""
    lines = [f"destination = {json.dumps(str(mirror))}", f"state_dir = {json.dumps(str(state))}",
             "", "[origin]", f"path = {json.dumps(origin)}"]
    if host is not None:
        lines.append(f"host = {json.dumps(host)}")
    if bwlimit is not None:
        lines.append(f"bwlimit = {json.dumps(bwlimit)}")
    path.write_text("\n".join(lines) + "\n\n" + host_toml)
    return path


def mirror_argv(config: Path) -> list[str]:
    return [*CLI, "-c", str(config), "-q", "mirror", "--no-report", "--no-progress"]


def last_report(state: Path) -> dict[str, object]:
    reports = sorted((state / "reports").glob("mirror-*.json"))
    if not reports:
        return {}
    data: dict[str, object] = json.loads(reports[-1].read_text())
    return data


def copied(report: dict[str, object]) -> list[dict[str, object]]:
    entries = report.get("copied", [])
    return entries if isinstance(entries, list) else []


# --- the origin ---------------------------------------------------------------------------


def backups(dest: Path) -> list[str]:
    from pibackup_async.engine.names import parse_name

    found = [(t, e.name) for e in os.scandir(dest) if (t := parse_name(e.name)) is not None]
    return [n for _, n in sorted(found)]


def write_files(root: Path, files: int) -> None:
    block = os.urandom(FILE_SIZE - 16)
    for i in range(files):
        folder = root / f"d{i // PER_DIR:04d}"
        if i % PER_DIR == 0:
            folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"f{i:06d}.dat", "wb") as f:
            f.write(i.to_bytes(8, "little") + (0).to_bytes(8, "little") + block)


def rewrite_one_percent(root: Path, files: int, round_: int) -> int:
    """Rewrite 1 % of the files (spread over every folder), same size, new content and
    mtime; returns the bytes rewritten."""
    rng = random.Random(round_)
    step = 100
    changed = 0
    block = os.urandom(FILE_SIZE - 16)
    for i in range(round_ % step, files, step):
        path = root / f"d{i // PER_DIR:04d}" / f"f{i:06d}.dat"
        with open(path, "r+b") as f:
            f.write(i.to_bytes(8, "little") + rng.getrandbits(64).to_bytes(8, "little") + block)
        changed += FILE_SIZE
    return changed


def run_engine(config: Path, label: str) -> None:
    result = subprocess.run([*CLI, "-c", str(config), "-q", "run", "--no-report",
                             "--no-progress"], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{label}: run exited {result.returncode}:\n{result.stderr[-3000:]}")


def wait_next_second(dest: Path) -> None:
    """Backup names are the start time to the second: never two runs in one."""
    names = backups(dest)
    if names:
        from pibackup_async.engine.names import parse_name

        newest = parse_name(names[-1])
        assert newest is not None
        while time.time() < newest.timestamp() + 1.05:
            time.sleep(0.05)


def build_origin(work: Path, origin: Path, files: int, count: int) -> None:
    """``count`` backups of one rsync source ``data`` by real runs of the engine."""
    marker = work / "origin.complete"
    want = f"{files} {count}\n"
    if marker.exists() and marker.read_text() == want and len(backups(origin)) == count:
        return
    marker.unlink(missing_ok=True)
    source = work / "source"
    sh(["rm", "-rf", str(source), str(work / "origin-state")])
    for name in os.listdir(origin):
        sh(["rm", "-rf", str(origin / name)])
    write_files(source, files)
    config = work / "origin.toml"
    config.write_text(f'destination = "{origin}"\nstate_dir = "{work / "origin-state"}"\n\n'
                      f'[[sources]]\nname = "data"\ntype = "rsync"\npath = "{source}/"\n')
    for n in range(count):
        print(f"  origin backup {n + 1}/{count}", file=sys.stderr, flush=True)
        if n:
            rewrite_one_percent(source, files, n)
        wait_next_second(origin)
        run_engine(config, f"origin backup {n + 1}")
    marker.write_text(want)


def add_big_backup(work: Path, origin: Path, mib: int) -> str:
    """A backup of its own holding ``mib`` MiB in 1 MiB files (the resumed-copy case),
    as the newest backup of a second origin folder."""
    source = work / "big-source"
    marker = work / "big.complete"
    if marker.exists() and marker.read_text() == f"{mib}\n" and backups(origin):
        return backups(origin)[-1]
    sh(["rm", "-rf", str(source), str(work / "big-state")])
    for name in os.listdir(origin):
        sh(["rm", "-rf", str(origin / name)])
    source.mkdir(parents=True)
    block = bytearray(os.urandom(MiB))
    for i in range(mib):
        block[:8] = i.to_bytes(8, "little")
        (source / f"part{i:04d}.bin").write_bytes(block)
    config = work / "big.toml"
    config.write_text(f'destination = "{origin}"\nstate_dir = "{work / "big-state"}"\n\n'
                      f'[[sources]]\nname = "data"\ntype = "rsync"\npath = "{source}/"\n')
    run_engine(config, "big backup")
    marker.write_text(f"{mib}\n")
    return backups(origin)[-1]


def fresh_mirror(fs: Ext4Filesystem, size_mb: int, origin: Path,
                 holding: list[str]) -> Path:
    """A fresh ext4 mirror holding copies of ``holding`` (one ``cp -a``: hard links kept
    between backups, as a mirror's are)."""
    fs.make(size_mb)
    mirror = fs.mount / "mirror"
    mirror.mkdir()
    if holding:
        sh(["cp", "-a", *(str(origin / n) for n in holding), str(mirror)])
    return mirror


def check_copy(origin: Path, mirror: Path, names: list[str]) -> None:
    for name in names:
        want, got = count_tree(origin / name), count_tree(mirror / name)
        if want != got:
            raise SystemExit(f"{mirror / name} holds {got} (files, bytes), expected {want}")


def sha256_check_s(backup: Path) -> float:
    """``sha256sum --check`` of every manifest of a copied backup, cold: what checking the
    copy against its manifests costs at most (the engine may read less)."""
    sources = (backup / ".pibackup" / "SOURCES").read_text().split()
    script = " && ".join(f"sha256sum --quiet --check .pibackup/{shlex.quote(s)}.sha256"
                         for s in sources)
    drop_caches()
    t0 = time.perf_counter()
    sh(["bash", "-c", f"cd {shlex.quote(str(backup))} && {script}"])
    return time.perf_counter() - t0


# --- part 1: local --------------------------------------------------------------------------


def part_local(args: argparse.Namespace, work: Path, origin: Path) -> None:
    names = backups(origin)
    newest, previous = names[-1], names[-2]
    fs = Ext4Filesystem(work / "images" / "mirror.img", work / "mnt" / "mirror")
    size_mb = max(1024, args.files * args.backups // 100)
    missing = engine_has("mirror")
    try:
        # Nightly by hand: the newest backup, --link-dest to the mirror's previous copy.
        mirror = fresh_mirror(fs, size_mb, origin, names[:-1])
        argv = [*RSYNC, f"--link-dest={mirror / previous}/", f"{origin / newest}/",
                f"{mirror / newest}/"]
        m = measure_cold(argv)
        check_copy(origin, mirror, [newest])
        row("local", "nightly by hand: rsync --link-dest of the newest backup", m.wall_s,
            tree_rss_mib=kib_mib(m.tree_rss_kib))
        manifest_s = sha256_check_s(mirror / newest)
        row("local", "  sha256sum --check of that copy (cold)", manifest_s)

        if missing:
            skip("local", "nightly by mirror", missing)
        else:
            mirror = fresh_mirror(fs, size_mb, origin, names[:-1])
            state = work / "state-local"
            sh(["rm", "-rf", str(state)])
            config = mirror_config(work / "local.toml", mirror, state, str(origin))
            m = measure_cold(mirror_argv(config), own_rss=True)
            check_copy(origin, mirror, [newest])
            row("local", "nightly by mirror", m.wall_s, own_rss_mib=kib_mib(m.own_rss_kib),
                tree_rss_mib=kib_mib(m.tree_rss_kib))

        # First mirror by hand: every backup, oldest first, --link-dest to the one before.
        mirror = fresh_mirror(fs, size_mb, origin, [])
        lines = []
        for i, name in enumerate(names):
            link = [f"--link-dest={mirror / names[i - 1]}/"] if i else []
            lines.append(shlex.join([*RSYNC, *link, f"{origin / name}/", f"{mirror / name}/"]))
        m = measure_cold(["bash", "-c", "set -e\n" + "\n".join(lines)])
        check_copy(origin, mirror, names)
        row("local", f"first mirror by hand: {len(names)} rsync --link-dest, oldest first",
            m.wall_s, tree_rss_mib=kib_mib(m.tree_rss_kib))

        if missing:
            skip("local", "first mirror by mirror", missing)
        else:
            mirror = fresh_mirror(fs, size_mb, origin, [])
            state = work / "state-local-first"
            sh(["rm", "-rf", str(state)])
            config = mirror_config(work / "local-first.toml", mirror, state, str(origin))
            m = measure_cold(mirror_argv(config), own_rss=True)
            check_copy(origin, mirror, names)
            row("local", "first mirror by mirror", m.wall_s,
                own_rss_mib=kib_mib(m.own_rss_kib), tree_rss_mib=kib_mib(m.tree_rss_kib))

        mirror = fresh_mirror(fs, size_mb, origin, [])
        m = measure_cold(["rsync", "-aH", f"{origin}/", f"{mirror}/"])
        check_copy(origin, mirror, names)
        row("local", "rsync -aH of the whole tree", m.wall_s,
            tree_rss_mib=kib_mib(m.tree_rss_kib))
    finally:
        fs.remove()


def kib_mib(kib: int | None) -> float:
    return -1.0 if kib is None else kib / 1024


def measure_cold(argv: list[str], *, own_rss: bool = False):  # type: ignore[no-untyped-def]
    drop_caches()
    return measure(argv, own_rss=own_rss)


# --- part 2: over SSH, through a throttled relay --------------------------------------------


class Relay:
    """A TCP relay on 127.0.0.1 to a port there: at most ``rate`` bytes/s towards the
    client (the mirror), counting the bytes each way (the wire's: SSH's included)."""

    def __init__(self, target_port: int, rate: float) -> None:
        self.target_port = target_port
        self.rate = rate
        self.down = 0  # origin -> mirror
        self.up = 0
        self.lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = int(self.listener.getsockname()[1])
        # One bucket for every connection: the uplink is shared.
        self.budget_at = time.monotonic()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> tuple[int, int]:
        with self.lock:
            seen = (self.down, self.up)
            self.down = self.up = 0
            return seen

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(client, server, False),
                             daemon=True).start()

    def _throttle(self, size: int) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(self.budget_at, now)
            self.budget_at = start + size / self.rate
            wait = self.budget_at - now
        if wait > 0:
            time.sleep(wait)

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        try:
            while True:
                chunk = src.recv(16 * KiB)
                if not chunk:
                    break
                if down:
                    self._throttle(len(chunk))
                with self.lock:
                    if down:
                        self.down += len(chunk)
                    else:
                        self.up += len(chunk)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                src.close()

    def close(self) -> None:
        self.closed = True
        self.listener.close()


@contextlib.contextmanager
def ssh_origin(work: Path, origin_root: Path, rate: float | None) -> Iterator[
        tuple[Sshd, Relay | None, Path, Path]]:
    """The test sshd (started after the origin is mounted: it runs in a private mount
    namespace), a second key restricted to ``serve --read-only origin_root``, a relay."""
    folder = work / "sshd"
    shutil.rmtree(folder, ignore_errors=True)
    client = ClientKey(folder / "client")
    restricted = ClientKey(folder / "restricted")
    server = Sshd(folder, client)
    forced = shlex.join([SERVE, "serve", "--read-only", str(origin_root)])
    server.authorized_keys.write_text(
        client.public + "\n"
        + f'command="{forced}",restrict {restricted.public}\n')
    server.start()
    relay = Relay(server.port, rate) if rate else None
    known = folder / "relay_known_hosts"
    known.write_text(known_hosts_line(relay.port if relay else server.port, server.host_public))
    try:
        yield server, relay, restricted.path, known
    finally:
        if relay is not None:
            relay.close()
        server.stop()


def ssh_cmd(port: int, key: Path, known: Path) -> list[str]:
    return ["ssh", "-p", str(port), "-i", str(key), "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes"]


def host_toml(port: int, key: Path, known: Path) -> str:
    return ("[hosts.origin]\naddress = \"127.0.0.1\"\n"
            f"port = {port}\nuser = \"root\"\nidentity_file = {json.dumps(str(key))}\n"
            f"known_hosts = {json.dumps(str(known))}\n")


def part_ssh(args: argparse.Namespace, work: Path, origin: Path, big_origin: Path) -> None:
    names = backups(origin)
    newest, previous = names[-1], names[-2]
    rate = args.link_mib * MiB
    fs = Ext4Filesystem(work / "images" / "mirror.img", work / "mnt" / "mirror")
    size_mb = max(1024, args.files * args.backups // 100)
    missing = engine_has("mirror") or serve_missing()
    with ssh_origin(work, origin.parent, rate) as (server, relay, restricted, known):
        assert relay is not None
        try:
            mirror = fresh_mirror(fs, size_mb, origin, names[:-1])
            shell = shlex.join(ssh_cmd(relay.port, server.client.path, known))
            argv = [*RSYNC, "--stats", "-e", shell, f"--link-dest={mirror / previous}/",
                    f"root@127.0.0.1:{origin / newest}/", f"{mirror / newest}/"]
            relay.reset()
            wall, out = timed(argv)
            down, up = relay.reset()
            check_copy(origin, mirror, [newest])
            stats = rsync_stats(out)
            changed = args.files // 100 * FILE_SIZE
            row("ssh", "nightly by hand: rsync --link-dest over ssh", wall,
                wire_down_kib=down / KiB, wire_up_kib=up / KiB,
                changed_kib=changed / KiB, file_list_kib=stats.get("File list size", 0) / KiB,
                rsync_received_kib=stats.get("Total bytes received", 0) / KiB)
            if missing:
                skip("ssh", "nightly by mirror over ssh", missing)
            else:
                mirror = fresh_mirror(fs, size_mb, origin, names[:-1])
                state = work / "state-ssh"
                sh(["rm", "-rf", str(state)])
                config = mirror_config(work / "ssh.toml", mirror, state, str(origin),
                                       host="origin",
                                       host_toml=host_toml(relay.port, restricted, known))
                relay.reset()
                m = measure_cold(mirror_argv(config), own_rss=True)
                down_e, up_e = relay.reset()
                check_copy(origin, mirror, [newest])
                row("ssh", "nightly by mirror over ssh", m.wall_s,
                    wire_down_kib=down_e / KiB, wire_up_kib=up_e / KiB,
                    vs_hand=(down_e + up_e) / max(1, down + up),
                    own_rss_mib=kib_mib(m.own_rss_kib))
        finally:
            fs.remove()

    # The resumed first copy: a second origin with one big backup.
    with ssh_origin(work, big_origin.parent, rate) as (server, relay, restricted, known):
        assert relay is not None
        if missing:
            skip("ssh", f"{args.big_mib} MiB first copy, cut and resumed", missing)
            return
        big = backups(big_origin)[-1]
        whole = 0  # the uninterrupted copy's wire bytes, measured first
        try:
            for cut in (False, True):
                mirror = fresh_mirror(fs, args.big_mib * 3 + 512, big_origin, [])
                state = work / f"state-big-{cut}"
                sh(["rm", "-rf", str(state)])
                config = mirror_config(work / "big.toml", mirror, state, str(big_origin),
                                       host="origin",
                                       host_toml=host_toml(relay.port, restricted, known))
                relay.reset()
                t0 = time.perf_counter()
                if cut:
                    process = subprocess.Popen(mirror_argv(config), stdout=subprocess.DEVNULL,
                                               stderr=subprocess.PIPE)
                    half = args.big_mib * MiB // 2
                    while relay.down < half and process.poll() is None:
                        time.sleep(0.05)
                    process.send_signal(signal.SIGTERM)
                    process.wait(60)
                    first, _ = relay.reset()
                    subprocess.run(mirror_argv(config), check=True, capture_output=True)
                    second, _ = relay.reset()
                    total = first + second
                    check_copy(big_origin, mirror, [big])
                    row("ssh", f"{args.big_mib} MiB first copy, SIGTERM half way, resumed",
                        time.perf_counter() - t0, wire_first_mib=first / MiB,
                        wire_second_mib=second / MiB, wire_total_mib=total / MiB,
                        exit_on_cut=float(process.returncode or 0),
                        sent_twice_pct=100 * (total - whole) / (args.big_mib * MiB))
                else:
                    subprocess.run(mirror_argv(config), check=True, capture_output=True)
                    whole, _ = relay.reset()
                    check_copy(big_origin, mirror, [big])
                    row("ssh", f"{args.big_mib} MiB first copy, uninterrupted",
                        time.perf_counter() - t0, wire_mib=whole / MiB)
        finally:
            fs.remove()


def rsync_stats(out: str) -> dict[str, float]:
    found = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            number = value.strip().split(" ")[0].replace(",", "")
            with contextlib.suppress(ValueError):
                found[key.strip()] = float(number)
    return found


# --- part 3: btrfs --------------------------------------------------------------------------


def write_big(path: Path, mib: int, seed: int) -> None:
    block = bytearray(os.urandom(MiB))
    with open(path, "wb") as f:
        for j in range(mib):
            block[:16] = seed.to_bytes(8, "little") + j.to_bytes(8, "little")
            f.write(block)


def rewrite_big(path: Path, seed: int) -> None:
    """Rewrite 1 % of a big file's MiB blocks in place."""
    blocks = path.stat().st_size // MiB
    with open(path, "r+b") as f:
        for j in range(seed % 100, blocks, 100):
            f.seek(j * MiB)
            f.write(os.urandom(MiB))


def part_btrfs(args: argparse.Namespace, work: Path) -> None:
    missing = engine_has("mirror")
    size_mb = args.btrfs_mib * 4 + 1024
    src = Filesystem(work / "images" / "bsource.img", work / "mnt" / "bsource")
    orig = Filesystem(work / "images" / "borigin.img", work / "mnt" / "borigin")
    tgt = Filesystem(work / "images" / "btarget.img", work / "mnt" / "btarget")
    try:
        src.make(size_mb)
        orig.make(size_mb)
        volume = src.mount / "vol"
        sh(["btrfs", "subvolume", "create", str(volume)])
        write_files(volume / "small", args.files)
        for i in range(4):
            write_big(volume / f"big{i}.bin", args.btrfs_mib // 4, i)
        origin = orig.mount / "origin"
        origin.mkdir()
        config = work / "borigin.toml"
        config.write_text(f'destination = "{origin}"\nstate_dir = "{work / "borigin-state"}"\n\n'
                          f'[[sources]]\nname = "data"\ntype = "btrfs"\npath = "{volume}"\n')
        sh(["rm", "-rf", str(work / "borigin-state")])
        for n in range(args.btrfs_backups):
            if n:
                rewrite_one_percent(volume / "small", args.files, n)
                for i in range(4):
                    rewrite_big(volume / f"big{i}.bin", n)
            sh(["btrfs", "filesystem", "sync", str(src.mount)])
            wait_next_second(origin)
            run_engine(config, f"btrfs origin backup {n + 1}")
        names = backups(origin)
        first, previous, newest = names[0], names[-2], names[-1]
        sh(["btrfs", "filesystem", "sync", str(orig.mount)])

        def hand(name: str, parent: str | None, ssh: list[str] | None) -> float:
            send = ["btrfs", "send", *(["-p", str(origin / parent / "data")] if parent else []),
                    str(origin / name / "data")]
            sender = shlex.join([*ssh, "root@127.0.0.1", shlex.join(send)]) if ssh \
                else shlex.join(send)
            (tgt.mount / "hand" / name).mkdir(parents=True)
            return timed_shell(f"{sender} 2>/dev/null | btrfs receive -q "
                               f"{shlex.quote(str(tgt.mount / 'hand' / name))}")

        def stream_mib(name: str, parent: str | None) -> float:
            send = ["btrfs", "send", "-q", *(["-p", str(origin / parent / "data")]
                                             if parent else []), str(origin / name / "data")]
            out = subprocess.run(["bash", "-c", shlex.join(send) + " | wc -c"],
                                 capture_output=True, text=True, check=True).stdout
            return int(out) / MiB

        full_mib, incr_mib = stream_mib(first, None), stream_mib(newest, previous)
        with ssh_origin(work, origin, None) as (server, _, restricted, known):
            plain = ssh_cmd(server.port, server.client.path, known)
            for label, ssh in (("", None), ("ssh ", plain)):
                tgt.make(size_mb)
                wall = hand(first, None, ssh)
                row("btrfs", f"full send by hand: {label}btrfs send | btrfs receive", wall,
                    stream_mib=full_mib, mib_s=full_mib / wall)
                hand(previous, None, ssh)
                wall = hand(newest, previous, ssh)
                row("btrfs", f"incremental by hand: {label}btrfs send -p | btrfs receive",
                    wall, stream_mib=incr_mib, mib_s=incr_mib / wall)
                tgt.remove()
            # The engine's stream alone, in process (mirror_btrfs.copy_subvolume: the
            # splice relay; over SSH the origin's master and serve), connection included.
            for label, over_ssh in (("", False), ("over ssh (serve) ", True)):
                if over_ssh and serve_missing():
                    skip("btrfs", f"engine stream {label}", serve_missing() or "")
                    continue
                tgt.make(size_mb)
                make = functools.partial(stream_origin, origin, server.port if over_ssh
                                         else None, restricted, known)
                wall = engine_stream(make, first, None, tgt.mount / "engine" / first)
                row("btrfs", f"full send by the engine's stream {label}(copy_subvolume)",
                    wall, stream_mib=full_mib, mib_s=full_mib / wall)
                engine_stream(make, previous, None, tgt.mount / "engine" / previous)
                wall = engine_stream(make, newest, previous, tgt.mount / "engine" / newest)
                row("btrfs", f"incremental by the engine's stream {label}(copy_subvolume)",
                    wall, stream_mib=incr_mib, mib_s=incr_mib / wall)
                tgt.remove()
            for label, over_ssh in (("", False), ("over ssh (serve) ", True)):
                if missing or (over_ssh and serve_missing()):
                    skip("btrfs", f"mirror {label}", missing or serve_missing() or "")
                    continue
                tgt.make(size_mb)
                mirror = tgt.mount / "mirror"
                mirror.mkdir()
                state = work / f"bstate-{over_ssh}"
                sh(["rm", "-rf", str(state)])
                cfg = mirror_config(work / "bmirror.toml", mirror, state, str(origin),
                                    host="origin" if over_ssh else None,
                                    host_toml=host_toml(server.port, restricted, known)
                                    if over_ssh else "")
                engine_rows(mirror, state, cfg, label, names, full_mib, incr_mib)
                tgt.remove()
    finally:
        tgt.remove()
        orig.remove()
        src.remove()


def stream_origin(origin: Path, port: int | None, key: Path, known: Path) -> object:
    """The origin as ``mirror`` reads it: a local folder, or through ``serve`` over SSH."""
    from pibackup_async.engine.config import Host
    from pibackup_async.engine.mirror_origin import LocalOrigin
    from pibackup_async.engine.mirror_ssh import SshOrigin

    if port is None:
        return LocalOrigin(str(origin))
    host = Host(address="127.0.0.1", port=port, user="root", identity_file=str(key),
                known_hosts=str(known))
    return SshOrigin("origin", host, str(origin))


def engine_stream(make: Callable[[], object], name: str, parent: str | None,
                  into: Path) -> float:
    """Cold: open the origin, receive ``<name>/data`` into ``into``, close; the wall time."""
    import anyio
    from pibackup_async.engine.mirror_btrfs import copy_subvolume

    into.mkdir(parents=True)
    origin = make()

    async def go() -> float:
        t0 = time.perf_counter()
        await origin.open()  # type: ignore[attr-defined]
        try:
            await copy_subvolume(origin, name, "data", str(into),  # type: ignore[arg-type]
                                 parent=parent)
        finally:
            await origin.close()  # type: ignore[attr-defined]
        return time.perf_counter() - t0

    drop_caches()
    wall: float = anyio.run(go, backend="asyncio")
    return wall


def engine_rows(mirror: Path, state: Path, config: Path, label: str, names: list[str],
                full_mib: float, incr_mib: float) -> None:
    """The first mirror (a full send, then incrementals), then the newest again alone:
    the copied entries' durations give the per-subvolume figures."""
    m = measure_cold(mirror_argv(config), own_rss=True)
    report = copied(last_report(state))
    if report:
        first = report[0]
        d = float(str(first.get("duration_s", 0)))
        row("btrfs", f"mirror {label}first backup (full send)", d,
            note=f"(whole command {m.wall_s:.2f} s for {len(report)} backups)",
            stream_mib=float(str(first.get("received_bytes", 0))) / MiB,
            mib_s=full_mib / d if d else 0)
    # The newest again, alone: remove it from the mirror and mirror once more.
    newest = mirror / names[-1]
    for sub in sorted(newest.iterdir()):
        if sub.is_dir() and os.lstat(sub).st_ino == 256:
            sh(["btrfs", "subvolume", "delete", str(sub)])
    sh(["rm", "-rf", str(newest)])
    m = measure_cold(mirror_argv(config), own_rss=True)
    report = copied(last_report(state))
    if report:
        d = float(str(report[-1].get("duration_s", 0)))
        row("btrfs", f"mirror {label}newest backup (incremental)", d,
            note=f"(whole command {m.wall_s:.2f} s)",
            stream_mib=float(str(report[-1].get("received_bytes", 0))) / MiB,
            mib_s=incr_mib / d if d else 0, own_rss_mib=kib_mib(m.own_rss_kib))


# --- main -----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "mirror")
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--backups", type=int, default=30)
    parser.add_argument("--big-mib", type=int, default=200, help="the resumed copy's size")
    parser.add_argument("--link-mib", type=float, default=2.0, help="the uplink, MiB/s")
    parser.add_argument("--btrfs-mib", type=int, default=512, help="big files in the btrfs "
                        "source (beside --files small ones)")
    parser.add_argument("--btrfs-backups", type=int, default=4)
    parser.add_argument("--only", default="local,ssh,btrfs")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rebuild", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.files, args.backups, args.big_mib, args.btrfs_mib = 2000, 5, 20, 64
        args.work = args.work.with_name(args.work.name + "-quick")
    if os.geteuid() != 0:
        raise SystemExit("run as root (caches dropped, loop filesystems, sshd)")
    parts = set(args.only.split(","))
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.rebuild:
        for marker in ("origin.complete", "big.complete"):
            (work / marker).unlink(missing_ok=True)
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", file=sys.stderr)
    # The origins: one ext4 image (kept between invocations, with its marker).
    ofs = Ext4Filesystem(work / "images" / "origin.img", work / "mnt" / "origin")
    cleanups: list[Callable[[], None]] = []
    try:
        if parts & {"local", "ssh"}:
            mount_origin(ofs, max(2048, args.files * args.backups // 50 + args.big_mib * 2))
            cleanups.append(ofs_unmount(ofs))
            origin = ofs.mount / "origin"
            big_origin = ofs.mount / "big" / "origin"
            origin.mkdir(exist_ok=True)
            big_origin.mkdir(parents=True, exist_ok=True)
            build_origin(work, origin, args.files, args.backups)
            if "ssh" in parts:
                add_big_backup(work, big_origin, args.big_mib)
            if "local" in parts:
                part_local(args, work, origin)
            if "ssh" in parts:
                part_ssh(args, work, origin, big_origin)
        if "btrfs" in parts:
            part_btrfs(args, work)
    finally:
        for cleanup in reversed(cleanups):
            cleanup()
    print_table(args, load)
    return 0


def mount_origin(fs: Ext4Filesystem, size_mb: int) -> None:
    """Mount the kept origin image, or make it (a marker says whether its backups are whole)."""
    if fs.image.exists():
        fs.mount.mkdir(parents=True, exist_ok=True)
        if subprocess.run(["mount", "-o", "loop", str(fs.image), str(fs.mount)],
                          capture_output=True).returncode == 0:
            return
    for marker in ("origin.complete", "big.complete"):
        (fs.image.parent.parent / marker).unlink(missing_ok=True)
    fs.make(size_mb, bytes_per_inode=4096)


def ofs_unmount(fs: Ext4Filesystem) -> Callable[[], None]:
    def unmount() -> None:
        subprocess.run(["umount", str(fs.mount)], capture_output=True)
    return unmount


def print_table(args: argparse.Namespace, load: tuple[float, float, float]) -> None:
    rsync_version = " ".join(subprocess.run(["rsync", "--version"], capture_output=True,
                                            text=True).stdout.split()[:3])
    end = os.getloadavg()
    print(f"\n{platform.node()}: {os.cpu_count()} CPUs, {rsync_version}; "
          f"{args.backups} backups x {args.files} files; one repetition; load average "
          f"{load[0]:.2f} at the start, {end[0]:.2f} at the end")
    for r in ROWS:
        if r.skipped:
            print(f"[{r.part}] {r.name}: skipped ({r.skipped})")
            continue
        wall = f"{r.wall_s:8.2f} s" if r.wall_s is not None else " " * 10
        more = ", ".join(f"{k} {v:,.2f}" for k, v in r.extra.items())
        print(f"[{r.part}] {r.name}: {wall}  {more} {r.note}")


if __name__ == "__main__":
    sys.exit(main())
