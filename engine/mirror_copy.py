"""One origin backup copied into the mirror (SPEC §10): ``<name>.in-progress`` by a transfer of
its own, checked against the origin's manifests; the caller flushes and renames it.

The copy goes in passes, each an rsync of this one backup (never one rsync
over several backups):

1. the whole backup, ``--link-dest`` the mirror's copy of the previous backup
   (nothing left out but folders of another kind, below: any exclude costs
   rsync work on every file);
2. the manifests (``.pibackup/``) that pass 1 may have taken from the
   previous copy (below: a manifest of the previous one's size written within
   the same second), unlinked and fetched again without ``--link-dest``;
3. the same for the files that must not be linked (below), which are known
   once the manifests are;
4. the check: every file of every source that ``.pibackup/SOURCES`` lists is
   compared with the origin's manifest (``manifest.write_manifest`` hashes it
   into a scratch file: a file linked to the previous copy takes that copy's
   digest, checked when it was made, and is not read again); what fails is
   fetched once more (``--ignore-times``, no ``--link-dest``) and checked
   again; a copy that still does not match fails.

**Which files are never linked.** rsync takes a file from its
``--link-dest`` (a hard link, or a local copy of it when only its attributes
differ) when the size and the mtime in whole seconds are the same; a file
rewritten within one timestamp tick keeps them (NOTES.md pitfall 21) and
would get its old content. Letting the check catch it would cost a read of
every such file, a warning and a second transfer, and lean on the check to
repair what the copy got wrong. So the paths whose digest differs between
the two origin manifests (the previous backup's, as the mirror holds it, and
this one's) are looked at once the manifests are in, without a read: where
the copy has the previous copy's size and mtime second, rsync may have taken
it from there, and it is fetched again (pass 3); elsewhere it came from the
origin. A changed file nearly always has a new mtime, so pass 3 rarely runs.
So are the paths ``verify`` found damaged in the mirror's previous copy (a damaged
file is never linked, SPEC §9). Backups without manifests get rsync's quick
check alone.

Folders of another kind (received btrfs subvolumes, sent by ``btrfs send``
when both sides are btrfs) are claimed by a ``FolderKind`` registered with
``register_folder_kind``; the rsync passes leave them out.

A copy cut short keeps its in-progress folder; the next ``mirror`` runs the
same passes into it again (``resumed``), so what was complete is not sent
again (rsync's quick check on what is there; ``--delete`` removes what an
interrupted rsync left that the origin does not have). Nor is the part of a
file that was on its way: rsync keeps it in ``.pibackup-partial/`` beside
where the file goes (``--partial-dir``; never under the file's own name,
where a short file could pass for the whole), and the resumed pass sends
only what that part lacks (``--no-W``: a local rsync otherwise sends whole
files, ignoring it). ``--append-verify`` would be cheaper still, but it
appends to the file in place, and that file may be a hard link shared with
the mirror's earlier, complete backups. A partial folder that a pass left
(the file it belonged to copied whole, or linked, by a later pass) is
removed before the check, so none reaches a complete backup; rsync leaves
the origin's own folders of that name out (an unlikely name in a backup: a
listed file there is then missing, and the check fails the copy, loudly).
"""

from __future__ import annotations

import abc
import contextlib
import functools
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio.from_thread
import structlog

from .allocated import written_bytes
from .checksums import MANIFEST_DIR, manifest_path, sources_path
from .damaged import load as load_damaged
from .destination import ANSWER_BOUND_S
from .failure_text import telling_line
from .heartbeat import current
from .manifest import write_manifest
from .manifest_pairs import Unordered, differing
from .names import IN_PROGRESS
from .pathtext import parse_path
from .processes import describe_exit
from .sources.relink import lstat_in
from .sources.rsync import RSYNC_BASE, run_rsync
from .threads import in_worker
from .verify import sorted_manifest

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable, Iterator
    from typing import BinaryIO

    from .config import Config
    from .destination import Destination
    from .mirror_origin import Origin, OriginFolder

log = structlog.get_logger("pibackup.mirror")

