"""End to end: what retention never deletes, and how a backup dated ahead is undone (SPEC §1
clock guard, §3, §5 ``prune --discard``, §6 ``retention.paused``).

- The newest backup that holds a source is kept (``last_of_source``), so an
  optional source away for a night keeps its last copy whatever ``keep_last``
  says.
- A backup dated more than 30 days after the one before it is a clock jump:
  nothing older is deleted until the backups from it on span 30 days, and
  every run's report, mail and log say why.
- The clock guard names every backup dated after the clock and both ways out;
  ``prune --discard NAME`` is the way out when those backups are dated ahead.

Real CLI runs, real rsync; a clock ten years ahead is libfaketime (Debian
package ``faketime``) preloaded into a real run, or a backup folder made by hand
with a name ten years ahead.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
from conftest import needs_rsync, processes_mentioning
from datakit import complete_backups, rsync_source, table
from prunekit import (
    SOURCE,
    clock_ahead,
    event_hooks,
    holding_lock,
    list_json,
    make_backup,
    needs_faketime,
    tree,
)
from smtpkit import MailServer, parts

if TYPE_CHECKING:
    from conftest import Workspace

pytestmark = needs_rsync

LAST_OF_SOURCE, PAUSED, NEWEST = "last_of_source", "paused", "newest"


def _name(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dt%H-%M-%S%z")


def _mail_config(server: MailServer) -> str:
    return (table("[report]", **{"from": "pibackup@test.local"}, to=["admin@test.local"])
            + server.smtp_table())


def _latest_report(ws: Workspace) -> dict[str, Any]:
    """The report written last (``ws.report()`` takes the greatest name: one dated ahead)."""
    newest = max(ws.reports(), key=lambda path: path.stat().st_mtime_ns)
    return dict(json.loads(newest.read_text()))


def _json_events(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


# --- last_of_source ----------------------------------------------------------------------------


def test_an_optional_source_away_for_a_night_keeps_its_last_copy(ws: Workspace) -> None:
    data = ws.make_source("data")
    laptop = ws.make_source("laptop", {"thesis.tex": "\\chapter{Results}\n"})
    with MailServer(None, security="none", require_auth=False) as server:
        ws.write_config(rsync_source("data", data)
                        + rsync_source("laptop", laptop, optional=True)
                        + table("[retention]", keep_last=1) + _mail_config(server))
        first = ws.run("run")
        assert first.returncode == 0, first.stderr
        [night] = complete_backups(ws.dest)

        # The laptop is off tonight: its path is not there, its source fails.
        laptop.rename(ws.root / "laptop-away")
        second = ws.run("run", "--log-format", "json")
        second_report = ws.report()
        # The previous backup is the only one holding laptop/thesis.tex: it stays.
        held = ws.dest / night / "laptop" / "thesis.tex"
        thesis = held.read_text() if held.exists() else None
        kept_by = {row["name"]: row["kept_by"] for row in list_json(ws)}
        mails = [parts(m) for m in server.messages]

        # Back the next night: the new backup holds the laptop, the old copies go.
        (ws.root / "laptop-away").rename(laptop)
        third = ws.run("run")

    assert second.returncode == 1, second.stderr
    report = second_report
    assert (report["status"], report["saved"]) == ("failed", True)
    assert report["sources"]["laptop"]["status"] == "failed"
    assert thesis == "\\chapter{Results}\n"
    newest = report["name"]
    assert report["retention"]["deleted"] == []
    assert report["retention"]["kept"] == {newest: [NEWEST, "keep_last"],
                                           night: [LAST_OF_SOURCE]}
    assert report["retention"]["paused"] is None
    assert kept_by == {newest: [NEWEST, "keep_last"], night: [LAST_OF_SOURCE]}
    assert f"kept     {night}  {LAST_OF_SOURCE}" in mails[-1].text, mails[-1].text

    assert third.returncode == 0, third.stderr
    assert complete_backups(ws.dest) == [ws.report()["name"]]
    assert sorted(ws.report()["retention"]["deleted"]) == sorted([newest, night])


def test_prune_keeps_the_newest_backup_of_each_source(ws: Workspace) -> None:
    # Made by hand: three nights with both sources, then two with only "data".
    start = datetime.now().astimezone().replace(microsecond=0) - timedelta(days=6)
    names = [_name(start + timedelta(days=i)) for i in range(5)]
    for i, name in enumerate(names):
        make_backup(ws.dest, name)
        if i < 3:
            (ws.dest / name / "laptop").mkdir()
    # A file or a link named like the source does not hold it.
    (ws.dest / names[4] / "laptop").symlink_to(ws.dest / names[0] / "laptop")
    (ws.dest / names[3] / "laptop").write_text("not a folder\n")
    ws.write_config(rsync_source(SOURCE, ws.make_source(SOURCE))
                    + rsync_source("laptop", ws.make_source("laptop"), optional=True)
                    + table("[retention]", keep_last=1))

    dry = ws.run("prune", "--dry-run")
    result = ws.run("prune")

    assert dry.returncode == 0, dry.stderr
    assert "3 backups would be deleted, 2 kept" in dry.stdout, dry.stdout
    assert result.returncode == 0, result.stderr
    assert complete_backups(ws.dest) == [names[2], names[4]]
    assert {row["name"]: row["kept_by"] for row in list_json(ws)} == {
        names[4]: [NEWEST, "keep_last"], names[2]: [LAST_OF_SOURCE]}


# --- a clock far ahead -------------------------------------------------------------------------


def _eight_nights(ws: Workspace, *, hooks: bool = False) -> list[str]:
    """Eight daily backups up to yesterday, ``keep_within = "14d"``; names, oldest first."""
    now = datetime.now().astimezone().replace(microsecond=0)
    names = [_name(now - timedelta(days=days)) for days in range(8, 0, -1)]
    for name in names:
        make_backup(ws.dest, name)
    ws.write_config(rsync_source(SOURCE, ws.make_source(SOURCE))
                    + (event_hooks(ws) if hooks else "")
                    + table("[retention]", keep_within="14d"))
    return names


def test_a_backup_dated_ten_years_ahead_makes_prune_delete_nothing(ws: Workspace) -> None:
    nights = _eight_nights(ws)
    ahead = _name(datetime.now().astimezone().replace(microsecond=0) + timedelta(days=3653))
    make_backup(ws.dest, ahead)

    dry = ws.run("prune", "--dry-run")
    result = ws.run("prune", "--log-format", "json")

    assert dry.returncode == 0, dry.stderr
    assert "0 backups would be deleted" in dry.stdout, dry.stdout
    assert result.returncode == 0, result.stderr
    assert complete_backups(ws.dest) == [*nights, ahead], "real backups were deleted"
    [paused] = [e for e in _json_events(result.stderr) if e["event"] == "retention paused"]
    assert paused["level"] == "warning"
    assert ahead in paused["why"] and f"prune --discard {ahead}" in paused["why"], paused
    kept_by = {row["name"]: row["kept_by"] for row in list_json(ws)}
    assert kept_by == {ahead: [NEWEST, "keep_within"], **{n: [PAUSED] for n in nights}}


@needs_faketime
def test_a_run_ten_years_ahead_deletes_nothing_and_discard_undoes_it(ws: Workspace) -> None:
    nights = _eight_nights(ws)
    ahead_clock = clock_ahead("+10y")
    base = ws.config_path.read_text()
    with MailServer(None, security="none", require_auth=False) as server:
        ws.config_path.write_text(base + _mail_config(server))
        ahead_run = ws.run("run", "--log-format", "json", env=ahead_clock)
        mails = [parts(m) for m in server.messages]
    ws.config_path.write_text(base)

    # Ten years ahead: every real backup is far outside keep_within, yet none goes.
    assert ahead_run.returncode == 0, ahead_run.stderr
    report = ws.report()
    ahead = report["name"]
    assert ahead[:4] >= str(datetime.now().year + 9), ahead
    assert complete_backups(ws.dest) == [*nights, ahead]
    retention = report["retention"]
    assert retention["deleted"] == []
    assert retention["kept"] == {ahead: [NEWEST, "keep_within"],
                                 **{n: [PAUSED] for n in reversed(nights)}}
    why = retention["paused"]
    assert why is not None and ahead in why and nights[-1] in why, why
    assert f"prune --discard {ahead}" in why, why
    assert why in mails[-1].text, mails[-1].text
    assert any(e["event"] == "retention paused" and e["why"] == why
               for e in _json_events(ahead_run.stderr)), ahead_run.stderr

    # With the right clock, the guard stops the run and says both ways out.
    stopped = ws.run("run")
    assert stopped.returncode == 1, stopped.stderr
    failure = _latest_report(ws)["failure"]
    assert ahead in failure and "NTP" in failure and f"prune --discard {ahead}" in failure, (
        failure)

    # The way out that is not rm -rf: discard the backup dated ahead.
    discarded = ws.run("prune", "--discard", ahead)
    assert discarded.returncode == 0, discarded.stderr
    assert complete_backups(ws.dest) == nights
    again = ws.run("run")
    assert again.returncode == 0, again.stderr
    assert complete_backups(ws.dest) == [*nights, _latest_report(ws)["name"]]
    assert _latest_report(ws)["retention"]["paused"] is None


# --- the clock guard --------------------------------------------------------------------------


def test_the_clock_guard_names_every_backup_dated_after_the_clock(ws: Workspace) -> None:
    now = datetime.now().astimezone().replace(microsecond=0)
    past = _name(now - timedelta(days=1))
    soon, far = _name(now + timedelta(days=400)), _name(now + timedelta(days=3653))
    for name in (past, soon, far):
        make_backup(ws.dest, name)
    ws.write_config(rsync_source(SOURCE, ws.make_source(SOURCE)))

    result = ws.run("run")

    assert result.returncode == 1, result.stderr
    failure = ws.report()["failure"]
    assert soon in failure and far in failure and past not in failure, failure
    assert "NTP" in failure, "the clock may be behind: wait for NTP"
    assert "prune --discard" in failure, "or the backups are dated ahead: discard them"
    assert soon in result.stderr and far in result.stderr, result.stderr
    assert complete_backups(ws.dest) == [past, soon, far]


# --- prune --discard --------------------------------------------------------------------------


def _three(ws: Workspace) -> list[str]:
    now = datetime.now().astimezone().replace(microsecond=0)
    names = [_name(now - timedelta(days=days)) for days in (3, 2, 1)]
    for name in names:
        make_backup(ws.dest, name)
    ws.write_config(rsync_source(SOURCE, ws.make_source(SOURCE)) + event_hooks(ws))
    return names


def test_discard_deletes_the_newest_inside_the_backup_hooks(ws: Workspace) -> None:
    names = _three(ws)
    before = len(os.listdir(ws.dest))

    result = ws.run("prune", "--discard", names[-1], "--log-format", "json")

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    # No [retention] table keeps everything, and the newest is never deleted by
    # retention: --discard deletes it all the same, and nothing else.
    assert sorted(os.listdir(ws.dest)) == names[:2]
    assert ws.event_lines() == [f"b1.pre - {before}", f"b2.pre - {before}",
                                f"b2.post ok {before - 1}", f"b1.post ok {before - 1}"]
    [event] = [e for e in _json_events(result.stderr) if e["event"] == "backup discarded"]
    assert event["backup"] == names[-1]
    assert processes_mentioning(str(ws.root)) == []


def test_discard_dry_run_says_what_it_would_delete_and_changes_nothing(ws: Workspace) -> None:
    names = _three(ws)
    before = tree(ws.dest)

    with holding_lock(ws):
        result = ws.run("prune", "--discard", names[0], "--dry-run")

    assert result.returncode == 0, result.stderr
    assert [line for line in result.stdout.splitlines() if line.startswith("would delete")
            ] == [f"would delete {ws.dest / names[0]}"]
    assert tree(ws.dest) == before
    assert not ws.events.exists(), ws.event_lines()


@pytest.mark.parametrize("what", ["absent", "in-progress", "deleting", "link", "file"])
@pytest.mark.parametrize("dry", [False, True], ids=["real", "dry-run"])
def test_discard_of_what_is_not_a_complete_backup_exits_1_naming_it(
        ws: Workspace, what: str, dry: bool) -> None:
    names = _three(ws)
    other = _name(datetime.now().astimezone().replace(microsecond=0) - timedelta(days=10))
    if what == "in-progress":
        make_backup(ws.dest, other + ".in-progress")
    elif what == "deleting":
        make_backup(ws.dest, other + ".deleting")
    elif what == "link":
        (ws.dest / other).symlink_to(ws.dest / names[0])
    elif what == "file":
        (ws.dest / other).write_text("not a backup\n")
    before = tree(ws.dest)

    result = ws.run("prune", "--discard", other, *(["--dry-run"] if dry else []))

    assert result.returncode == 1, result.stderr
    assert other in result.stderr
    assert "Traceback" not in result.stderr
    assert tree(ws.dest) == before
    assert "would delete" not in result.stdout


@pytest.mark.parametrize("bad", ["latest", "2025-13-45t99-00-00+0200", "../etc",
                                 "2025-01-01t00-00-00+0100.in-progress", ""])
def test_discard_of_a_malformed_name_is_bad_usage(ws: Workspace, bad: str) -> None:
    _three(ws)
    before = tree(ws.dest)

    result = ws.run("prune", "--discard", bad)

    assert result.returncode == 2, result.stderr
    assert "--discard" in result.stderr and "Traceback" not in result.stderr
    assert tree(ws.dest) == before
    assert not ws.events.exists()


def test_discard_exits_3_while_the_lock_is_held(ws: Workspace) -> None:
    names = _three(ws)
    before = tree(ws.dest)

    with holding_lock(ws):
        result = ws.run("prune", "--discard", names[-1], timeout=30)

    assert result.returncode == 3, result.stderr
    assert tree(ws.dest) == before
