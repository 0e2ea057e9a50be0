"""An origin over SSH (SPEC §10): ``[origin] host = "piserver"``, read through a key that the
origin restricts to ``pibackup-async serve --read-only PATH``.

That key runs nothing but rsync as a sender and ``btrfs send`` (cli/serve.py),
so everything here is one of those:

- the origin's backups: ``rsync --list-only PATH/`` (one level: ``-d``);
- a backup's folders: ``--list-only`` of ``PATH/NAME/`` twice, once with
  ``-r -xx`` (which leaves out every folder on another filesystem: a btrfs
  subvolume has a device of its own) and once without; what only the second
  lists is a subvolume;
- the copies: rsync with ``-e`` the host's ssh (never ``-s``: arguments that
  travel inside rsync's protocol are past ``serve``'s check, which refuses
  them), and ``ssh … btrfs send [-p PARENT] SUBVOL`` as it is, not wrapped in
  a shell (``serve`` runs no shell).

Every session rides on one OpenSSH master per mirror run (``remote``), so
the key's login happens once and the host key is verified as for any host.

``check --connect`` reads the origin and then asks it to accept a dry-run
push: a key that can do that is not restricted (``write_probe``).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import tempfile
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from .checksums import MANIFEST_DIR
from .destination import Entry
from .errors import CannotStart
from .failure_text import telling_line
from .mirror_origin import (
    LocalOrigin,
    Origin,
    OriginFolder,
    OriginUnreadable,
    is_backup_folder_name,
)
from .names import parse_name
from .pathtext import rsync_unescape
from .processes import describe_exit, run_process
from .remote import (
    RemoteError,
    RemoteHost,
    rsync_target,
    ssh_options,
    ssh_target,
    transport,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from .config import Config, Host
    from .processes import Finished

# A listing's lines: the top of an origin (its backups) or of one backup (its
# folders); more than this is not a destination of ours.
_LISTING_LINES = 200_000
# rsync --list-only: "drwxr-xr-x          4,096 2024/05/01 03:00:00 NAME".
_LISTED = re.compile(r"^(?P<type>\S)\S*\s+[\d,.]+\s+\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (?P<name>.*)$")
# rsync writes a byte it will not print as \#ooo (octal).
# What serve says when it refuses: the one line that tells.
_SERVE_SAID = "pibackup-async serve: "
# Where check --connect's dry-run push would go (nothing is written: a dry run).
WRITE_PROBE = ".pibackup-write-probe"


def origin_of(config: Config) -> Origin:
    """The configured ``[origin]``: over SSH with ``host``, else a local folder."""
    settings = config.origin
    if settings is None:
        raise ValueError("the configuration has no [origin]")
    if settings.host is None:
        return LocalOrigin(settings.path)
    return SshOrigin(settings.host, config.hosts[settings.host], settings.path)


class SshOrigin(Origin):
    """An origin on another machine, read over SSH through its ``serve --read-only`` key."""

    def __init__(self, name: str, host: Host, path: str) -> None:
        super().__init__(path)
        self.name = name
        self.host = host
        self._control_dir: str | None = None
        self._remote: RemoteHost | None = None

    @property
    def label(self) -> str:
        return f"{self.name}:{self.path}"

    async def open(self) -> None:
        if self._remote is not None:
            return
        self._control_dir = tempfile.mkdtemp(prefix="pibackup-ssh-")
        self._remote = RemoteHost(self.name, self.host, self._control_dir)
        try:
            await self._remote.ensure_master()
        except RemoteError as e:
            raise OriginUnreadable(f"origin {self.label} cannot be read: {e}") from e

    async def close(self) -> None:
        remote, self._remote = self._remote, None
        if remote is not None:
            await remote.aclose()
        if self._control_dir is not None:
            shutil.rmtree(self._control_dir, ignore_errors=True)
            self._control_dir = None

    @property
    def _shell(self) -> str:
        if self._remote is None:
            # Not open (a dry-run's printed command): a connection of its own.
            return transport(self.host, "none").shell
        return self._remote.transport.shell

    @asynccontextmanager
    async def _opened(self) -> AsyncIterator[None]:
        """Open for the block, unless it already is (then it stays open)."""
        if self._remote is not None:
            yield
            return
        await self.open()
        try:
            yield
        finally:
            await self.close()

    def rsync_options(self) -> list[str]:
        return ["-e", self._shell]

    def _remote_path(self, *parts: str) -> str:
        path = "/".join([self.path.rstrip("/"), *(p.strip("/") for p in parts if p)])
        return f"{rsync_target(self.host)}:{path}"

    def rsync_source(self, name: str) -> str:
        return self._remote_path(name) + "/"

    async def btrfs_send_argv(self, name: str, folder: str, parent: str | None
                              ) -> list[str] | None:
        send = ["btrfs", "send"]
        if parent is not None:
            send += ["-p", os.path.join(self.path, parent, folder)]
        send.append(os.path.join(self.path, name, folder))
        # As it is: serve splits it as a shell would and runs no shell.
        control = "none" if self._remote is None else self._remote.control_path
        return ["ssh", *ssh_options(self.host, control),
                "-o", "ControlMaster=no", "-T", ssh_target(self.host), shlex.join(send)]

    # --- listings ----------------------------------------------------------------------

    async def _list(self, options: list[str], *parts: str) -> Finished:
        argv = ["rsync", "--list-only", *options, "-e", self._shell,
                self._remote_path(*parts).rstrip("/") + "/"]
        try:
            return await run_process(argv, stdout_lines=_LISTING_LINES)
        except CannotStart as e:
            raise OriginUnreadable(f"origin {self.label} cannot be read: {e}") from e

    def _unreadable(self, finished: Finished, what: str) -> OriginUnreadable:
        served = [line for line in finished.stderr.lines if line.startswith(_SERVE_SAID)]
        said = served[-1] if served else telling_line(finished.stderr.lines)
        return OriginUnreadable(f"origin {self.label}: cannot list {what}: rsync "
                                f"{describe_exit(finished.exit_code)}: {said or 'no output'}")

    async def backups(self) -> list[Entry]:
        async with self._opened():
            finished = await self._list(["-d"])
        if finished.exit_code != 0:
            if _missing(finished):
                raise OriginUnreadable(f"origin {self.label} does not exist (is its disk "
                                       "mounted there?)")
            raise self._unreadable(finished, "its backups")
        entries = []
        for kind, name in _listed(finished):
            moment = parse_name(name)
            if kind == "d" and moment is not None and is_backup_folder_name(name):
                entries.append(Entry(name, "complete", moment))
        entries.sort(key=lambda e: (e.time, e.name), reverse=True)
        return entries

    async def holds(self, name: str) -> bool:
        # The origin's top folder is a few dozen names: listing it is the one
        # check that a link or a half-deleted backup cannot fool.
        return any(entry.name == name for entry in await self.backups())

    async def folders(self, name: str) -> list[OriginFolder]:
        async with self._opened():
            every = await self._list(["-d"], name)
            # -xx leaves out every folder on another filesystem than the backup's:
            # a received btrfs subvolume is one (its own device number).
            same = await self._list(["-r", "-xx", "--exclude=/*/*"], name)
        if every.exit_code != 0:
            if _missing(every):
                raise FileNotFoundError(f"origin {self.label}: {name} is gone")
            raise self._unreadable(every, name)
        if same.exit_code != 0:
            if _missing(same):
                raise FileNotFoundError(f"origin {self.label}: {name} is gone")
            raise self._unreadable(same, name)
        on_same = {n for kind, n in _listed(same) if kind == "d"}
        return [OriginFolder(n, n not in on_same)
                for n in sorted(n for kind, n in _listed(every)
                                if kind == "d" and n not in (".", MANIFEST_DIR))]

    # --- check --connect ---------------------------------------------------------------

    async def write_probe(self) -> str | None:
        """The problem when the origin accepts a dry-run push (its key can write), else None.

        Nothing is written either way: rsync's receiver changes nothing in a
        dry run, and a restricted key never gets that far.
        """
        empty = tempfile.mkdtemp(prefix="pibackup-probe-")
        try:
            async with self._opened():
                argv = ["rsync", "--dry-run", "-r", "-e", self._shell, empty + "/",
                        self._remote_path(WRITE_PROBE) + "/"]
                finished = await run_process(argv)
        finally:
            os.rmdir(empty)
        if finished.exit_code != 0:
            return None
        return (f"origin {self.label}: its key can write there (a dry-run push to "
                f"{self.path}/{WRITE_PROBE} was accepted): restrict it in the origin's "
                f"authorized_keys to command=\"pibackup-async serve --read-only {self.path}\""
                ",restrict (README: 3-2-1 in practice)")


def _missing(finished: Finished) -> bool:
    return finished.exit_code == 23 and "No such file or directory" in finished.stderr.text()


def _listed(finished: Finished) -> list[tuple[str, str]]:
    """(type letter, name) of every entry of a ``--list-only`` output."""
    found = []
    for line in finished.stdout.lines:
        match = _LISTED.match(line)
        if match is None:
            continue
        kind, name = match.group("type"), match.group("name")
        if kind == "l":
            name = name.partition(" -> ")[0]
        raw = rsync_unescape(name.encode())
        found.append((kind, os.fsdecode(raw)))
    return found


async def check_origin(config: Config) -> list[str]:
    """``check --connect`` on a mirror: why the origin cannot be read, or why its key is not
    restricted (SPEC §10); empty when neither."""
    origin = origin_of(config)
    try:
        await origin.open()  # one login for the listing and the probe
        await origin.backups()
        if isinstance(origin, SshOrigin):
            problem = await origin.write_probe()
            return [] if problem is None else [problem]
        return []
    except OriginUnreadable as e:
        return [str(e)]
    finally:
        await origin.close()
