"""The engine's own cost per child process (issue 20's per-source goal): what it keeps anyway.

setpriv finds a bare program name on PATH with an execve per folder (9 failed
ones per rsync here, about 15 µs each on a loaded machine). Handing it the
program's absolute path instead would spare them, but the child would then
show that path as its ``argv[0]``: ``ps``, ``pgrep -f '^rsync'`` and the
tests that find a run's rsync by its command line see ``rsync …`` today.
"""

from __future__ import annotations

import anyio
import pytest
from pibackup_async.engine import processes
from pibackup_async.engine.processes import run_process


@pytest.mark.skipif(processes._SETPRIV is None, reason="setpriv is not installed")
def test_a_child_shows_the_name_it_was_given_under_setpriv() -> None:
    finished = anyio.run(run_process, ["sh", "-c", "tr '\\0' ' ' < /proc/$$/cmdline"])
    assert finished.exit_code == 0
    assert finished.stdout.text().startswith("sh -c ")
