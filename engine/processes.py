"""The one way the engine runs a child process.

Every child gets its own session, so that it and everything it forks (rsync's
receiver and generator, a hook's background jobs, ssh) can be signalled as a
group. anyio's own clean-up kills only the direct child (NOTES pitfall 1), so
on every exit path — normal, failure, cancel, timeout — we end the whole
session ourselves, shielded: SIGTERM, a grace period, SIGKILL, a hard bound.
The one exception is a hook that exits on its own: what it started in the
background (a daemon brought back by a ``post``) is left running.

Nothing here waits forever: a process that survives SIGKILL (stuck on a dying
disk) is abandoned after a bound and remembered for the report of the run
it belongs to (``abandoned_into``).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import threading
from collections import deque
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import structlog

from .errors import CannotStart, map_errors

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
    from contextlib import AbstractContextManager
    from types import TracebackType

    from anyio.abc import ByteReceiveStream, Process

GRACE_S = 10.0
KILL_BOUND_S = 30.0
_REAP_BOUND_S = 5.0
# The longest a child takes to end once its caller gives up on it (a timeout,
# a cancel): the grace, the bound after SIGKILL, then the two bounded reaps
# (end_session's wait and managed_process's aclose).
ENDING_BOUND_S = GRACE_S + KILL_BOUND_S + 2 * _REAP_BOUND_S
_POLL_S = 0.05
TAIL_LINES = 20
# A line is kept whole up to here: an rsync message (a path of up to
# PATH_MAX, 4096, and its error after it: rsync builds each in a buffer of
# PATH_MAX + 1024) fits, so its cause at the end is never cut away.
_LINE_CAP = 8 << 10
# Big reads from a big pipe: a child printing hundreds of megabytes costs a
# few hundred wake-ups, not tens of thousands.
_READ_SIZE = 256 << 10
_PIPE_SIZE = 1 << 20

log = structlog.get_logger("pibackup.processes")

# With a parent-death signal a child dies with the engine even when the engine
# itself is SIGKILLed, so a crashed run cannot leave rsync writing into a
# folder that the next run is about to remove.
_SETPRIV = shutil.which("setpriv")

# The run a task belongs to keeps its own list of processes left behind
# (``abandoned_into``), so two runs in one process report their own; code
# outside every run (a test ending one child) shares ``_outside``.
_abandoned: ContextVar[list[str] | None] = ContextVar("pibackup_abandoned", default=None)
_outside: list[str] = []
# Abandoned pids are not waited for again when the same session is ended twice
# (pids are the kernel's, one set for the process).
_stuck: set[int] = set()


@contextmanager
def abandoned_into(lines: list[str]) -> Iterator[list[str]]:
    """Remember in ``lines`` the processes that the block (and the tasks it starts) leaves
    behind."""
    token = _abandoned.set(lines)
    try:
        yield lines
    finally:
        _abandoned.reset(token)


def take_abandoned() -> list[str]:
    """One line per process of this task's run that survived SIGKILL and was left behind;
    clears the list."""
    lines = _abandoned.get()
    if lines is None:
        lines = _outside
    taken = list(lines)
    lines.clear()
    return taken


@dataclass
class Tail:
    """The last lines of a stream, bounded in count and width."""

    limit: int = TAIL_LINES
    lines: deque[str] = field(default_factory=deque)
    dropped: int = 0

    def add(self, line: str) -> None:
        if len(line) > _LINE_CAP:
            line = line[:_LINE_CAP] + " [cut]"
        self.keep(line)

    def keep(self, line: str) -> None:
        """Add a line already bounded (the splitter says itself how much it cut)."""
        self.lines.append(line)
        if len(self.lines) > self.limit:
            self.lines.popleft()
            self.dropped += 1

    def text(self) -> str:
        head = [f"[{self.dropped} earlier lines cut]"] if self.dropped else []
        return "\n".join(head + list(self.lines))


def _debug_enabled() -> bool:
    # structlog's filtering logger answers without formatting anything; a
    # logger that cannot tell is treated as wanting every line.
    is_enabled_for = getattr(log, "is_enabled_for", None)
    return True if is_enabled_for is None else bool(is_enabled_for(logging.DEBUG))


class LineSplitter:
    """The one line splitter for every child's output, local or remote.

    Memory stays bounded whatever the child prints: the line being built is
    capped at ``_LINE_CAP`` bytes (the rest is counted, and the line says how
    much was cut), and only the lines the tail can keep are ever decoded.
    When debug logging is off, the lines of a chunk that the tail would drop
    anyway are counted with ``bytes.count`` and never looked at one by one.
    """

    def __init__(self, tail: Tail, name: str) -> None:
        self.tail = tail
        self.name = name
        self._line = bytearray()
        self._cut = 0
        self._debug = _debug_enabled()

    def feed(self, data: bytes | bytearray, end: int | None = None) -> None:
        """Take ``data[:end]`` (all of it by default)."""
        end = len(data) if end is None else end
        last = data.rfind(b"\n", 0, end)
        if last < 0:
            self._extend(data, 0, end)
            return
        pos = 0 if self._debug else self._skip(data, last)
        while pos <= last:
            newline = data.find(b"\n", pos, last + 1)
            self._extend(data, pos, newline)
            self._emit()
            pos = newline + 1
        self._extend(data, last + 1, end)

    def close(self) -> None:
        """The stream ended: a last line without a newline counts too."""
        if self._line or self._cut:
            self._emit()

    def _skip(self, data: bytes | bytearray, last: int) -> int:
        """Count away the complete lines the tail could not keep; where the kept ones start."""
        pos = last
        for _ in range(self.tail.limit):
            pos = data.rfind(b"\n", 0, pos)
            if pos < 0:
                return 0
        # ``pos`` ends the newest line to drop (the first one continues ours).
        self.tail.dropped += data.count(b"\n", 0, pos + 1)
        self._line.clear()
        self._cut = 0
        return pos + 1

    def _extend(self, data: bytes | bytearray, start: int, stop: int) -> None:
        room = _LINE_CAP - len(self._line)
        if stop - start > room:
            self._cut += stop - start - room
            stop = start + room
        if stop > start:
            self._line += data[start:stop]

    def _emit(self) -> None:
        line = self._line.decode(errors="replace").rstrip("\r")
        if self._cut:
            line = f"{line} [{self._cut} bytes cut]"
        self._line.clear()
        self._cut = 0
        self.tail.keep(line)
        if self._debug:
            log.debug("output", stream=self.name, line=line)


@dataclass
class Finished:
    """How a process ended: its exit code (negative: killed by that signal) and output tails."""

    exit_code: int
    stdout: Tail
    stderr: Tail


def _session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``.

    A zombie still answers ``kill(pid, 0)``, so /proc is read instead
    (NOTES pitfall 3).
    """
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:
            continue
        # fields: state, ppid, pgrp, session, ...
        if len(fields) > 3 and int(fields[3]) == sid and fields[0] != b"Z":
            members.append(int(entry))
    return members


