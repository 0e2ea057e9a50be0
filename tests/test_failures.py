"""End to end: each failure rule of SPEC §2 "Failures", through the real CLI."""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING, Any

import pytest
from conftest import needs_rsync, processes_mentioning, wait_for
from hookkit import (
    ORDER_OK,
    SLOW,
    HookSpec,
    assert_no_processes,
    complete_backups,
    events,
    in_progress,
    make_slow_source,
    order,
    report_hooks,
    sleeper,
    source_toml,
    standard_hooks,
    start,
    started_marker,
    statuses,
    wait_marker,
    wait_no_processes,
    write_config,
)

if TYPE_CHECKING:
    from conftest import Workspace

pytestmark = needs_rsync


def _skipped_after(
    report: dict[str, Any], ran: list[tuple[str, str, str]]
) -> set[tuple[str, str]]:
    """Assert the report lists ``ran`` first, then only skipped phases; return those."""
    hooks = report_hooks(report)
    assert hooks[: len(ran)] == ran, hooks
    rest = hooks[len(ran):]
    assert all(status == "skipped" for _, _, status in rest), hooks
    return {(hook, phase) for hook, phase, _ in rest}


ALL_PHASES = {(h, p) for h in ("b1", "b2", "s1", "s2") for p in ("pre", "post")}


def test_non_critical_pre_failure_stops_later_pres_and_keeps_older_backups(
    ws: Workspace,
) -> None:
    write_config(ws, standard_hooks())
    first = ws.run("run")
    assert first.returncode == 0, first.stderr
    [older] = complete_backups(ws)
    kept_file = ws.dest / older / "alpha" / "file.txt"
    before = os.stat(kept_file)
    ws.events.unlink()

    write_config(ws, standard_hooks(b2={"fail": {"pre": 3}}))
    result = ws.run("run")
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert order(ws) == ["b1.pre", "b2.pre", "b1.post"]
    assert statuses(ws)["b1.post"] == "failed"
    assert ws.backups() == [older], "no in-progress folder, no new backup"
    after = os.stat(kept_file)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert kept_file.read_text() == "content of alpha\n"

    report = ws.report()
    assert report["name"] != older
    assert report["status"] == "failed"
    assert report["saved"] is False
    assert "b2" in report["failure"]
    skipped = _skipped_after(
        report, [("b1", "pre", "ok"), ("b2", "pre", "failed"), ("b1", "post", "ok")]
    )
    assert skipped == ALL_PHASES - {("b1", "pre"), ("b2", "pre"), ("b1", "post")}
    assert all(s["status"] in ("skipped", "cancelled") for s in report["sources"].values())
    assert next(h for h in report["hooks"] if h["hook"] == "b2")["exit_code"] == 3


def test_critical_pre_failure_stops_at_once_and_next_run_cleans_up(ws: Workspace) -> None:
    write_config(ws, standard_hooks(s1={"critical": True, "fail": {"pre": 4}}))
    result = ws.run("run")
    assert result.returncode == 1, result.stderr
    assert order(ws) == ["b1.pre", "b2.pre", "s1.pre"], "no other pre, no post at all"
    assert complete_backups(ws) == []
    report = ws.report()
    assert report["status"] == "failed"
    assert report["saved"] is False
    assert "s1" in report["failure"]
    skipped = _skipped_after(report, [("b1", "pre", "ok"), ("b2", "pre", "ok"),
                                      ("s1", "pre", "failed")])
    assert skipped == ALL_PHASES - {("b1", "pre"), ("b2", "pre"), ("s1", "pre")}
    left = in_progress(ws)  # may remain, as after a crash

    ws.events.unlink()
    write_config(ws, standard_hooks())
    again = ws.run("run")
    assert again.returncode == 0, again.stderr
    assert order(ws) == ORDER_OK
    [name] = complete_backups(ws)
    assert ws.backups() == [name], "the stale in-progress folder was removed"
    for stale in left:
        assert stale.removesuffix(".in-progress") != name
        assert stale in again.stderr, "the run logs that it removed the stale folder"
    assert ws.report()["status"] == "ok"


def test_critical_post_failure_stops_remaining_posts(ws: Workspace) -> None:
    write_config(ws, standard_hooks(s2={"critical": True, "fail": {"post": 5}}))
    result = ws.run("run")
    assert result.returncode == 1, result.stderr
    assert order(ws) == ["b1.pre", "b2.pre", "s1.pre", "s2.pre", "s2.post"]
    assert complete_backups(ws) == [], "nothing after the critical post ran: no save"
    report = ws.report()
    assert report["status"] == "failed"
    assert report["saved"] is False
    assert "s2" in report["failure"]
    ran = [("b1", "pre", "ok"), ("b2", "pre", "ok"), ("s1", "pre", "ok"), ("s2", "pre", "ok"),
           ("s2", "post", "failed")]
    assert _skipped_after(report, ran) == {("s1", "post"), ("b2", "post"), ("b1", "post")}


