"""Remote hosts: one asyncssh connection and one OpenSSH master per host for a run.

Hooks run through the asyncssh connection; rsync pulls run over the system
``ssh`` client multiplexed on an OpenSSH master (rsync needs a command, not a
channel). Host keys are always verified, by both. asyncssh is imported only
here, and this module only when a configuration has hosts (its import runs
compilers: NOTES).
"""

from __future__ import annotations

import errno
import math
import os
import shlex
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from .errors import StepError, describe, map_errors
from .processes import (
    GRACE_S,
    KILL_BOUND_S,
    Finished,
    LineSplitter,
    Tail,
    drain,
    managed_process,
    run_process,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Collection, Iterator, Mapping

    from anyio.abc import ByteReceiveStream, Process

    from .config import Config, Host

log = structlog.get_logger("pibackup.remote")

CONNECT_TIMEOUT_S = 15.0
KEEPALIVE_S = 15.0
_PGID_MARK = "pibackup-pgid "
_WINDOW = 16 << 20
_PACKET = 256 << 10
_READ = 256 << 10
_CLOSE_BOUND_S = 5.0
# A Unix socket's path holds at most 107 bytes (sun_path, with its NUL), and
# OpenSSH's master first binds its ControlPath plus ".XXXXXXXXXXXXXXXX".
_SOCKET_PATH_MAX = 107
_CONTROL_SUFFIX = 17
_MASTER_EXIT_S = 0.5
# asyncssh offers no event for "exit status received": it is polled while
# the channel stays open (a hook's background job holds it).
_EXIT_POLL_S = 0.05
_LAST_OUTPUT_S = 0.2
# Fast ciphers first; the server's choice falls back along the list.
_CIPHERS = ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com",
            "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr"]

Sink = Callable[[bytes], Awaitable[None]]


class RemoteError(StepError):
    """A host cannot be reached or trusted, or its connection broke; the message names
    the host and what happened."""


def _connection_trouble() -> tuple[type[Exception], ...]:
    """What asyncssh and the sockets under it raise when a connection breaks.

    asyncssh errors are not OSErrors (NOTES pitfall 14); a stream read after
    the peer vanished raises BrokenPipeError or EOF-type errors.
    """
    import asyncssh

    return (asyncssh.Error, OSError, EOFError)


def _ssh_errors(error_for: Callable[[str, Exception], RemoteError]
                ) -> AbstractContextManager[None]:
    """The adapter of asyncssh: what it (and the sockets under it) raises in the block
    becomes the RemoteError that ``error_for`` makes of a one-line reason and the error.

    Everything else passes: a bug stays a bug, a cancel a cancel.
    """
    import asyncssh

    return map_errors({
        asyncssh.PermissionDenied: lambda e: error_for(f"login refused: {_reason(e, False)}", e),
        asyncssh.Error: lambda e: error_for(_reason(e), e),
        # A bad identity file (asyncssh reads it when it connects).
        asyncssh.KeyImportError: lambda e: error_for(f"cannot use the identity file: {e}", e),
        OSError: lambda e: error_for(describe(e), e),
        EOFError: lambda e: error_for("the connection closed", e),
    })


def _reason(error: BaseException, named: bool = True) -> str:
    reason = getattr(error, "reason", None) or str(error)
    if not named:
        return reason or type(error).__name__
    return f"{type(error).__name__}: {reason}" if reason else type(error).__name__


def _shown(command: str) -> str:
    first = command.strip().splitlines()[0] if command.strip() else command
    return repr(first if len(first) <= 80 else first[:77] + "...")


def _bracketed(address: str) -> str:
    """An IPv6 address in brackets, so a ``:PORT`` or ``:PATH`` after it reads apart."""
    return f"[{address}]" if ":" in address else address


def _where(name: str, host: Host) -> str:
    """``host NAME (ADDRESS:PORT)`` for messages."""
    return f"host {name} ({_bracketed(host.address)}:{host.port})"


def _fits_a_socket(path: str) -> bool:
    return len(os.fsencode(path)) + _CONTROL_SUFFIX <= _SOCKET_PATH_MAX


def _known_hosts(host: Host) -> str:
    return host.known_hosts or os.path.expanduser("~/.ssh/known_hosts")


