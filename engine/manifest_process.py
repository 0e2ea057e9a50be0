"""A manifest written by a child process (manifest_child.py), watched like any other.

Which manifests go there, and how many at once, is the destination's call
(destination.py); this runs one: a managed process (its own session,
ended on cancel), whose lines push ``progress`` on, whose last line is the
``Made``, and whose OSError comes back as one.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from typing import TYPE_CHECKING

import anyio

from .failure_text import telling_line
from .manifest import Made
from .processes import Tail, describe_exit, drain, managed_process

if TYPE_CHECKING:
    from collections.abc import Callable

    from .threads import Progress

# A protocol line is short: a count, or one JSON object (a path of up to 4 KiB in it).
_LINE_CAP = 64 * 1024


async def write_manifest_in_child(backup_dir: str, source: str, progress: Progress,
                                  on_file: Callable[[int], None]) -> Made:
    """``manifest.write_manifest(backup_dir, source, None)`` in a child process: a
    manifest with nothing to inherit.

    Each line it says pushes ``progress`` on and hands its count of files
    to ``on_file``. Raises OSError: the walk's own (errno, strerror and
    filename as the child met them), or EIO when the child failed otherwise.
    """
    # -P: ``-m`` would put the working folder first on the path, and a run (as root)
    # started where someone left a ``pibackup_async`` folder would run their code.
    argv = [sys.executable, "-P", "-m", "pibackup_async.engine.manifest_child", backup_dir,
            source, "--beat", f"{min(1.0, progress.stall_s / 4):g}"]
    errors = Tail()
    last = b""
    async with managed_process(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as child:
        assert child.stdout is not None
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, child.stderr, errors, "stderr")
            pending = b""
            async for chunk in child.stdout:
                progress.moved()
                *lines, pending = (pending + chunk).split(b"\n")
                pending = pending[-_LINE_CAP:]
                for line in lines:
                    if line.isdigit():
                        on_file(int(line))
                    elif line:
                        last = line
            await child.wait()
    code = child.returncode
    assert code is not None
    return _ended(code, last, errors)


def _ended(code: int, last: bytes, errors: Tail) -> Made:
    """The child's ``Made``, or its error as an OSError."""
    try:
        said = json.loads(last) if last else {}
    except ValueError:
        said = {}
    if code == 0 and "made" in said:
        return Made(**said["made"])
    if code == 1 and "error" in said:
        error = said["error"]
        raise OSError(error["errno"], error["strerror"], error["filename"])
    told = telling_line(errors.lines) or "no error output"
    raise OSError(errno.EIO, f"the manifest's process {describe_exit(code)}: {told}")