# rsync exit codes that still leave a copy to judge: 24, files vanished on the
# origin while it was read (its retention deleting the backup: then it is
# dropped; otherwise the manifest check decides).
_OK_CODES = (0, 24)
_BYTES = re.compile(r"Total bytes (sent|received): ([\d,.]+)")
# The longest list of paths given on rsync's command line rather than in a file.
SCRATCH_PREFIX = "mirror-"
# Where rsync keeps the part of a file it was cut in, relative to the file's folder.
PARTIAL_DIR = ".pibackup-partial"


class CopyFailed(Exception):
    """The copy of one backup failed (its in-progress folder stays, for a resume or a
    removal): one line saying why."""


class CopyMismatch(CopyFailed):
    """The copy does not match the origin's manifests, even after a second fetch."""


@dataclass
class BackupCopy:
    """One origin backup being copied into ``<name>.in-progress`` of the mirror."""

    config: Config
    origin: Origin
    dest: Destination
    name: str
    # The mirror's last good copy (``--link-dest``, the btrfs parent), or None.
    previous: str | None
    folders: list[OriginFolder]
    dest_is_btrfs: bool
    # What the transfers carried, both ways (rsync's --stats), in this run.
    received_bytes: int = 0
    # Paths (relative to the backup) never linked to the previous copy.
    never_link: set[bytes] = field(default_factory=set)
    # What each source's folder takes on the mirror's disk (written_bytes's
    # figure), counted by the last check's walk of it.
    allocated: dict[str, int] = field(default_factory=dict)
    # It continues an interrupted copy (set by the caller), or one of its passes did not
    # end cleanly: either may have left partial files.
    resumed: bool = False
    partials: bool = False

    @property
    def in_progress(self) -> str:
        return self.name + IN_PROGRESS

    @property
    def in_progress_dir(self) -> str:
        return self.dest.path_of(self.in_progress)

    @property
    def previous_dir(self) -> str | None:
        return None if self.previous is None else self.dest.path_of(self.previous)

    @property
    def scratch(self) -> str:
        """Where this copy's lists and scratch manifests go (``state_dir``)."""
        return self.config.state_dir


class FolderKind(abc.ABC):
    """How folders of one kind are copied (the rsync passes copy every other folder)."""

    @abc.abstractmethod
    def claims(self, copy: BackupCopy, folder: OriginFolder) -> bool:
        """This kind copies ``folder`` of the backup."""

    @abc.abstractmethod
    async def copy(self, copy: BackupCopy, folders: list[OriginFolder]) -> None:
        """Copy ``folders`` into ``copy.in_progress_dir``, adding what went over the
        transfer to ``copy.received_bytes``. Raises CopyFailed."""

    def plan(self, copy: BackupCopy, folders: list[OriginFolder]) -> list[str]:
        """The dry-run's lines for ``folders``."""
        return [f"  copy {', '.join(f.name for f in folders)} ({type(self).__name__})"]


_KINDS: list[FolderKind] = []


def register_folder_kind(kind: FolderKind) -> FolderKind:
    """Add a kind of folder copy; asked before rsync, which copies what no kind claims."""
    _KINDS.append(kind)
    return kind


def claimed(copy: BackupCopy) -> list[tuple[FolderKind, list[OriginFolder]]]:
    """The folders of the backup that a registered kind copies, grouped by kind."""
    groups: dict[int, tuple[FolderKind, list[OriginFolder]]] = {}
    for folder in copy.folders:
        for kind in _KINDS:
            if kind.claims(copy, folder):
                groups.setdefault(id(kind), (kind, []))[1].append(folder)
                break
    return list(groups.values())


# --- the copy ------------------------------------------------------------------------------


