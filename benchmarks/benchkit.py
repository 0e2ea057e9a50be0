"""What the benchmark scripts share: commands, the page cache, loop-mounted btrfs.

Imported by the scripts beside it (``python benchmarks/x.py`` puts this folder
on ``sys.path``).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path


# A sandbox may set PYTHONDONTWRITEBYTECODE: every engine run would then compile
# its modules again (about 0.1 s), which no installed copy does. The scripts'
# children inherit this environment; the modules are compiled once, here.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
subprocess.run([sys.executable, "-m", "compileall", "-q",
                *(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", d)
                  for d in ("engine", "cli"))],
               check=False, stdout=subprocess.DEVNULL)

def sh(argv: list[str]) -> str:
    """Run a command; its stdout, or exit the benchmark with what it said."""
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} exited {result.returncode}:\n"
                         f"{result.stdout}{result.stderr}")
    return str(result.stdout)


def drop_caches() -> None:
    """Write everything out and empty the page cache (root only): a cold run."""
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def count_tree(root: Path) -> tuple[int, int]:
    """Files below ``root`` and their total size (to check a copy against its source)."""
    files = size = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            files += 1
            size += os.lstat(os.path.join(dirpath, name)).st_size
    return files, size


def mounted(point: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(point) for line in f if len(line.split()) > 4)


@dataclass
class Filesystem:
    """A loop-mounted btrfs; ``remove`` detaches only this image's loop devices."""

    image: Path
    mount: Path

    def make(self, size_mb: int) -> Filesystem:
        self.remove()
        self.image.parent.mkdir(parents=True, exist_ok=True)
        self.mount.mkdir(parents=True, exist_ok=True)
        sh(["truncate", "-s", f"{size_mb}M", str(self.image)])
        sh(["mkfs.btrfs", "-q", "-f", str(self.image)])
        sh(["mount", "-o", "loop", str(self.image), str(self.mount)])
        return self

    def remove(self) -> None:
        deadline = time.monotonic() + 20
        while mounted(self.mount):
            if subprocess.run(["umount", str(self.mount)], capture_output=True).returncode == 0:
                break
            if time.monotonic() > deadline:
                subprocess.run(["umount", "-l", str(self.mount)], capture_output=True)
                break
            time.sleep(0.2)
        # Only the loop devices backing this image (`mount -o loop` sets autoclear,
        # but the kernel releases the device asynchronously).
        while self.image.exists() and time.monotonic() < deadline:
            out = subprocess.run(["losetup", "-j", str(self.image)], capture_output=True,
                                 text=True).stdout
            devices = [line.split(":", 1)[0] for line in out.splitlines() if line.strip()]
            if not devices:
                break
            for device in devices:
                subprocess.run(["losetup", "-d", device], capture_output=True)
            time.sleep(0.1)
        self.image.unlink(missing_ok=True)


def build_tree(root: Path, files: int, *, size: int, seed: int = 0,
               per_folder: int = 200) -> None:
    """``files`` files of ``size`` bytes in folders of ``per_folder``, distinct contents (no
    dedup tricks); built once: a finished tree is marked and reused by later invocations."""
    if (root / ".complete").exists():
        return
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    block = os.urandom(size - 16)
    for i in range(files):
        folder = root / f"d{i // per_folder:04d}"
        if i % per_folder == 0:
            folder.mkdir()
        with open(folder / f"f{i:06d}.dat", "wb") as f:
            f.write(seed.to_bytes(8, "little") + i.to_bytes(8, "little") + block)
    (root / ".complete").write_text("")


# --- shared by the peers and fleet harnesses (bench_peers.py, bench_fleet.py) ------------


class Ext4Filesystem(Filesystem):
    """A loop-mounted ext4 (the usual USB backup disk). Mounted ``noinit_itable``: the
    kernel would otherwise zero the inode tables in the background during the timed runs."""

    def make(self, size_mb: int, bytes_per_inode: int = 16384) -> Ext4Filesystem:
        self.remove()
        self.image.parent.mkdir(parents=True, exist_ok=True)
        self.mount.mkdir(parents=True, exist_ok=True)
        sh(["truncate", "-s", f"{size_mb}M", str(self.image)])
        sh(["mkfs.ext4", "-q", "-F", "-i", str(bytes_per_inode), str(self.image)])
        sh(["mount", "-o", "loop,noinit_itable", str(self.image), str(self.mount)])
        return self


def used_bytes(path: Path) -> int:
    """Bytes in use on the filesystem holding ``path`` (``df``'s used column)."""
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@dataclass
class Measured:
    """One run of a command. ``cpu_s``: user + system of the process and every descendant
    it waited for (``wait4``). ``tree_rss_kib``: the largest process of the tree (GNU
    time's ``%M``; None without /usr/bin/time). ``own_rss_kib``: the command's own VmHWM."""

    wall_s: float
    cpu_s: float
    tree_rss_kib: int | None
    own_rss_kib: int | None
    returncode: int
    stderr: str


GNU_TIME = "/usr/bin/time"


def vm_hwm(pid: int) -> int | None:
    """A process's peak RSS in KiB (``VmHWM``), None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _first_child(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            found = f.read().split()
    except OSError:
        return None
    return int(found[0]) if found else None


def measure(argv: list[str], *, own_rss: bool = False, check: bool = True) -> Measured:
    """Run ``argv`` (stdout discarded); wall time, CPU and peak RSS as ``Measured`` says.

    ``ru_maxrss`` survives ``exec``, so a child forked from this Python would report
    Python's own size: the tree's peak is read by GNU time, which forks the command from
    a small process and reports its children's ``ru_maxrss``. ``own_rss`` polls
    ``/proc/PID/status`` every 10 ms (the engine's own memory, not its rsync children's)."""
    import tempfile
    import threading

    wrapped = os.access(GNU_TIME, os.X_OK)
    with tempfile.NamedTemporaryFile("w+", suffix=".time") as rss_file, \
            tempfile.TemporaryFile("w+") as err:
        full = [GNU_TIME, "-q", "-f", "%M", "-o", rss_file.name, *argv] if wrapped else argv
        started = time.monotonic()
        process = subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=err)
        peak: list[int] = []
        done = threading.Event()

        def poll() -> None:
            target = None if wrapped else process.pid
            while not done.is_set():
                if target is None:
                    target = _first_child(process.pid)
                value = vm_hwm(target) if target is not None else None
                if value is not None:
                    peak.append(value)
                done.wait(0.01)

        watcher = threading.Thread(target=poll, daemon=True) if own_rss else None
        if watcher is not None:
            watcher.start()
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.monotonic() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        if watcher is not None:
            watcher.join()
        err.seek(0)
        stderr = err.read()
        rss_file.seek(0)
        lines = rss_file.read().split()
        tree = int(lines[-1]) if wrapped and lines and lines[-1].isdigit() else None
    result = Measured(wall, usage.ru_utime + usage.ru_stime, tree,
                      max(peak) if peak else None, process.returncode, stderr)
    if check and result.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} exited {result.returncode}:\n{stderr}")
    return result
