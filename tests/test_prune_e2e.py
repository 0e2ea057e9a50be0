"""End to end: retention through `prune`, `prune --dry-run` and `run` (SPEC §2 step 6, §3, §5).

Each test fabricates a destination of 62 backups over 400 days (tests/prunekit.py,
with the hand-worked walk of the rules) next to things that are not ours, then
drives the real CLI and looks at what is left on disk.
"""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING

import pytest
from conftest import needs_rsync, processes_mentioning
from prunekit import (
    EXPECTED_PRUNE_DELETED,
    EXPECTED_PRUNE_KEPT,
    EXPECTED_RUN_DELETED,
    EXPECTED_RUN_KEPT_OLD,
    EXPECTED_RUN_NEW_RULES,
    FOREIGN,
    HISTORY,
    LAST,
    NEWEST,
    RULES_PRUNE,
    RULES_RUN,
    RUN_CLOCK,
    SOURCE,
    STALE_IN_PROGRESS,
    clock_at,
    complete_backups,
    event_hooks,
    fabricate,
    holding_lock,
    list_json,
    make_backup,
    make_big_backup,
    needs_faketime,
    retention_table,
    rsync_source,
    subtree,
    tree,
)

if TYPE_CHECKING:
    from conftest import Workspace

pytestmark = needs_rsync


def _prune_config(ws: Workspace, *, hooks: bool = True) -> None:
    source = ws.make_source(SOURCE)
    body = rsync_source(source) + (event_hooks(ws) if hooks else "")
    ws.write_config(body + "\n" + retention_table(RULES_PRUNE))


def _assert_foreign_untouched(ws: Workspace, before: dict[str, tuple[int, int, int]]) -> None:
    after = tree(ws.dest)
    for name in FOREIGN:
        assert subtree(after, name) == subtree(before, name), f"{name} was touched"


def _sorted_rules(kept: dict[str, list[str]]) -> dict[str, list[str]]:
    # SPEC names the rules that keep a backup but not the order they are listed in.
    return {name: sorted(rules) for name, rules in kept.items()}


# --- prune --dry-run --------------------------------------------------------------------------


def test_prune_dry_run_changes_nothing_takes_no_lock_runs_no_hook(ws: Workspace) -> None:
    fabricate(ws.dest)
    _prune_config(ws)
    before = tree(ws.dest)

    with holding_lock(ws):
        result = ws.run("prune", "--dry-run")

    assert result.returncode == 0, result.stderr
    assert tree(ws.dest) == before, "a dry run changed the destination"
    assert not ws.events.exists(), f"a dry run ran hooks: {ws.event_lines()}"
    assert ws.reports() == [], "a dry run writes no report"
    for name in EXPECTED_PRUNE_DELETED:
        assert name in result.stdout, f"the dry run does not say it would delete {name}"
    for name in EXPECTED_PRUNE_KEPT:
        assert name not in result.stdout, f"the dry run says it would delete {name}, a kept one"
    for name in FOREIGN:
        assert name not in result.stdout, f"the dry run mentions the foreign {name}"


# --- prune --------------------------------------------------------------------------------------


def test_prune_deletes_exactly_the_unkept_backups_inside_the_backup_hooks(ws: Workspace
                                                                            ) -> None:
    fabricate(ws.dest)
    _prune_config(ws)
    before = tree(ws.dest)
    entries_before = len(os.listdir(ws.dest))

    result = ws.run("prune")

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert complete_backups(ws) == set(EXPECTED_PRUNE_KEPT)
    for name in EXPECTED_PRUNE_DELETED:
        assert not os.path.lexists(ws.dest / name)
        assert not os.path.lexists(ws.dest / f"{name}.deleting")
    for name in EXPECTED_PRUNE_KEPT:
        assert subtree(tree(ws.dest), name) == subtree(before, name), f"kept {name} was touched"
    _assert_foreign_untouched(ws, before)
    # prune never made a backup, and nothing but the stale in-progress folder may
    # have gone besides the deleted backups.
    left = set(os.listdir(ws.dest)) - {STALE_IN_PROGRESS}
    assert left == set(EXPECTED_PRUNE_KEPT) | set(FOREIGN)

    # The hooks ran around the deletions: pre saw every entry, post what is left.
    entries_after = len(os.listdir(ws.dest))
    assert ws.event_lines() == [
        f"b1.pre - {entries_before}",
        f"b2.pre - {entries_before}",
        f"b2.post ok {entries_after}",
        f"b1.post ok {entries_after}",
    ]
    assert processes_mentioning(str(ws.root)) == []


