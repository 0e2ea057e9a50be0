"""End to end: a run killed with SIGKILL (SPEC §2 "Crashes"), and one run at a time."""

from __future__ import annotations

import json
import signal
import time
from typing import TYPE_CHECKING

from conftest import needs_rsync
from datakit import rsync_source, table
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
from smtpkit import MailServer, parts

if TYPE_CHECKING:
    from pathlib import Path

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


# --- a state_dir on a path that other users can write (SPEC §5) ------------------------------


def _state_under_shared(ws: Workspace, server: MailServer) -> tuple[Path, Path]:
    """A config whose state_dir lies in a folder of its own (mode 0755 for now), mailing
    its reports to ``server``; returns that folder and the state_dir."""
    shared = ws.root / "shared"
    shared.mkdir(mode=0o755)
    state = shared / "state"
    ws.config_path.write_text(
        f'destination = "{ws.dest}"\nstate_dir = "{state}"\n'
        + rsync_source("data", ws.make_source("data"))
        + table("[report]", **{"from": "pibackup@test.local"}, to=["admin@test.local"])
        + server.smtp_table())
    return shared, state


def _latest_report(state: Path) -> dict[str, object]:
    newest = sorted((state / "reports").glob("*.json"))[-1]
    return dict(json.loads(newest.read_text()))


def test_a_run_whose_state_dir_others_can_write_warns_in_log_report_and_mail(
        ws: Workspace) -> None:
    with MailServer(None, security="none", require_auth=False) as server:
        shared, state = _state_under_shared(ws, server)
        private = ws.run("run")
        assert private.returncode == 0, private.stderr
        assert _latest_report(state)["warnings"] == []

        # Anyone could now squat the lock or replace the folder: the run still goes.
        shared.chmod(0o1777)
        shared_run = ws.run("run", "--log-format", "json")
        mails = [parts(m) for m in server.messages]

    assert shared_run.returncode == 0, shared_run.stderr
    said = f"{shared} can be written by users other than root"
    logged = [json.loads(line) for line in shared_run.stderr.splitlines()
              if line.startswith("{")]
    assert any(e["level"] == "warning" and said in e["event"] and f"state_dir {state}"
               in e["event"] for e in logged), shared_run.stderr
    report = _latest_report(state)
    assert report["status"] == "ok"
    [warning] = report["warnings"]
    assert said in warning
    assert len(mails) == 2
    assert said not in mails[0].text
    assert warning in mails[1].text


def test_prune_warns_and_list_says_nothing_about_a_state_dir_others_can_write(
        ws: Workspace) -> None:
    with MailServer(None, security="none", require_auth=False) as server:
        shared, _ = _state_under_shared(ws, server)
        shared.chmod(0o777)
        pruned = ws.run("prune")
        listed = ws.run("list")
    said = f"{shared} can be written by users other than root"
    assert pruned.returncode == 0, pruned.stderr
    assert said in pruned.stderr
    assert listed.returncode == 0, listed.stderr
    assert said not in listed.stderr, "list takes no lock"
