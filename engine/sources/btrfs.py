"""btrfs sources: a read-only snapshot in step 3, ``send | receive`` (or rsync) in step 5.

Local snapshots live in ``<snapshot_dir>/<id>/<backup name>/<source>``: ``btrfs
receive`` names what it receives after the snapshot's own folder, so that
folder must be called like the source (NOTES pitfall 12); ``<id>`` names the
destination (``destination.identify``), so that configurations backing up one
subvolume into different destinations never touch each other's snapshots. The
newest local snapshot whose copy is in the destination is kept as the next
run's parent. A parent in the layout of earlier versions,
``<snapshot_dir>/<backup name>/<source>``, is used once, then deleted, where
this destination holds that backup. ``snapshot_dir`` is read without
following symbolic links (SPEC §1): a link named like a snapshot never leads
a deletion elsewhere.
"""

from __future__ import annotations

import errno
import functools
import os
import shlex
import stat
import time
from typing import TYPE_CHECKING, ClassVar

import anyio
import msgspec
import structlog

from ..destination import Entry, newest_holding, remove_tree
from ..failure_text import telling_line
from ..filesystems import is_subvolume, is_within, same_filesystem, subvolume_info
from ..heartbeat import current
from ..names import parse_name
from ..private_dir import make_private_dir
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
    manifest_plan,
    write_manifest,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from ..config import Config
    from ..destination import Identity
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


def snapshot_folder(source: BtrfsSource, space: str | None) -> str:
    """Where the snapshots kept for one destination are: ``<snapshot_dir>/<space>``, the
    destination's id; None: ``snapshot_dir`` itself, the layout of earlier versions."""
    root = snapshot_root(source)
    return root if space is None else os.path.join(root, space)


def snapshot_path(source: BtrfsSource, space: str | None, name: str) -> str:
    return os.path.join(snapshot_folder(source, space), name, source.name)


def snapshot_argv(source: BtrfsSource, space: str, name: str) -> list[str]:
    return ["btrfs", "subvolume", "snapshot", "-r", source.path,
            snapshot_path(source, space, name)]


def send_argv(snapshot: str, parent: str | None) -> list[str]:
    return ["btrfs", "send", *(["-p", parent] if parent else []), snapshot]


def receive_argv(folder: str) -> list[str]:
    return ["btrfs", "receive", folder]


# Everything in snapshot_dir is opened with O_NOFOLLOW: a link planted there,
# named like a snapshot, must never lead root's deletion somewhere else.
_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _parts(space: str | None) -> list[str]:
    return [] if space is None else [space]


def _open_within(root: str, parts: Sequence[str]) -> int:
    """A descriptor of the folder ``root/parts…``, none of them followed if it is a link
    (OSError ELOOP or ENOTDIR); the folders above ``root`` are the configuration's own."""
    fd = os.open(root, _FOLDER)
    try:
        for part in parts:
            inner = os.open(part, _FOLDER, dir_fd=fd)
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def _not_followed(root: str, parts: Sequence[str], error: OSError) -> SourceError:
    """The line for a folder of snapshot_dir that could not be opened, naming a link on the way."""
    path = root
    for part in ["", *parts]:
        path = os.path.join(path, part) if part else path
        if os.path.islink(path):
            return SourceError(f"{path} is a symbolic link: never followed in snapshot_dir")
    if error.errno in (errno.ELOOP, errno.ENOTDIR):
        return SourceError(f"{os.path.join(root, *parts)} is not a folder (snapshot_dir)")
    return SourceError(f"{os.path.join(root, *parts)}: {error.strerror or error}")


def _holds_folder(fd: int, name: str, source: str) -> bool:
    try:
        inner = os.open(name, _FOLDER, dir_fd=fd)
    except OSError:
        return False
    try:
        return stat.S_ISDIR(os.stat(source, dir_fd=inner, follow_symlinks=False).st_mode)
    except OSError:
        return False
    finally:
        os.close(inner)


