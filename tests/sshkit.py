"""A real OpenSSH ``sshd`` on 127.0.0.1 (or ``::1``) for the remote-host tests (NOTES pitfall 6).

Each `Sshd` has a folder of its own (outside the test's workspace, so the
workspace's /proc scan never finds the server itself, only what runs through
it): an ed25519 host key, ``authorized_keys`` holding the session's client
key, a ``known_hosts`` line ``[127.0.0.1]:PORT ssh-ed25519 AAAA…``, its
``sshd_config`` and its log. The server runs in the foreground
(``sshd -D -f CONFIG -E LOG``), is ready when its log says it listens, and is
stopped by its PID (its per-connection children first).

The "remote" machine is this one, logged into as root. Two things of the
real system would get in the way, and both are dealt with in a private mount
namespace of the server (``unshare --mount``), so nothing outside the test's
folders is changed:

- OpenSSH refuses to start without its privilege separation folder
  ``/run/sshd``; where it is missing, a private tmpfs is mounted on ``/run``
  and the folder made there.
- bash reads ``~/.bashrc`` even for commands run over ssh (NOTES pitfall 7):
  here that costs time and anything it prints breaks rsync's protocol, so an
  empty file is bind-mounted over it.

Where ``unshare`` is not allowed the server runs as it is, and the tests are
skipped if ``/run/sshd`` is missing.
"""

from __future__ import annotations

import functools
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from datakit import toml_value

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

SSHD = "/usr/sbin/sshd"
# The test sshd logs in as root (the only user whose files the tests own), and the engine
# reaches it with OpenSSH's own client for rsync.
needs_sshd = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(SSHD) or shutil.which("ssh") is None,
    reason="needs root, OpenSSH's sshd and its ssh client")
READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
USER = "root"
ADDRESS = "127.0.0.1"


def free_port(address: str = ADDRESS) -> int:
    """A TCP port on ``address`` where nothing listens (a connection is refused)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def keygen(path: Path, comment: str) -> str:
    """An unencrypted ed25519 key pair at ``path``; returns the public key line."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True, capture_output=True,
    )
    return path.with_name(path.name + ".pub").read_text().strip()


def known_hosts_line(port: int, public_key: str, address: str = ADDRESS) -> str:
    key_type, key = public_key.split()[:2]
    return f"[{address}]:{port} {key_type} {key}\n"


@functools.cache
def _can_unshare() -> bool:
    try:
        probe = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "true"],
            capture_output=True, timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (sshd's per-connection processes)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            found.append(int(entry))
    return found


def established_to(port: int) -> int:
    """How many TCP connections on this machine have ``port`` as their remote port.

    Counts client ends only (the server's ends have it as their local port):
    after a run, none may be left (an OpenSSH master left open would be one).
    """
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            remote, state = fields[2], fields[3]
            if state == "01" and int(remote.rpartition(":")[2], 16) == port:
                count += 1
    return count


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, children first."""
    found = []
    for child in children(pid):
        found += [child, *descendants(child)]
    return found


def cut_connections(server: Sshd) -> int:
    """SIGKILL the server's per-connection sshd processes (not the listener, not the
    commands they run): the TCP connection goes away as when a network drops."""
    assert server.proc is not None
    killed = 0
    for pid in descendants(server.proc.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                is_sshd = f.read().startswith(b"sshd")
            if is_sshd:
                os.kill(pid, signal.SIGKILL)
                killed += 1
        except (OSError, ProcessLookupError):
            continue
    return killed


class ClientKey:
    """The client's key pair, authorized on every test sshd."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "client_key"
        self.public = keygen(self.path, "pibackup-test-client")


