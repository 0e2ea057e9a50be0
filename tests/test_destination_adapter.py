"""LocalDestination in-process, on real disks (issue 18 item 2): its bounds, what it
says when the destination vanishes or stops answering, its flush.

A destination that stops answering is a FUSE mount that never answers
(tests/hangkit.py); one that vanishes has another filesystem mounted over it.
The bounds are the adapter's own, made short here so that the tests take
seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

import anyio
import pytest
from conftest import needs_root
from hangkit import hanging, needs_fuse
from pibackup_async.engine.destination import DestinationLost, LocalDestination
from pibackup_async.engine.threads import Progress, in_worker

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

BOUND_S = 0.5


@needs_fuse
async def test_a_destination_that_stops_answering_costs_one_bound_then_nothing(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "dest"
    (folder / "2025-01-01t03-00-00+0100").mkdir(parents=True)
    dest = LocalDestination(str(folder), answer_bound_s=BOUND_S)
    await dest.remember()
    assert await dest.gone() is None
    with hanging(folder) as hang:
        hang.start()
        t0 = time.monotonic()
        with pytest.raises(DestinationLost, match="does not answer") as raised:
            await dest.scan()
        assert BOUND_S <= time.monotonic() - t0 < BOUND_S + 5
        assert str(folder) in str(raised.value)
        # Known now: every later operation says so at once, none waits again.
        t0 = time.monotonic()
        assert await dest.gone() == str(raised.value)
        name = "2025-01-01t03-00-00+0100"
        for operation in (dest.scan, dest.space, lambda: dest.remove(name),
                          lambda: dest.delete_backup(name), dest.flush,
                          lambda: dest.create("x.in-progress")):
            with pytest.raises(DestinationLost, match="does not answer"):
                await operation()
        assert time.monotonic() - t0 < 1.0


@needs_fuse
async def test_a_removal_on_a_destination_that_stops_answering_gives_up_within_its_bound(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "dest"
    folder.mkdir()
    dest = LocalDestination(str(folder), answer_bound_s=BOUND_S)
    with hanging(folder) as hang:
        hang.start()
        t0 = time.monotonic()
        with pytest.raises(DestinationLost, match="does not answer"):
            await dest.remove("2025-01-01t03-00-00+0100.deleting")
        # The bound, and no wait for the stuck thread on top of it.
        assert time.monotonic() - t0 < BOUND_S + 5


@pytest.fixture
def mounted_over(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "dest"
    folder.mkdir()
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)


@needs_root
async def test_a_destination_with_another_filesystem_mounted_over_it_has_vanished(
    mounted_over: Path,
) -> None:
    (mounted_over / "2025-01-01t03-00-00+0100").mkdir()
    dest = LocalDestination(str(mounted_over), answer_bound_s=BOUND_S)
    await dest.remember()
    await anyio.run_process(["mount", "-t", "tmpfs", "tmpfs", str(mounted_over)])
    line = await dest.gone()
    assert line is not None and "vanished" in line and "another filesystem" in line, line
    # An operation's own error is told as the destination gone, not as ENOENT.
    with pytest.raises(DestinationLost, match="vanished"):
        await dest.delete_backup("2025-01-01t03-00-00+0100")


async def test_an_error_on_a_destination_still_there_is_its_own(tmp_path: Path) -> None:
    dest = LocalDestination(str(tmp_path), answer_bound_s=BOUND_S)
    await dest.remember()
    (tmp_path / "2025-01-01t03-00-00+0100").symlink_to(tmp_path)
    with pytest.raises(OSError, match="not a folder") as raised:
        await dest.delete_backup("2025-01-01t03-00-00+0100")
    assert not isinstance(raised.value, DestinationLost)
    assert await dest.gone() is None


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_flush_is_one_syncfs_of_the_destinations_filesystem(tmp_path: Path) -> None:
    code = ("import anyio, sys\n"
            "from pibackup_async.engine.destination import LocalDestination\n"
            "anyio.run(LocalDestination(sys.argv[1]).flush)\n")
    traced = subprocess.run(
        ["strace", "-f", "-y", "-e", "trace=syncfs", "-o", str(tmp_path / "trace"),
         sys.executable, "-c", code, str(tmp_path)],
        capture_output=True, text=True, timeout=60)
    assert traced.returncode == 0, traced.stderr
    calls = [line for line in (tmp_path / "trace").read_text().splitlines() if "syncfs(" in line]
    assert len(calls) == 1 and f"<{tmp_path}>" in calls[0] and calls[0].endswith("= 0"), calls


# --- Progress: the bound of a removal is how long it goes without moving -----------------


def _work(progress: Progress, steps: int, step_s: float, stuck: threading.Event) -> int:
    """Work that checks between items, then (``stuck`` set) hangs without checking."""
    for _ in range(steps):
        progress.check()
        stuck.wait(step_s)
    while stuck.is_set():
        time.sleep(0.01)  # a system call that does not return
    return steps


async def test_work_that_moves_outlives_the_bound_and_work_that_stops_does_not() -> None:
    moving = Progress(0.4)
    with moving.scope:
        # 2 s of work in 0.05 s steps, five times the bound.
        assert await in_worker(_work, moving, 40, 0.05, threading.Event(),
                               progress=moving) == 40
    assert not moving.scope.cancelled_caught

    stuck = threading.Event()
    stuck.set()
    stopping = Progress(0.4)
    t0 = time.monotonic()
    try:
        with stopping.scope:
            await in_worker(_work, stopping, 2, 0.05, stuck, progress=stopping)
    finally:
        stuck.clear()
    assert stopping.scope.cancelled_caught
    # Given up at the bound; the stuck thread is not waited for on top of it.
    assert time.monotonic() - t0 < 0.4 + 3
