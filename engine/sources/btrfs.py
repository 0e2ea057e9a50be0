"""btrfs sources: a read-only snapshot in step 3, ``send | receive`` (or rsync) in step 5.

Local snapshots live in ``<snapshot_dir>/<backup name>/<source>``: ``btrfs
receive`` names what it receives after the snapshot's own folder, so that
folder must be called like the source (NOTES pitfall 12). The newest local
snapshot whose copy is in the destination is kept as the next run's parent.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import anyio
import structlog

from ..destination import Entry, newest_holding, remove_tree
from ..filesystems import is_subvolume, same_filesystem
from ..names import parse_name
from ..processes import Tail, describe_exit, drain, managed_process, run_process
from .errors import SourceError

if TYPE_CHECKING:

    from ..config import BtrfsSource
    from ..report import Step

log = structlog.get_logger("pibackup.btrfs")


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


async def subvolume_show(path: str) -> dict[str, str]:
    """The fields of ``btrfs subvolume show`` (``UUID``, ``Received UUID``, ``Flags`` …)."""
    finished = await run_process(["btrfs", "subvolume", "show", path], stdout_lines=200)
    if finished.exit_code != 0:
        raise SourceError(f"btrfs subvolume show {path}: {finished.stderr.text() or 'failed'}")
    fields = {}
    for line in finished.stdout.lines:
        key, sep, value = line.strip().partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


async def take_snapshot(source: BtrfsSource, name: str, step: Step) -> str:
    """Step 3: a read-only snapshot of the source; returns its path."""
    problems = source_problems(source)
    if problems:
        raise SourceError(problems[0])
    target = snapshot_path(source, name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    argv = snapshot_argv(source, name)
    step.begin(argv)
    finished = await run_process(argv)
    step.exit_code = finished.exit_code
    step.stderr_tail = finished.stderr.text()
    if finished.exit_code != 0:
        raise SourceError(f"btrfs snapshot {describe_exit(finished.exit_code)}: "
                          f"{finished.stderr.text() or 'no error output'}")
    return target


def local_snapshots(source: BtrfsSource) -> list[str]:
    """Backup names that have a local snapshot of this source, newest first."""
    root = snapshot_root(source)
    try:
        names = os.listdir(root)
    except OSError:
        return []
    found = [(t, n) for n in names
             if (t := parse_name(n)) is not None
             and os.path.isdir(os.path.join(root, n, source.name))]
    return [n for _, n in sorted(found, reverse=True)]


async def find_parent(source: BtrfsSource, destination: str, previous: list[Entry]) -> str | None:
    """The local snapshot whose received copy is in the newest backup holding the source.

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
    for name in local_snapshots(source):
        candidate = snapshot_path(source, name)
        try:
            if (await subvolume_show(candidate)).get("UUID") == received:
                return candidate
        except SourceError:
            continue
    return None


def _splice_all(source: int, target: int, finished: anyio.Event) -> int:
    """Move every byte from one pipe to another in the kernel; return the count.

    Stops at end of stream, or quietly when receive is gone (its exit code
    says what happened). Sets ``finished`` last: only then may the pipes be
    closed (a closed number could be reused under a running splice).
    """
    total = 0
    try:
        while moved := os.splice(source, target, 1 << 20):
            total += moved
    except OSError:
        pass
    finally:
        anyio.from_thread.run_sync(finished.set)
    return total


async def send_receive(snapshot: str, parent: str | None, folder: str, step: Step) -> int:
    """Step 5 into btrfs: ``btrfs send [-p parent] | btrfs receive``; returns the stream size.

    Both are managed processes, ended as groups on cancel; both exit codes
    are checked, and the received subvolume must be read-only with a
    received UUID (btrbk's "garbled" check), else it is deleted.
    """
    send, receive = send_argv(snapshot, parent), receive_argv(folder)
    step.begin([*send, "|", *receive])
    send_err, receive_out, receive_err = Tail(), Tail(), Tail()
    # Two pipes joined by splice() in a thread: the stream is counted for the
    # report without passing through Python (a copy loop here cost ~40%).
    from_send, to_pump = os.pipe()
    from_pump, to_receive = os.pipe()
    size = 0
    spliced, splicing = anyio.Event(), False
    try:
        async with managed_process(send, stdout=to_pump) as sender, managed_process(
                receive, stdin=from_pump) as receiver:
            os.close(to_pump)
            os.close(from_pump)
            to_pump = from_pump = -1
            async with anyio.create_task_group() as tg:
                tg.start_soon(drain, sender.stderr, send_err, "stderr")
                tg.start_soon(drain, receiver.stdout, receive_out, "stdout")
                tg.start_soon(drain, receiver.stderr, receive_err, "stderr")
                # Abandoned on cancel: the thread ends by itself once the
                # processes are ended on leaving the block.
                splicing = True
                size = await anyio.to_thread.run_sync(
                    _splice_all, from_send, to_receive, spliced, abandon_on_cancel=True)
                os.close(to_receive)  # end of stream for receive
                to_receive = -1
                await sender.wait()
                await receiver.wait()
    finally:
        if splicing:
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await spliced.wait()
        for fd in (from_send, to_pump, from_pump, to_receive):
            if fd >= 0:
                os.close(fd)
    send_code, receive_code = sender.returncode, receiver.returncode
    assert send_code is not None and receive_code is not None
    step.exit_code = send_code or receive_code
    step.stderr_tail = "\n".join(t for t in (send_err.text(), receive_err.text()) if t)
    received = os.path.join(folder, os.path.basename(snapshot))
    problem = None
    if send_code != 0:
        problem = f"btrfs send {describe_exit(send_code)}: {send_err.text() or 'no error output'}"
    elif receive_code != 0:
        problem = (f"btrfs receive {describe_exit(receive_code)}: "
                   f"{receive_err.text() or 'no error output'}")
    else:
        info = await subvolume_show(received)
        if "readonly" not in info.get("Flags", "") or info.get("Received UUID", "-") == "-":
            problem = f"the received subvolume {received} is incomplete (not read-only or no " \
                      "received UUID)"
    if problem is not None:
        if os.path.lexists(received):
            await remove_tree(received)
        raise SourceError(problem)
    return size


async def drop_local_snapshots(source: BtrfsSource, keep: str | None) -> None:
    """Delete this source's local snapshots except the one of backup ``keep``."""
    for name in local_snapshots(source):
        if name != keep:
            await drop_snapshot(source, name)


async def drop_snapshot(source: BtrfsSource, name: str) -> None:
    """Delete one local snapshot, and its backup-name folder once empty."""
    path = snapshot_path(source, name)
    if os.path.lexists(path):
        log.info("deleting local snapshot", source=source.name, snapshot=path)
        await remove_tree(path)
    try:
        os.rmdir(os.path.dirname(path))
    except OSError:
        pass  # other sources' snapshots share it, or it is gone
