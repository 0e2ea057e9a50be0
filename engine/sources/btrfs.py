"""btrfs sources: a read-only snapshot in step 3, ``send | receive`` (or rsync) in step 5.

Local snapshots live in ``<snapshot_dir>/<backup name>/<source>``: ``btrfs
receive`` names what it receives after the snapshot's own folder, so that
folder must be called like the source (NOTES pitfall 12). The newest local
snapshot whose copy is in the destination is kept as the next run's parent.
"""

from __future__ import annotations

import os
import shlex
from typing import TYPE_CHECKING, ClassVar

import anyio
import msgspec
import structlog

from ..destination import Entry, newest_holding, remove_tree
from ..failure_text import telling_line
from ..filesystems import is_subvolume, is_within, same_filesystem, subvolume_info
from ..heartbeat import current
from ..names import parse_name
from ..processes import Finished, Tail, describe_exit, drain, managed_process, run_process
from ..remote import CONNECT_TIMEOUT_S, RemoteError, drain_marked
from ..report import StepResult, started
from .errors import SourceError
from .kind import InitChoice, SourceKind, SourcePlan, SourceWork, register
from .rsync import (
    RsyncOptions,
    asks_for_metadata,
    copy_argv,
    copy_into,
    left_out,
    write_manifest,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ..config import Config
    from ..heartbeat import Beat
    from ..remote import RemoteHost
    from .kind import DryRun, Run


class BtrfsSource(RsyncOptions, frozen=True, kw_only=True, tag="btrfs"):
    snapshot_dir: str | None = None


log = structlog.get_logger("pibackup.btrfs")

_REMOTE_DELETE_BOUND_S = 120.0
# A listing is one short exchange: as long as a connection may take, and some.
_LISTING_BOUND_S = CONNECT_TIMEOUT_S + 5


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


def _local_snapshot_names(root: str, source: str) -> list[str]:
    try:
        return [n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n, source))]
    except OSError:
        return []


def _make_folders(path: str) -> None:
    os.makedirs(path, exist_ok=True)


def _remove_if_empty(folder: str) -> None:
    try:
        os.rmdir(folder)
    except OSError:
        pass  # other sources' snapshots share it, or it is gone


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
        """Backup names that have a snapshot of this source here, newest first.

        Bounded: a host (or disk) that stops answering fails the listing
        (RemoteError, or SourceError here) instead of holding the run.
        """
        root = snapshot_root(source)
        if self.remote is None:
            with anyio.move_on_after(_LISTING_BOUND_S) as scope:
                names = await anyio.to_thread.run_sync(_local_snapshot_names, root,
                                                       source.name, abandon_on_cancel=True)
            if scope.cancelled_caught:
                raise SourceError(f"listing {root}: no answer within {_LISTING_BOUND_S:g} s")
        else:
            script = (f"cd {shlex.quote(root)} 2>/dev/null || exit 0; "
                      f"for d in */{shlex.quote(source.name)}; do "
                      '[ -d "$d" ] && echo "${d%%/*}"; done; exit 0')
            finished = await self.remote.run(script, {}, stdout_lines=10_000,
                                             bound_s=_LISTING_BOUND_S)
            names = list(finished.stdout.lines)
        found = [(t, n) for n in names if (t := parse_name(n)) is not None]
        return [n for _, n in sorted(found, reverse=True)]

    async def make_folder(self, path: str) -> None:
        if self.remote is None:
            await anyio.to_thread.run_sync(_make_folders, path, abandon_on_cancel=True)
            return
        finished = await self.run(["mkdir", "-p", path])
        if finished.exit_code != 0:
            raise SourceError(f"mkdir {path}: {telling_line(finished.stderr.lines) or 'failed'}")

    async def delete_snapshot(self, path: str) -> None:
        """Delete a snapshot subvolume, then its backup-name folder once empty."""
        if self.remote is None:
            await remove_tree(path)
            await anyio.to_thread.run_sync(_remove_if_empty, os.path.dirname(path),
                                           abandon_on_cancel=True)
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


async def take_snapshot(site: Site, source: BtrfsSource, name: str
                        ) -> tuple[str, StepResult]:
    """Step 3: a read-only snapshot of the source; returns its path and the command's result."""
    if site.remote is None:
        problems = source_problems(source)
        if problems:
            raise SourceError(problems[0])
    target = snapshot_path(source, name)
    await site.make_folder(os.path.dirname(target))
    argv = snapshot_argv(source, name)
    started(argv)
    finished = await site.run(argv)
    result = StepResult(exit_code=finished.exit_code, stderr_tail=finished.stderr.text())
    if finished.exit_code != 0:
        raise SourceError(f"btrfs snapshot {describe_exit(finished.exit_code)}: "
                          f"{telling_line(finished.stderr.lines) or 'no error output'}",
                          result=result)
    return target, result


