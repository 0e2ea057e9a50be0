"""A mirror's copy of a received btrfs subvolume: ``btrfs send [-p] | btrfs receive`` (SPEC §10).

A backup folder that the origin holds as a received subvolume (a btrfs
source saved onto a btrfs destination) is sent into the mirror's
``<name>.in-progress/`` when the mirror is btrfs too; onto any other
filesystem the mirror copies it with rsync like any folder. The stream is
the origin's (``Origin.btrfs_send_argv``: a local ``btrfs send``, or an
``ssh`` to ``serve --read-only`` there), received here, joined by the btrfs
source's relay (``sources.btrfs.send_receive``: splice, both exit codes, the
read-only and received-UUID check, a failing receive ending its send and
the other way round), throttled to ``bwlimit``.

The parent is the same folder of an earlier backup that both sides hold:
the mirror's copy is a complete received subvolume and the origin still has
that backup. ``btrfs receive`` finds its parent by received UUID; a local
origin's candidate is checked by UUID first, an origin over SSH (which
answers nothing but rsync and ``btrfs send``) is trusted, and a receive
that cannot find the parent is sent once more in full.

``btrfs receive`` names what it receives after the sent subvolume's folder
(NOTES pitfall 12): the origin's folder is already named after the source,
so the copy lands as ``<name>.in-progress/<folder>`` with nothing renamed.
A copy cut short leaves a writable subvolume without a received UUID: the
next ``mirror`` deletes it and sends it again whole (a receive cannot
continue).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import anyio
import structlog

from .destination import remove_tree
from .filesystems import subvolume_info
from .mirror_copy import CopyFailed, FolderKind, register_folder_kind
from .mirror_origin import LocalOrigin
from .remote import RemoteError
from .report import StepResult
from .sources.btrfs import Site, send_receive
from .sources.errors import SourceError

if TYPE_CHECKING:
    from collections.abc import Collection, Sequence

    from .mirror_copy import BackupCopy
    from .mirror_origin import Origin, OriginFolder

log = structlog.get_logger("pibackup.mirror")

_HERE = Site()
# What btrfs receive says when no subvolume here has the parent's received UUID.
_NO_PARENT = "cannot find parent subvolume"


def _received(path: str) -> dict[str, str] | None:
    """``path``'s subvolume fields when it is a complete received subvolume (read-only, with
    a received UUID), else None."""
    info = subvolume_info(path)
    if info is None or "readonly" not in info["Flags"] or info["Received UUID"] == "-":
        return None
    return info


def _origin_uuid(path: str) -> str | None:
    """The UUID a send of ``path`` names its subvolume by: its received UUID when it has one
    (a received copy passes the original's on), else its own."""
    info = subvolume_info(path)
    if info is None:
        return None
    return info["Received UUID"] if info["Received UUID"] != "-" else info["UUID"]


async def common_parent(origin: Origin, mirror: str, earlier: Sequence[str],
                        on_origin: Collection[str], folder: str) -> str | None:
    """The newest of ``earlier`` (the mirror's complete backups before this one, newest
    first) whose ``folder`` both sides hold: the mirror's a complete received subvolume,
    the origin still holding that backup (``on_origin``), for a local origin the same
    subvolume. None: a full send."""
    local = isinstance(origin, LocalOrigin)
    for name in earlier:
        if name not in on_origin:
            continue
        copy = os.path.join(mirror, name, folder)
        info = await anyio.to_thread.run_sync(_received, copy, abandon_on_cancel=True)
        if info is None:
            continue
        if local:
            theirs = await anyio.to_thread.run_sync(
                _origin_uuid, os.path.join(origin.path, name, folder), abandon_on_cancel=True)
            if theirs != info["Received UUID"]:
                continue
        return name
    return None


async def copy_subvolume(origin: Origin, name: str, folder: str, into: str, *,
                         parent: str | None, rate: float | None = None) -> StepResult:
    """Receive ``<name>/<folder>`` of the origin as ``into/<folder>`` (``into``: the
    mirror's ``<name>.in-progress``), incrementally on backup ``parent``'s copy when
    given; its ``bytes``: the stream's size (0 when a complete copy was already there).

    Raises SourceError (the receive failed; nothing of it is left), or RemoteError (the
    origin's connection broke).
    """
    target = os.path.join(into, folder)
    kept = await anyio.to_thread.run_sync(_received, target, abandon_on_cancel=True)
    if kept is not None:
        # A run cut after this receive had finished: it is whole.
        log.info("subvolume already received", folder=folder, backup=name)
        return StepResult(exit_code=0)
    if await anyio.Path(target).exists() or await anyio.Path(target).is_symlink():
        log.info("deleting a partly received subvolume, sent again whole", path=target)
        await remove_tree(target)
    try:
        return await _send(origin, name, folder, into, parent, rate)
    except SourceError as e:
        said = e.result.stderr_tail if e.result is not None else ""
        if parent is None or _NO_PARENT not in f"{e}\n{said}":
            raise
        log.warning("the parent is not on the mirror as the origin has it: full send",
                    folder=folder, backup=name, parent=parent)
        return await _send(origin, name, folder, into, None, rate)


async def _send(origin: Origin, name: str, folder: str, into: str, parent: str | None,
                rate: float | None) -> StepResult:
    argv = await origin.btrfs_send_argv(name, folder, parent)
    if argv is None:
        raise SourceError(f"the origin cannot send {name}/{folder} with btrfs send")
    log.info("incremental send" if parent else "full send", folder=folder, backup=name,
             parent=parent)
    # The path only names the received subvolume (its last part) and the log line.
    return await send_receive(_HERE, os.path.join(origin.path, name, folder), parent, into,
                              sender=argv, rate=rate)


class SubvolumeKind(FolderKind):
    """Received subvolumes of the origin, onto a btrfs mirror: sent, not rsynced."""

    def claims(self, copy: BackupCopy, folder: OriginFolder) -> bool:
        return folder.subvolume and copy.dest_is_btrfs

    async def copy(self, copy: BackupCopy, folders: list[OriginFolder]) -> None:
        settings = copy.config.origin
        rate = None if settings is None else settings.bwlimit_bytes
        earlier = [] if copy.previous is None else [copy.previous]
        on_origin = [n for n in earlier if await copy.origin.holds(n)]
        for folder in folders:
            parent = await common_parent(copy.origin, copy.dest.path, earlier, on_origin,
                                         folder.name)
            try:
                result = await copy_subvolume(copy.origin, copy.name, folder.name,
                                              copy.in_progress_dir, parent=parent, rate=rate)
            except (SourceError, RemoteError) as e:
                raise CopyFailed(f"{folder.name}: {e}") from e
            copy.received_bytes += result.bytes

    def plan(self, copy: BackupCopy, folders: list[OriginFolder]) -> list[str]:
        parent = "" if copy.previous is None else f" -p <{copy.previous}/…>"
        return [f"  btrfs send{parent} {copy.origin.label}/{copy.name}/{f.name} | btrfs receive "
                f"{copy.in_progress_dir}  (full send when the parent is not on both sides)"
                for f in folders]


KIND = register_folder_kind(SubvolumeKind())
