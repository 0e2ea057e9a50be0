"""Helpers for the end-to-end tests of the run's control flow (hooks, failures, signals).

A test config is built from `HookSpec`s: each hook phase appends one event line
to the workspace's events log, so a test can assert the exact order of hook
phases and what each one saw:

    <hook>.<phase>|<PIBACKUP_STATUS or ->|<PIBACKUP_BACKUP_DIR>|<ls -A of the destination>|
    <PIBACKUP_NAME>|<PIBACKUP_DESTINATION>|<PIBACKUP_PHASE>|<PIBACKUP_TEST_ENV or ->

(one line, `|`-separated; the listing is comma-separated). Every path in a hook
command is written literally, so each hook's shell has the workspace root on its
command line and `processes_mentioning(str(ws.root))` finds it.

Knobs make a phase fail with an exit code, block until the test creates a
release marker (after touching a "started" marker), print to stdout/stderr,
or start background children (a copy of `sleep` under the workspace, so they
are visible to the /proc scan too).
"""

from __future__ import annotations

import os
import pty
import select
import shlex
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from conftest import CLI, processes_mentioning, wait_for

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Workspace

PHASES = ("pre", "post")
ORDER_OK = [
    "b1.pre", "b2.pre", "s1.pre", "s2.pre", "s2.post", "s1.post", "b2.post", "b1.post",
]


@dataclass
class HookSpec:
    """One test hook. ``kind`` is "backup" or "snapshot"."""

    name: str
    kind: str = "backup"
    phases: tuple[str, ...] = PHASES
    fail: dict[str, int] = field(default_factory=dict)      # phase -> exit code
    block: tuple[str, ...] = ()                              # phases that wait for a marker
    critical: bool = False
    timeout: str | None = None
    env: dict[str, str] | None = None
    argv: bool = False                                       # list form instead of a string
    stdout: bool = False                                     # print a line on stdout
    stderr_lines: int = 0                                    # print this many lines on stderr
    children: bool | tuple[str, ...] = False                 # start `sleeper 1000 &` twice
                                                             # (in every phase, or these)


def started_marker(ws: Workspace, hook: str, phase: str) -> Path:
    return ws.markers / f"{hook}.{phase}.started"


def release_marker(ws: Workspace, hook: str, phase: str) -> Path:
    return ws.markers / f"{hook}.{phase}.release"


def sleeper(ws: Workspace) -> Path:
    """A copy of `sleep` whose path (and so command line) lies under the workspace."""
    path = ws.root / "bin" / "sleeper"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        shutil.copy2(shutil.which("sleep") or "/bin/sleep", path)
    return path


def _event_line(ws: Workspace, label: str) -> str:
    q = shlex.quote
    fields = [
        label,
        '${PIBACKUP_STATUS-"-"}',
        '${PIBACKUP_BACKUP_DIR-"-"}',
        f"$(ls -A {q(str(ws.dest))} | tr '\\n' ',')",
        '${PIBACKUP_NAME-"-"}',
        '${PIBACKUP_DESTINATION-"-"}',
        '${PIBACKUP_PHASE-"-"}',
        '${PIBACKUP_TEST_ENV-"-"}',
    ]
    return f'echo "{"|".join(fields)}" >> {q(str(ws.events))}'


def hook_script(ws: Workspace, spec: HookSpec, phase: str) -> str:
    """The /bin/sh script of one hook phase."""
    q = shlex.quote
    label = f"{spec.name}.{phase}"
    lines = [_event_line(ws, label)]
    if spec.stdout:
        lines.append(f"echo 'HOOK-STDOUT {label}'")
    if spec.stderr_lines:
        lines.append(
            f'i=1; while [ $i -le {spec.stderr_lines} ]; do '
            f'printf "{label} err-%04d\\n" $i >&2; i=$((i+1)); done'
        )
    if spec.children is True or (spec.children and phase in spec.children):
        s = q(str(sleeper(ws)))
        lines.append(f"{s} 1000 & {s} 1000 &")
    if phase in spec.block:
        lines.append(f"touch {q(str(started_marker(ws, spec.name, phase)))}")
        lines.append(
            f"while [ ! -e {q(str(release_marker(ws, spec.name, phase)))} ]; do sleep 0.05; done"
        )
        lines.append(f"echo '{label}.released' >> {q(str(ws.events))}")
    if phase in spec.fail:
        lines.append(f"exit {spec.fail[phase]}")
    return "\n".join(lines)


