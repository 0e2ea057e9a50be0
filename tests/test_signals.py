"""End to end: SIGINT and SIGTERM delivered to the real CLI in each phase of a run (SPEC §2)."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Any

import pytest
from conftest import needs_rsync, processes_mentioning, wait_for
from hookkit import (
    EXIT_FOR,
    ORDER_OK,
    SLOW,
    Running,
    assert_no_processes,
    complete_backups,
    make_slow_source,
    order,
    release_marker,
    report_hooks,
    source_toml,
    standard_hooks,
    start,
    started_marker,
    statuses,
    wait_marker,
    write_config,
)

if TYPE_CHECKING:
    from conftest import Workspace

pytestmark = needs_rsync

SIGNALS = pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"]
)
POSTS = ["s2.post", "s1.post", "b2.post", "b1.post"]


def _slow_sources(ws: Workspace) -> str:
    return "".join(source_toml(n, make_slow_source(ws, n), **SLOW) for n in ("alpha", "beta"))


def _wait_rsync_running(ws: Workspace, running: Running, source: str) -> None:
    path = str(ws.src / source)

    def copying() -> bool:
        if running.proc.poll() is not None:
            raise AssertionError(f"the CLI exited early; stderr:\n{running.stderr}")
        return any("rsync" in cmd for _, cmd in processes_mentioning(path))

    wait_for(copying, 15, f"rsync of {source}")


def _wait_noticed(running: Running, since: int, sig: int) -> None:
    """Wait until the engine has logged that it got the signal (lines after ``since``)."""
    words = ("interrupt", "signal", signal.Signals(sig).name.lower())
    wait_for(
        lambda: any(w in line.lower() for line in running.stderr_lines()[since:] for w in words),
        10, f"the engine to log that it got {signal.Signals(sig).name}",
    )


def _assert_interrupted_report(ws: Workspace, saved: bool) -> dict[str, Any]:
    report = ws.report()
    assert report["status"] == "interrupted", report
    assert report["saved"] is saved
    return report


@SIGNALS
def test_signal_during_backup_pre_hook(ws: Workspace, sig: int) -> None:
    write_config(ws, standard_hooks(b2={"block": ("pre",)}))
    with start(ws) as running:
        wait_marker(started_marker(ws, "b2", "pre"), running)
        running.send(sig)
        rc = running.wait(30)
    assert rc == EXIT_FOR[sig], running.stderr
    assert running.stdout == ""
    assert_no_processes(ws)
    # b2's pre was cut short: it may have done half its work (stopped the
    # service, then hung), so its post runs too, first (SPEC §2, issue 9 item 3).
    assert order(ws) == ["b1.pre", "b2.pre", "b2.post", "b1.post"]
    assert statuses(ws)["b2.post"] == "interrupted"
    assert statuses(ws)["b1.post"] == "interrupted"
    assert ws.backups() == []
    report = _assert_interrupted_report(ws, saved=False)
    hooks = report_hooks(report)
    assert hooks[:4] == [("b1", "pre", "ok"), ("b2", "pre", "cancelled"),
                         ("b2", "post", "ok"), ("b1", "post", "ok")]
    assert all(status == "skipped" for _, _, status in hooks[4:])
    assert len(hooks) == 8


@pytest.mark.slow
@SIGNALS
def test_signal_during_snapshot(ws: Workspace, sig: int) -> None:
    write_config(ws, standard_hooks(), _slow_sources(ws))
    with start(ws) as running:
        _wait_rsync_running(ws, running, "alpha")
        running.send(sig)
        rc = running.wait(30)
    assert rc == EXIT_FOR[sig], running.stderr
    assert_no_processes(ws)
    assert order(ws) == ORDER_OK
    assert all(statuses(ws)[label] == "interrupted" for label in POSTS), statuses(ws)
    assert ws.backups() == [], "the in-progress folder is removed, no backup added"
    report = _assert_interrupted_report(ws, saved=False)
    assert report_hooks(report) == [
        (label.split(".")[0], label.split(".")[1], "ok") for label in ORDER_OK
    ]
    for name in ("alpha", "beta"):
        source = report["sources"][name]
        assert source["status"] == "cancelled", source


@SIGNALS
def test_signal_during_backup_post_lets_it_finish_and_keeps_the_backup(
    ws: Workspace, sig: int
) -> None:
    write_config(ws, standard_hooks(b2={"block": ("post",)}))
    with start(ws) as running:
        wait_marker(started_marker(ws, "b2", "post"), running)
        since = len(running.stderr_lines())
        running.send(sig)
        _wait_noticed(running, since, sig)
        release_marker(ws, "b2", "post").touch()
        rc = running.wait(30)
    assert rc == EXIT_FOR[sig], running.stderr
    assert_no_processes(ws)
    assert order(ws) == ORDER_OK
    assert "b2.post.released" in ws.event_lines(), "the running post was let finish"
    st = statuses(ws)
    assert [st[label] for label in POSTS] == ["ok", "ok", "ok", "interrupted"]
    [name] = complete_backups(ws)
    assert ws.backups() == [name]
    assert (ws.dest / name / "beta" / "file.txt").exists()
    report = _assert_interrupted_report(ws, saved=True)
    assert report["name"] == name


@pytest.mark.slow
def test_second_sigint_during_cleanup_does_not_skip_post_hooks(ws: Workspace) -> None:
    write_config(ws, standard_hooks(s2={"block": ("post",)}), _slow_sources(ws))
    with start(ws) as running:
        _wait_rsync_running(ws, running, "alpha")
        running.send(signal.SIGINT)
        wait_marker(started_marker(ws, "s2", "post"), running)
        running.send(signal.SIGINT)
        assert running.proc.poll() is None, f"the second SIGINT ended the run:\n{running.stderr}"
        release_marker(ws, "s2", "post").touch()
        rc = running.wait(30)
    assert rc == 130, running.stderr
    assert_no_processes(ws)
    assert order(ws) == ORDER_OK
    assert "s2.post.released" in ws.event_lines(), "the blocked post was not cut short"
    assert all(statuses(ws)[label] == "interrupted" for label in POSTS), statuses(ws)
    assert ws.backups() == []
    _assert_interrupted_report(ws, saved=False)