def _received_copy(destination: str, previous: list[Entry], name: str) -> str | None:
    """The newest complete backup's copy of source ``name``, if it is a subvolume."""
    copy = newest_holding(destination, previous, name)
    return copy if copy is not None and is_subvolume(copy) else None


async def find_parent(site: Site, source: BtrfsSource, destination: str,
                      previous: list[Entry]) -> str | None:
    """The snapshot whose received copy is in the newest backup holding the source.

    Matched by UUID against the copy's ``Received UUID`` (a name match alone
    could pair a snapshot with a copy made from another one). None: full send.
    """
    copy = await anyio.to_thread.run_sync(_received_copy, destination, previous, source.name,
                                          abandon_on_cancel=True)
    if copy is None:
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


async def send_receive(site: Site, snapshot: str, parent: str | None, folder: str
                       ) -> StepResult:
    """Step 5 into btrfs: ``btrfs send [-p parent] | btrfs receive``; its bytes: the stream size.

    The send runs where the source lives (for a host: a local ``ssh`` on the
    run's OpenSSH master), the receive here; the two are joined by
    ``splice`` (the stream never passes through Python), both are ended as
    groups on cancel (remotely too), both exit codes are checked, and the
    received subvolume must be read-only with a received UUID (btrbk's
    "garbled" check), else it is deleted. Raises SourceError, or RemoteError
    when the host's connection broke.
    """
    send, receive = send_argv(snapshot, parent), receive_argv(folder)
    started([*send, "|", *receive])
    received = os.path.join(folder, os.path.basename(snapshot))
    try:
        size, send_code, send_err, receive_code, receive_err = await _stream(
            site.remote, send, receive, current())
    except RemoteError:
        await remove_tree(received)
        raise
    result = StepResult(exit_code=send_code or receive_code,
                        stderr_tail="\n".join(t for t in (send_err, receive_err) if t),
                        bytes=size)
    problem = None
    # A send that died of a broken pipe is a symptom: receive's error says why.
    if send_code != 0 and not (receive_code != 0 and send_code in _PIPE_DEATHS):
        said = telling_line(send_err.splitlines()) or "no error output"
        problem = f"btrfs send {describe_exit(send_code)}: {said}"
    elif receive_code != 0:
        said = telling_line(receive_err.splitlines()) or "no error output"
        problem = f"btrfs receive {describe_exit(receive_code)}: {said}"
    else:
        try:
            info = await subvolume_show(received)
        except SourceError as e:
            raise SourceError(str(e), result=result) from e
        if "readonly" not in info.get("Flags", "") or info.get("Received UUID", "-") == "-":
            problem = (f"the received subvolume {received} is incomplete (not read-only or no "
                       "received UUID)")
    if problem is not None:
        await remove_tree(received)
        raise SourceError(problem, result=result)
    return result


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
    # report without passing through Python. Made inside the try: if the
    # second cannot be made (out of descriptors), the first is closed.
    from_send = to_pump = from_pump = to_receive = -1
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
        from_send, to_pump = os.pipe()
        from_pump, to_receive = os.pipe()
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


# --- the btrfs kind -------------------------------------------------------------------


