"""The origin of a mirror (SPEC §10): the destination that ``mirror`` copies, read and never
written.

``Origin`` is what the mirror asks of it: its complete backups, whether one
is still there, the folders of one (and which are received btrfs
subvolumes), and how rsync reads it (the source argument and the options
that reach it: a local path, or ``host:path`` over ssh). ``LocalOrigin`` is a
folder on this machine (a second disk); an origin over SSH, restricted to
``pibackup-async serve --read-only PATH``, is another implementation of the
same methods.

The manifests (``.pibackup/``) are not read from the origin apart: they come
into the in-progress copy with everything else, by the same transfer, and
are read there — whatever the origin is, the mirror checks against the very
bytes it received.

Everything that reads a local origin's disk runs in a worker thread,
abandoned on cancel and after the destination's answer bound, as for the
destination itself.
"""

from __future__ import annotations

import abc
import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import anyio
import anyio.to_thread

from .checksums import MANIFEST_DIR
from .destination import ANSWER_BOUND_S, complete, scan
from .filesystems import is_subvolume
from .names import DELETING, IN_PROGRESS, parse_name

if TYPE_CHECKING:
    from collections.abc import Callable

    from .destination import Entry

T = TypeVar("T")


class OriginUnreadable(OSError):
    """The origin cannot be read (not there, not a folder, not answering): one line."""


@dataclass(frozen=True)
class OriginFolder:
    """A folder of an origin backup: a source's copy (or what a hook wrote there)."""

    name: str
    # A received btrfs subvolume (a btrfs source saved onto a btrfs destination):
    # sent with ``btrfs send`` when the mirror is btrfs too.
    subvolume: bool = False


class Origin(abc.ABC):
    """What ``mirror`` reads of the destination it copies. Nothing here writes there."""

    def __init__(self, path: str) -> None:
        # The origin's destination folder, as its own machine names it (absolute).
        self.path = path.rstrip("/") or "/"

    @property
    def label(self) -> str:
        """How the report, the log and the mail name it: ``host:path``, or the path."""
        return self.path

    async def open(self) -> None:
        """Make the origin reachable (an SSH connection); raise OriginUnreadable if not."""
        return None

    async def close(self) -> None:
        """Let go of what ``open`` took; never raises."""
        return None

    @abc.abstractmethod
    async def backups(self) -> list[Entry]:
        """Its complete backups, newest first: names exactly a backup name, real folders
        (never ``.in-progress``/``.deleting``, never a symbolic link). Raises
        OriginUnreadable."""

    @abc.abstractmethod
    async def holds(self, name: str) -> bool:
        """``name`` is still a complete backup there (the origin's retention may have
        deleted it meanwhile). Raises OriginUnreadable."""

    @abc.abstractmethod
    async def folders(self, name: str) -> list[OriginFolder]:
        """The folders of backup ``name`` (``.pibackup`` left out), sorted by name. Raises
        OriginUnreadable, FileNotFoundError when the backup is gone."""

    @abc.abstractmethod
    def rsync_source(self, name: str) -> str:
        """rsync's source argument for backup ``<name>`` of the origin (the contents of
        its folder: a trailing slash)."""

    def rsync_options(self) -> list[str]:
        """rsync's options that reach the origin (``-e`` its transport); none for a local
        folder."""
        return []

    async def btrfs_send_argv(self, name: str, folder: str, parent: str | None
                              ) -> list[str] | None:
        """The command whose stdout is ``btrfs send`` of ``<name>/<folder>`` (``-p`` the
        same folder of backup ``parent``), or None when this origin cannot send it."""
        return None


class LocalOrigin(Origin):
    """An origin folder on this machine (a second disk that travels, say)."""

    def __init__(self, path: str, answer_bound_s: float = ANSWER_BOUND_S) -> None:
        super().__init__(path)
        self.answer_bound_s = answer_bound_s

    async def _call(self, func: Callable[..., T], *args: object) -> T:
        try:
            with anyio.fail_after(self.answer_bound_s):
                return await anyio.to_thread.run_sync(func, *args, abandon_on_cancel=True)
        except TimeoutError:
            raise OriginUnreadable(f"origin {self.path} does not answer (nothing in "
                                   f"{self.answer_bound_s:g} s)") from None
        except FileNotFoundError:
            raise
        except OSError as e:
            if isinstance(e, OriginUnreadable):
                raise
            raise OriginUnreadable(f"origin {self.path} cannot be read: "
                                   f"{e.strerror or e}") from e

    async def backups(self) -> list[Entry]:
        return await self._call(_complete_backups, self.path)

    async def holds(self, name: str) -> bool:
        return await self._call(_is_folder, os.path.join(self.path, name))

    async def folders(self, name: str) -> list[OriginFolder]:
        return await self._call(_folders, os.path.join(self.path, name))

    def rsync_source(self, name: str) -> str:
        return os.path.join(self.path, name) + "/"

    async def btrfs_send_argv(self, name: str, folder: str, parent: str | None
                              ) -> list[str] | None:
        argv = ["btrfs", "send"]
        if parent is not None:
            argv += ["-p", os.path.join(self.path, parent, folder)]
        return [*argv, os.path.join(self.path, name, folder)]


def _complete_backups(path: str) -> list[Entry]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise OriginUnreadable(f"origin {path} does not exist (is its disk mounted?)") from None
    if not stat.S_ISDIR(st.st_mode):
        raise OriginUnreadable(f"origin {path} is not a folder")
    return complete(scan(path))


def _is_folder(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _folders(backup: str) -> list[OriginFolder]:
    found = []
    with os.scandir(backup) as entries:
        for entry in entries:
            if entry.name == MANIFEST_DIR or not entry.is_dir(follow_symlinks=False):
                continue
            found.append(OriginFolder(entry.name, is_subvolume(entry.path)))
    return sorted(found, key=lambda f: f.name)


def is_backup_folder_name(name: str) -> bool:
    """``name`` is exactly a backup name: no suffix (SPEC §10 copies nothing else)."""
    return not name.endswith((IN_PROGRESS, DELETING)) and parse_name(name) is not None