def argv_program(ws: Workspace) -> Path:
    """An executable that logs the event line for ``$1`` and then each other argument."""
    path = ws.root / "bin" / "argv-hook"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        q = shlex.quote
        path.write_text(
            "#!/bin/sh\n"
            'label="$1"; shift\n'
            + _event_line(ws, "$label") + "\n"
            + 'for a in "$@"; do printf "arg:%s\\n" "$a" >> ' + q(str(ws.events)) + "; done\n"
        )
        path.chmod(0o755)
    return path


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # TOML basic strings accept JSON-style escapes for what we produce.
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return str(value)


ARGV_EXTRA = ["two words", "$HOME;*", "'quoted'"]


def hook_toml(ws: Workspace, spec: HookSpec) -> str:
    table = "backup_hooks" if spec.kind == "backup" else "snapshot_hooks"
    out = [f"[[{table}]]", f"name = {_toml_value(spec.name)}"]
    for phase in spec.phases:
        if spec.argv:
            cmd: Any = [str(argv_program(ws)), f"{spec.name}.{phase}", *ARGV_EXTRA]
        else:
            cmd = hook_script(ws, spec, phase)
        out.append(f"{phase} = {_toml_value(cmd)}")
    if spec.critical:
        out.append("critical = true")
    if spec.timeout:
        out.append(f"timeout = {_toml_value(spec.timeout)}")
    if spec.env:
        out.append(f"env = {_toml_value(spec.env)}")
    return "\n".join(out) + "\n"


def standard_hooks(**overrides: dict[str, Any]) -> list[HookSpec]:
    """Backup hooks b1, b2 and snapshot hooks s1, s2; ``b2={"fail": {"pre": 3}}`` etc."""
    specs = [
        HookSpec("b1"), HookSpec("b2"),
        HookSpec("s1", kind="snapshot"), HookSpec("s2", kind="snapshot"),
    ]
    for spec in specs:
        for key, value in overrides.get(spec.name, {}).items():
            setattr(spec, key, value)
    return specs


def source_toml(name: str, path: Path | str, **extra: Any) -> str:
    out = ["[[sources]]", f"name = {_toml_value(name)}", 'type = "rsync"',
           f"path = {_toml_value(str(path))}"]
    out += [f"{k} = {_toml_value(v)}" for k, v in extra.items()]
    return "\n".join(out) + "\n"


def make_slow_source(ws: Workspace, name: str, mib: int = 3) -> Path:
    """A source of ``mib`` MiB of random data (with --bwlimit=500 it copies for seconds)."""
    path = ws.src / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "blob.bin").write_bytes(os.urandom(mib * 1024 * 1024))
    return path


# No precopy: these sources stand for a copy that is still running inside the
# snapshot hooks' window (tests/test_precopy.py has the precopy's own).
SLOW = {"rsync_args": ["--bwlimit=500"], "precopy": False}


def write_config(ws: Workspace, hooks: list[HookSpec], sources: str | None = None,
                 header: str = "") -> Path:
    """Config with ``hooks`` and ``sources`` (default: two small rsync sources)."""
    if sources is None:
        sources = (source_toml("alpha", ws.make_source("alpha"))
                   + source_toml("beta", ws.make_source("beta")))
    body = "".join(hook_toml(ws, h) for h in hooks) + sources
    return ws.write_config(body, header=header)


@dataclass
class Event:
    label: str              # "b1.pre"
    status: str             # PIBACKUP_STATUS, "-" when unset
    backup_dir: str
    listing: list[str]      # ls -A of the destination
    name: str
    destination: str
    phase: str
    test_env: str


def events(ws: Workspace) -> list[Event]:
    """Parsed event lines (lines that are not full events are left out)."""
    out = []
    for line in ws.event_lines():
        parts = line.split("|")
        if len(parts) != 8:
            continue
        label, status, bdir, listing, name, dest, phase, test_env = parts
        out.append(Event(label, status, bdir, [x for x in listing.split(",") if x],
                         name, dest, phase, test_env))
    return out


def order(ws: Workspace) -> list[str]:
    return [e.label for e in events(ws)]


def statuses(ws: Workspace) -> dict[str, str]:
    return {e.label: e.status for e in events(ws)}


def complete_backups(ws: Workspace) -> list[str]:
    return [n for n in ws.backups() if not n.endswith((".in-progress", ".deleting"))]