def _signal_session(sid: int, members: list[int], signum: int) -> None:
    # The group first; then each member, in case one moved to another group
    # of the same session (a shell with job control does).
    for target in [-sid, *members]:
        try:
            if target < 0:
                os.killpg(-target, signum)
            else:
                os.kill(target, signum)
        except (ProcessLookupError, PermissionError):
            pass


def _group_gone(process: Process) -> bool:
    """True when the child was reaped and no process, not even a zombie, is left in its group.

    The common end of rsync, btrfs or ssh, answered by one system call instead
    of a scan of all of /proc. Once the group is empty only a process that
    moved itself to another group of the session could remain: a shell with
    job control, which none of the engine's own commands is (hooks leave their
    background alone when they exit, and a cancel, with the child alive,
    always scans). Any answer, a zombie's too (NOTES pitfall 3), means a scan.
    """
    if process.returncode is None:
        return False
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # someone else's group now holds the id: scan the session
    return False


def _live_members(sid: int) -> list[int]:
    return [pid for pid in _session_members(sid) if pid not in _stuck]


async def _until_empty(sid: int) -> None:
    # Polling: the kernel offers no event for "this session has no process
    # left" (grandchildren are not ours to wait for).
    while _live_members(sid):  # noqa: ASYNC110
        await anyio.sleep(_POLL_S)


def _command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return "?"
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")[:200] or "?"


def _abandon(members: list[int]) -> None:
    for pid in members:
        _stuck.add(pid)
        command = _command_line(pid)
        lines = _abandoned.get()
        (_outside if lines is None else lines).append(
            f"pid {pid} ({command}) did not die after SIGKILL; abandoned")
        log.error("process did not die after SIGKILL; abandoned", pid=pid, command=command)