@pytest.mark.slow
def test_failing_source_cancels_the_others_while_they_copy(ws: Workspace) -> None:
    slow1 = make_slow_source(ws, "slow1")
    slow2 = make_slow_source(ws, "slow2")
    bad = make_slow_source(ws, "bad")
    sources = (source_toml("slow1", slow1, **SLOW) + source_toml("slow2", slow2, **SLOW)
               + source_toml("bad", bad, timeout="2s", **SLOW))
    write_config(ws, standard_hooks(), sources, header="concurrency = 3")
    with start(ws) as running:

        def copying(path: object) -> bool:
            return any("rsync" in cmd for _, cmd in processes_mentioning(str(path)))

        wait_for(lambda: copying(slow1) and copying(slow2) and copying(bad), 15, "three rsyncs")
        rc = running.wait(60)
    assert rc == 1, running.stderr
    assert_no_processes(ws)
    assert ws.backups() == [], "no in-progress folder and no backup"
    assert order(ws) == ORDER_OK
    assert all(e.status == "failed" for e in events(ws) if e.label.endswith(".post"))

    report = ws.report()
    assert report["status"] == "failed"
    assert report["saved"] is False
    assert "bad" in report["failure"]
    src = report["sources"]
    assert src["bad"]["status"] == "failed"
    assert src["bad"]["snapshot"]["status"] == "failed"
    for name in ("slow1", "slow2"):
        assert src[name]["status"] == "cancelled", src[name]
        # 3 MiB at 500 KiB/s takes ~6 s: they were cut short when "bad" timed out (2 s),
        # timed from their own start, which a loaded machine's start-up does not move.
        assert src[name]["snapshot"]["duration_s"] < 5.5, src[name]
        assert src[name]["snapshot"]["status"] == "cancelled", src[name]


@pytest.mark.parametrize("failing", ["b1", "b2"])
def test_post_failure_after_save_keeps_backup_and_runs_other_posts(
    ws: Workspace, failing: str
) -> None:
    write_config(ws, standard_hooks(**{failing: {"fail": {"post": 1}}}))
    result = ws.run("run")
    assert result.returncode == 1, result.stderr
    assert order(ws) == ORDER_OK, "a failed post does not stop the other posts"
    [name] = complete_backups(ws)
    assert ws.backups() == [name]
    assert (ws.dest / name / "alpha" / "file.txt").exists()
    report = ws.report()
    assert report["status"] == "failed"
    assert report["saved"] is True
    assert failing in report["failure"]
    expected = [(label.split(".")[0], label.split(".")[1],
                 "failed" if label == f"{failing}.post" else "ok") for label in ORDER_OK]
    assert report_hooks(report) == expected


@pytest.mark.slow
def test_hook_past_its_timeout_is_killed_with_its_children(ws: Workspace) -> None:
    write_config(ws, standard_hooks(
        b2={"timeout": "1s", "children": True, "block": ("pre",)},
    ))
    with start(ws) as running:
        wait_marker(started_marker(ws, "b2", "pre"), running)
        program = str(sleeper(ws))
        children = [(p, c) for p, c in processes_mentioning(program) if c.startswith(program)]
        assert len(children) == 2, f"the hook's children run: {children}"
        rc = running.wait(30)
    assert rc == 1, running.stderr
    # The pre's own children were ended with it; the post (cut short pre's post,
    # SPEC §2) started two more in the background and exited: those are left running.
    left = {p for p, _ in processes_mentioning(program)}
    assert not left & {p for p, _ in children}, "the timed-out pre's children survived"
    assert len(left) == 2, f"the post's background jobs are left running: {left}"
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    wait_no_processes(ws)
    # Cut short by its timeout: its post undoes what the pre half did.
    assert order(ws) == ["b1.pre", "b2.pre", "b2.post", "b1.post"]
    assert statuses(ws)["b2.post"] == "failed"
    assert statuses(ws)["b1.post"] == "failed"
    assert ws.backups() == []
    report = ws.report()
    assert report["status"] == "failed"
    assert "b2" in report["failure"]
    b2_pre = next(h for h in report["hooks"] if (h["hook"], h["phase"]) == ("b2", "pre"))
    assert b2_pre["status"] == "failed"
    assert 0.9 < b2_pre["duration_s"] < 10


def test_optional_source_failure_saves_backup_without_it(ws: Workspace) -> None:
    sources = (source_toml("alpha", ws.make_source("alpha"))
               + source_toml("laptop", ws.src / "switched-off", optional=True)
               + source_toml("beta", ws.make_source("beta")))
    write_config(ws, [HookSpec("b1"), HookSpec("s1", kind="snapshot")], sources)
    result = ws.run("run")
    assert result.returncode == 1, result.stderr
    assert order(ws) == ["b1.pre", "s1.pre", "s1.post", "b1.post"]
    [name] = complete_backups(ws)
    assert ws.backups() == [name]
    # .pibackup: the manifests of the sources saved (SPEC §9).
    assert sorted(p.name for p in (ws.dest / name).iterdir()) == [".pibackup", "alpha", "beta"]
    report = ws.report()
    assert report["status"] == "failed"
    assert report["saved"] is True
    assert "laptop" in report["failure"]
    assert report["sources"]["laptop"]["status"] == "failed"
    assert report["sources"]["alpha"]["status"] == "ok"
    assert report["sources"]["beta"]["status"] == "ok"
