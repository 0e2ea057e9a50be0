"""A signal during deletions takes effect before the next backup is deleted (SPEC §2, Interrupts).

Retention (`prune`, and a `run`'s step 6) and the clean-up of a crashed run's
leftovers delete folder after folder. A SIGTERM sent once the first deletion
has begun must end the command within a small part of the time all the
deletions take (measured in the same test: the next command finishes them),
with every backup but the one being deleted untouched, that one left as
`.deleting` for the next command, and the backup hooks' `post` run.

Also here, in-process: `remove_tree` stops when its scope is cancelled or its
shielded deadline passes, and finishes under a shield that gives it time.
"""

from __future__ import annotations

import os
import signal
import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import anyio
import pytest
from conftest import needs_rsync, processes_mentioning, wait_for
from pibackup_async.engine.destination import remove_tree
from prunekit import (
    SOURCE,
    event_hooks,
    make_backup,
    make_big_backup,
    retention_table,
    rsync_source,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from conftest import Workspace

pytestmark = needs_rsync

FILES = 20_000  # ~0.4 s to remove on the CI machine
FULL = FILES + FILES // 1000 + 1  # entries below a big backup: files, their folders, the source
# Dated in the days before the test: a run now is no clock jump after them (SPEC §3).
_TODAY = datetime.now().astimezone().replace(microsecond=0)
KEEP = f"{_TODAY - timedelta(days=1):%Y-%m-%dt%H-%M-%S%z}"
DOOMED = [f"{_TODAY - timedelta(days=days):%Y-%m-%dt%H-%M-%S%z}"
          for days in range(2, 8)]  # six, newest first


def _entries_below(path: Path) -> int:
    return sum(len(dirs) + len(files) for _, dirs, files in os.walk(path))


def _config(ws: Workspace, rules: dict[str, int]) -> None:
    source = ws.make_source(SOURCE, {"new.txt": "made by this run\n"})
    ws.write_config(rsync_source(source) + event_hooks(ws, ["b1"]) + "\n"
                    + retention_table(rules))


def _interrupt(ws: Workspace, command: str, begun: Callable[[], bool], what: str) -> float:
    """Start ``command``; SIGTERM it once ``begun()``; return the seconds it took to exit."""
    proc = ws.start(command)
    try:
        wait_for(lambda: begun() or proc.poll() is not None, timeout=60, what=what)
        assert proc.poll() is None, f"{command} ended before {what}: {proc.communicate()}"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        _, stderr = proc.communicate()
    assert code == 143, stderr
    assert "Traceback" not in stderr, stderr
    return elapsed


def _deleting(ws: Workspace) -> list[str]:
    return [name for name in os.listdir(ws.dest) if name.endswith(".deleting")]


def _assert_at_most_one_touched(ws: Workspace, doomed: list[str], suffix: str = "") -> None:
    """Every doomed folder is there, whole, under its own name, but at most one."""
    touched = []
    for name in doomed:
        folder = ws.dest / (name + suffix)
        if not folder.is_dir() or _entries_below(folder) != FULL:
            touched.append(name)
    assert len(touched) <= 1, f"deleted after the signal: {touched}"
    assert len(_deleting(ws)) <= (1 if not suffix else len(doomed)), os.listdir(ws.dest)


def _finish_with_prune(ws: Workspace) -> float:
    """The next `prune` finishes what was cut; return how long it took."""
    t0 = time.monotonic()
    result = ws.run("prune")
    took = time.monotonic() - t0
    assert result.returncode == 0, result.stderr
    assert _deleting(ws) == [], "the interrupted deletion was not finished"
    return took


@pytest.mark.slow
def test_sigterm_during_prune_stops_before_the_next_deletion(ws: Workspace) -> None:
    make_backup(ws.dest, KEEP)
    for name in DOOMED:
        make_big_backup(ws.dest, name, FILES)
    _config(ws, {"keep_last": 1})

    elapsed = _interrupt(ws, "prune", lambda: bool(_deleting(ws)), "a .deleting folder")

    _assert_at_most_one_touched(ws, DOOMED)
    assert (ws.dest / KEEP).is_dir()
    assert [line.split()[:2] for line in ws.event_lines()] == [
        ["b1.pre", "-"], ["b1.post", "interrupted"]]
    assert processes_mentioning(str(ws.root)) == []

    rest = _finish_with_prune(ws)
    assert sorted(os.listdir(ws.dest)) == [KEEP]
    # Finishing took the remaining deletions; the signal did not wait for them.
    print(f"exit {elapsed:.2f}s after SIGTERM; finishing the rest {rest:.2f}s")
    assert elapsed < rest / 3, f"exit took {elapsed:.2f}s after SIGTERM; the rest {rest:.2f}s"


@pytest.mark.slow
def test_sigterm_during_a_runs_retention_keeps_the_backup_and_stops_deleting(
        ws: Workspace) -> None:
    for name in DOOMED:
        make_big_backup(ws.dest, name, FILES)
    _config(ws, {"keep_last": 1})

    elapsed = _interrupt(ws, "run", lambda: bool(_deleting(ws)), "a .deleting folder")

    report = ws.report()
    assert report["status"] == "interrupted" and report["saved"] is True
    new = report["name"]
    assert (ws.dest / new / SOURCE / "new.txt").read_text() == "made by this run\n"
    _assert_at_most_one_touched(ws, DOOMED)
    assert [line.split()[:2] for line in ws.event_lines()] == [
        ["b1.pre", "-"], ["b1.post", "interrupted"]]
    assert processes_mentioning(str(ws.root)) == []

    rest = _finish_with_prune(ws)
    assert sorted(os.listdir(ws.dest)) == [new]
    print(f"exit {elapsed:.2f}s after SIGTERM; finishing the rest {rest:.2f}s")
    assert elapsed < rest / 3, f"exit took {elapsed:.2f}s after SIGTERM; the rest {rest:.2f}s"


@pytest.mark.slow
def test_sigterm_during_a_crashed_runs_clean_up_stops_before_the_next_folder(
        ws: Workspace) -> None:
    make_backup(ws.dest, KEEP)
    for name in DOOMED:
        make_big_backup(ws.dest, name + ".deleting", FILES)
    _config(ws, {"keep_last": 1})
    sources = [ws.dest / f"{name}.deleting" / SOURCE for name in DOOMED]

    def begun() -> bool:
        return any(not s.exists() or len(os.listdir(s)) < FILES // 1000 for s in sources)

    elapsed = _interrupt(ws, "run", begun, "a stale folder losing entries")

    report = ws.report()
    assert report["status"] == "interrupted" and report["saved"] is False
    _assert_at_most_one_touched(ws, DOOMED, ".deleting")
    assert [line.split()[:2] for line in ws.event_lines()] == [
        ["b1.pre", "-"], ["b1.post", "interrupted"]]
    assert processes_mentioning(str(ws.root)) == []

    rest = _finish_with_prune(ws)
    assert sorted(os.listdir(ws.dest)) == [KEEP]
    print(f"exit {elapsed:.2f}s after SIGTERM; finishing the rest {rest:.2f}s")
    assert elapsed < rest / 3, f"exit took {elapsed:.2f}s after SIGTERM; the rest {rest:.2f}s"
    following = ws.run("run")
    assert following.returncode == 0, following.stderr


# --- remove_tree in-process --------------------------------------------------------------------


async def _timed_removal(path: Path) -> float:
    t0 = time.monotonic()
    await remove_tree(str(path))
    return time.monotonic() - t0


@pytest.mark.slow
async def test_remove_tree_stops_when_cancelled_or_its_shielded_deadline_passes(
        tmp_path: Path) -> None:
    whole, cut, shielded, given_time = (
        make_big_backup(tmp_path, name, FILES) for name in ("whole", "cut", "shielded", "given"))
    full = await _timed_removal(whole)
    assert not os.path.lexists(whole)  # noqa: ASYNC240

    # Cancelled from outside (a signal), with no shield: it stops.
    t0 = time.monotonic()
    with anyio.move_on_after(0.05):
        await remove_tree(str(cut))
    assert time.monotonic() - t0 < full / 2
    assert cut.is_dir() and _entries_below(cut) < FULL, "the removal did not start or did not stop"

    with anyio.CancelScope() as interrupted:
        interrupted.cancel()
        # Under a cancel, a shield with a deadline bounds it ...
        t0 = time.monotonic()
        with anyio.move_on_after(0.05, shield=True):
            await remove_tree(str(shielded))
        assert time.monotonic() - t0 < full / 2
        assert shielded.is_dir(), "the removal outlived its shielded deadline"
        # ... and one with time enough lets it finish.
        with anyio.move_on_after(60, shield=True) as bounded:
            await remove_tree(str(given_time))
        assert not bounded.cancelled_caught
        assert not os.path.lexists(given_time)  # noqa: ASYNC240
