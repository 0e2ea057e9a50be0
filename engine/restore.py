"""``restore``: a backup, or a file or folder of it, copied back (SPEC §7).

One rsync with the backup's own flags (``-aHAX --numeric-ids --sparse``)
from ``<destination>/<backup>/<source>[/<path>]`` into the target, local or
pushed to a host over the run's OpenSSH master. rsync's size-and-mtime check
decides what is replaced; ``--delete`` acts only inside the restored item
and never removes what the source's backups leave out (restore_filters).
The item lands under its own name; a whole source gives its contents.

PATH is looked up in the backup without following links (``lookup.find``);
every file under the item that the backup's manifest lists is hashed first
(``restore_check``) and a damaged one is left out of the rsync and named,
with the newest backup holding a good copy: the restore then fails.

Usage problems (exit 2) are found by ``parse_request`` before the lock and
before any hook, a link on the way to PATH only on the disk, under the
lock. The work itself runs under the lock, inside the backup hooks
(``command_stage.under_hooks``); ``plan_restore`` is ``--dry-run``: no
lock, no hook, nothing written.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import anyio
import structlog

from .checksums import MANIFEST_DIR
from .command_stage import find_and_use, under_hooks
from .config import SOURCE_NAME
from .destination import ANSWER_BOUND_S, complete, destination_of
from .errors import DestinationUnavailable
from .failure_text import telling_line
from .filesystems import is_within
from .heartbeat import beating
from .lookup import LATEST, LinkOnTheWay, UsageProblem, check_backup_arg, find
from .pathtext import parse_path, rsync_unescape, show_path
from .processes import Tail, describe_exit, drain, managed_process
from .remote import RemoteError, open_remotes
from .restore_check import Checked, Damage, check_item, good_copies
from .restore_filters import Rule, covered, exact_pattern, parse_rules, relative_to
from .sources.kind import kind_of
from .sources.rsync import RSYNC_BASE, run_rsync
from .threads import Progress, in_worker

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from .config import Config
    from .context import Interruption, RunContext
    from .remote import Transport
    from .report import Report

log = structlog.get_logger("pibackup.restore")

T = TypeVar("T")

# A line of ``--out-format=%i %n``: eleven change flags, a space, the name.
_ITEM = re.compile(rb"(\*deleting  |[<>ch.][fdLDS][^ ]{9}) (.*)")
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
    # The manifests' folder passes here to get the answer of a source the
    # backup does not hold (exit 1, SPEC §9), not that of a malformed name.
    if source != MANIFEST_DIR and not SOURCE_NAME.fullmatch(source):
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
                 remote: Transport | None = None, dry_run: bool = False,
                 skip: Sequence[bytes] = ()) -> list[str]:
    """The exact rsync command of the restore (``dry_run``: the listing of what it would do);
    ``skip``: files (relative to the backup) it must not write."""
    argv = [a for a in RSYNC_BASE if not (dry_run and a == "--stats")]
    if dry_run:
        argv += ["--dry-run", "--out-format=%i %n"]
    # Excluded, a damaged file is neither sent nor, under --delete, deleted
    # in the target: the target keeps what it had there.
    argv += [f"--exclude={exact_pattern(os.fsdecode(rel))}"
             for rel in (_from_top(request, path) for path in skip) if rel]
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
    # rsync resolves this path through the kernel, following links on the
    # way; lookup.find has just walked it one component at a time without
    # following any (SPEC §7). That is check-then-use: acceptable because a
    # complete backup is written by root only and not changed after its
    # rename, so no one but root could swap a link in between. The last
    # component is rsync's own (-a: -l sends a link as the link), and the
    # source's folder, followed by the trailing slash, is a real folder
    # (``locate``). No --relative, so no implied folders are looked up.
    # A trailing slash sends the source's contents; without it a file or
    # folder lands under its own name.
    origin += "/" + os.fsdecode(request.inner) if request.inner else "/"
    target = request.target.rstrip("/") + "/"
    if remote is not None:
        target = f"{remote.target}:{target}"
    return [*argv, origin, target]


def _from_top(request: Request, path: bytes) -> bytes:
    """``path`` (relative to the backup) relative to the folder rsync sends from: the
    source's for a whole source, else the item's parent; b"" for the item itself."""
    parent = os.path.dirname(request.inner)
    top = request.source.encode() + (b"/" + parent if parent else b"")
    if request.inner and path == request.source.encode() + b"/" + request.inner:
        return b""
    return path[len(top) + 1:]


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
                 ctx: RunContext, skip: list[bytes]) -> None:
    argv = restore_argv(config, request, backup, remote=remote, skip=skip)
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


async def _in_backup(config: Config, func: Callable[..., T], *args: object) -> T:
    """``func(*args, check)``, reading the backups, in a worker thread: cancellable, and
    given up (TimeoutError) once it goes ANSWER_BOUND_S without moving (a dying disk)."""
    progress = Progress(ANSWER_BOUND_S)
    with beating("manifest check", destination=config.destination), progress.scope:
        return await in_worker(func, *args, progress.check, progress=progress)
    raise TimeoutError(f"destination {config.destination} does not answer (nothing in "
                       f"{ANSWER_BOUND_S:g} s while checking the manifest)")


async def check_against_manifest(config: Config, request: Request,
                                 backup: str) -> list[Damage]:
    """The damaged files under the item (SPEC §7): hashed against the backup's manifest
    before anything is written. Empty when the backup has no manifest. Raises OSError."""
    checked: Checked | None = await _in_backup(
        config, check_item, os.path.join(config.destination, backup), request.source,
        request.inner)
    if checked is None:
        log.info("no manifest in this backup: restored without a check",
                 backup=backup, source=request.source)
        return []
    if checked.malformed:
        log.warning(f"{checked.malformed} lines of the manifest of {request.source} in "
                    f"{backup} are not sha256sum lines: the files they name are not checked")
    log.info("checked against the manifest", item=request.item, backup=backup,
             files=checked.files, damaged=len(checked.damaged))
    return checked.damaged


async def damage_lines(config: Config, request: Request, backup: str,
                       damaged: list[Damage]) -> list[str]:
    """One line per damaged file, naming the newest backup whose copy has the manifest's
    digest, if any. Raises OSError."""
    dest = destination_of(config)
    others = [e.name for e in complete(await dest.scan()) if e.name != backup]
    good = await _in_backup(config, good_copies, config.destination, others, request.source,
                            damaged)
    lines = []
    for damage in damaged:
        where = good.get(damage.path)
        elsewhere = (f"a good copy is in backup {where}" if where is not None
                     else "no backup holds a good copy")
        lines.append(f"{show_path(damage.path)} in backup {backup} is damaged "
                     f"({damage.why}): not restored; {elsewhere}")
    return lines


async def restore(config: Config, request: Request, interruption: Interruption,
                  refused: list[str] | None = None) -> Report:
    """Restore under the lock, inside the backup hooks; the report (never written) says how
    it went. A refusal found only on the disk (a link on the way, exit 2) is also added
    to ``refused``. Raises LockHeld, StateUnusable or Interrupted as ``under_hooks`` does."""

    async def work(ctx: RunContext) -> None:
        try:
            backup = await find_and_use(ctx, request.backup, request.source,
                                        request.inner or None)
        except LinkOnTheWay as e:
            if refused is not None:
                refused.append(str(e))
            ctx.fail_step(str(e))
        log.info(f"restoring from {_which(request, backup)}", item=request.item)
        try:
            damaged = await check_against_manifest(config, request, backup)
        except OSError as e:
            ctx.fail_step(f"cannot check {request.item} in backup {backup} against its "
                          f"manifest: {e.strerror or e}")
        skip = [d.path for d in damaged]
        if request.host is None:
            problem = await anyio.to_thread.run_sync(_make_local_target, request,
                                                     abandon_on_cancel=True)
            if problem is not None:
                ctx.fail_step(problem)
            await _rsync_unless_damaged(config, request, backup, None, ctx, skip)
        else:
            async with open_remotes(config) as remotes:
                host = remotes[request.host]
                try:
                    await host.ensure_master()
                except RemoteError as e:
                    ctx.fail_step(str(e))
                await _rsync_unless_damaged(config, request, backup, host.transport, ctx,
                                            skip)
        if damaged:
            await _fail_damaged(config, request, backup, damaged, ctx)

    return await under_hooks(config, interruption, "restore", request.backup, work)


async def _rsync_unless_damaged(config: Config, request: Request, backup: str,
                                remote: Transport | None, ctx: RunContext,
                                skip: list[bytes]) -> None:
    if any(not _from_top(request, path) for path in skip):
        log.warning("the item itself is damaged: nothing was written", item=request.item)
        return
    await _rsync(config, request, backup, remote, ctx, skip)


async def _fail_damaged(config: Config, request: Request, backup: str,
                        damaged: list[Damage], ctx: RunContext) -> None:
    try:
        lines = await damage_lines(config, request, backup, damaged)
    except OSError as e:
        lines = [f"{show_path(d.path)} in backup {backup} is damaged ({d.why}): not "
                 f"restored (other backups could not be searched: {e.strerror or e})"
                 for d in damaged]
    for line in lines:
        log.error(line)
    ctx.fail_step(f"restore of {request.item} from {backup} into {request.where}: "
                  f"{len(damaged)} damaged file{'s' if len(damaged) != 1 else ''} not "
                  f"restored ({'; '.join(lines)}); everything else was restored")


class PlanFailed(Exception):
    """``--dry-run`` could not list the changes (exit 1); the message says why."""


def item_line(raw: bytes) -> str | None:
    """One line of rsync's itemized listing as ``flags path`` (path through show_path)."""
    match = _ITEM.fullmatch(raw.rstrip(b"\r"))
    if match is None:
        return None
    return f"{match.group(1).decode()} {show_path(rsync_unescape(match.group(2)))}"


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
    """``--dry-run``: say which backup, the damaged files, the command, then every change
    rsync would make.

    Takes no lock and runs no hook (and still reads every file the manifest
    lists under the item). Raises LinkOnTheWay (exit 2); DestinationUnavailable,
    NotHeld or PlanFailed (exit 1: damaged files too, once listed); OSError if
    the destination cannot be read.
    """
    backup = await _find(config, request)
    emit(f"would restore {request.item} from {_which(request, backup)} "
         f"into {request.where}")
    damaged = await check_against_manifest(config, request, backup)
    lines = await damage_lines(config, request, backup, damaged) if damaged else []
    for line in lines:
        emit(f"damaged: {line}")
    skip = [d.path for d in damaged]
    whole = not any(not _from_top(request, path) for path in skip)
    count = 0
    if request.host is None:
        problem = await anyio.to_thread.run_sync(_local_target_problem, request,
                                                 abandon_on_cancel=True)
        if problem is not None:
            raise PlanFailed(problem)
        argv = restore_argv(config, request, backup, skip=skip)
        if whole:
            emit(f"would run: {_shown(argv)}")
            count = await _list_changes(
                restore_argv(config, request, backup, dry_run=True, skip=skip), emit)
    else:
        async with open_remotes(config) as remotes:
            host = remotes[request.host]
            try:
                await host.ensure_master()
            except RemoteError as e:
                raise PlanFailed(str(e)) from None
            remote = host.transport
            if whole:
                emit("would run: "
                     f"{_shown(restore_argv(config, request, backup, remote=remote, skip=skip))}")
                count = await _list_changes(
                    restore_argv(config, request, backup, remote=remote, dry_run=True,
                                 skip=skip), emit)
    emit(f"dry run: {count} changes listed; nothing was changed")
    if damaged:
        raise PlanFailed(f"{len(damaged)} damaged file{'s' if len(damaged) != 1 else ''} "
                         "would not be restored (listed above): the restore would fail")
