"""End to end: `list` and `list --json` (SPEC §3, §5), on fabricated destinations.

`list` reads the destination as it is: no lock, no hook, no change. Its JSON
is an array of {name, state, time, kept_by}, newest instant first.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest
from conftest import processes_mentioning
from prunekit import (
    ALL,
    DAILY,
    EXPECTED_PRUNE_KEPT,
    FOREIGN,
    HISTORY,
    LAST,
    NEWEST,
    RULES_PRUNE,
    SOURCE,
    STALE_IN_PROGRESS,
    event_hooks,
    fabricate,
    holding_lock,
    list_json,
    make_backup,
    make_foreign,
    retention_table,
    rsync_source,
    tree,
)

if TYPE_CHECKING:
    from conftest import Workspace

# A week of a Central European clock around the end of summer time.
IN_PROGRESS = "2025-10-27t03-00-00+0100"  # a crashed run, newer than every backup
A = "2025-10-26t02-10-00+0100"  # 01:10 UTC: the newest backup, though the smaller name
B = "2025-10-26t02-30-00+0200"  # 00:30 UTC
C = "2025-10-25t03-00-00+0200"
DELETING = "2025-10-24t12-00-00+0200"  # an interrupted deletion
D = "2025-10-24t03-00-00+0200"
E = "2025-10-23t03-00-00+0200"

ORDER = [IN_PROGRESS, A, B, C, DELETING, D, E]
STATES = {IN_PROGRESS: "in-progress", DELETING: "deleting"}
# keep_last = 1, keep_daily = 2, walking newest instant first:
# keep_last keeps A; keep_daily keeps A (10-26), skips B (10-26 again), keeps C (10-25).
WEEK_RULES = {"keep_last": 1, "keep_daily": 2}
WEEK_KEPT = {A: [NEWEST, LAST, DAILY], C: [DAILY]}
WEEK_DOOMED = [B, D, E]

UTC_INSTANTS = {
    IN_PROGRESS: datetime(2025, 10, 27, 2, 0, tzinfo=UTC),
    A: datetime(2025, 10, 26, 1, 10, tzinfo=UTC),
    B: datetime(2025, 10, 26, 0, 30, tzinfo=UTC),
    C: datetime(2025, 10, 25, 1, 0, tzinfo=UTC),
    DELETING: datetime(2025, 10, 24, 10, 0, tzinfo=UTC),
    D: datetime(2025, 10, 24, 1, 0, tzinfo=UTC),
    E: datetime(2025, 10, 23, 1, 0, tzinfo=UTC),
}


def _week(ws: Workspace, retention: dict[str, int] | None = WEEK_RULES, *,
          hooks: bool = False) -> None:
    for name in (A, B, C, D, E):
        make_backup(ws.dest, name)
    make_backup(ws.dest, f"{IN_PROGRESS}.in-progress")
    make_backup(ws.dest, f"{DELETING}.deleting")
    make_foreign(ws.dest)
    body = rsync_source(ws.make_source(SOURCE)) + (event_hooks(ws) if hooks else "")
    if retention is not None:
        body += "\n" + retention_table(retention)
    ws.write_config(body)


def _offset(name: str) -> timedelta:
    sign = -1 if name[-5] == "-" else 1
    return sign * timedelta(hours=int(name[-4:-2]), minutes=int(name[-2:]))


def test_list_json_newest_instant_first_with_states_times_and_rules(ws: Workspace) -> None:
    _week(ws)

    rows = list_json(ws)

    assert [r["name"] for r in rows] == ORDER
    for row in rows:
        name = row["name"]
        assert set(row) == {"name", "state", "time", "kept_by"}, row
        assert row["state"] == STATES.get(name, "complete"), row
        moment = datetime.fromisoformat(row["time"])
        assert moment == UTC_INSTANTS[name], row
        assert moment.utcoffset() == _offset(name), f"time not in the name's offset: {row}"
        expected = WEEK_KEPT.get(name, [])  # doomed, in-progress and deleting: []
        assert sorted(row["kept_by"]) == sorted(expected), row


def test_list_json_without_retention_keeps_all(ws: Workspace) -> None:
    _week(ws, retention=None)

    rows = list_json(ws)

    assert [r["name"] for r in rows] == ORDER
    kept = {r["name"]: sorted(r["kept_by"]) for r in rows}
    assert kept == {
        IN_PROGRESS: [], A: sorted([NEWEST, ALL]), B: [ALL], C: [ALL], DELETING: [],
        D: [ALL], E: [ALL],
    }


def test_list_table_shows_every_backup_and_what_goes_at_the_next_prune(ws: Workspace) -> None:
    _week(ws)

    result = ws.run("list")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    positions = []
    for name in ORDER:
        matching = [i for i, line in enumerate(lines) if name in line]
        assert len(matching) == 1, f"{name} is on {len(matching)} lines:\n{result.stdout}"
        positions.append(matching[0])
        line = lines[matching[0]]
        if name in STATES:
            assert STATES[name] in line, line
        assert ("deleted at next prune" in line) == (name in WEEK_DOOMED), line
    assert positions == sorted(positions), f"not newest first:\n{result.stdout}"
    for name in FOREIGN:
        assert name not in result.stdout


def test_list_takes_no_lock_runs_no_hook_changes_nothing(ws: Workspace) -> None:
    _week(ws, hooks=True)
    before = tree(ws.dest)

    with holding_lock(ws):
        json_result = ws.run("list", "--json")
        table_result = ws.run("list")

    assert json_result.returncode == 0, json_result.stderr
    assert table_result.returncode == 0, table_result.stderr
    assert not ws.events.exists(), f"list ran hooks: {ws.event_lines()}"
    assert tree(ws.dest) == before, "list changed the destination"
    assert ws.reports() == []
    assert processes_mentioning(str(ws.root)) == []


def test_list_json_agrees_with_the_hand_worked_rules_over_400_days(ws: Workspace) -> None:
    fabricate(ws.dest)
    ws.write_config(rsync_source(ws.make_source(SOURCE)) + "\n" + retention_table(RULES_PRUNE))

    rows = list_json(ws)

    stale = STALE_IN_PROGRESS.removesuffix(".in-progress")
    # HISTORY is written newest instant first; the crashed run is newer still.
    assert [r["name"] for r in rows] == [stale, *HISTORY]
    assert rows[0]["state"] == "in-progress" and rows[0]["kept_by"] == []
    kept = {r["name"]: sorted(r["kept_by"]) for r in rows[1:] if r["kept_by"]}
    assert kept == {name: sorted(rules) for name, rules in EXPECTED_PRUNE_KEPT.items()}
    assert all(r["state"] == "complete" for r in rows[1:])


@pytest.mark.parametrize("command", [["list"], ["list", "--json"], ["prune", "--dry-run"]])
def test_a_destination_that_does_not_exist_is_reported_not_created(
        ws: Workspace, command: list[str]) -> None:
    missing = ws.root / "not-mounted"
    ws.config_path.write_text(
        f'destination = "{missing}"\nstate_dir = "{ws.state}"\n'
        + rsync_source(ws.make_source(SOURCE)) + event_hooks(ws)
        + retention_table(WEEK_RULES))

    result = ws.run(*command)

    assert result.returncode != 0
    assert str(missing) in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""
    assert not missing.exists()
    assert not ws.events.exists(), "hooks ran"
