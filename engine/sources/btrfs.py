"""btrfs sources: a read-only snapshot in step 3, ``send | receive`` (or rsync) in step 5.

Local snapshots live in ``<snapshot_dir>/<backup name>/<source>``: ``btrfs
receive`` names what it receives after the snapshot's own folder, so that
folder must be called like the source (NOTES pitfall 12). The newest local
snapshot whose copy is in the destination is kept as the next run's parent.
"""

from __future__ import annotations

import os
import shlex
from typing import TYPE_CHECKING

import anyio
import structlog

from ..destination import Entry, newest_holding, remove_tree
from ..failure_text import telling_line
from ..filesystems import is_subvolume, same_filesystem, subvolume_info
from ..heartbeat import current
from ..names import parse_name
from ..processes import Finished, Tail, describe_exit, drain, managed_process, run_process
from ..remote import RemoteError, drain_marked
from .errors import SourceError

if TYPE_CHECKING:
    from ..config import BtrfsSource
    from ..heartbeat import Beat
    from ..remote import RemoteHost
    from ..report import Step

log = structlog.get_logger("pibackup.btrfs")

_REMOTE_DELETE_BOUND_S = 120.0


def snapshot_root(source: BtrfsSource) -> str:
    """``snapshot_dir``, by default ``<parent of path>/.pibackup-snapshots``."""
    if source.snapshot_dir is not None:
        return source.snapshot_dir
    return os.path.join(os.path.dirname(os.path.normpath(source.path)), ".pibackup-snapshots")


def snapshot_path(source: BtrfsSource, name: str) -> str:
    return os.path.join(snapshot_root(source), name, source.name)


def snapshot_argv(source: BtrfsSource, name: str) -> list[str]:
    return ["btrfs", "subvolume", "snapshot", "-r", source.path, snapshot_path(source, name)]


def send_argv(snapshot: str, parent: str | None) -> list[str]:
    return ["btrfs", "send", *(["-p", parent] if parent else []), snapshot]


def receive_argv(folder: str) -> list[str]:
    return ["btrfs", "receive", folder]


class Site:
    """Where a btrfs source lives: this machine, or a host reached over SSH.

    The snapshot, its listing and its deletion run there; the receive
    always runs here, into the destination.
    """

    def __init__(self, remote: RemoteHost | None = None) -> None:
        self.remote = remote

    async def run(self, argv: list[str]) -> Finished:
        if self.remote is None:
            return await run_process(argv, stdout_lines=200)
        return await self.remote.run(shlex.join(argv), {}, stdout_lines=200)

    async def snapshot_names(self, source: BtrfsSource) -> list[str]:
        """Backup names that have a snapshot of this source here, newest first."""
        root = snapshot_root(source)
        if self.remote is None:
            try:
                names = [n for n in os.listdir(root)
                         if os.path.isdir(os.path.join(root, n, source.name))]
            except OSError:
                return []
        else:
            script = (f"cd {shlex.quote(root)} 2>/dev/null || exit 0; "
                      f"for d in */{shlex.quote(source.name)}; do "
                      '[ -d "$d" ] && echo "${d%%/*}"; done; exit 0')
            finished = await self.remote.run(script, {}, stdout_lines=10_000)
            names = list(finished.stdout.lines)
        found = [(t, n) for n in names if (t := parse_name(n)) is not None]
        return [n for _, n in sorted(found, reverse=True)]

    async def make_folder(self, path: str) -> None:
        if self.remote is None:
            os.makedirs(path, exist_ok=True)
            return
        finished = await self.run(["mkdir", "-p", path])
        if finished.exit_code != 0:
            raise SourceError(f"mkdir {path}: {telling_line(finished.stderr.lines) or 'failed'}")

    async def delete_snapshot(self, path: str) -> None:
        """Delete a snapshot subvolume, then its backup-name folder once empty."""
        if self.remote is None:
            if os.path.lexists(path):
                await remove_tree(path)
            try:
                os.rmdir(os.path.dirname(path))
            except OSError:
                pass  # other sources' snapshots share it, or it is gone
            return
        # Shielded so that a cancel does not leave half the clean-up, bounded
        # so that a host that stopped answering cannot hold the run.
        with anyio.move_on_after(_REMOTE_DELETE_BOUND_S, shield=True) as scope:
            finished = await self.run(["btrfs", "subvolume", "delete", path])
            if finished.exit_code != 0:
                log.error("remote snapshot not deleted", snapshot=path,
                          error=finished.stderr.text())
            await self.run(["sh", "-c", 'rmdir "$1" 2>/dev/null; exit 0', "rmdir",
                            os.path.dirname(path)])
        if scope.cancelled_caught:
            log.error("remote snapshot deletion did not finish in time", snapshot=path,
                      bound_s=_REMOTE_DELETE_BOUND_S)