class BtrfsWork(SourceWork[BtrfsSource]):
    """A snapshot in the window, its copy after it; the snapshot goes or stays as a parent.

    ``bytes``: the send stream's size into a btrfs destination (the snapshot
    itself writes nothing into the backup), else what rsync's new files
    take on disk.
    """

    def __init__(self, run: Run, source: BtrfsSource) -> None:
        super().__init__(run, source)
        # The snapshot this run took, once taken: saved, then kept or deleted.
        self.taken: str | None = None

    @property
    def site(self) -> Site:
        # Looked up when used: the run opens its hosts after the work is built.
        host = self.source.host
        return Site(self.run.remotes[host] if host is not None else None)

    async def clean_stale(self) -> None:
        """Snapshots of crashed runs go; only the newest with a copy in the destination stays."""
        run, site = self.run, self.site
        done = {e.name for e in run.previous}
        try:
            names = await site.snapshot_names(self.source)
            keep = next((n for n in names if n in done), None) if run.dest_is_btrfs else None
            await drop_snapshots(site, self.source, keep)
        except (RemoteError, SourceError) as e:
            # An unreachable host fails its source later, in its own step.
            log.warning("stale snapshots not checked", source=self.source.name, problem=str(e))

    async def snapshot(self) -> StepResult:
        # Its bytes stay 0: the snapshot writes nothing into the backup.
        self.taken, result = await take_snapshot(self.site, self.source, self.run.name)
        return result

    async def save(self) -> StepResult:
        assert self.taken is not None, "a save follows its snapshot"
        run = self.run
        if not run.dest_is_btrfs:
            copied = await copy_into(run, self.source, from_path=self.taken)
            try:
                manifest = await write_manifest(run, self.source)
            except SourceError as e:
                raise SourceError(str(e), result=copied) from e
            return msgspec.structs.replace(copied, hashed_bytes=manifest.hashed_bytes)
        site = self.site
        parent = await find_parent(site, self.source, run.destination, run.previous)
        log.info("incremental send" if parent else "full send", parent=parent)
        return await send_receive(site, self.taken, parent, run.in_progress_dir)

    async def finish(self, *, failed: bool) -> None:
        """This run's snapshot stays as the next run's parent, and only now may the old one go.

        A failure before the rename keeps the old parent for the next run.
        """
        if self.taken is None:
            return
        run, site = self.run, self.site
        try:
            if failed:
                await drop_snapshot(site, self.source, run.name)
            else:
                await drop_snapshots(site, self.source, run.name if run.dest_is_btrfs else None)
        except (RemoteError, SourceError, OSError) as e:
            # The backup is saved; a leftover snapshot is cleaned by the next run.
            log.warning("old snapshots not deleted", source=self.source.name, problem=str(e))

    async def discard(self) -> None:
        if self.taken is None:
            return
        try:
            await drop_snapshot(self.site, self.source, self.run.name)
        except (RemoteError, SourceError, OSError) as e:
            log.warning("snapshot not deleted", source=self.source.name, problem=str(e))

    async def plan(self, dry: DryRun) -> SourcePlan:
        source = self.source
        snapshot = snapshot_path(source, dry.name)
        taken = (f"mkdir -p {shlex.quote(os.path.dirname(snapshot))}; "
                 f"{shlex.join(snapshot_argv(source, dry.name))}")
        if not dry.known:
            return SourcePlan(taken, f"btrfs send | btrfs receive into {dry.in_progress_dir} if "
                              "the destination is btrfs, else rsync from the snapshot (decided "
                              "at run time, with the parent or --link-dest)")
        if not dry.dest_is_btrfs:
            argv, _ = copy_argv(dry, source, dry.transport(source.host), from_path=snapshot)
            return SourcePlan(taken, shlex.join(argv))
        # A remote host is not contacted by a dry run: full send shown.
        parent = None if source.host else await find_parent(
            _HERE, source, dry.destination, dry.previous)
        return SourcePlan(taken, f"{shlex.join(send_argv(snapshot, parent))} | "
                          f"{shlex.join(receive_argv(dry.in_progress_dir))}"
                          f"{'' if parent else '  (full send: no parent)'}")


class BtrfsKind(SourceKind[BtrfsSource]):
    config = BtrfsSource
    path_keys = ("snapshot_dir",)
    key_hints: ClassVar[Mapping[str, str]] = {
        "exclude": "a btrfs snapshot is whole; exclude is only for rsync sources"}
    init_rank = 10  # a snapshot keeps the snapshot hooks' window short: before a copy

    def work(self, run: Run, source: BtrfsSource) -> BtrfsWork:
        return BtrfsWork(run, source)

    def check(self, source: BtrfsSource) -> tuple[list[str], list[str]]:
        return [f"path: {p}" for p in source_problems(source)], []

    def own_folders(self, source: BtrfsSource) -> list[tuple[str, str]]:
        # A remote source's snapshots are on its host, out of every local copy.
        return [] if source.host is not None else [("snapshot_dir", snapshot_root(source))]

    def asks_for_metadata(self, source: BtrfsSource) -> bool:
        # Into a destination that is not btrfs (vfat, say) rsync copies the snapshot.
        return asks_for_metadata(source)

    def kept_by_restore(self, config: Config, source: BtrfsSource) -> list[str]:
        return left_out(config, source)

    def init_choice(self, path: str, destination: str) -> InitChoice:
        if not is_subvolume(path):
            return InitChoice(fits=False)
        if is_within(os.path.realpath(destination), os.path.realpath(path)):
            return InitChoice(False, f"{path} is a btrfs subvolume, but the destination lies "
                              "inside it (refused for a btrfs source): copied with rsync, "
                              "which leaves the destination out")
        problems = source_problems(BtrfsSource(name="probe", path=path))
        if problems:
            return InitChoice(False, f"{path} is a btrfs subvolume, but {problems[0]}: copied "
                              'with rsync; for snapshots, set type = "btrfs" and a '
                              "snapshot_dir on its filesystem")
        return InitChoice(fits=True)


KIND = register(BtrfsKind())