def _local_listing(root: str, parts: Sequence[str], source: str
                   ) -> tuple[list[str], list[str]]:
    """Backup names with a snapshot of ``source`` in ``root/parts…``, and the symbolic
    links there named like a backup. Nothing is followed."""
    try:
        fd = _open_within(root, parts)
    except FileNotFoundError:
        return [], []
    except OSError as e:
        raise _not_followed(root, parts, e) from e
    names, links = [], []
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                if parse_name(entry.name) is None:
                    continue
                if entry.is_symlink():
                    links.append(entry.name)
                elif entry.is_dir(follow_symlinks=False) and _holds_folder(fd, entry.name,
                                                                           source):
                    names.append(entry.name)
    finally:
        os.close(fd)
    return names, links


def _make_private_folders(root: str, parts: Sequence[str]) -> None:
    """``root`` and ``parts…`` below it, each made mode 0700 when missing, as state_dir is
    (SPEC §1); an existing folder is left as it is, a link is never followed."""
    make_private_dir(root)
    try:
        fd = _open_within(root, [])
    except OSError as e:
        raise _not_followed(root, [], e) from e
    try:
        for i, part in enumerate(parts):
            try:
                os.mkdir(part, 0o700, dir_fd=fd)
                made = True
            except FileExistsError:
                made = False
            try:
                inner = os.open(part, _FOLDER, dir_fd=fd)
            except OSError as e:
                raise _not_followed(root, parts[:i + 1], e) from e
            os.close(fd)
            fd = inner
            if made:
                os.fchmod(fd, 0o700)  # mkdir's mode is masked by the umask
    finally:
        os.close(fd)


def _local_state(root: str, parts: Sequence[str], name: str, source: str) -> str:
    """"snapshot": ``root/parts…/name/source`` is a folder reached through folders alone;
    "link": ``name`` is a symbolic link; "gone": neither."""
    try:
        fd = _open_within(root, parts)
    except FileNotFoundError:
        return "gone"
    except OSError as e:
        raise _not_followed(root, parts, e) from e
    try:
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return "gone"
        if stat.S_ISLNK(st.st_mode):
            return "link"
        return "snapshot" if _holds_folder(fd, name, source) else "gone"
    finally:
        os.close(fd)


def _unlink_or_rmdir(root: str, parts: Sequence[str], name: str, *, link: bool) -> None:
    """Unlink the symbolic link ``name`` (never what it points at), or remove the folder
    ``name`` once empty (other sources' snapshots may share it)."""
    try:
        fd = _open_within(root, parts)
    except OSError:
        return
    try:
        if link:
            if stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                os.unlink(name, dir_fd=fd)
        else:
            os.rmdir(name, dir_fd=fd)
    except OSError:
        pass  # not empty, or gone
    finally:
        os.close(fd)


# The same on a host: nothing is followed there either (exit 3: a link on the way).
_LINK_ON_THE_WAY = ('[ -L "$p" ] && { echo "$p is a symbolic link: never followed in '
                    'snapshot_dir" >&2; exit 3; }')
_REMOTE_LIST = (f'p=$1 s=$2; shift 2; {_LINK_ON_THE_WAY}; '
                f'for c do p=$p/$c; {_LINK_ON_THE_WAY}; done; '
                'cd "$p" 2>/dev/null || exit 0; '
                'for d in *; do [ -L "$d" ] || [ -L "$d/$s" ] || '
                '{ [ -d "$d/$s" ] && echo "$d"; }; done; exit 0')
_REMOTE_MAKE = (f'umask 077; p=$1; shift; mkdir -p -- "$p" || exit 1; {_LINK_ON_THE_WAY}; '
                f'for c do p=$p/$c; mkdir -- "$p" 2>/dev/null; {_LINK_ON_THE_WAY}; done; '
                '[ -d "$p" ] || { echo "$p: not a folder" >&2; exit 1; }')
