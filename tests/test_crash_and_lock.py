"""End to end: a run killed with SIGKILL (SPEC §2 "Crashes"), and one run at a time."""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING

from conftest import needs_rsync
from hookkit import (
    ORDER_OK,
    assert_no_processes,
    complete_backups,
    in_progress,
    order,
    release_marker,
    standard_hooks,
    start,
    started_marker,
    wait_marker,
    wait_no_processes,
    write_config,
)

if TYPE_CHECKING:
    from conftest import Workspace

pytestmark = needs_rsync


def _kill_during_snapshot_hook(ws: Workspace) -> str:
    """Start a run, SIGKILL it while s1's pre blocks; return the stale in-progress name."""
    write_config(ws, standard_hooks(s1={"block": ("pre",)}))
    with start(ws) as running:
        wait_marker(started_marker(ws, "s1", "pre"), running)
        running.proc.send_signal(signal.SIGKILL)
        assert running.wait(10) == -signal.SIGKILL
    [stale] = in_progress(ws)
    assert complete_backups(ws) == []
    assert order(ws) == ["b1.pre", "b2.pre", "s1.pre"]
    return stale


def test_next_run_after_sigkill_removes_stale_in_progress_and_succeeds(ws: Workspace) -> None:
    stale = _kill_during_snapshot_hook(ws)
    ws.events.unlink()
    write_config(ws, standard_hooks())
    result = ws.run("run")
    assert result.returncode == 0, result.stderr
    assert stale in result.stderr, "the run logs that it removed the stale folder"
    assert order(ws) == ORDER_OK
    [name] = complete_backups(ws)
    assert ws.backups() == [name], "the stale in-progress folder is gone"
    assert name != stale.removesuffix(".in-progress")
    assert ws.report()["status"] == "ok"


def test_children_of_a_killed_run_do_not_outlive_it(ws: Workspace) -> None:
    _kill_during_snapshot_hook(ws)
    # The blocked hook is never released: it must end with the engine that started it.
    wait_no_processes(ws, 5)


def test_second_run_while_the_lock_is_held_exits_3_at_once(ws: Workspace) -> None:
    write_config(ws, standard_hooks(b1={"block": ("pre",)}))
    with start(ws) as first:
        wait_marker(started_marker(ws, "b1", "pre"), first)

        began = time.monotonic()
        second = ws.run("run", timeout=30)
        elapsed = time.monotonic() - began
        assert second.returncode == 3, second.stderr
        assert elapsed < 3, f"the second run took {elapsed:.1f}s"
        assert str(ws.state / "lock") in second.stderr
        assert second.stdout == ""
        assert ws.reports() == [], "a run refused by the lock writes no report"
        assert order(ws) == ["b1.pre"], "the second run ran no hook"

        release_marker(ws, "b1", "pre").touch()
        assert first.wait(30) == 0, first.stderr
    assert order(ws) == ORDER_OK
    assert len(complete_backups(ws)) == 1
    assert len(ws.reports()) == 1
    assert ws.report()["status"] == "ok"
    assert_no_processes(ws)