def test_prune_exits_3_and_touches_nothing_while_the_lock_is_held(ws: Workspace) -> None:
    fabricate(ws.dest)
    _prune_config(ws)
    before = tree(ws.dest)

    with holding_lock(ws) as lock:
        began = time.monotonic()
        result = ws.run("prune", timeout=30)
        elapsed = time.monotonic() - began

    assert result.returncode == 3, result.stderr
    assert str(lock) in result.stderr, "the message names the lock file"
    assert elapsed < 5, f"prune waited {elapsed:.1f}s for the lock instead of exiting"
    assert tree(ws.dest) == before
    assert not ws.events.exists(), f"hooks ran without the lock: {ws.event_lines()}"


def test_prune_of_a_destination_that_does_not_exist_fails_inside_the_hooks(ws: Workspace
                                                                          ) -> None:
    source = ws.make_source(SOURCE)
    missing = ws.root / "not-mounted"
    ws.config_path.write_text(
        f'destination = "{missing}"\nstate_dir = "{ws.state}"\n'
        + rsync_source(source) + event_hooks(ws, ["b1"]) + retention_table(RULES_PRUNE))

    result = ws.run("prune")

    assert result.returncode == 1, result.stderr
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stderr
    assert not missing.exists(), "prune created the destination"
    assert [line.split()[:2] for line in ws.event_lines()] == [
        ["b1.pre", "-"], ["b1.post", "failed"]]


# --- run ---------------------------------------------------------------------------------------


@needs_faketime
def test_run_saves_then_deletes_exactly_the_unkept_backups(ws: Workspace) -> None:
    fabricate(ws.dest)
    source = ws.make_source(SOURCE, {"new.txt": "made by this run\n"})
    ws.write_config(rsync_source(source) + "\n" + retention_table(RULES_RUN))
    before = tree(ws.dest)

    result = ws.run("run", env=clock_at(RUN_CLOCK))

    assert result.returncode == 0, result.stderr
    report = ws.report()
    new = report["name"]
    assert report["status"] == "ok" and report["saved"] is True
    assert (ws.dest / new / SOURCE / "new.txt").read_text() == "made by this run\n"
    assert complete_backups(ws) == set(EXPECTED_RUN_KEPT_OLD)
    left = set(os.listdir(ws.dest))
    assert left == {new} | set(EXPECTED_RUN_KEPT_OLD) | set(FOREIGN), (
        "the stale in-progress folder is removed, the unkept backups deleted, nothing else")
    _assert_foreign_untouched(ws, before)

    retention = report["retention"]
    assert sorted(retention["deleted"]) == sorted(EXPECTED_RUN_DELETED)
    assert _sorted_rules(retention["kept"]) == _sorted_rules(
        {new: EXPECTED_RUN_NEW_RULES, **EXPECTED_RUN_KEPT_OLD})
    assert retention["errors"] == []


def test_a_failed_save_deletes_nothing(ws: Workspace) -> None:
    fabricate(ws.dest)
    ws.write_config(rsync_source(ws.root / "no-such-source") + "\n" + retention_table(RULES_RUN))
    before = tree(ws.dest)

    result = ws.run("run")

    assert result.returncode == 1, result.stderr
    report = ws.report()
    assert report["status"] == "failed" and report["saved"] is False
    assert report["retention"]["deleted"] == []
    assert complete_backups(ws) == set(HISTORY), "a failed run deleted old backups"
    for name in HISTORY:
        assert subtree(tree(ws.dest), name) == subtree(before, name)
    _assert_foreign_untouched(ws, before)
    assert not os.path.lexists(ws.dest / report["name"])
    assert not os.path.lexists(ws.dest / f"{report['name']}.in-progress")


# --- an interrupted deletion -----------------------------------------------------------------

