"""``restore``: a backup, or a file or folder of it, copied back (SPEC §7).

One rsync with the backup's own flags (``-aHAX --numeric-ids --sparse``)
from ``<destination>/<backup>/<source>[/<path>]`` into the target, local or
pushed to a host over the run's OpenSSH master. rsync's size-and-mtime check
decides what is replaced; ``--delete`` acts only inside the restored item
and never removes what the source's backups leave out (restore_filters).
The item lands under its own name; a whole source gives its contents.

Usage problems (exit 2) are found by ``parse_request`` before the lock and
before any hook. The work itself runs under the lock, inside the backup
hooks (``command_stage.under_hooks``); ``plan_restore`` is ``--dry-run``:
no lock, no hook, nothing written.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import structlog

from .command_stage import find_and_use, under_hooks
from .config import SOURCE_NAME
from .destination import destination_of
from .errors import DestinationUnavailable
from .failure_text import telling_line
from .filesystems import is_within
from .heartbeat import beating
from .lookup import LATEST, UsageProblem, check_backup_arg, find
from .pathtext import parse_path, show_path
from .processes import Tail, describe_exit, drain, managed_process
from .remote import RemoteError, open_remotes
from .restore_filters import Rule, covered, parse_rules, relative_to
from .sources.kind import kind_of
from .sources.rsync import RSYNC_BASE, run_rsync

if TYPE_CHECKING:
    from collections.abc import Callable

    from .config import Config
    from .context import Interruption, RunContext
    from .remote import Transport
    from .report import Report

log = structlog.get_logger("pibackup.restore")

# A line of ``--out-format=%i %n``: eleven change flags, a space, the name.
_ITEM = re.compile(rb"(\*deleting  |[<>ch.][fdLDS][^ ]{9}) (.*)")
_ESCAPE = re.compile(rb"\\#([0-7]{3})")
_LINE_CAP = 64 << 10


@dataclass(frozen=True)
class Request:
    """What to restore, where to, checked (``parse_request``)."""

    backup: str  # a backup name or "latest"
    source: str
    inner: bytes  # the path inside the source; b"" for the whole source
    target: str  # local: absolute; remote: the path on the host
    host: str | None
    delete: bool
    protect: tuple[Rule, ...]

    @property
    def item(self) -> str:
        """``source[/path]`` as the user reads it."""
        return self.source + ("/" + show_path(self.inner) if self.inner else "")

    @property
    def where(self) -> str:
        return f"{self.host}:{self.target}" if self.host else self.target

    def landing(self) -> str:
        """The folder or file in the target that the restore replaces and may delete in."""
        if not self.inner:
            return self.target
        return os.path.join(self.target, os.fsdecode(os.path.basename(self.inner)))


def _split_item(item: str) -> tuple[str, bytes]:
    source, _, rest = item.partition("/")
    if not SOURCE_NAME.fullmatch(source):
        raise UsageProblem(f"{source!r} is not a source name (the first part of "
                           "SOURCE[/PATH], as in data/photos/a.jpg)")
    try:
        raw = parse_path(rest)
    except ValueError as e:
        raise UsageProblem(f"PATH: {e}") from None
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise UsageProblem(f"PATH {rest!r} has '..': name a file or folder inside the source")
    return source, b"/".join(parts)


def _split_target(config: Config, to: str) -> tuple[str | None, str]:
    head, colon, tail = to.partition(":")
    if not colon or "/" in head or not head:
        return None, os.path.abspath(to)
    if head not in config.hosts:
        raise UsageProblem(f"TARGET {to!r}: no host {head!r} in [hosts] (a local path "
                           f"with a colon is written ./{to})")
    if not tail:
        raise UsageProblem(f"TARGET {to!r} names no path on host {head}")
    return head, tail


def protect_rules(config: Config, source: str, inner: bytes) -> list[Rule]:
    """What ``--delete`` must keep, relative to the folder rsync sends the item from."""
    configured = next((s for s in config.sources if s.name == source), None)
    patterns = [] if configured is None else kind_of(configured).kept_by_restore(config,
                                                                                 configured)
    prefix = os.fsdecode(os.path.dirname(inner))
    rules: list[Rule] = []
    for pattern in patterns:
        for rule in parse_rules(pattern):
            rules += [r for r in relative_to(rule, prefix) if r not in rules]
    return rules


def _refuse_own_folders(config: Config, request: Request) -> None:
    target = os.path.realpath(request.target)
    own = {"the destination": config.destination, "state_dir": config.state_dir}
    for what, path in own.items():
        real = os.path.realpath(path)
        if is_within(target, real):
            raise UsageProblem(f"TARGET {request.target} is inside {what} {path}: refused")
    if not request.delete:
        return
    landing = os.path.realpath(request.landing())
    for what, path in own.items():
        real = os.path.realpath(path)
        if not is_within(real, landing):
            continue
        inside = os.path.relpath(real, landing)
        if request.inner:
            inside = os.path.join(os.fsdecode(os.path.basename(request.inner)), inside)
        if inside == "." or not covered(list(request.protect), inside):
            raise UsageProblem(
                f"--delete into {request.target} could remove {what} {path}, which the "
                f"backups of {request.source} do not leave out: refused")


def parse_request(config: Config, backup: str, item: str, to: str, *,
                  delete: bool) -> Request:
    """The checked request; UsageProblem (exit 2) for a malformed name, a PATH with
    ``..``, a TARGET inside the destination or state_dir, or one that ``--delete``
    could empty of them."""
    check_backup_arg(backup)
    source, inner = _split_item(item)
    host, target = _split_target(config, to)
    protect = tuple(protect_rules(config, source, inner))
    request = Request(backup, source, inner, target, host, delete, protect)
    if host is None:
        _refuse_own_folders(config, request)
    return request


def restore_argv(config: Config, request: Request, backup: str, *,
                 remote: Transport | None = None, dry_run: bool = False) -> list[str]:
    """The exact rsync command of the restore (``dry_run``: the listing of what it would do)."""
    argv = [a for a in RSYNC_BASE if not (dry_run and a == "--stats")]
    if dry_run:
        argv += ["--dry-run", "--out-format=%i %n"]
    if request.delete:
        argv.append("--delete")
        argv += [f"--filter=P {rule.text()}" for rule in request.protect]
    if remote is not None:
        # -s: TARGET travels inside rsync's protocol, not through the remote
        # shell (which split it at spaces before rsync 3.2.4, Debian 11).
        argv += ["-e", remote.shell, "-s"]
        if remote.sudo:
            argv.append("--rsync-path=sudo -n rsync")
    origin = os.path.join(config.destination, backup, request.source)
    # A trailing slash sends the source's contents; without it a file or
    # folder lands under its own name.
    origin += "/" + os.fsdecode(request.inner) if request.inner else "/"
    target = request.target.rstrip("/") + "/"
    if remote is not None:
        target = f"{remote.target}:{target}"
    return [*argv, origin, target]


def _shown(argv: list[str]) -> str:
    return shlex.join(show_path(a) for a in argv)


def _local_target_problem(request: Request) -> str | None:
    parent = os.path.dirname(request.target.rstrip("/")) or "/"
    if not os.path.isdir(parent):
        return f"the folder above TARGET, {parent}, does not exist"
    if os.path.lexists(request.target) and not os.path.isdir(request.target):
        return f"TARGET {request.target} exists and is not a folder"
    return None


def _make_local_target(request: Request) -> str | None:
    """Why the local TARGET cannot be restored into, or None once it is a folder."""
    problem = _local_target_problem(request)
    if problem is None and not os.path.isdir(request.target):
        os.mkdir(request.target)
    return problem


async def _find(config: Config, request: Request) -> str:
    """The backup to read; NotHeld or DestinationUnavailable (exit 1) otherwise."""
    dest = destination_of(config)
    problem = await dest.problem(config.require_mountpoint)
    if problem is not None:
        raise DestinationUnavailable(problem)
    return await find(dest, request.backup, request.source, request.inner or None)


def _which(request: Request, backup: str) -> str:
    return f"backup {backup}" + (" (latest)" if request.backup == LATEST else "")


async def _rsync(config: Config, request: Request, backup: str, remote: Transport | None,
                 ctx: RunContext) -> None:
    argv = restore_argv(config, request, backup, remote=remote)
    log.info("restoring", item=request.item, backup=backup, target=request.where,
             command=_shown(argv))
    try:
        with beating("restore", item=request.item):
            finished, transferred = await run_rsync(argv)
    except anyio.get_cancelled_exc_class():
        log.warning(f"restore interrupted: {request.where} was left as far as it got; "
                    "the same command run again completes it")
        raise
    if finished.exit_code != 0:
        telling = telling_line(finished.stderr.lines) or "no error output"
        ctx.fail_step(f"restore of {request.item} from {backup} into {request.where} "
                      f"failed: rsync {describe_exit(finished.exit_code)}: {telling}; the "
                      "target was left as far as it got, the same command run again "
                      "completes it")
    log.info("restored", item=request.item, backup=backup, target=request.where,
             bytes=transferred)


async def restore(config: Config, request: Request, interruption: Interruption) -> Report:
    """Restore under the lock, inside the backup hooks; the report (never written) says how
    it went. Raises LockHeld, StateUnusable or Interrupted as ``under_hooks`` does."""

    async def work(ctx: RunContext) -> None:
        backup = await find_and_use(ctx, request.backup, request.source, request.inner or None)
        log.info(f"restoring from {_which(request, backup)}", item=request.item)
        if request.host is None:
            problem = await anyio.to_thread.run_sync(_make_local_target, request,
                                                     abandon_on_cancel=True)
            if problem is not None:
                ctx.fail_step(problem)
            await _rsync(config, request, backup, None, ctx)
            return
        async with open_remotes(config) as remotes:
            host = remotes[request.host]
            try:
                await host.ensure_master()
            except RemoteError as e:
                ctx.fail_step(str(e))
            await _rsync(config, request, backup, host.transport, ctx)

    return await under_hooks(config, interruption, "restore", request.backup, work)


class PlanFailed(Exception):
    """``--dry-run`` could not list the changes (exit 1); the message says why."""


def _unescape(name: bytes) -> bytes:
    # rsync writes every byte it will not print as \#ooo (octal), a
    # backslash before "#ooo" included, so this is exact.
    return _ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), name)


def item_line(raw: bytes) -> str | None:
    """One line of rsync's itemized listing as ``flags path`` (path through show_path)."""
    match = _ITEM.fullmatch(raw.rstrip(b"\r"))
    if match is None:
        return None
    return f"{match.group(1).decode()} {show_path(_unescape(match.group(2)))}"