async def end_session(process: Process, grace: float = GRACE_S,
                      kill_bound: float = KILL_BOUND_S) -> None:
    """End every process of the child's session: SIGTERM, ``grace`` seconds, SIGKILL.

    Shielded from cancellation and bounded: what is still alive
    ``kill_bound`` seconds after SIGKILL (stuck in the kernel on a dying disk)
    is logged, remembered for the run's report and left behind. The session
    id is the child's pid; while the child is unreaped or its session has
    members the id cannot be reused, so no stranger is signalled.
    """
    sid = process.pid
    with anyio.CancelScope(shield=True):
        members = [] if _group_gone(process) else _live_members(sid)
        if members:
            _signal_session(sid, members, signal.SIGTERM)
            with anyio.move_on_after(grace):
                await _until_empty(sid)
            members = _live_members(sid)
        if members:
            log.warning("process group ignored SIGTERM; sending SIGKILL", pid=sid)
            _signal_session(sid, members, signal.SIGKILL)
            with anyio.move_on_after(kill_bound):
                await _until_empty(sid)
            members = _live_members(sid)
        if members:
            _abandon(members)
        if sid in _stuck:
            return  # waiting for the stuck child would not end either
        with anyio.move_on_after(_REAP_BOUND_S):
            await process.wait()


async def drain(stream: ByteReceiveStream | None, tail: Tail, name: str) -> None:
    """Read an anyio byte stream to its end into ``tail`` (through the line splitter)."""
    if stream is None:
        return
    lines = LineSplitter(tail, name)
    async for chunk in stream:
        lines.feed(chunk)
    lines.close()