def in_progress(ws: Workspace) -> list[str]:
    return [n for n in ws.backups() if n.endswith(".in-progress")]


def report_hooks(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(h["hook"], h["phase"], h["status"]) for h in report["hooks"]]


def tail_text(tail: Any) -> str:
    """``stderr_tail`` as text, whether the report keeps a string or a list of lines."""
    if tail is None:
        return ""
    if isinstance(tail, list):
        return "\n".join(str(x) for x in tail)
    return str(tail)


def leftover_processes(ws: Workspace) -> list[tuple[int, str]]:
    return processes_mentioning(str(ws.root))


def assert_no_processes(ws: Workspace) -> None:
    """No process mentioning the workspace is left (call once the CLI has exited)."""
    left = leftover_processes(ws)
    assert left == [], f"processes left behind: {left}"


def wait_no_processes(ws: Workspace, timeout: float = 5.0) -> None:
    """Bounded wait until no process mentioning the workspace is left."""
    try:
        wait_for(lambda: not leftover_processes(ws), timeout, "the test's processes to end")
    except AssertionError:
        raise AssertionError(f"processes left behind: {leftover_processes(ws)}") from None


class Running:
    """The CLI started with ``ws.start``; its stdout and stderr drained by threads."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self._out: list[str] = []
        self._err: list[str] = []
        self._threads = [
            threading.Thread(target=self._drain, args=(proc.stdout, self._out), daemon=True),
            threading.Thread(target=self._drain, args=(proc.stderr, self._err), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _drain(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    @property
    def stdout(self) -> str:
        return "".join(self._out)

    @property
    def stderr(self) -> str:
        return "".join(self._err)

    def stderr_lines(self) -> list[str]:
        return list(self._err)

    def wait(self, timeout: float = 60) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise AssertionError(
                f"the CLI did not exit within {timeout}s; stderr:\n{self.stderr}"
            ) from None
        self._finish()
        return rc

    def _finish(self) -> None:
        for t in self._threads:
            t.join(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def close(self) -> None:
        """Kill the CLI if it still runs (a failed test), reap it, close its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._finish()

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, sig: int) -> None:
        """Send ``sig`` and wait until the kernel has delivered it to the process."""
        os.kill(self.proc.pid, sig)
        wait_for(lambda: not self._pending(sig), 5, f"signal {sig} to be delivered")

    def _pending(self, sig: int) -> bool:
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                status = f.read()
        except OSError:
            return False
        mask = 1 << (sig - 1)
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key in ("SigPnd", "ShdPnd") and int(value.strip(), 16) & mask:
                return True
        return False


def start(ws: Workspace, *args: str) -> Running:
    return Running(ws.start("run", *args))


def wait_marker(path: Path, running: Running | None = None, timeout: float = 20) -> None:
    def seen() -> bool:
        if path.exists():
            return True
        if running is not None and running.proc.poll() is not None:
            raise AssertionError(
                f"the CLI exited ({running.proc.returncode}) before {path.name}; "
                f"stderr:\n{running.stderr}"
            )
        return False

    wait_for(seen, timeout, path.name)


EXIT_FOR: dict[int, int] = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Terminal:
    """The CLI as the session leader of a real pseudo-terminal, its output drained."""

    def __init__(self, ws: Workspace, *args: str) -> None:
        self.master, slave = pty.openpty()
        # setsid --ctty: a new session whose controlling terminal is the pty,
        # as a login shell's would be.
        self.proc = subprocess.Popen(
            ["setsid", "--ctty", *CLI, *args, "-c", str(ws.config_path)],
            stdin=slave, stdout=slave, stderr=slave, env=ws.env(), close_fds=True)
        os.close(slave)
        self.output = bytearray()
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        # select() with a timeout, not a blocking read: a read blocked in
        # another thread would keep the master open after close().
        while not self._stop.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if not ready:
                continue
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                return
            if not chunk:
                return
            self.output += chunk

    def hang_up(self) -> None:
        """Close the terminal's master side: the kernel sends SIGHUP to the session."""
        self._stop.set()
        self._reader.join(5)
        os.close(self.master)

    def finish(self, timeout: float = 60) -> int:
        """Wait for the CLI to exit and for its last output; close the terminal."""
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        self._stop.set()
        os.close(self.master)
        return rc

    def text(self) -> str:
        return self.output.decode(errors="replace")