async def _list_changes(argv: list[str], emit: Callable[[str], None]) -> int:
    """Run the dry-run rsync, emitting each itemized change as it comes; count them."""
    errors = Tail()
    count = 0
    async with managed_process(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(drain, proc.stderr, errors, "stderr")
                pending = b""
                async for chunk in proc.stdout:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    pending = pending[-_LINE_CAP:]
                    for raw in lines:
                        shown = item_line(raw)
                        if shown is not None:
                            emit(shown)
                            count += 1
                await proc.wait()
        except BaseExceptionGroup as group:
            # stdout closed early (``| head``): the caller stops quietly.
            if group.subgroup(BrokenPipeError) is not None:
                raise BrokenPipeError from None
            raise
    if proc.returncode != 0:
        telling = telling_line(errors.lines) or "no error output"
        raise PlanFailed(f"rsync --dry-run {describe_exit(proc.returncode or 0)}: {telling}")
    return count


async def plan_restore(config: Config, request: Request, emit: Callable[[str], None]) -> None:
    """``--dry-run``: say which backup, the command, then every change rsync would make.

    Takes no lock and runs no hook. Raises DestinationUnavailable, NotHeld or
    PlanFailed (exit 1); OSError if the destination cannot be read.
    """
    backup = await _find(config, request)
    emit(f"would restore {request.item} from {_which(request, backup)} "
         f"into {request.where}")
    if request.host is None:
        problem = await anyio.to_thread.run_sync(_local_target_problem, request,
                                                 abandon_on_cancel=True)
        if problem is not None:
            raise PlanFailed(problem)
        argv = restore_argv(config, request, backup)
        emit(f"would run: {_shown(argv)}")
        count = await _list_changes(restore_argv(config, request, backup, dry_run=True), emit)
    else:
        async with open_remotes(config) as remotes:
            host = remotes[request.host]
            try:
                await host.ensure_master()
            except RemoteError as e:
                raise PlanFailed(str(e)) from None
            remote = host.transport
            emit(f"would run: {_shown(restore_argv(config, request, backup, remote=remote))}")
            count = await _list_changes(
                restore_argv(config, request, backup, remote=remote, dry_run=True), emit)
    emit(f"dry run: {count} changes listed; nothing was changed")