def source_problems(source: BtrfsSource) -> list[str]:
    """Why this source cannot be snapshotted here, if it cannot (empty when fine)."""
    if not os.path.exists(source.path):
        return [f"{source.path} does not exist"]
    if not is_subvolume(source.path):
        return [f"{source.path} is not a btrfs subvolume"]
    root = snapshot_root(source)
    if not same_filesystem(root, source.path):
        return [f"snapshot_dir {root} is not on the same btrfs filesystem as {source.path}"]
    return []


async def subvolume_show(path: str, site: Site | None = None) -> dict[str, str]:
    """The fields of ``btrfs subvolume show`` (``UUID``, ``Received UUID``, ``Flags`` …).

    Here, by one ioctl where the kernel answers it (the three fields the
    engine reads); on a remote host, or failing that, by the command.
    """
    if site is None or site.remote is None:
        info = await anyio.to_thread.run_sync(subvolume_info, path, abandon_on_cancel=True)
        if info is not None:
            return info
    finished = await (site or _HERE).run(["btrfs", "subvolume", "show", path])
    if finished.exit_code != 0:
        raise SourceError(f"btrfs subvolume show {path}: "
                          f"{telling_line(finished.stderr.lines) or 'failed'}")
    fields = {}
    for line in finished.stdout.lines:
        key, sep, value = line.strip().partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


async def take_snapshot(site: Site, source: BtrfsSource, name: str, step: Step) -> str:
    """Step 3: a read-only snapshot of the source; returns its path."""
    if site.remote is None:
        problems = source_problems(source)
        if problems:
            raise SourceError(problems[0])
    target = snapshot_path(source, name)
    await site.make_folder(os.path.dirname(target))
    argv = snapshot_argv(source, name)
    step.begin(argv)
    finished = await site.run(argv)
    step.exit_code = finished.exit_code
    step.stderr_tail = finished.stderr.text()
    if finished.exit_code != 0:
        raise SourceError(f"btrfs snapshot {describe_exit(finished.exit_code)}: "
                          f"{telling_line(finished.stderr.lines) or 'no error output'}")
    return target


async def find_parent(site: Site, source: BtrfsSource, destination: str,
                      previous: list[Entry]) -> str | None:
    """The snapshot whose received copy is in the newest backup holding the source.

    Matched by UUID against the copy's ``Received UUID`` (a name match alone
    could pair a snapshot with a copy made from another one). None: full send.
    """
    copy = newest_holding(destination, previous, source.name)
    if copy is None or not is_subvolume(copy):
        return None
    try:
        received = (await subvolume_show(copy)).get("Received UUID", "-")
    except SourceError:
        return None
    if received in ("", "-"):
        return None
    for name in await site.snapshot_names(source):
        candidate = snapshot_path(source, name)
        try:
            if (await subvolume_show(candidate, site)).get("UUID") == received:
                return candidate
        except SourceError:
            continue
    return None


def _splice_all(source: int, target: int, finished: anyio.Event, beat: Beat | None) -> int:
    """Move every byte from one pipe to another in the kernel; return the count.

    Stops at end of stream, or quietly when receive is gone (its exit code
    says what happened). The count so far goes to the running step's
    heartbeat after every call (a plain attribute write). Sets ``finished``
    last: only then may the pipes be closed (a closed number could be reused
    under a running splice).
    """
    total = 0
    try:
        while moved := os.splice(source, target, 1 << 20):
            total += moved
            if beat is not None:
                beat.bytes = total
    except OSError:
        pass
    finally:
        anyio.from_thread.run_sync(finished.set)
    return total


async def send_receive(site: Site, snapshot: str, parent: str | None, folder: str,
                       step: Step) -> int:
    """Step 5 into btrfs: ``btrfs send [-p parent] | btrfs receive``; returns the stream size.

    The send runs where the source lives (for a host: a local ``ssh`` on the
    run's OpenSSH master), the receive here; the two are joined by
    ``splice`` (the stream never passes through Python), both are ended as
    groups on cancel (remotely too), both exit codes are checked, and the
    received subvolume must be read-only with a received UUID (btrbk's
    "garbled" check), else it is deleted. Raises SourceError, or RemoteError
    when the host's connection broke.
    """
    send, receive = send_argv(snapshot, parent), receive_argv(folder)
    step.begin([*send, "|", *receive])
    received = os.path.join(folder, os.path.basename(snapshot))
    try:
        size, send_code, send_err, receive_code, receive_err = await _stream(
            site.remote, send, receive, current())
    except RemoteError:
        if os.path.lexists(received):
            await remove_tree(received)
        raise
    step.exit_code = send_code or receive_code
    step.stderr_tail = "\n".join(t for t in (send_err, receive_err) if t)
    problem = None
    # A send that died of a broken pipe is a symptom: receive's error says why.
    if send_code != 0 and not (receive_code != 0 and send_code in _PIPE_DEATHS):
        said = telling_line(send_err.splitlines()) or "no error output"
        problem = f"btrfs send {describe_exit(send_code)}: {said}"
    elif receive_code != 0:
        said = telling_line(receive_err.splitlines()) or "no error output"
        problem = f"btrfs receive {describe_exit(receive_code)}: {said}"
    else:
        info = await subvolume_show(received)
        if "readonly" not in info.get("Flags", "") or info.get("Received UUID", "-") == "-":
            problem = (f"the received subvolume {received} is incomplete (not read-only or no "
                       "received UUID)")
    if problem is not None:
        if os.path.lexists(received):
            await remove_tree(received)
        raise SourceError(problem)
    return size