class Sshd:
    """One OpenSSH server on 127.0.0.1 (or ``address``: ``::1``), a free port, its own host key."""

    def __init__(self, folder: Path, client: ClientKey, address: str = ADDRESS) -> None:
        self.folder = folder
        self.address = address
        folder.mkdir(parents=True, exist_ok=True)
        self.client = client
        self.host_key = folder / "host_key"
        self.host_public = keygen(self.host_key, "pibackup-test-host")
        self.authorized_keys = folder / "authorized_keys"
        self.authorized_keys.write_text(client.public + "\n")
        self.known_hosts = folder / "known_hosts"
        self.config = folder / "sshd_config"
        self.log = folder / "sshd.log"
        self.empty = folder / "empty"
        self.empty.write_text("")
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    # --- the server ----------------------------------------------------------------------

    def _write_config(self) -> None:
        self.config.write_text(
            f"Port {self.port}\n"
            f"ListenAddress {self.address}\n"
            f"HostKey {self.host_key}\n"
            f"AuthorizedKeysFile {self.authorized_keys}\n"
            "PidFile none\n"
            "StrictModes no\n"
            "UsePAM no\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\n"
            "LogLevel VERBOSE\n"
            "MaxSessions 20\n"
            "MaxStartups 50\n"
        )
        self.known_hosts.write_text(known_hosts_line(self.port, self.host_public, self.address))

    def _argv(self) -> list[str]:
        sshd = [SSHD, "-D", "-f", str(self.config), "-E", str(self.log)]
        if not _can_unshare():
            if not os.path.isdir("/run/sshd"):
                pytest.skip("sshd needs /run/sshd and unshare is not allowed here")
            return sshd
        bashrc = Path(pwd.getpwnam(USER).pw_dir) / ".bashrc"
        script = " && ".join([
            "{ [ -d /run/sshd ] || { mount -t tmpfs -o mode=755 tmpfs /run"
            " && mkdir -m 755 /run/sshd; }; }",
            '{ [ ! -e "$1" ] || mount --bind "$2" "$1"; }',
            "exec " + shlex.join(sshd),
        ])
        return ["unshare", "--mount", "--propagation", "private",
                "/bin/sh", "-c", script, "sh", str(bashrc), str(self.empty)]

    def start(self) -> Sshd:
        """Start on a fresh free port; return once the server listens."""
        problem = ""
        for _ in range(3):  # another process may take the free port in between
            self.port = free_port(self.address)
            self._write_config()
            self.log.write_text("")
            # unshare and sh exec into sshd, so this PID is the server's.
            self.proc = subprocess.Popen(
                self._argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            problem = self._wait_ready()
            if not problem:
                return self
            self.stop()
            if "Address already in use" not in problem:
                break
        raise AssertionError(f"sshd did not start: {problem}")

    def _wait_ready(self) -> str:
        """Empty once the log says the server listens, else what went wrong."""
        assert self.proc is not None
        ready = f"Server listening on {self.address} port {self.port}"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if ready in self.log_text():
                return ""
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                return f"exited {self.proc.returncode}: {err}{self.log_text()}"
            time.sleep(0.01)
        return f"not listening after {READY_TIMEOUT_S}s: {self.log_text()}"

    def stop(self) -> None:
        """Stop the server and its sessions, by PID; bounded."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            for pid in [proc.pid, *children(proc.pid)]:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)
        if proc.stderr is not None:
            proc.stderr.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # --- what the tests read -------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def logins(self) -> int:
        """Successful logins so far (one per SSH connection that authenticated)."""
        return self.log_text().count("Accepted publickey for ")

    def wrong_known_hosts(self) -> Path:
        """A known_hosts file that lists another key for this server's address and port."""
        other = self.folder / "impostor_key"
        if not other.exists():
            keygen(other, "impostor")
        path = self.folder / "wrong_known_hosts"
        public = other.with_name(other.name + ".pub").read_text()
        path.write_text(known_hosts_line(self.port, public, self.address))
        return path

    def serve_only(self, path: Path | str) -> None:
        """Restrict the client key to ``pibackup-async serve --read-only PATH`` (SPEC §10),
        as the README's ``authorized_keys`` line does; sshd reads the file at each login."""
        command = shlex.join([sys.executable, "-m", "pibackup_async.cli", "serve",
                              "--read-only", str(path)])
        self.authorized_keys.write_text(
            f'command="{command}",restrict {self.client.public}\n')

    def unrestricted(self) -> None:
        """The client key may run anything again."""
        self.authorized_keys.write_text(self.client.public + "\n")

    def ssh_argv(self) -> list[str]:
        """The system ssh client with this server's settings (for checks by hand)."""
        return [
            "ssh", "-F", "/dev/null", "-p", str(self.port), "-i", str(self.client.path),
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
        ]

    def host_toml(self, name: str, *, known_hosts: Path | None = None,
                  port: int | None = None, identity_file: Path | None = None,
                  **extra: object) -> str:
        """A ``[hosts.NAME]`` table for this server."""
        lines = [
            f"[hosts.{name}]",
            f'address = "{self.address}"',
            f"port = {port if port is not None else self.port}",
            f'user = "{USER}"',
            f"identity_file = {toml_value(str(identity_file or self.client.path))}",
            f'known_hosts = "{known_hosts or self.known_hosts}"',
        ]
        lines += [f"{key} = {toml_value(value)}" for key, value in extra.items()]
        return "\n".join(lines) + "\n"


def sshd_servers(tmp_path_factory: pytest.TempPathFactory,
                 client_key: ClientKey) -> Iterator[Callable[[], Sshd]]:
    """For a fixture to ``yield from``: start servers on demand, stop them (by PID) after."""
    servers: list[Sshd] = []

    def make() -> Sshd:
        server = Sshd(tmp_path_factory.mktemp("sshd"), client_key)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()
