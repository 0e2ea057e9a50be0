"""End to end, on a real loop-device ext4: ``state_dir`` on a filesystem that went read-only
(issue 18 bug 14; SPEC §2 "Failures").

An SD card that the kernel remounted read-only after errors is the night the
mail matters most. The run still takes its lock — on the existing lock file
opened read-only, or on the folder that would hold it where the file cannot
be created — makes the backup, logs that the report was not written, and
mails it; ``check`` warns. The filesystem is made read-only the way the
kernel does it: ``mount -o remount,ro`` under a state_dir prepared while
it was writable.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import TYPE_CHECKING

import pytest
from conftest import needs_root, needs_rsync
from datakit import table
from diskkit import ext4_filesystems, needs_loop
from hookkit import (
    HookSpec,
    assert_no_processes,
    complete_backups,
    order,
    release_marker,
    source_toml,
    start,
    started_marker,
    wait_marker,
    write_config,
)
from pibackup_async.engine.report import KEEP_REPORTS
from smtpkit import MailServer, parts

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from conftest import Workspace
    from diskkit import Ext4

pytestmark = [needs_rsync, needs_root, needs_loop]

READ_ONLY = "is on a read-only filesystem"


@pytest.fixture
def ext4_fs(tmp_path: Path) -> Iterator[Callable[..., Ext4]]:
    yield from ext4_filesystems(tmp_path)


@pytest.fixture
def mail() -> Iterator[MailServer]:
    with MailServer(None, security="none", require_auth=False) as server:
        yield server


def _state_on_sd(ws: Workspace, ext4_fs: Callable[..., Ext4]) -> Ext4:
    """A writable ext4 (the SD card) holding the workspace's state_dir, as a first run makes it."""
    fs = ext4_fs(ws.root / "sd")
    ws.state = fs.mount / "var" / "lib" / "pibackup-async"
    ws.state.mkdir(parents=True)
    ws.state.chmod(0o700)
    return fs


def _remount_read_only(fs: Ext4) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(fs.mount)], check=True,
                   capture_output=True, text=True)
    assert os.statvfs(fs.mount).f_flag & os.ST_RDONLY


def _mailing_config(ws: Workspace, server: MailServer, header: str = "") -> None:
    ws.write_config(
        source_toml("alpha", ws.make_source("alpha"))
        + table("[report]", **{"from": "pibackup@test.local"}, to=["admin@test.local"])
        + server.smtp_table(), header=header)


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "[warning" in line]


@pytest.mark.parametrize("lock_exists", [True, False], ids=["lock-file", "no-lock-file"])
def test_a_run_on_a_read_only_state_dir_saves_and_mails_the_report(
    ws: Workspace, ext4_fs: Callable[..., Ext4], mail: MailServer, lock_exists: bool
) -> None:
    fs = _state_on_sd(ws, ext4_fs)
    _mailing_config(ws, mail)
    if lock_exists:
        first = ws.run("run")  # the nights before: lock file and reports/ made
        assert first.returncode == 0, first.stderr
        assert (ws.state / "lock").is_file()
    reports_before = ws.reports()
    mails_before = len(mail.messages)
    _remount_read_only(fs)

    result = ws.run("run")

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "report not written; the mail carries it" in result.stderr, result.stderr
    assert "Read-only file system" in result.stderr, result.stderr
    assert any(READ_ONLY in line and str(ws.state) in line
               for line in _warnings(result.stderr)), result.stderr
    backups = complete_backups(ws)
    assert len(backups) == (2 if lock_exists else 1)
    assert ws.reports() == reports_before, "nothing could be written on the card"
    assert (ws.state / "lock").exists() == lock_exists
    assert len(mail.messages) == mails_before + 1
    mailed = parts(mail.messages[-1])
    [(filename, attached)] = mailed.attachments.items()
    report = json.loads(attached)
    assert filename == f"{backups[-1]}.json"
    assert report["name"] == backups[-1]
    assert report["status"] == "ok" and report["saved"] is True
    # The mail says why there is no report file, where the admin reads it.
    [warning] = report["warnings"]
    assert READ_ONLY in warning and str(ws.state) in warning
    assert warning in mailed.text
    assert_no_processes(ws)