async def copy_backup(copy: BackupCopy) -> None:
    """Copy the backup into its in-progress folder (which exists) and check it.

    Raises CopyFailed (CopyMismatch for a copy that does not match the
    origin's manifests); OSError for the mirror's own disk.
    """
    others = claimed(copy)
    left_out = [f.name for _, folders in others for f in folders]
    link = [f"--link-dest={copy.previous_dir}"] if copy.previous_dir is not None else []
    # Only what is there to leave out: any exclude costs rsync work on every file.
    excludes = [f"--exclude=/{os.fsdecode(_pattern(os.fsencode(n)))}" for n in left_out]
    await _rsync(copy, "copy", [*link, "--delete", *excludes])
    previous = copy.previous_dir
    if previous is not None:
        # First the manifests (what the never-link list is read from), then those files.
        manifests = await in_worker(_manifest_paths, copy)
        await _fetch_quick_matches(copy, previous, "manifests", manifests)
        changed = await in_worker(_never_linked, copy, previous,
                                  anyio.from_thread.check_cancelled)
        await _fetch_quick_matches(copy, previous, "changed files (not linked)", changed)
    for kind, folders in others:
        await kind.copy(copy, folders)
    if copy.resumed or copy.partials:
        await in_worker(_remove_partials, copy.in_progress_dir, left_out,
                        anyio.from_thread.check_cancelled)
    bad = await in_worker(_mismatches, copy, anyio.from_thread.check_cancelled)
    if not bad:
        return
    log.warning("files do not match the origin's manifest; fetching them once more",
                backup=copy.name, files=len(bad), first=_shown(bad[0]))
    async with _path_list(copy, bad) as listed:
        await _rsync(copy, "refetch", [f"--files-from={listed}", "--from0", "--ignore-times"])
    bad = await in_worker(_mismatches, copy, anyio.from_thread.check_cancelled)
    if bad:
        raise CopyMismatch(f"{len(bad)} file{'' if len(bad) == 1 else 's'} of {copy.name} "
                           f"do not match the origin's manifest after a second fetch "
                           f"(first: {_shown(bad[0])}): the origin's copy may be damaged")


async def written(copy: BackupCopy) -> int:
    """What the copy takes on the mirror's disk: its files not linked to the previous copy.

    The sources' folders were counted by the check's walk (``allocated``);
    the rest of the backup (its top folder, the manifests, folders of another
    kind) is walked here.
    """
    rest = await in_worker(functools.partial(
        written_bytes, copy.in_progress_dir, copy.previous_dir,
        anyio.from_thread.check_cancelled, skip=frozenset(copy.allocated)))
    return rest + sum(copy.allocated.values())


def rsync_command(copy: BackupCopy, options: Iterable[str]) -> list[str]:
    """The rsync that copies backup ``<name>`` of the origin into the in-progress folder."""
    argv = [*RSYNC_BASE, *copy.origin.rsync_options()]
    settings = copy.config.origin
    bwlimit = None if settings is None else settings.bwlimit_bytes
    if bwlimit is not None:
        # rsync counts in units of 1024 bytes per second.
        argv.append(f"--bwlimit={max(1, bwlimit // 1024)}")
    argv.append(f"--partial-dir={PARTIAL_DIR}")
    if copy.resumed:
        argv.append("--no-W")
    argv += options
    return [*argv, copy.origin.rsync_source(copy.name), copy.in_progress_dir + "/"]


async def _rsync(copy: BackupCopy, what: str, options: list[str]) -> None:
    argv = rsync_command(copy, options)
    log.debug("rsync", backup=copy.name, pass_=what, argv=argv)
    finished, _ = await run_rsync(argv)
    if finished.exit_code != 0:
        copy.partials = True
    copy.received_bytes += _carried(finished.stdout.text())
    beat = current()
    if beat is not None:
        beat.bytes = copy.received_bytes
    if finished.exit_code == 24 and not await copy.origin.holds(copy.name):
        # Deleted under the transfer: said now, before the check reads what came.
        raise CopyFailed(f"rsync ({what}): {copy.name} vanished from the origin")
    if finished.exit_code in _OK_CODES:
        return
    text = telling_line(finished.stderr.lines) or "no error output"
    raise CopyFailed(f"rsync ({what}) {describe_exit(finished.exit_code)}: {text}")


def _carried(stdout: str) -> int:
    """The bytes rsync's --stats says went over the transfer, both ways: a pull receives
    what a local copy sends, and either way that is what the mirror was given."""
    return sum(int(re.sub(r"[,.]", "", n)) for _, n in _BYTES.findall(stdout))


