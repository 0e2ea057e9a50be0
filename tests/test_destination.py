"""The destination as one adapter (issue 18 item 2), end to end through the real CLI.

Each test is a review finding: an OSError while removing a failed optional
source's folder cancelled every other source (bug 11); a destination that
stops answering (a FUSE mount that never answers, tests/hangkit.py) held the
run after a source's timeout, so the snapshot hooks' post never ran and the
database stayed stopped, and a signal then left the source ``skipped`` with
no end (bug 13).
"""

from __future__ import annotations

import shlex
import signal
import subprocess
import time
from typing import TYPE_CHECKING

import pytest
from conftest import needs_root, needs_rsync, wait_for
from hangkit import hanging, needs_fuse
from hookkit import (
    release_marker,
    source_toml,
    start,
    started_marker,
    wait_marker,
    wait_no_processes,
)
from pibackup_async.engine.destination import ANSWER_BOUND_S

if TYPE_CHECKING:
    from collections.abc import Iterator

    from conftest import Workspace
    from hangkit import Hang
    from hookkit import Running

pytestmark = needs_rsync


# --- bug 11: a failed optional source's folder that cannot be removed --------------------


@pytest.fixture
def immutable_cleanup(ws: Workspace) -> Iterator[None]:
    yield
    # chattr +i files keep tmp_path from being removed: give them back.
    subprocess.run(["chattr", "-R", "-i", str(ws.dest)], check=False, capture_output=True)


@needs_root
@pytest.mark.usefixtures("immutable_cleanup")
def test_optional_source_folder_that_cannot_be_removed_cancels_no_other_source(
    ws: Workspace,
) -> None:
    # A snapshot hook leaves an immutable file in the optional source's folder:
    # removing that folder after the source fails raises EPERM.
    pre = ('mkdir -p "$PIBACKUP_BACKUP_DIR/laptop" && touch "$PIBACKUP_BACKUP_DIR/laptop/kept" '
           '&& chattr +i "$PIBACKUP_BACKUP_DIR/laptop/kept"')
    ws.write_config(
        f'[[snapshot_hooks]]\nname = "s1"\npre = {pre!r}\n'
        + source_toml("alpha", ws.make_source("alpha"))
        + source_toml("laptop", ws.src / "switched-off", optional=True)
        + source_toml("beta", ws.make_source("beta")))
    result = ws.run("run")
    assert result.returncode == 1, result.stderr
    report = ws.report()
    assert report["saved"] is True, report["failure"]
    assert report["status"] == "failed"
    assert 'source "laptop"' in report["failure"], report["failure"]
    assert "unexpected" not in report["failure"], report["failure"]
    assert report["sources"]["laptop"]["status"] == "failed"
    assert report["sources"]["alpha"]["status"] == "ok"
    assert report["sources"]["beta"]["status"] == "ok"
    [name] = ws.backups()
    assert (ws.dest / name / "alpha" / "file.txt").is_file()
    assert (ws.dest / name / "beta" / "file.txt").is_file()
    # What could not be removed is said, as a warning, with the folder.
    warned = [line for line in result.stderr.splitlines()
              if "laptop" in line and "not removed" in line]
    assert warned, result.stderr


# --- bug 13: a destination that stops answering ----------------------------------------------


def _hanging_config(ws: Workspace) -> None:
    """b1 around s1 around one source with a 1 s timeout; s1's pre waits for the test.

    The hooks only write to the event log: one that read the destination
    (hookkit's event line lists it) would wait on it too.
    """
    events, started = ws.events, started_marker(ws, "s1", "pre")
    release = release_marker(ws, "s1", "pre")

    def line(label: str) -> str:
        return f'echo "{label}|$PIBACKUP_STATUS" >> {shlex.quote(str(events))}'

    wait = (f"touch {shlex.quote(str(started))}; while [ ! -e {shlex.quote(str(release))} ]; "
            "do sleep 0.05; done")
    ws.write_config(
        f"[[backup_hooks]]\nname = \"b1\"\npre = {line('b1.pre')!r}\npost = {line('b1.post')!r}\n"
        f"[[snapshot_hooks]]\nname = \"s1\"\npre = {wait!r}\npost = {line('s1.post')!r}\n"
        + source_toml("data", ws.make_source("data"), timeout="1s"))


def _start_hanging(ws: Workspace, hang: Hang, running: Running) -> None:
    """Let the run reach its snapshot hook, then make the destination stop answering."""
    wait_marker(started_marker(ws, "s1", "pre"), running)
    hang.start()
    release_marker(ws, "s1", "pre").touch()


@needs_fuse
@pytest.mark.slow
def test_a_destination_that_stops_answering_still_gets_the_posts_run(ws: Workspace) -> None:
    _hanging_config(ws)
    t0 = time.monotonic()
    with hanging(ws.dest) as hang, start(ws) as running:
        _start_hanging(ws, hang, running)
        # The copy waits on the mount until the source's timeout; then the
        # engine asks whether the destination answers: at most ANSWER_BOUND_S.
        code = running.wait(90)
        stderr = running.stderr
    elapsed = time.monotonic() - t0
    assert code == 1, stderr
    report = ws.report()
    failure = report["failure"] or ""
    assert "does not answer" in failure and str(ws.dest) in failure, failure
    assert "unexpected" not in failure, failure
    assert report["status"] == "failed" and report["saved"] is False
    snapshot = report["sources"]["data"]["snapshot"]
    assert snapshot["status"] == "failed" and snapshot["end"] is not None, snapshot
    assert report["sources"]["data"]["status"] == "failed"
    # Every post ran, in order, though the disk never answered: the database is back.
    assert ws.event_lines() == ["b1.pre|", "s1.post|failed", "b1.post|failed"], stderr
    # One bound for the destination, not one for each thing that touches it.
    assert elapsed < 1 + 10 + 2 * ANSWER_BOUND_S, stderr
    assert "Traceback" not in stderr
    wait_no_processes(ws)


@needs_fuse
@pytest.mark.slow
def test_a_signal_while_the_destination_does_not_answer_keeps_the_timed_out_step(
    ws: Workspace,
) -> None:
    _hanging_config(ws)
    with hanging(ws.dest) as hang, start(ws) as running:
        _start_hanging(ws, hang, running)
        # The source's timeout has ended its step; the engine now asks whether
        # the destination is still there, which it does not answer.
        wait_for(lambda: "snapshot failed" in running.stderr, 60, "the source's timeout")
        running.send(signal.SIGTERM)
        code = running.wait(90)
        stderr = running.stderr
    assert code == 143, stderr
    report = ws.report()
    assert report["status"] == "interrupted", report["failure"]
    snapshot = report["sources"]["data"]["snapshot"]
    # It ran and timed out: failed, with its end, not skipped.
    assert snapshot["status"] == "failed" and snapshot["end"] is not None, snapshot
    assert report["sources"]["data"]["status"] == "failed"
    assert ws.event_lines() == ["b1.pre|", "s1.post|interrupted", "b1.post|interrupted"], stderr
    assert "Traceback" not in stderr
    wait_no_processes(ws)