_REMOTE_DELETE = (f'p=$1; shift; {_LINK_ON_THE_WAY}; '
                  f'for c do p=$p/$c; {_LINK_ON_THE_WAY}; done; '
                  '[ -d "$p" ] || exit 0; btrfs subvolume delete "$p" >/dev/null || exit 1; '
                  'rmdir "${p%/*}" 2>/dev/null; exit 0')


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

    async def _script(self, script: str, args: list[str], *, lines: int = 200,
                      bound_s: float | None = None) -> Finished:
        assert self.remote is not None
        return await self.remote.run(shlex.join(["sh", "-c", script, "sh", *args]), {},
                                     stdout_lines=lines, bound_s=bound_s)

    async def listing(self, source: BtrfsSource, space: str | None
                      ) -> tuple[list[str], list[str]]:
        """Backup names that have a snapshot of this source in ``space`` (None: the layout of
        earlier versions) here, newest first, and symbolic links named like one (only
        found here; a host's are skipped).

        Bounded: a host (or disk) that stops answering fails the listing
        (RemoteError, or SourceError here) instead of holding the run.
        """
        root = snapshot_root(source)
        links: list[str] = []
        if self.remote is None:
            with anyio.move_on_after(_LISTING_BOUND_S) as scope:
                names, links = await anyio.to_thread.run_sync(
                    _local_listing, root, _parts(space), source.name, abandon_on_cancel=True)
            if scope.cancelled_caught:
                raise SourceError(f"listing {root}: no answer within {_LISTING_BOUND_S:g} s")
        else:
            finished = await self._script(_REMOTE_LIST, [root, source.name, *_parts(space)],
                                          lines=10_000, bound_s=_LISTING_BOUND_S)
            if finished.exit_code != 0:
                raise SourceError(telling_line(finished.stderr.lines)
                                  or f"listing {root}: {describe_exit(finished.exit_code)}")
            names = list(finished.stdout.lines)
        found = [(t, n) for n in names if (t := parse_name(n)) is not None]
        return [n for _, n in sorted(found, reverse=True)], links

    async def snapshot_names(self, source: BtrfsSource, space: str | None) -> list[str]:
        """``listing``'s backup names, newest first."""
        return (await self.listing(source, space))[0]

    async def make_folders(self, source: BtrfsSource, space: str, name: str) -> None:
        """``<snapshot_dir>/<space>/<name>``, each folder made 0700 when missing, none
        reached through a link."""
        root = snapshot_root(source)
        if self.remote is None:
            await anyio.to_thread.run_sync(_make_private_folders, root, [space, name],
                                           abandon_on_cancel=True)
            return
        finished = await self._script(_REMOTE_MAKE, [root, space, name])
        if finished.exit_code != 0:
            raise SourceError(f"mkdir {os.path.join(root, space, name)}: "
                              f"{telling_line(finished.stderr.lines) or 'failed'}")

    async def delete_snapshot(self, source: BtrfsSource, space: str | None, name: str) -> None:
        """Delete a snapshot subvolume, then its backup-name folder once empty.

        A symbolic link in its place is never followed: in this destination's
        own folder it is removed as a link, in the layout of earlier versions
        (shared with other configurations) it is left.
        """
        root, parts = snapshot_root(source), _parts(space)
        path = snapshot_path(source, space, name)
        if self.remote is None:
            state = await anyio.to_thread.run_sync(_local_state, root, parts, name, source.name,
                                                   abandon_on_cancel=True)
            if state == "link":
                if space is not None:
                    log.warning("removing a symbolic link named like a snapshot (never "
                                "followed)", link=os.path.join(root, *parts, name))
                    await anyio.to_thread.run_sync(
                        functools.partial(_unlink_or_rmdir, root, parts, name, link=True),
                        abandon_on_cancel=True)
                return
            if state == "snapshot":
                await remove_tree(path)
            await anyio.to_thread.run_sync(
                functools.partial(_unlink_or_rmdir, root, parts, name, link=False),
                abandon_on_cancel=True)
            return
        # Shielded so that a cancel does not leave half the clean-up, bounded
        # so that a host that stopped answering cannot hold the run.
        with anyio.move_on_after(_REMOTE_DELETE_BOUND_S, shield=True) as scope:
            finished = await self._script(_REMOTE_DELETE, [root, *parts, name, source.name])
            if finished.exit_code != 0:
                log.error("remote snapshot not deleted", snapshot=path,
                          error=finished.stderr.text())
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


