"""End to end: the order of hook phases, what each phase sees, and how hooks show in the report."""

from __future__ import annotations

from typing import TYPE_CHECKING

from conftest import needs_rsync
from hookkit import (
    ARGV_EXTRA,
    ORDER_OK,
    HookSpec,
    complete_backups,
    events,
    in_progress,
    order,
    report_hooks,
    standard_hooks,
    tail_text,
    write_config,
)

if TYPE_CHECKING:
    from conftest import Workspace

pytestmark = needs_rsync


def test_successful_run_hook_order_environment_and_view_of_destination(ws: Workspace) -> None:
    write_config(ws, standard_hooks())
    result = ws.run("run")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""

    [name] = complete_backups(ws)
    assert ws.backups() == [name]
    final = str(ws.dest / name)
    progress = str(ws.dest / f"{name}.in-progress")
    assert order(ws) == ORDER_OK

    for e in events(ws):
        hook, phase = e.label.split(".")
        assert e.name == name, e
        assert e.destination == str(ws.dest), e
        assert e.phase == phase, e
        if phase == "pre":
            assert e.status == "-", f"PIBACKUP_STATUS must be unset in pre: {e}"
        else:
            assert e.status == "ok", e
        if hook.startswith("b") and phase == "post":
            # In a backup hook's post it is the final path, whether or not the backup exists.
            assert e.backup_dir == final, e
        else:
            # Snapshot hooks run inside the unfinished backup, post included (SPEC §4).
            assert e.backup_dir == progress, e
        if hook.startswith("b") and phase == "pre":
            assert e.listing == [], f"nothing is created before the backup hooks' pre: {e}"
        elif hook.startswith("s"):
            assert e.listing == [f"{name}.in-progress"], e
        else:
            assert e.listing == [name], f"the backup is final in backup hooks' post: {e}"

    assert (ws.dest / name / "alpha" / "file.txt").read_text() == "content of alpha\n"
    assert (ws.dest / name / "beta" / "file.txt").read_text() == "content of beta\n"

    report = ws.report()
    assert report["name"] == name
    assert report["status"] == "ok"
    assert report["saved"] is True
    assert report["failure"] is None
    assert report_hooks(report) == [
        (label.split(".")[0], label.split(".")[1], "ok") for label in ORDER_OK
    ]
    kinds = {h["hook"]: h["kind"] for h in report["hooks"]}
    assert kinds == {"b1": "backup", "b2": "backup", "s1": "snapshot", "s2": "snapshot"}
    for h in report["hooks"]:
        assert h["exit_code"] == 0, h
        assert isinstance(h["duration_s"], float), h


def test_hook_without_pre_counts_as_succeeded_when_its_turn_comes(ws: Workspace) -> None:
    hooks = [
        HookSpec("b1"), HookSpec("bx", phases=("post",)), HookSpec("b2"),
        HookSpec("s1", kind="snapshot", phases=("post",)), HookSpec("s2", kind="snapshot"),
    ]
    write_config(ws, hooks)
    result = ws.run("run")
    assert result.returncode == 0, result.stderr
    assert order(ws) == [
        "b1.pre", "b2.pre", "s2.pre", "s2.post", "s1.post", "b2.post", "bx.post", "b1.post",
    ]
    report = ws.report()
    assert report["status"] == "ok"
    # Only configured phases are listed: bx and s1 have no pre.
    assert report_hooks(report) == [
        ("b1", "pre", "ok"), ("b2", "pre", "ok"), ("s2", "pre", "ok"), ("s2", "post", "ok"),
        ("s1", "post", "ok"), ("b2", "post", "ok"), ("bx", "post", "ok"), ("b1", "post", "ok"),
    ]


def test_hook_without_pre_after_a_failed_pre_gets_no_post(ws: Workspace) -> None:
    hooks = [
        HookSpec("b1"), HookSpec("bx", phases=("post",)), HookSpec("b2", fail={"pre": 3}),
        HookSpec("by", phases=("post",)), HookSpec("s1", kind="snapshot"),
    ]
    write_config(ws, hooks)
    result = ws.run("run")
    assert result.returncode == 1, result.stderr
    # bx's turn came before b2 failed, so it counts as succeeded; by's turn never came.
    assert order(ws) == ["b1.pre", "b2.pre", "bx.post", "b1.post"]
    assert all(e.status == "failed" for e in events(ws) if e.label.endswith(".post"))


def test_list_form_hooks_and_hook_env(ws: Workspace) -> None:
    hooks = standard_hooks(
        b1={"argv": True, "env": {"PIBACKUP_TEST_ENV": "env of b1"}},
        b2={"env": {"PIBACKUP_TEST_ENV": "env of b2"}},
        s1={"argv": True},
    )
    write_config(ws, hooks)
    result = ws.run("run")
    assert result.returncode == 0, result.stderr
    assert order(ws) == ORDER_OK
    [name] = complete_backups(ws)

    # An argv hook gets its arguments verbatim: no shell splits, expands or unquotes them.
    lines = ws.event_lines()
    for label in ("b1.pre", "s1.pre", "s1.post", "b1.post"):
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{label}|"))
        assert lines[at + 1 : at + 1 + len(ARGV_EXTRA)] == [f"arg:{a}" for a in ARGV_EXTRA]

    for e in events(ws):
        hook = e.label.split(".")[0]
        expected = {"b1": "env of b1", "b2": "env of b2"}.get(hook, "-")
        assert e.test_env == expected, e
        assert e.name == name, e  # argv hooks get the PIBACKUP_* variables too
    post_b1 = next(e for e in events(ws) if e.label == "b1.post")
    assert post_b1.status == "ok"
    assert post_b1.backup_dir == str(ws.dest / name)


def test_hook_output_never_reaches_stdout_and_stderr_tail_is_reported(ws: Workspace) -> None:
    hooks = standard_hooks(
        b1={"stdout": True, "stderr_lines": 1000},
        b2={"stdout": True},
        s1={"stdout": True, "stderr_lines": 3},
    )
    write_config(ws, hooks)
    result = ws.run("run")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "HOOK-STDOUT" not in result.stdout

    report = ws.report()
    by_phase = {(h["hook"], h["phase"]): h for h in report["hooks"]}
    b1_pre = tail_text(by_phase["b1", "pre"]["stderr_tail"])
    assert "b1.pre err-1000" in b1_pre
    assert "b1.pre err-0001" not in b1_pre, "stderr_tail keeps the last lines only"
    assert "HOOK-STDOUT" not in b1_pre
    s1_post = tail_text(by_phase["s1", "post"]["stderr_tail"])
    assert "s1.post err-0001" in s1_post and "s1.post err-0003" in s1_post
    assert "err-" not in tail_text(by_phase["b2", "pre"]["stderr_tail"])
    assert not in_progress(ws)