def _option_path(path: str) -> str:
    """``path`` as the value of an OpenSSH ``-o`` file option, read whole and literally.

    ssh splits an option's value at whitespace (UserKnownHostsFile is a list
    of files) unless it is double-quoted, where a backslash escapes ``"`` and
    ``\\``; then it expands ``%`` tokens in it, ``%%`` being a percent sign.
    """
    escaped = path.replace("%", "%%").replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def wrap_command(command: str, env: Mapping[str, str], *, sudo: bool) -> str:
    """The remote command line: variables set on it, in a process group of its own.

    sshd drops most environment requests, hence ``env`` on the command line.
    The group's id comes first on stderr, so a cancel can end the whole group
    remotely. A command killed by a signal ends the same way over SSH (an
    exit signal, not an exit code), so it reads as cut short, as locally.
    """
    assignments = [f"{k}={v}" for k, v in env.items()]
    # coreutils' ``timeout`` (0: never times out) leads a process group of
    # its own and, when its child dies of a signal, dies of that signal too
    # (so does sudo). ``setsid --wait`` exited with the raw wait status
    # instead: SIGKILL read as "exit code 9", a failure, not a cut. The
    # group's id is timeout's pid: the inner shell's $PPID.
    inner = f'echo "{_PGID_MARK}$PPID" >&2; exec /bin/sh -c "$1"'
    argv = ["env", *assignments, "timeout", "0", "/bin/sh", "-c", inner, "pibackup", command]
    if sudo:
        argv = ["sudo", "-n", *argv]
    return "exec " + shlex.join(argv)


@dataclass(frozen=True)
class Transport:
    """How rsync reaches a host: ``user@address`` as rsync reads it before ``:PATH``
    (``rsync_target``), the ``-e`` shell, sudo or not."""

    target: str
    shell: str
    sudo: bool


def ssh_options(host: Host, control_path: str) -> list[str]:
    """Options of the system ``ssh`` client for ``host`` (rsync's transport and the master)."""
    options = ["-p", str(host.port)]
    if host.identity_file:
        # Not ``-i``: ssh expands its % tokens too, but looks for the file
        # before that, so neither the path as written nor with %% would do.
        options += ["-o", f"IdentityFile={_option_path(host.identity_file)}",
                    "-o", "IdentitiesOnly=yes"]
    options += [
        "-o", f"UserKnownHostsFile={_option_path(_known_hosts(host))}",
        "-o", "StrictHostKeyChecking=yes",
        "-o", "BatchMode=yes",
        "-o", f"ConnectTimeout={int(CONNECT_TIMEOUT_S)}",
        "-o", f"ServerAliveInterval={int(KEEPALIVE_S)}",
        "-o", "ServerAliveCountMax=4",
        "-o", f"ControlPath={_option_path(control_path)}",
        # The master's cipher is every multiplexed stream's: a btrfs send
        # runs ~30% faster with AES-GCM than with OpenSSH's default ChaCha20.
        "-o", f"Ciphers={','.join(_CIPHERS)}",
    ]
    return options


def ssh_target(host: Host) -> str:
    """``user@address`` as ssh's own argument takes it: an IPv6 address bare."""
    return f"{host.user}@{host.address}" if host.user else host.address


def rsync_target(host: Host) -> str:
    """``user@address`` to put before ``:PATH``: an IPv6 address in brackets, which rsync
    strips before calling ssh (``root@fe80::1:/srv`` reads as a daemon's ``HOST::MODULE``)."""
    address = _bracketed(host.address)
    return f"{host.user}@{address}" if host.user else address


def transport(host: Host, control_path: str) -> Transport:
    shell = shlex.join(["ssh", *ssh_options(host, control_path), "-o", "ControlMaster=no"])
    return Transport(rsync_target(host), shell, host.sudo)


async def _until_exited(process: Any) -> None:
    """Until the remote command has exited (its exit status came) or its channel closed.

    sshd sends the exit status when the command exits, but closes the
    channel only once every process holding its output has let go of it.
    """
    while process.exit_status is None and process.exit_signal is None:
        with anyio.move_on_after(_EXIT_POLL_S):
            await process.wait_closed()
            return
    # Output written just before the exit may still be on its way.
    with anyio.move_on_after(_LAST_OUTPUT_S):
        await process.wait_closed()