# Exit codes of a sender whose reader went away: SIGPIPE, a closed channel,
# ssh's own 255 for a remote command killed by a signal.
_PIPE_DEATHS = (-13, -1, 141, 255)
_Streamed = tuple[int, int, str, int, str]


async def _stream(remote: RemoteHost | None, send: list[str], receive: list[str],
                  beat: Beat | None) -> _Streamed:
    send_err, receive_out, receive_err = Tail(), Tail(), Tail()
    # The remote command's process group there, which a cancel ends.
    pgid: list[int] = []
    sender_argv = send if remote is None else await remote.command_argv(shlex.join(send))
    # Two pipes joined by splice() in a thread: the stream is counted for the
    # report without passing through Python.
    from_send, to_pump = os.pipe()
    from_pump, to_receive = os.pipe()
    size = 0
    spliced, splicing = anyio.Event(), False

    def close_relay_ends() -> None:
        # Once the relay has stopped, the engine must hold no end of either
        # pipe: a receive that failed then ends its send (EPIPE instead of a
        # write blocked forever on a full pipe), a send that failed ends its
        # receive (end of stream).
        nonlocal from_send, to_receive
        for fd in (from_send, to_receive):
            if fd >= 0:
                os.close(fd)
        from_send = to_receive = -1

    try:
        async with managed_process(sender_argv, stdout=to_pump) as sender, managed_process(
                receive, stdin=from_pump) as receiver:
            os.close(to_pump)
            os.close(from_pump)
            to_pump = from_pump = -1
            try:
                async with anyio.create_task_group() as tg:
                    if remote is None:
                        tg.start_soon(drain, sender.stderr, send_err, "stderr")
                    else:
                        tg.start_soon(drain_marked, sender.stderr, send_err, pgid)
                    tg.start_soon(drain, receiver.stdout, receive_out, "stdout")
                    tg.start_soon(drain, receiver.stderr, receive_err, "stderr")
                    # Abandoned on cancel: the thread ends by itself once the
                    # processes are ended on leaving the block.
                    splicing = True
                    size = await anyio.to_thread.run_sync(
                        _splice_all, from_send, to_receive, spliced, beat,
                        abandon_on_cancel=True)
                    close_relay_ends()
                    await sender.wait()
                    await receiver.wait()
            finally:
                # Ending the local ssh only closes the channel: the send there
                # would live until its next write. Its group is ended there
                # unless it has said how it exited.
                if remote is not None and pgid and sender.returncode != 0:
                    await remote.end_group(pgid[0])
    finally:
        if splicing:
            with anyio.move_on_after(10, shield=True):
                await spliced.wait()
        if not splicing or spliced.is_set():
            close_relay_ends()
        # else: a splice still runs on them (it cannot, once both children are
        # ended); leaking two descriptors beats closing them under it.
        for fd in (to_pump, from_pump):
            if fd >= 0:
                os.close(fd)
    assert sender.returncode is not None and receiver.returncode is not None
    if remote is not None and sender.returncode == 255:
        lost = await remote.lost(send_err.lines[-1] if send_err.lines else "")
        if lost is not None:
            raise lost
    return size, sender.returncode, send_err.text(), receiver.returncode, receive_err.text()


async def drop_snapshots(site: Site, source: BtrfsSource, keep: str | None) -> None:
    """Delete this source's snapshots except the one of backup ``keep``."""
    for name in await site.snapshot_names(source):
        if name != keep:
            await drop_snapshot(site, source, name)


async def drop_snapshot(site: Site, source: BtrfsSource, name: str) -> None:
    """Delete one snapshot of this source, and its backup-name folder once empty."""
    log.info("deleting snapshot", source=source.name, snapshot=snapshot_path(source, name))
    await site.delete_snapshot(snapshot_path(source, name))


_HERE = Site()