@pytest.mark.parametrize("lock_file", [False, True], ids=["default-lock", "own-lock-file"])
def test_check_warns_about_a_read_only_state_dir(
    ws: Workspace, ext4_fs: Callable[..., Ext4], mail: MailServer, lock_file: bool
) -> None:
    fs = _state_on_sd(ws, ext4_fs)
    # A lock_file of its own, in a folder that exists but where it was never created.
    lock = fs.mount / "run" / "pibackup.lock"
    lock.parent.mkdir()
    _mailing_config(ws, mail, header=f'lock_file = "{lock}"' if lock_file else "")
    _remount_read_only(fs)

    result = ws.run("check")

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "ok (" in result.stderr, result.stderr
    assert not [line for line in result.stderr.splitlines() if line.startswith("error")]
    warned = _warnings(result.stderr)
    assert any(READ_ONLY in line and f"state_dir {ws.state}" in line for line in warned), (
        result.stderr)
    if lock_file:
        assert any(READ_ONLY in line and f"lock_file {lock}" in line for line in warned), (
            result.stderr)
        # And a run takes the lock on that folder, as check promised.
        ran = ws.run("run")
        assert ran.returncode == 0, ran.stderr
        assert not lock.exists()


@pytest.mark.parametrize("lock_exists", [True, False], ids=["lock-file", "no-lock-file"])
def test_two_runs_on_a_read_only_state_dir_still_exclude_each_other(
    ws: Workspace, ext4_fs: Callable[..., Ext4], lock_exists: bool
) -> None:
    fs = _state_on_sd(ws, ext4_fs)
    write_config(ws, [HookSpec("b1", block=("pre",))],
                 source_toml("alpha", ws.make_source("alpha")))
    if lock_exists:
        (ws.state / "lock").touch(mode=0o600)
    _remount_read_only(fs)

    with start(ws) as first:
        wait_marker(started_marker(ws, "b1", "pre"), first)
        second = ws.run("run", timeout=30)
        assert second.returncode == 3, second.stderr
        assert str(ws.state / "lock") in second.stderr
        assert order(ws) == ["b1.pre"], "the second run ran no hook"
        release_marker(ws, "b1", "pre").touch()
        assert first.wait(30) == 0, first.stderr
    assert "report not written" in first.stderr
    assert len(complete_backups(ws)) == 1
    # The lock went with the first run.
    third = ws.run("run")
    assert third.returncode == 0, third.stderr
    assert_no_processes(ws)


def test_an_old_report_that_cannot_be_removed_does_not_unwrite_the_new_one(
    ws: Workspace, ext4_fs: Callable[..., Ext4]
) -> None:
    _state_on_sd(ws, ext4_fs)
    ws.write_config(source_toml("alpha", ws.make_source("alpha")))
    reports = ws.state / "reports"
    reports.mkdir(mode=0o700)
    # With the new one, two too many: the two oldest go.
    old = [reports / f"2020-01-01t00-00-{i:03d}+0000.json" for i in range(KEEP_REPORTS + 1)]
    for i, path in enumerate(old):
        path.write_text("{}")
        os.utime(path, (1_577_836_800 + i, 1_577_836_800 + i))
    # The oldest, which pruning removes first, refuses (EPERM even for root).
    subprocess.run(["chattr", "+i", str(old[0])], check=True)
    try:
        result = ws.run("run")
    finally:
        subprocess.run(["chattr", "-i", str(old[0])], check=True)

    assert result.returncode == 0, result.stderr
    assert "report not written" not in result.stderr, result.stderr
    assert "report written" in result.stderr
    assert any("old report not removed" in line and str(old[0]) in line
               for line in _warnings(result.stderr)), result.stderr
    [backup] = complete_backups(ws)
    assert (reports / f"{backup}.json").is_file()
    assert old[0].exists() and not old[1].exists(), "the next oldest went all the same"