class _OutputPipe:
    """A pipe the child writes into; the engine reads it without blocking.

    The engine owns both ends (not asyncio's subprocess transport), so it can
    stop reading when it wants: after a hook's exit its background jobs may
    hold the write end for days.
    """

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.read_fd, False)
        try:
            fcntl.fcntl(self.read_fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        except OSError:
            pass  # above fs.pipe-max-size: the default size only costs more wake-ups

    def __enter__(self) -> _OutputPipe:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close_write()
        if self.read_fd >= 0:
            os.close(self.read_fd)
            self.read_fd = -1

    def close_write(self) -> None:
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    async def pump(self, lines: LineSplitter) -> None:
        """Read until every writer has closed its end (cancel to stop earlier)."""
        while True:
            await anyio.wait_readable(self.read_fd)
            if not self._read_now(lines):
                return

    def read_rest(self, lines: LineSplitter) -> None:
        """What is in the pipe now, without waiting for writers still alive."""
        self._read_now(lines)

    def _read_now(self, lines: LineSplitter) -> bool:
        """Read what the pipe holds now into ``lines``; False once every writer is gone."""
        buffer = _read_buffer()
        # A writer still alive may refill the pipe as fast as we empty it.
        budget = 2 * _PIPE_SIZE
        while budget > 0:
            try:
                count = os.readv(self.read_fd, [buffer])
            except BlockingIOError:
                return True
            if count == 0:
                return False
            lines.feed(buffer, count)
            budget -= count
        return True


_buffers = threading.local()


def _read_buffer() -> bytearray:
    """One read buffer per thread, shared by every pipe it reads.

    A read and the feeding of what it read never straddle an ``await``, and
    the splitters copy what they keep: a hundred sources at once then cost
    one buffer, not two each (0.5 MiB a source, measured at ``--jobs 100``).
    """
    buffer: bytearray | None = getattr(_buffers, "buffer", None)
    if buffer is None:
        buffer = _buffers.buffer = bytearray(_READ_SIZE)
    return buffer


@asynccontextmanager
async def managed_process(
    argv: Sequence[str],
    *,
    stdin: int = subprocess.DEVNULL,
    stdout: int = subprocess.PIPE,
    stderr: int = subprocess.PIPE,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    grace: float = GRACE_S,
    leave_background: bool = False,
) -> AsyncIterator[Process]:
    """Start ``argv`` in a new session; on leaving the block, end the whole session.

    stdin, stdout and stderr are what the caller passes: a file descriptor,
    or a pipe the block owns. Leaving it by any path — normal, error, cancel
    — ends every process of the session, shielded and bounded (SIGTERM,
    ``grace``, SIGKILL), except with ``leave_background`` once the child has
    exited on its own: then what it left running stays. Raises CannotStart
    (an OSError) if the program cannot start; under setpriv, a program that
    setpriv cannot execute shows as exit code 126 or 127 instead (run_process
    tells them apart).
    """
    command = list(argv)
    if _SETPRIV is not None:
        command = [_SETPRIV, "--pdeathsig", "KILL", "--", *command]
    # Shielded: a cancel landing inside the spawn would lose the handle of a
    # child that is already running, and nothing would ever end it.
    with anyio.CancelScope(shield=True), _start_errors(argv):
        process = await anyio.open_process(
            command, stdin=stdin, stdout=stdout, stderr=stderr, env=env, cwd=cwd,
            start_new_session=True
        )
    log.debug("started", argv=list(argv), pid=process.pid)
    try:
        yield process
    finally:
        if not (leave_background and process.returncode is not None):
            await end_session(process, grace)
        if process.returncode is not None:
            # anyio's aclose waits for the child, shielded and unbounded: only
            # once it is known to be gone (an abandoned one never is).
            with anyio.move_on_after(_REAP_BOUND_S, shield=True):
                await process.aclose()


async def run_process(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    stdout_lines: int = TAIL_LINES,
    on_start: Callable[[int], None] | None = None,
    grace: float = GRACE_S,
    leave_background: bool = False,
) -> Finished:
    """Run ``argv`` to its end in a new session and return how it ended.

    Output is captured, never passed to our own stdout; the last lines are
    kept and, with debug logging on, every line goes to the debug log. When
    the child exits, whatever it left running in its session is ended too —
    unless ``leave_background`` (hooks): then it is left running, what is
    already in the pipes is read and the engine's ends are closed without
    waiting for it. If the caller is cancelled (a timeout, a failing sibling,
    a signal) the whole session is ended before this returns, in both cases.
    ``on_start`` gets the child's pid once it runs (to watch its progress).
    Raises CannotStart (an OSError) if the program cannot start.
    """
    out, err = Tail(limit=stdout_lines), Tail()
    out_lines, err_lines = LineSplitter(out, "stdout"), LineSplitter(err, "stderr")
    with _OutputPipe() as out_pipe, _OutputPipe() as err_pipe:
        async with managed_process(argv, stdout=out_pipe.write_fd, stderr=err_pipe.write_fd,
                                   env=env, cwd=cwd, grace=grace,
                                   leave_background=leave_background) as process:
            out_pipe.close_write()
            err_pipe.close_write()
            if on_start is not None:
                on_start(process.pid)
            async with anyio.create_task_group() as tg:
                tg.start_soon(out_pipe.pump, out_lines)
                tg.start_soon(err_pipe.pump, err_lines)
                await process.wait()
                if not leave_background:
                    await end_session(process, grace)
                # Whoever still holds the write ends (a hook's daemon, a child
                # abandoned in the kernel) is not waited for.
                tg.cancel_scope.cancel()
            out_pipe.read_rest(out_lines)
            err_pipe.read_rest(err_lines)
    out_lines.close()
    err_lines.close()
    code = process.returncode
    assert code is not None
    refused = _setpriv_refused(argv, code, out, err)
    if refused is not None:
        raise refused
    return Finished(exit_code=code, stdout=out, stderr=err)


def _cannot_start(argv: Sequence[str], cause: OSError | None, strerror: str) -> CannotStart:
    return CannotStart(f"cannot start {argv[0]!r}: {strerror}", cause)


def _start_errors(argv: Sequence[str]) -> AbstractContextManager[None]:
    """The spawn's errors as CannotStart (an OSError still), naming the program."""
    return map_errors({
        OSError: lambda e: _cannot_start(argv, e if isinstance(e, OSError) else None,
                                         getattr(e, "strerror", None) or str(e)),
        # subprocess refuses a NUL byte in an argument or the environment.
        ValueError: lambda e: _cannot_start(argv, None, str(e)),
    })


# setpriv's own exit codes when it cannot execute the program (util-linux's
# EX_EXEC_ENOENT and EX_EXEC_FAILED), before which it prints one line:
# "setpriv: failed to execute <program>: <strerror>".
_EXEC_ENOENT, _EXEC_FAILED = 127, 126
_ERRNO_OF = {os.strerror(n): n for n in sorted(errno.errorcode, reverse=True)}


def _setpriv_refused(argv: Sequence[str], code: int, out: Tail, err: Tail
                     ) -> CannotStart | None:
    """CannotStart when the child that ran was setpriv failing to execute ``argv``.

    Without setpriv, Python itself would have raised that error at the spawn.
    Told from a program that exits 126 or 127 by itself by setpriv's one
    line and nothing else. The words after the program's name are the
    strerror, in the child's language: the errno is found from the English
    text where it can be (126 covers every errno but ENOENT).
    """
    if _SETPRIV is None or code not in (_EXEC_ENOENT, _EXEC_FAILED):
        return None
    if out.lines or err.dropped or len(err.lines) != 1:
        return None
    line = err.lines[0]
    program = f" {argv[0]}: "
    if not line.startswith("setpriv: ") or program not in line:
        return None
    strerror = line.rpartition(program)[2].strip()
    number = errno.ENOENT if code == _EXEC_ENOENT else _ERRNO_OF.get(strerror)
    return _cannot_start(argv, OSError(number, strerror, argv[0]), strerror)


def describe_exit(code: int) -> str:
    """``exit code 3`` or ``killed by SIGKILL``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
