"""Shared fixtures: a private workspace per test and the real CLI run as a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from btrfskit import Btrfs
    from sshkit import ClientKey, Sshd

CLI = [sys.executable, "-m", "pibackup_async.cli"]

# The engine keeps a signal its parent ignores (`nohup pibackup-async run` stays
# nohup), and an ignored signal is inherited across exec: a suite started under
# nohup would hand that to every run it starts, and the SIGHUP tests would see
# a run that hears nothing. The runs the tests start get the default.
if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
needs_rsync = pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync is not installed")


def _private_temproot() -> str:
    """Where pytest makes every tmp_path: a folder of the tester's own, not /tmp.

    The engine refuses (``check``) or warns about (``run``) a ``state_dir`` on a
    path that other users can write (SPEC §5), and /tmp is world-writable: under
    it, every test's ``state_dir`` would be one.
    """
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = os.path.join(cache, "pibackup-async-tests")
    os.makedirs(root, mode=0o700, exist_ok=True)
    return root


# pytest's own root for tmp_path (documented); it keeps its numbered, per-user
# folders below it, safe for sessions running side by side, which --basetemp is not.
os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", _private_temproot())


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """Live (non-zombie) processes whose command line contains ``text``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state != "Z" and text in cmdline:
            found.append((int(entry), cmdline))
    return found


def kill_mentioning(text: str) -> None:
    """SIGKILL every live process whose command line contains ``text``."""
    for pid, _ in processes_mentioning(text):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(predicate: Any, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class Workspace:
    """A test's own folders: sources, destination, state, and a hook event log."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dest = root / "dest"
        self.state = root / "state"
        self.src = root / "src"
        self.events = root / "events.log"
        self.markers = root / "markers"
        for d in (self.dest, self.src, self.markers):
            d.mkdir()
        self.config_path = root / "config.toml"

    def make_source(self, name: str, files: dict[str, str] | None = None) -> Path:
        path = self.src / name
        path.mkdir(parents=True, exist_ok=True)
        for rel, content in (files or {"file.txt": f"content of {name}\n"}).items():
            target = path / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
        return path

    def write_config(self, body: str, *, header: str = "") -> Path:
        """Write a config: ``header`` top-level keys, then ``body`` (tables)."""
        text = (
            f'destination = "{self.dest}"\n'
            f'state_dir = "{self.state}"\n'
            f"{header}\n{body}\n"
        )
        self.config_path.write_text(text)
        return self.config_path

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["EVENTS"] = str(self.events)
        env["MARKERS"] = str(self.markers)
        env.update(extra or {})
        return env

    def run(self, *args: str, timeout: float = 120, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, *args, "-c", str(self.config_path)],
            capture_output=True, text=True, timeout=timeout, env=self.env(env),
        )

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*CLI, *args, "-c", str(self.config_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env(env),
        )

    def event_lines(self) -> list[str]:
        if not self.events.exists():
            return []
        return self.events.read_text().splitlines()

    def backups(self) -> list[str]:
        return sorted(p.name for p in self.dest.iterdir())

    def reports(self) -> list[Path]:
        folder = self.state / "reports"
        return sorted(folder.glob("*.json")) if folder.exists() else []

    def report(self) -> dict[str, Any]:
        reports = self.reports()
        assert reports, "no report was written"
        return dict(json.loads(reports[-1].read_text()))


@pytest.fixture
def ws(tmp_path: Path) -> Iterator[Workspace]:
    workspace = Workspace(tmp_path)
    yield workspace
    # Whatever a failed test left running is ended, so later tests start clean.
    kill_mentioning(str(tmp_path))


# --- SSH: one client key for the session, test sshd instances on demand ---------------


@pytest.fixture(scope="session")
def client_key(tmp_path_factory: pytest.TempPathFactory) -> ClientKey:
    from sshkit import ClientKey

    return ClientKey(tmp_path_factory.mktemp("ssh-client"))


@pytest.fixture
def new_sshd(tmp_path_factory: pytest.TempPathFactory,
             client_key: ClientKey) -> Iterator[Callable[[], Sshd]]:
    """Start test sshd instances on demand; all are stopped (by PID) at teardown."""
    from sshkit import SSHD, sshd_servers

    if os.geteuid() != 0 or not os.path.exists(SSHD):
        pytest.skip("the test sshd needs root and OpenSSH sshd")
    yield from sshd_servers(tmp_path_factory, client_key)


@pytest.fixture
def btrfs_fs(tmp_path: Path) -> Iterator[Callable[..., Btrfs]]:
    """Loop-mounted btrfs filesystems on demand (tests/btrfskit.py), released at teardown.

    Ask for it before ``new_sshd`` where a server sees the filesystem: fixtures
    end in reverse order, so the servers, whose mount namespaces hold it,
    stop before its loop device is detached.
    """
    from btrfskit import btrfs_filesystems

    yield from btrfs_filesystems(tmp_path)


@pytest.fixture
def frozen(btrfs_fs: Callable[..., Btrfs], tmp_path: Path) -> Iterator[Path]:
    """A mounted filesystem frozen with ``fsfreeze``: a write there sleeps in the kernel (D)
    until it is thawed, which teardown does whatever happens."""
    fs = btrfs_fs(tmp_path / "frozen", 200)
    subprocess.run(["fsfreeze", "--freeze", str(fs.mount)], check=True)
    try:
        yield fs.mount
    finally:
        thaw(fs.mount)


def thaw(mount: Path) -> None:
    subprocess.run(["fsfreeze", "--unfreeze", str(mount)], capture_output=True, check=False)


@pytest.fixture
def sshd(new_sshd: Callable[[], Sshd]) -> Sshd:
    return new_sshd()