def _remove_partials(backup_dir: str, skipped: list[str], check: Callable[[], None]) -> None:
    """Remove every ``PARTIAL_DIR`` folder below ``backup_dir`` (rsync made them all: it
    copies none from the origin), never following a link; ``skipped``: top folders that
    another kind copied (a read-only btrfs subvolume), not walked."""
    for top, dirs, _ in os.walk(backup_dir):
        check()
        if top == backup_dir:
            dirs[:] = [d for d in dirs if d not in skipped]
        if PARTIAL_DIR not in dirs:
            continue
        dirs.remove(PARTIAL_DIR)
        path = os.path.join(top, PARTIAL_DIR)
        # A link of that name is the origin's (rsync leaves out only its folders).
        if stat.S_ISDIR(os.lstat(path).st_mode):
            log.info("removing what an interrupted transfer left", folder=path)
            shutil.rmtree(path)


# --- which files are never linked, and the check ------------------------------------------


def _sources(backup_dir: str) -> list[str]:
    try:
        with open(sources_path(backup_dir), "rb") as f:
            return [line.decode() for line in f.read().splitlines() if line]
    except FileNotFoundError:
        return []


def _digests(path: str, spill: str) -> Iterable[tuple[bytes, bytes]]:
    """(key, digest) of a manifest sorted as verify sorts it (a missing one: none)."""
    try:
        stream = open(path, "rb")
    except FileNotFoundError:
        return []
    with stream:  # sorted_manifest reads it all before it returns
        return sorted_manifest(stream, spill)


def _key_path(key: bytes) -> bytes:
    return key.replace(b"\0", b"/")


def _never_linked(copy: BackupCopy, previous: str, check: Callable[[], None]) -> list[bytes]:
    """Paths of this backup that must not be linked to ``previous``, the mirror's copy of
    the backup before (module docstring)."""
    paths = set(copy.never_link)
    here = copy.in_progress_dir
    for source in _sources(here):
        check()
        old, new = manifest_path(previous, source), manifest_path(here, source)
        try:
            with _opened(old) as before, _opened(new) as after:
                paths.update(path for path, was, now in differing(before, after, check)
                             if was is not None and now is not None)
        except Unordered:
            paths.update(_changed_sorted(old, new, copy.scratch, check))
    return sorted(paths)


async def _fetch_quick_matches(copy: BackupCopy, previous: str, what: str,
                               paths: list[bytes]) -> None:
    """Fetch again, without ``--link-dest``, each of ``paths`` that the copy pass may have
    taken from ``previous`` (``_undo_quick_matches``)."""
    if not paths:
        return
    taken = await in_worker(_undo_quick_matches, copy.in_progress_dir, previous, paths,
                            anyio.from_thread.check_cancelled)
    if taken:
        async with _path_list(copy, taken) as listed:
            await _rsync(copy, what, [f"--files-from={listed}", "--from0"])