class RemoteHost:
    """One configured host during one run."""

    def __init__(self, name: str, host: Host, control_dir: str) -> None:
        self.name = name
        self.host = host
        self.limiter = anyio.CapacityLimiter(host.max_sessions)
        self.control_path = os.path.join(control_dir, name)
        # A short folder of the host's own when control_dir is too deep for a
        # socket (ensure_master); removed by aclose.
        self._private_dir: str | None = None
        self._stack = AsyncExitStack()
        self._master_started = False
        self._master: Process | None = None
        self._connection: Any = None
        self._error: str | None = None
        self._lock = anyio.Lock()

    @property
    def transport(self) -> Transport:
        """rsync's way to the host, on the run's master connection."""
        return transport(self.host, self.control_path)

    async def connection(self) -> Any:
        """The host's asyncssh connection, opened on first use; RemoteError if impossible.

        A failure is remembered: nothing more of that host is tried in this run.
        """
        async with self._lock:
            if self._error is not None:
                raise RemoteError(self._error)
            if self._connection is None:
                self._connection = await self._connect()
            return self._connection

    async def _connect(self) -> Any:
        import asyncssh

        where = _where(self.name, self.host)

        def refused(reason: str, error: Exception) -> RemoteError:
            if isinstance(error, asyncssh.HostKeyNotVerifiable):
                reason = f"host key not verified against {_known_hosts(self.host)} ({reason})"
            elif isinstance(error, TimeoutError):
                reason = f"no answer within {CONNECT_TIMEOUT_S:g} s"
            # Remembered: nothing more of this host is tried in this run.
            self._error = f"{where}: cannot connect: {reason}"
            log.error("host unavailable", host=self.name, problem=self._error)
            return RemoteError(self._error)

        options: dict[str, Any] = {
            "port": self.host.port,
            "known_hosts": _known_hosts(self.host),
            "connect_timeout": CONNECT_TIMEOUT_S,
            "keepalive_interval": KEEPALIVE_S,
            "keepalive_count_max": 4,
            "preferred_auth": "publickey",
            "encryption_algs": _CIPHERS,
        }
        if self.host.user:
            options["username"] = self.host.user
        if self.host.identity_file:
            options["client_keys"] = [self.host.identity_file]
        # TimeoutError is an OSError: fail_after's is mapped too.
        with _ssh_errors(refused), anyio.fail_after(CONNECT_TIMEOUT_S + 5):
            connection = await asyncssh.connect(self.host.address, **options)
        log.info("connected", host=self.name)
        return connection

    async def run(self, command: str, env: Mapping[str, str], *, stdout_lines: int = 20,
                  stdout_sink: Sink | None = None, leave_background: bool = False,
                  bound_s: float | None = None) -> Finished:
        """Run ``command`` under ``/bin/sh -c`` on the host; on cancel, kill its group there.

        With ``stdout_sink`` the output is streamed into it instead of kept
        (``btrfs send``); if the sink fails, the remote command is ended.
        With ``leave_background`` (hooks) the command is finished as soon as
        it exits: what it started in the background is left running there,
        and output it still holds open is not waited for.
        With ``bound_s`` the whole exchange must end within that many seconds,
        else the host counts as no longer answering and its connection as lost.
        Raises RemoteError, and only that, for any trouble with the host:
        unreachable, untrusted, or the connection breaking while the command
        runs (the next call connects again).
        """
        connection = await self.connection()
        with self._mapped(connection, command):
            deadline = math.inf if bound_s is None else anyio.current_time() + bound_s
            with anyio.CancelScope(deadline=deadline) as bounded:
                return await self._run(connection, command, env, stdout_lines, stdout_sink,
                                       leave_background, bounded)
            # A TimeoutError, for the adapter to make the "connection lost" error of.
            raise TimeoutError(errno.ETIMEDOUT, f"no answer within {bound_s:g} s")

    @contextmanager
    def _mapped(self, connection: Any, command: str) -> Iterator[None]:
        """Connection trouble, raised alone or out of a task group, becomes RemoteError."""
        with _ssh_errors(lambda reason, error: self._broken(connection, command, reason,
                                                            error)):
            try:
                yield
            except BaseExceptionGroup as group:
                matched, rest = group.split(_connection_trouble())
                if matched is None or rest is not None:
                    raise
                first: BaseException = matched
                while isinstance(first, BaseExceptionGroup):
                    first = first.exceptions[0]
                # The task group's trouble alone, for the adapter to map.
                raise first from group

    def _broken(self, connection: Any, command: str, reason: str, error: Exception
                ) -> RemoteError:
        where = _where(self.name, self.host)
        if connection.is_closed() or not _is_channel_refusal(error):
            problem = f"connection to {where} lost while running {_shown(command)}"
            # Forget it: the next command (a later post) connects again.
            if self._connection is connection:
                self._connection = None
            connection.close()
        else:
            problem = f"{where} refused a session for {_shown(command)}"
        problem += f" ({reason})"
        log.error("host connection trouble", host=self.name, problem=problem)
        return RemoteError(problem)

    async def _run(self, connection: Any, command: str, env: Mapping[str, str],
                   stdout_lines: int, stdout_sink: Sink | None,
                   leave_background: bool, bounded: anyio.CancelScope) -> Finished:
        script = wrap_command(command, env, sudo=self.host.sudo)
        out, err = Tail(limit=stdout_lines), Tail()
        pgid: list[int] = []
        # A large window keeps a stream's throughput near the cipher's (NOTES 5).
        process = await connection.create_process(script, encoding=None, window=_WINDOW,
                                                  max_pktsize=_PACKET)
        try:
            process.stdin.write_eof()
            async with anyio.create_task_group() as tg:
                if stdout_sink is None:
                    tg.start_soon(self._drain, process.stdout, LineSplitter(out, "stdout"), None)
                else:
                    tg.start_soon(self._stream, process, stdout_sink)
                tg.start_soon(self._drain, process.stderr, LineSplitter(err, "stderr"), pgid)
                if leave_background:
                    await _until_exited(process)
                    tg.cancel_scope.cancel()
                else:
                    await process.wait_closed()
        finally:
            if bounded.cancel_called:
                # The host stopped answering: a kill sent over this connection
                # would wait as long. Dropped, it leaves the command to sshd.
                connection.close()
            if process.exit_status is None and process.exit_signal is None:
                with anyio.move_on_after(GRACE_S + 2 * _CLOSE_BOUND_S + 5, shield=True):
                    await self._end_group(connection, process, pgid)
            elif leave_background and not connection.is_closed():
                # Its background jobs hold the channel open: let go of it
                # (sshd closes their output) without signalling them.
                process.close()
        # The negative signal number for a command killed by one (NOTES 14).
        code = process.returncode
        if code is None:
            if connection.is_closed():
                # The channel closed without a word: the connection went away.
                raise EOFError("the connection closed before the command's exit status")
            code = -1
        return Finished(exit_code=code, stdout=out, stderr=err)

    @staticmethod
    async def _stream(process: Any, sink: Sink) -> None:
        while chunk := await process.stdout.read(_PACKET):
            try:
                await sink(chunk)
            except Exception:
                # The consumer is gone; closing the channel makes the caller
                # end the remote command, and the consumer's exit says why.
                process.close()
                return

    @staticmethod
    async def _drain(stream: Any, lines: LineSplitter, pgid: list[int] | None) -> None:
        """Read a channel's stream into ``lines``; on stderr, first take the group id."""
        head = bytearray() if pgid is not None else None
        while chunk := await stream.read(_READ):
            if head is None:
                lines.feed(chunk)
                continue
            head += chunk
            newline = head.find(b"\n")
            if newline < 0 and len(head) < 200:
                continue
            first = bytes(head[:newline]) if newline >= 0 else b""
            if pgid is not None and first.startswith(_PGID_MARK.encode()):
                try:
                    pgid.append(int(first[len(_PGID_MARK):]))
                except ValueError:
                    pass
                del head[:newline + 1]
            lines.feed(head)
            head = None
        if head:
            lines.feed(head)
        lines.close()

    async def _end_group(self, connection: Any, process: Any, pgid: list[int]) -> None:
        # Closing a channel without a terminal does not stop the remote
        # command: signal its process group over the same connection.
        sudo = "sudo -n " if self.host.sudo else ""
        try:
            with _ssh_errors(lambda reason, _: RemoteError(reason)):
                if pgid and not connection.is_closed():
                    with anyio.move_on_after(GRACE_S + _CLOSE_BOUND_S):
                        await connection.run(f"{sudo}kill -TERM -{pgid[0]}", check=False)
                        with anyio.move_on_after(GRACE_S):
                            await process.wait_closed()
                            return
                        await connection.run(f"{sudo}kill -KILL -{pgid[0]}", check=False)
        except RemoteError as error:
            # Gone with the connection: sshd hangs up the command's session.
            log.warning("cannot signal the remote command", host=self.name, error=str(error))
        process.close()
        with anyio.move_on_after(_CLOSE_BOUND_S):
            await process.wait_closed()

    async def ensure_master(self) -> None:
        """Start the host's OpenSSH master connection, once; RemoteError if impossible.

        The master checks the host key itself (``StrictHostKeyChecking=yes``),
        so an rsync-only host needs no asyncssh connection (nor its import);
        a host it cannot reach or trust is remembered as failed for the run.
        """
        async with self._lock:
            if self._error is not None:
                raise RemoteError(self._error)
            if self._master_started:
                return
            self._master_started = True
            if not _fits_a_socket(self.control_path):
                self._use_private_dir()
            argv = ["ssh", "-M", "-N", *ssh_options(self.host, self.control_path),
                    "-o", "ControlMaster=yes", ssh_target(self.host)]
            # Entered here, left when the run's remotes close: the master's
            # session is ended then, as for any child.
            master = await self._stack.enter_async_context(managed_process(argv))
            self._master = master
            with anyio.move_on_after(CONNECT_TIMEOUT_S + 5):
                # ssh offers no readiness signal but its control socket.
                while (not await anyio.Path(self.control_path).exists()  # noqa: ASYNC110
                       and master.returncode is None):
                    await anyio.sleep(0.02)
            if await anyio.Path(self.control_path).exists():
                log.info("ssh master connected", host=self.name)
                return
            said = Tail()
            with anyio.move_on_after(2):
                await drain(master.stderr, said, "stderr")
            last = said.lines[-1] if said.lines else "no answer"
            self._error = (f"{_where(self.name, self.host)}: ssh failed: {last} "
                           "(host keys checked against "
                           f"{_known_hosts(self.host)})")
            log.error("host unavailable", host=self.name, problem=self._error)
            raise RemoteError(self._error)

    def _use_private_dir(self) -> None:
        """Move the control socket into a new private folder under the temporary one.

        mkdtemp makes it 0700 with a name no other user can predict, so none
        can squat it or reach the socket; /tmp stands in for a TMPDIR that is
        too deep itself.
        """
        base = tempfile.gettempdir()
        # mkdtemp's name is the prefix and 8 random characters.
        if not _fits_a_socket(os.path.join(base, "pibackup-ssh-xxxxxxxx", self.name)):
            base = "/tmp"
        try:
            self._private_dir = tempfile.mkdtemp(prefix="pibackup-ssh-", dir=base)
        except OSError as e:
            self._error = (f"{_where(self.name, self.host)}: cannot make a folder for the "
                           f"ssh control socket in {base}: {e.strerror}")
            log.error("host unavailable", host=self.name, problem=self._error)
            raise RemoteError(self._error) from e
        self.control_path = os.path.join(self._private_dir, self.name)

    async def command_argv(self, command: str) -> list[str]:
        """A local ``ssh`` that runs ``command`` on the host over the run's master.

        For streams that a local process consumes (``btrfs send`` into
        ``btrfs receive``): OpenSSH moves the bytes, not Python. The command
        runs as ``run`` runs it (``wrap_command``: its own process group,
        whose id comes first on stderr, see ``drain_marked``; ``sudo -n``
        where configured). Raises RemoteError if the host cannot be reached.
        """
        await self.ensure_master()
        return self._over_master(wrap_command(command, {}, sudo=self.host.sudo))

    def _over_master(self, command: str) -> list[str]:
        """A local ``ssh`` running the shell ``command`` on the host over the run's master."""
        return ["ssh", *ssh_options(self.host, self.control_path), "-o", "ControlMaster=no",
                "-T", ssh_target(self.host), command]

    async def lost(self, ssh_said: str) -> RemoteError | None:
        """The error for a ``command_argv`` ssh that exited 255, if the connection broke.

        A master that died, or an ssh that could not use it, means the host or
        the network went away; None when the master still runs (the remote
        command itself ended badly: its own output says why).
        """
        master = self._master
        if master is not None and master.returncode is None:
            # The master lets its clients go before it exits: give it a moment.
            with anyio.move_on_after(_MASTER_EXIT_S):
                await master.wait()
        if (master is not None and master.returncode is None
                and await anyio.Path(self.control_path).exists()):
            return None
        where = _where(self.name, self.host)
        problem = f"connection to {where} lost"
        if ssh_said:
            problem += f" (ssh: {ssh_said})"
        log.error("host connection trouble", host=self.name, problem=problem)
        return RemoteError(problem)

    async def end_group(self, pgid: int) -> None:
        """End the host's process group ``pgid``: SIGTERM, ``GRACE_S``, SIGKILL; shielded, bounded.

        Over the master; a host whose master is gone is not tried (sshd has
        closed the command's output: it dies at its next write).
        """
        if self._master is None or self._master.returncode is not None:
            return
        ticks = int(GRACE_S * 10)
        script = ('kill -TERM -- -"$1" 2>/dev/null || exit 0; i=0; '
                  'while kill -0 -- -"$1" 2>/dev/null; do i=$((i+1)); '
                  f'[ "$i" -gt {ticks} ] && exec kill -KILL -- -"$1"; sleep 0.1; done')
        argv = ["sh", "-c", script, "end", str(pgid)]
        if self.host.sudo:
            argv = ["sudo", "-n", *argv]
        ssh = self._over_master(shlex.join(argv))
        with anyio.move_on_after(GRACE_S + CONNECT_TIMEOUT_S, shield=True) as scope:
            try:
                finished = await run_process(ssh, grace=1.0)
            except OSError as error:
                log.warning("cannot signal the remote command", host=self.name, error=str(error))
                return
            if finished.exit_code != 0:
                log.warning("cannot signal the remote command", host=self.name,
                            error=finished.stderr.text() or f"exit {finished.exit_code}")
        if scope.cancelled_caught:
            log.warning("the remote command was not confirmed ended in time", host=self.name,
                        pgid=pgid)

    async def aclose(self) -> None:
        """Close the asyncssh connection and end the master; shielded, bounded."""
        if self._connection is not None:
            self._connection.close()
            with anyio.move_on_after(_CLOSE_BOUND_S, shield=True):
                await self._connection.wait_closed()
        # The master's session is ended as any child's (end_session's bounds).
        with anyio.move_on_after(GRACE_S + KILL_BOUND_S + 2 * _CLOSE_BOUND_S, shield=True):
            await self._stack.aclose()
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None


