"""The one way the engine runs a child process.

Every child gets its own session, so that it and everything it forks (rsync's
receiver and generator, a hook's background jobs, ssh) can be signalled as a
group. anyio's own clean-up kills only the direct child (NOTES pitfall 1), so
on every exit path — normal, failure, cancel, timeout — we end the whole
session ourselves, shielded: SIGTERM, a grace period, SIGKILL, a hard bound.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import structlog

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping, Sequence

    from anyio.abc import ByteReceiveStream, Process

GRACE_S = 10.0
_KILL_BOUND_S = 5.0
_POLL_S = 0.05
TAIL_LINES = 20
_LINE_CAP = 1000

log = structlog.get_logger("pibackup.processes")

# With a parent-death signal a child dies with the engine even when the engine
# itself is SIGKILLed, so a crashed run cannot leave rsync writing into a
# folder that the next run is about to remove.
_SETPRIV = shutil.which("setpriv")


@dataclass
class Tail:
    """The last lines of a stream, bounded in count and width."""

    limit: int = TAIL_LINES
    lines: deque[str] = field(default_factory=deque)
    dropped: int = 0

    def add(self, line: str) -> None:
        if len(line) > _LINE_CAP:
            line = line[:_LINE_CAP] + " [cut]"
        self.lines.append(line)
        if len(self.lines) > self.limit:
            self.lines.popleft()
            self.dropped += 1

    def text(self) -> str:
        head = [f"[{self.dropped} earlier lines cut]"] if self.dropped else []
        return "\n".join(head + list(self.lines))


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


async def _until_empty(sid: int) -> None:
    # Polling: the kernel offers no event for "this session has no process
    # left" (grandchildren are not ours to wait for).
    while _session_members(sid):  # noqa: ASYNC110
        await anyio.sleep(_POLL_S)


async def end_session(process: Process, grace: float = GRACE_S) -> None:
    """End every process of the child's session: SIGTERM, ``grace`` seconds, SIGKILL.

    Shielded from cancellation, bounded in time. The session id is the
    child's pid; while the child is unreaped or its session has members the
    id cannot be reused, so no stranger is signalled.
    """
    sid = process.pid
    with anyio.CancelScope(shield=True):
        members = _session_members(sid)
        if members:
            _signal_session(sid, members, signal.SIGTERM)
            with anyio.move_on_after(grace):
                await _until_empty(sid)
            members = _session_members(sid)
            if members:
                log.warning("process group ignored SIGTERM; sending SIGKILL", pid=sid)
                _signal_session(sid, members, signal.SIGKILL)
                with anyio.move_on_after(_KILL_BOUND_S):
                    await _until_empty(sid)
        with anyio.move_on_after(_KILL_BOUND_S):
            await process.wait()


async def drain(stream: ByteReceiveStream | None, tail: Tail, name: str) -> None:
    if stream is None:
        return
    pending = b""
    async for chunk in stream:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace").rstrip("\r")
            tail.add(line)
            log.debug("output", stream=name, line=line)
    if pending:
        line = pending.decode(errors="replace")
        tail.add(line)
        log.debug("output", stream=name, line=line)


@asynccontextmanager
async def managed_process(
    argv: Sequence[str],
    *,
    stdin: int = subprocess.DEVNULL,
    stdout: int = subprocess.PIPE,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    grace: float = GRACE_S,
) -> AsyncIterator[Process]:
    """Start ``argv`` in a new session; on leaving the block, end the whole session.

    The block owns the process's pipes (stderr is a pipe; stdin and stdout
    are what the caller passes: a file descriptor, or a pipe). Leaving it by
    any path — normal, error, cancel — ends every process of the session,
    shielded and bounded (SIGTERM, ``grace``, SIGKILL). Raises OSError if
    the program cannot start.
    """
    command = list(argv)
    if _SETPRIV is not None:
        command = [_SETPRIV, "--pdeathsig", "KILL", "--", *command]
    # Shielded: a cancel landing inside the spawn would lose the handle of a
    # child that is already running, and nothing would ever end it.
    with anyio.CancelScope(shield=True):
        process = await anyio.open_process(
            command, stdin=stdin, stdout=stdout, env=env, cwd=cwd,
            start_new_session=True
        )
    log.debug("started", argv=list(argv), pid=process.pid)
    try:
        yield process
    finally:
        await end_session(process, grace)
        with anyio.CancelScope(shield=True):
            await process.aclose()


async def run_process(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    stdout_lines: int = TAIL_LINES,
    grace: float = GRACE_S,
    leave_background: bool = False,
) -> Finished:
    """Run ``argv`` to its end in a new session and return how it ended.

    Output is captured, never passed to our own stdout; the last lines are
    kept and every line goes to the debug log. Whatever the child leaves
    running in its session when it exits is ended too, and if the caller is
    cancelled (a timeout, a failing sibling, a signal) the whole session is
    ended before this returns. Raises OSError if the program cannot start.
    """
    out, err = Tail(limit=stdout_lines), Tail()
    async with managed_process(argv, env=env, cwd=cwd, grace=grace) as process:
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, process.stdout, out, "stdout")
            tg.start_soon(drain, process.stderr, err, "stderr")
            await process.wait()
            # A background job left by a hook would hold the pipes open and
            # outlive the run: end it now.
            await end_session(process, grace)
    code = process.returncode
    assert code is not None
    return Finished(exit_code=code, stdout=out, stderr=err)


def describe_exit(code: int) -> str:
    """``exit code 3`` or ``killed by SIGKILL``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