async def take_snapshot(site: Site, source: BtrfsSource, space: str, name: str
                        ) -> tuple[str, StepResult]:
    """Step 3: a read-only snapshot of the source in this destination's folder ``space``;
    returns its path and the command's result."""
    if site.remote is None:
        problems = source_problems(source)
        if problems:
            raise SourceError(problems[0])
    target = snapshot_path(source, space, name)
    await site.make_folders(source, space, name)
    argv = snapshot_argv(source, space, name)
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


async def old_parents(site: Site, source: BtrfsSource, run: Run) -> list[str]:
    """Backup names with a snapshot of the source in the layout of earlier versions that are
    this destination's: it holds a complete backup of that name with that source (SPEC §2
    step 3). Another configuration's are never among them."""
    done = {e.name for e in run.previous}
    names = [n for n in await site.snapshot_names(source, None) if n in done]
    if not names:
        return []
    held = set(await run.dest.holding(names, source.name, None))
    return [n for n in names if n in held]


async def find_parent(site: Site, source: BtrfsSource, destination: str,
                      previous: list[Entry], space: str, old: list[str]) -> str | None:
    """The snapshot whose received copy is in the newest backup holding the source: one in
    this destination's folder ``space``, or one of ``old`` in the layout of earlier versions.

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
    candidates = [snapshot_path(source, space, n)
                  for n in await site.snapshot_names(source, space)]
    for candidate in candidates + [snapshot_path(source, None, n) for n in old]:
        try:
            if (await subvolume_show(candidate, site)).get("UUID") == received:
                return candidate
        except SourceError:
            continue
    return None


def _splice_all(source: int, target: int, finished: anyio.Event, beat: Beat | None,
                rate: float | None = None) -> int:
    """Move every byte from one pipe to another in the kernel; return the count.

    ``rate`` (bytes per second) throttles the relay: a mirror's ``bwlimit``
    (SPEC §10). The thread sleeps between moves of at most a tenth of a
    second's bytes; the sender then blocks on its full pipe.

    Stops at end of stream, or quietly when receive is gone (its exit code
    says what happened). The count so far goes to the running step's
    heartbeat after every call (a plain attribute write). Sets ``finished``
    last: only then may the pipes be closed (a closed number could be reused
    under a running splice).
    """
    total = 0
    chunk = 1 << 20 if rate is None else max(4096, min(1 << 20, int(rate / 10)))
    began = time.monotonic()
    try:
        while moved := os.splice(source, target, chunk):
            total += moved
            if beat is not None:
                beat.bytes = total
            if rate is not None:
                ahead = began + total / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
    except OSError:
        pass
    finally:
        anyio.from_thread.run_sync(finished.set)
    return total


async def send_receive(site: Site, snapshot: str, parent: str | None, folder: str, *,
                       sender: list[str] | None = None, rate: float | None = None
                       ) -> StepResult:
    """Step 5 into btrfs: ``btrfs send [-p parent] | btrfs receive``; its bytes: the stream size.

    ``sender``: a ready command whose stdout is that send's stream, run here
    in its place (a mirror's ``ssh`` to ``serve --read-only``, SPEC §10: the
    forced command takes no wrapper, so no remote group is ended from here;
    the send there dies of the closed channel). ``rate``: bytes per second
    through the relay (``bwlimit``).

    The send runs where the source lives (for a host: a local ``ssh`` on the
    run's OpenSSH master), the receive here; the two are joined by
    ``splice`` (the stream never passes through Python), both are ended as
    groups on cancel (remotely too), both exit codes are checked, and the
    received subvolume must be read-only with a received UUID (btrbk's
    "garbled" check), else it is deleted. Raises SourceError, or RemoteError
    when the host's connection broke.
    """
    send, receive = sender or send_argv(snapshot, parent), receive_argv(folder)
    started([*send, "|", *receive])
    received = os.path.join(folder, os.path.basename(snapshot))
    try:
        size, send_code, send_err, receive_code, receive_err = await _stream(
            site.remote if sender is None else None, send, receive, current(), rate)
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
                  beat: Beat | None, rate: float | None = None) -> _Streamed:
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
                        _splice_all, from_send, to_receive, spliced, beat, rate,
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


async def drop_snapshots(site: Site, source: BtrfsSource, space: str, keep: str | None
                         ) -> None:
    """Delete this source's snapshots in this destination's folder ``space`` except the one
    of backup ``keep``, and the symbolic links there named like one (as links)."""
    names, links = await site.listing(source, space)
    for name in names:
        if name != keep:
            await drop_snapshot(site, source, space, name)
    for name in links:
        await site.delete_snapshot(source, space, name)


async def drop_snapshot(site: Site, source: BtrfsSource, space: str | None, name: str) -> None:
    """Delete one snapshot of this source, and its backup-name folder once empty."""
    log.info("deleting snapshot", source=source.name,
             snapshot=snapshot_path(source, space, name))
    await site.delete_snapshot(source, space, name)


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
        # The destination's id: its folder in snapshot_dir, once asked.
        self.space: str | None = None

    @property
    def site(self) -> Site:
        # Looked up when used: the run opens its hosts after the work is built.
        host = self.source.host
        return Site(self.run.remotes[host] if host is not None else None)

    async def _space(self) -> str:
        """The destination's id (SPEC §2 step 3), asked of the destination once step 1 found
        it: a backup hook's pre may have just mounted it."""
        if self.space is None:
            self.space = (await self.run.dest.identify()).id
        return self.space

    async def clean_stale(self) -> None:
        """Snapshots of crashed runs go; only the newest with a copy in the destination stays.

        Only in this destination's own folder: what is kept for another is
        none of this run's business.
        """
        run, site = self.run, self.site
        done = {e.name for e in run.previous}
        try:
            space = await self._space()
            names = await site.snapshot_names(self.source, space)
            keep = next((n for n in names if n in done), None) if run.dest_is_btrfs else None
            await drop_snapshots(site, self.source, space, keep)
        except (RemoteError, SourceError, OSError) as e:
            # An unreachable host fails its source later, in its own step.
            log.warning("stale snapshots not checked", source=self.source.name, problem=str(e))

    async def snapshot(self) -> StepResult:
        # Its bytes stay 0: the snapshot writes nothing into the backup.
        self.taken, result = await take_snapshot(self.site, self.source, await self._space(),
                                                 self.run.name)
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
            return msgspec.structs.replace(copied, hashed_bytes=manifest.hashed_bytes,
                                           bytes=manifest.bytes)
        site = self.site
        parent = await find_parent(site, self.source, run.destination, run.previous,
                                   await self._space(), await old_parents(site, self.source, run))
        log.info("incremental send" if parent else "full send", parent=parent)
        return await send_receive(site, self.taken, parent, run.in_progress_dir)

    async def finish(self, *, failed: bool) -> None:
        """This run's snapshot stays as the next run's parent, and only now may the old one go.

        A failure before the rename keeps the old parent for the next run.
        """
        if self.taken is None:
            return
        run, site = self.run, self.site
        space = await self._space()
        try:
            if failed:
                await drop_snapshot(site, self.source, space, run.name)
            else:
                await drop_snapshots(site, self.source, space,
                                     run.name if run.dest_is_btrfs else None)
                # Parents in the layout of earlier versions served once: this run's is next.
                for name in await old_parents(site, self.source, run):
                    await drop_snapshot(site, self.source, None, name)
        except (RemoteError, SourceError, OSError) as e:
            # The backup is saved; a leftover snapshot is cleaned by the next run.
            log.warning("old snapshots not deleted", source=self.source.name, problem=str(e))

    async def discard(self) -> None:
        if self.taken is None:
            return
        try:
            await drop_snapshot(self.site, self.source, await self._space(), self.run.name)
        except (RemoteError, SourceError, OSError) as e:
            log.warning("snapshot not deleted", source=self.source.name, problem=str(e))

    async def plan(self, dry: DryRun) -> SourcePlan:
        source = self.source
        space = None
        if dry.known:
            try:
                space = (await dry.dest.identify()).id
            except OSError:
                pass  # said as at run time
        snapshot = snapshot_path(source, space or "<id>", dry.name)
        taken = (f"make {os.path.dirname(snapshot)}/ (0700 where missing, no link followed); "
                 f"{shlex.join(snapshot_argv(source, space or '<id>', dry.name))}")
        if space is None:
            taken += ("  (<id> names the destination: its filesystem's UUID and its folder "
                      "there, decided at run time)")
        if not dry.known or space is None:
            return SourcePlan(taken, f"btrfs send | btrfs receive into {dry.in_progress_dir} if "
                              "the destination is btrfs, else rsync from the snapshot (decided "
                              "at run time, with the parent or --link-dest)")
        if not dry.dest_is_btrfs:
            argv, link_dest = copy_argv(dry, source, dry.transport(source.host),
                                        from_path=snapshot)
            return SourcePlan(taken, f"{shlex.join(argv)}, then "
                              f"{manifest_plan(dry, source.name, link_dest)}")
        # A remote host is not contacted by a dry run: full send shown.
        parent = None if source.host else await find_parent(
            _HERE, source, dry.destination, dry.previous, space,
            await old_parents(_HERE, source, dry))
        return SourcePlan(taken, f"{shlex.join(send_argv(snapshot, parent))} | "
                          f"{shlex.join(receive_argv(dry.in_progress_dir))}"
                          f"{'' if parent else '  (full send: no parent)'}")


class BtrfsKind(SourceKind[BtrfsSource]):
    config = BtrfsSource
    path_keys = ("snapshot_dir",)
    key_hints: ClassVar[Mapping[str, str]] = {
        "exclude": "a btrfs snapshot is whole; exclude is only for rsync sources",
        # Its path must be a subvolume, which an unmounted disk's empty folder is not.
        "require_mountpoint": "a btrfs source fails already when its subvolume is not "
        "there; require_mountpoint is only for rsync sources",
        "allow_empty": "a btrfs snapshot is whole, empty or not; allow_empty is only for "
        "rsync sources"}
    init_rank = 10  # a snapshot keeps the snapshot hooks' window short: before a copy

    def work(self, run: Run, source: BtrfsSource) -> BtrfsWork:
        return BtrfsWork(run, source)

    def check(self, source: BtrfsSource) -> tuple[list[str], list[str]]:
        return [f"path: {p}" for p in source_problems(source)], []

    def details(self, source: BtrfsSource, destination: Identity | None) -> list[str]:
        where = f" on {source.host}" if source.host else ""
        if destination is None:
            return [f"snapshot_dir: snapshots go in {snapshot_root(source)}/<id>/{where}; <id> "
                    "names the destination, which is not there now (decided at run time)"]
        return [f"snapshot_dir: snapshots go in {snapshot_folder(source, destination.id)}/"
                f"{where} (id {destination.id}: the destination's filesystem "
                f"{destination.filesystem}, folder {destination.inner} in it)"]

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