class _Reader:
    """An anyio byte stream read the way asyncssh's streams are (``b""`` at the end)."""

    def __init__(self, stream: ByteReceiveStream) -> None:
        self._stream = stream

    async def read(self, size: int) -> bytes:
        try:
            return await self._stream.receive(size)
        except anyio.EndOfStream:
            return b""


async def drain_marked(stream: ByteReceiveStream | None, tail: Tail, pgid: list[int]) -> None:
    """Read the stderr of a ``command_argv`` ssh: the remote group id into ``pgid``, the rest
    into ``tail``."""
    if stream is not None:
        await RemoteHost._drain(_Reader(stream), LineSplitter(tail, "stderr"), pgid)


def _is_channel_refusal(error: BaseException) -> bool:
    import asyncssh

    return isinstance(error, asyncssh.ChannelOpenError)


class Remotes:
    """The hosts of one run, looked up by name."""

    def __init__(self, hosts: dict[str, RemoteHost]) -> None:
        self._hosts = hosts

    def __getitem__(self, name: str) -> RemoteHost:
        return self._hosts[name]


@asynccontextmanager
async def open_remotes(config: Config, only: Collection[str] | None = None
                       ) -> AsyncIterator[Remotes]:
    """The run's remote hosts (those named in ``only``, if given); on leaving, their
    connections and masters are closed."""
    chosen = {name: host for name, host in config.hosts.items()
              if only is None or name in only}
    if not chosen:
        yield Remotes({})
        return
    control_dir = tempfile.mkdtemp(prefix="pibackup-ssh-")
    hosts = {name: RemoteHost(name, host, control_dir) for name, host in chosen.items()}
    try:
        yield Remotes(hosts)
    finally:
        for host in hosts.values():
            await host.aclose()
        shutil.rmtree(control_dir, ignore_errors=True)


async def check_hosts(config: Config) -> dict[str, str | None]:
    """``check --connect``: per host, None if it answers ``true`` over SSH, else the problem."""
    results: dict[str, str | None] = {}
    async with open_remotes(config) as remotes:
        for name in config.hosts:
            try:
                finished = await remotes[name].run("true", {})
            except RemoteError as e:
                results[name] = str(e)
            else:
                results[name] = (None if finished.exit_code == 0
                                 else f"host {name}: `true` ended with {finished.exit_code}")
    return results
