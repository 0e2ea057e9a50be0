"""rsync sources: one copy into the in-progress folder, hard-linked against the last backup."""

from __future__ import annotations

import functools
import os
import re
from typing import TYPE_CHECKING

import anyio.from_thread
import structlog

from ..allocated import written_bytes
from ..config import BtrfsSource, Config, RsyncSource
from ..destination import in_worker
from ..failure_text import telling_line, with_hint
from ..filesystems import is_within
from ..heartbeat import current
from ..proc_io import most_written
from ..processes import describe_exit, run_process
from .btrfs import snapshot_root
from .errors import SourceError

if TYPE_CHECKING:
    from ..heartbeat import Beat
    from ..processes import Finished
    from ..remote import Transport
    from ..report import Step

log = structlog.get_logger("pibackup.rsync")

# Everything a restore needs: archive mode (permissions, times, symlinks,
# devices and owners when root), hard links, ACLs, xattrs, numeric owners so
# a restore onto a fresh system does not remap ids by name, sparse files.
# --stats gives the transferred size, which a restore logs; a backup's report
# counts what its copy takes on disk instead (allocated.py: a sparse file's
# holes are transferred, not written). Progress comes from the kernel's
# counters (proc_io), not from rsync: --info=progress2 cost rsync 6.5% on
# small files.
RSYNC_BASE = ("rsync", "-aHAX", "--numeric-ids", "--sparse", "--stats")

_TRANSFERRED = re.compile(r"Total transferred file size: ([\d,.]+)")


def _escape(pattern: str) -> str:
    # rsync treats * ? [ as wildcards; a backslash escapes them only in a
    # pattern that has one, which is exactly when escaping matters.
    return re.sub(r"([*?\[\\])", r"\\\1", pattern)


def auto_excludes(config: Config, source_path: str) -> list[str]:
    """Anchored excludes for the engine's own folders that lie inside the source.

    Backing up ``/`` to ``/mnt/backup`` must not copy the backups into
    themselves, nor the state folder, the lock or local btrfs snapshots.
    Paths are compared after resolving symbolic links: a destination reached
    through a link (or a source that is one) still lies inside the tree rsync
    walks, and the pattern is relative to that tree (rsync follows the
    source's own top-level link, as the path ends in ``/``, and no other).
    """
    own = [config.destination, config.state_dir, config.lock_path]
    own += [snapshot_root(s) for s in config.sources
            if isinstance(s, BtrfsSource) and s.host is None]
    walked = os.path.realpath(source_path)
    excludes: list[str] = []
    for real in _real_paths(tuple(own)):
        if is_within(real, walked) and not is_within(walked, real):
            pattern = f"--exclude=/{_escape(os.path.relpath(real, walked))}"
            if pattern not in excludes:
                excludes.append(pattern)
    return excludes


@functools.lru_cache(maxsize=8)
def _real_paths(paths: tuple[str, ...]) -> tuple[str, ...]:
    # The same few folders for every source of a run: resolved once, not per source.
    return tuple(os.path.realpath(p) for p in paths)


def rsync_argv(config: Config, source: RsyncSource | BtrfsSource, target: str,
               link_dest: str | None, *, from_path: str | None = None,
               remote: Transport | None = None) -> list[str]:
    """The exact rsync command that copies a source into ``target``.

    ``from_path`` copies from elsewhere (a btrfs source's read-only
    snapshot) with the source's own excludes and arguments; ``remote`` pulls
    from that host over ssh.
    """
    argv = list(RSYNC_BASE)
    if remote is None:
        argv += auto_excludes(config, source.path)
    else:
        argv += ["-e", remote.shell]
        if remote.sudo:
            argv.append("--rsync-path=sudo -n rsync")
    if isinstance(source, RsyncSource):
        argv += [f"--exclude={pattern}" for pattern in source.exclude]
    if link_dest is not None:
        argv.append(f"--link-dest={link_dest}")
    argv += source.rsync_args
    # A trailing slash copies the contents of the folder, whichever way the
    # user wrote the path.
    origin = (from_path or source.path).rstrip("/") + "/"
    if remote is not None:
        origin = f"{remote.target}:{origin}"
    argv += [origin, target.rstrip("/") + "/"]
    return argv


def transferred_bytes(stdout: str) -> int:
    """rsync's "Total transferred file size" from ``--stats`` output (0 if absent)."""
    match = _TRANSFERRED.search(stdout)
    return int(re.sub(r"[,.]", "", match.group(1))) if match else 0


async def copy(argv: list[str], ok_codes: list[int], step: Step) -> None:
    """Run one rsync; raise SourceError if it failed."""
    step.begin(argv)
    finished, _ = await run_rsync(argv)
    step.exit_code = finished.exit_code
    step.stderr_tail = finished.stderr.text()
    if finished.exit_code not in ok_codes:
        # Not merely the last line: rsync's "No space left on device" comes
        # before the "Broken pipe" and "rsync error: (code 11)" lines.
        telling = telling_line(finished.stderr.lines) or "no error output"
        raise SourceError(with_hint(f"rsync {describe_exit(finished.exit_code)}: {telling}"))
    if finished.exit_code != 0:
        # rsync_ok_codes let it pass (24: files vanished while copying); say so.
        log.warning("rsync reported a problem, accepted by rsync_ok_codes",
                    exit_code=finished.exit_code, stderr=finished.stderr.text())


async def written(target: str, link_dest: str | None) -> int:
    """The bytes a finished copy into ``target`` wrote: what its new files take on disk.

    Not rsync's transferred size, which counts a sparse file's holes and
    knows nothing of the disk: ``allocated.written_bytes`` against
    ``link_dest`` (the copy's ``--link-dest`` folder), in a worker thread
    that stops on cancel. Raises OSError if the copy cannot be read.
    """
    total = await in_worker(written_bytes, target, link_dest,
                            anyio.from_thread.check_cancelled)
    beat = current()
    if beat is not None:
        # Live progress and the run's total end on the figure the report gives.
        beat.bytes = total
    return total


async def run_rsync(argv: list[str]) -> tuple[Finished, int]:
    """Run an rsync to its end: how it ended, and the bytes it transferred (``--stats``).

    Meanwhile the running step's bytes follow what it writes.
    """
    beat = current()

    def watch(pid: int) -> None:
        if beat is not None:
            beat.probe = lambda b: _follow(b, pid)

    try:
        finished = await run_process(argv, stdout_lines=40, on_start=watch)
    finally:
        if beat is not None:
            beat.probe = None
    transferred = transferred_bytes(finished.stdout.text())
    if beat is not None:
        beat.bytes = transferred
    return finished, transferred


def _follow(beat: Beat, pid: int) -> None:
    written = most_written(pid)
    if written is not None:
        beat.bytes = written