def _manifest_paths(copy: BackupCopy) -> list[bytes]:
    """The files of the copy's ``.pibackup/`` (a backup made before manifests: none)."""
    try:
        with os.scandir(os.path.join(copy.in_progress_dir, MANIFEST_DIR)) as entries:
            return [os.fsencode(f"{MANIFEST_DIR}/{e.name}") for e in entries
                    if e.is_file(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _undo_quick_matches(here: str, previous: str, paths: list[bytes],
                        check: Callable[[], None]) -> list[bytes]:
    """Unlink each of ``paths`` that rsync may have taken from the previous copy; return them.

    rsync takes a file from its ``--link-dest`` (a hard link, or a local copy of
    it when only the attributes differ) only when the two have the same size and
    the same mtime in whole seconds; a path whose copy differs from the previous
    copy's in either came from the origin. The others are unlinked (a name
    only: the previous copy keeps its inode), for a pass of their own. No link
    is followed on the way, in either copy.
    """
    taken = []
    for path in paths:
        check()
        parts = path.split(b"/")
        found = lstat_in(os.fsencode(here), parts)
        if found is None:
            continue  # not in this backup, or a link on the way
        fd, new = found
        try:
            before = lstat_in(os.fsencode(previous), parts)
            if before is None:
                continue
            os.close(before[0])
            old = before[1]
            if (stat.S_ISREG(new.st_mode) and stat.S_ISREG(old.st_mode)
                    and new.st_size == old.st_size
                    and new.st_mtime_ns // 10**9 == old.st_mtime_ns // 10**9):
                os.unlink(parts[-1], dir_fd=fd)
                taken.append(path)
        finally:
            os.close(fd)
    return taken


def _changed_sorted(old_manifest: str, new_manifest: str, spill: str,
                    check: Callable[[], None]) -> Iterator[bytes]:
    """The paths both manifests list with other digests, whatever their order."""
    old = dict(_digests(old_manifest, spill))
    check()
    for key, digest in _digests(new_manifest, spill):
        before = old.get(key)
        if before is not None and before != digest:
            yield _key_path(key)


def _mismatches(copy: BackupCopy, check: Callable[[], None]) -> list[bytes]:
    """Paths the origin's manifests list whose copy is missing or has another digest."""
    here = copy.in_progress_dir
    bad: list[bytes] = []
    for source in _sources(here):
        origin_manifest = manifest_path(here, source)
        if not os.path.exists(origin_manifest):
            raise CopyMismatch(f"the origin's backup {copy.name} lists source {source} in "
                               f"{MANIFEST_DIR}/SOURCES but has no manifest of it")
        earlier = None
        if copy.previous_dir is not None:
            candidate = os.path.join(copy.previous_dir, source)
            earlier = candidate if os.path.isdir(candidate) else None
        fd, scratch = tempfile.mkstemp(prefix=SCRATCH_PREFIX, suffix=".sha256",
                                       dir=copy.scratch)
        os.close(fd)
        try:
            made = write_manifest(here, source, earlier, check, into=scratch)
            copy.allocated[source] = made.allocated
            try:
                with _opened(origin_manifest) as listed, _opened(scratch) as found:
                    bad += [path for path, expected, _ in differing(listed, found, check)
                            if expected is not None]
            except Unordered:
                bad += _missing_sorted(origin_manifest, scratch, copy.scratch)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(scratch)
    return bad


def _missing_sorted(origin_manifest: str, scratch: str, spill: str) -> list[bytes]:
    """The paths the origin's manifest lists that the copy's lacks or gives another
    digest, whatever the origin's order."""
    bad = []
    found = iter(_digests(scratch, spill))
    mine = next(found, None)
    for key, digest in _digests(origin_manifest, spill):
        while mine is not None and mine[0] < key:
            mine = next(found, None)
        if mine is None or mine[0] != key or mine[1] != digest:
            bad.append(_key_path(key))
    return bad


@contextlib.contextmanager
def _opened(path: str) -> Iterator[BinaryIO | None]:
    """``path`` open for reading, or None when there is no such file."""
    try:
        stream = open(path, "rb", buffering=1 << 16)
    except FileNotFoundError:
        yield None
        return
    with stream:
        yield stream


@contextlib.asynccontextmanager
async def _path_list(copy: BackupCopy, paths: list[bytes]) -> AsyncIterator[str]:
    """A file of ``paths`` for rsync (``--from0``: any name, a newline too) in the
    mirror's scratch folder, written and removed off the event loop."""
    listed = await in_worker(_write_path_list, copy.scratch, paths)
    try:
        yield listed
    finally:
        # Shielded, so a cancel still removes it; bounded, so a hung disk cannot hold on.
        with anyio.move_on_after(ANSWER_BOUND_S, shield=True):
            await in_worker(_remove_quietly, listed)


def _write_path_list(scratch: str, paths: list[bytes]) -> str:
    fd, listed = tempfile.mkstemp(prefix=SCRATCH_PREFIX, suffix=".list", dir=scratch)
    with os.fdopen(fd, "wb") as out:
        out.writelines(path + b"\0" for path in paths)
    return listed


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _pattern(name: bytes) -> bytes:
    # rsync reads a pattern without * ? [ literally; in one with them, a
    # backslash escapes (itself too): as sources/rsync.py writes its excludes.
    if not re.search(rb"[*?\[]", name):
        return name
    return re.sub(rb"([*?\[\\])", rb"\\\1", name)


def _shown(path: bytes) -> str:
    from .pathtext import show_path

    return show_path(path)


def damaged_paths(config: Config, previous: str | None) -> set[bytes]:
    """The paths of ``previous`` (a mirror backup) that ``verify`` found damaged."""
    if previous is None:
        return set()
    found = set()
    for damage in load_damaged(config.state_dir, config.destination):
        if damage.backup == previous:
            found.add(os.path.join(damage.source.encode(), parse_path(damage.path)))
    return found