NEWER, OLDER = "2025-11-02t03-00-00+0100", "2025-11-01t03-00-00+0100"
BIG = "2025-10-05t03-00-00+0200"  # less than 30 days before OLDER: no clock jump


def _kill_prune_while_it_deletes(ws: Workspace) -> None:
    """Start `prune`, SIGKILL it once BIG has become BIG.deleting (and is not gone yet)."""
    make_backup(ws.dest, NEWER)
    make_backup(ws.dest, OLDER)
    make_big_backup(ws.dest, BIG)
    source = ws.make_source(SOURCE)
    ws.write_config(rsync_source(source) + "\n" + retention_table({"keep_last": 2}))
    deleting = ws.dest / f"{BIG}.deleting"

    proc = ws.start("prune")
    try:
        deadline = time.monotonic() + 30
        # A tight poll: removing 20,000 files takes a few hundred milliseconds.
        while not deleting.exists():
            assert proc.poll() is None, f"prune ended before deleting: {proc.communicate()}"
            assert time.monotonic() < deadline, "timed out waiting for the .deleting folder"
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()

    assert deleting.is_dir(), "the deletion finished before the kill: make BIG bigger"
    assert not os.path.lexists(ws.dest / BIG), "a half-deleted folder kept its backup name"
    assert processes_mentioning(str(ws.root)) == []


@pytest.mark.parametrize("finisher", [pytest.param("run", marks=needs_faketime), "prune"])
def test_an_interrupted_deletion_is_never_a_backup_and_the_next_command_finishes_it(
        ws: Workspace, finisher: str) -> None:
    _kill_prune_while_it_deletes(ws)

    rows = list_json(ws)
    assert [(r["name"], r["state"], sorted(r["kept_by"])) for r in rows] == [
        (NEWER, "complete", sorted([NEWEST, LAST])),
        (OLDER, "complete", [LAST]),
        (BIG, "deleting", []),
    ]

    # A run within 30 days of NEWER: a later one would be a clock jump (SPEC §3).
    result = ws.run(finisher, env=clock_at("2025-11-20 12:00:00") if finisher == "run" else {})

    assert result.returncode == 0, result.stderr
    assert not os.path.lexists(ws.dest / f"{BIG}.deleting"), "the deletion was not finished"
    assert not os.path.lexists(ws.dest / BIG)
    if finisher == "run":
        report = ws.report()
        new = report["name"]
        assert report["status"] == "ok"
        # keep_last = 2 now keeps the new backup and NEWER.
        assert set(os.listdir(ws.dest)) == {new, NEWER}
        assert OLDER in report["retention"]["deleted"]
    else:
        assert set(os.listdir(ws.dest)) == {NEWER, OLDER}
    assert processes_mentioning(str(ws.root)) == []


# --- a table that keeps nothing --------------------------------------------------------------


@pytest.mark.parametrize("table", [
    "[retention]\nkeep_last = 0\nkeep_daily = 0\nkeep_monthly = 0\n",
    "[retention]\n",
])
def test_a_retention_table_without_a_rule_is_refused(ws: Workspace, table: str) -> None:
    fabricate(ws.dest, HISTORY[:5], foreign=False, stale=False)
    ws.write_config(rsync_source(ws.make_source(SOURCE)) + "\n" + table)

    check = ws.run("check")
    assert check.returncode == 2, check.stderr
    assert "retention" in check.stderr
    assert "Traceback" not in check.stderr

    prune = ws.run("prune")
    assert prune.returncode == 2, prune.stderr
    assert complete_backups(ws) == set(HISTORY[:5]), "a refused config deleted backups"


def test_prune_without_a_retention_table_deletes_nothing(ws: Workspace) -> None:
    fabricate(ws.dest)
    ws.write_config(rsync_source(ws.make_source(SOURCE)))
    before = tree(ws.dest)

    result = ws.run("prune")

    assert result.returncode == 0, result.stderr
    def ours(snapshot: dict[str, tuple[int, int, int]]) -> dict[str, tuple[int, int, int]]:
        # Whether prune also clears a crashed run's folder is not in question here.
        return {k: v for k, v in snapshot.items()
                if k != "." and not k.startswith(STALE_IN_PROGRESS)}

    assert ours(tree(ws.dest)) == ours(before)
