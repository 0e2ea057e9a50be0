"""The most telling line of a failing child, and the hint a user can act on (SPEC §6).

The key cases run on output captured here from real children: rsync filling
a real 16 MiB ext4 (ENOSPC), and mount asked for a device that does not
exist.
"""

from __future__ import annotations

import os
import subprocess
from typing import TYPE_CHECKING

import pytest
from btrfskit import btrfs_source, fill_random, needs_btrfs
from conftest import needs_root, needs_rsync
from diskkit import MiB, ext4_filesystems
from pibackup_async.engine.failure_text import (
    hint_for,
    root_cause,
    telling_line,
    with_hint,
    without_hint,
)
from pibackup_async.engine.mail_body import gist, render_body, render_subject
from pibackup_async.engine.report import Report, SourceReport, Step
from pibackup_async.engine.sources.errors import SourceError
from pibackup_async.engine.sources.rsync import RSYNC_BASE, copy

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from btrfskit import Btrfs
    from conftest import Workspace
    from diskkit import Ext4


@pytest.fixture
def ext4_fs(tmp_path: Path) -> Iterator[Callable[..., Ext4]]:
    yield from ext4_filesystems(tmp_path)


def _big_source(root: Path) -> Path:
    """24 MiB of incompressible files: more than a 16 MiB ext4 holds."""
    src = root / "src"
    src.mkdir()
    for i in range(3):
        (src / f"big{i}.bin").write_bytes(os.urandom(8 * MiB))
    return src


def _rsync_argv(src: Path, target: Path) -> list[str]:
    return [*RSYNC_BASE, f"{src}/", f"{target}/"]


@pytest.fixture
def enospc_stderr(tmp_path: Path, ext4_fs: Callable[..., Ext4]) -> list[str]:
    """What a real rsync prints when its destination fills up."""
    fs = ext4_fs(tmp_path / "small")
    done = subprocess.run(_rsync_argv(_big_source(tmp_path), fs.mount / "copy"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 11, done.stderr
    return done.stderr.splitlines()


@pytest.fixture
def mount_stderr(tmp_path: Path) -> list[str]:
    """What a real mount prints for a device that does not exist."""
    target = tmp_path / "mnt"
    target.mkdir()
    done = subprocess.run(["mount", f"/dev/pibackup-test-nope-{os.getpid()}", str(target)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    return (done.stderr or done.stdout).splitlines()


# --- real output -------------------------------------------------------------------------


@needs_rsync
def test_rsync_filling_its_destination_is_told_by_enospc(enospc_stderr: list[str]) -> None:
    telling = telling_line(enospc_stderr)
    assert telling is not None and "No space left on device (28)" in telling, enospc_stderr
    # The lines after it are what the old code showed; none of them is chosen.
    after = enospc_stderr[enospc_stderr.index(telling) + 1:]
    assert after and all("rsync error:" in ln or "Broken pipe" in ln for ln in after if ln)
    hint = hint_for(telling)
    assert hint is not None
    assert "pibackup-async prune" in hint and "[retention]" in hint
    assert "only after a successful backup" in hint


@needs_root
def test_mount_is_told_by_its_own_message_not_the_dmesg_hint(mount_stderr: list[str]) -> None:
    telling = telling_line(mount_stderr)
    assert telling is not None, mount_stderr
    assert telling.startswith("mount: ") and "does not exist" in telling, mount_stderr
    assert "dmesg" not in telling
    # util-linux 2.38 and later add the hint after the message: that is the trap.
    if any("dmesg" in line for line in mount_stderr):
        assert "dmesg" in mount_stderr[-1]
    assert hint_for(telling) == "is the backup disk plugged in?"


@needs_rsync
async def test_copy_fails_with_the_enospc_line_and_the_hint(
    tmp_path: Path, ext4_fs: Callable[..., Ext4]
) -> None:
    fs = ext4_fs(tmp_path / "small")
    with pytest.raises(SourceError) as raised:
        await copy(_rsync_argv(_big_source(tmp_path), fs.mount / "copy"), [0, 24])
    message = str(raised.value)
    assert message.startswith("rsync exit code 11: ")
    assert "No space left on device (28)" in message
    assert "Broken pipe" not in message and "rsync error" not in message
    assert "pibackup-async prune" in message and "[retention]" in message
    assert "\n" not in message
    # The tail keeps everything, for the body's "Failures" section.
    assert raised.value.result is not None
    assert "No space left on device" in raised.value.result.stderr_tail
    failure = f'source "data" snapshot failed: {message}'
    assert gist(failure) == 'source "data" snapshot failed: No space left on device'


# --- the choice, on known shapes -------------------------------------------------------------

RSYNC_31_ENOSPC = [
    'rsync: write failed on "/mnt/backup/x.in-progress/data/big.bin": No space left on device (28)',
    "rsync error: error in file IO (code 11) at receiver.c(374) [receiver=3.1.3]",
    "rsync: [sender] write error: Broken pipe (32)",
    "rsync error: error in file IO (code 11) at io.c(829) [sender=3.1.3]",
    "",
]


def test_older_rsync_wording_is_read_alike() -> None:
    assert telling_line(RSYNC_31_ENOSPC) == RSYNC_31_ENOSPC[0]


def test_the_gravest_cause_wins_and_the_first_among_equals() -> None:
    lines = [
        'rsync: [sender] send_files failed to open "/srv/a": Permission denied (13)',
        'rsync: [sender] send_files failed to open "/srv/b": Permission denied (13)',
        'rsync: [sender] read errors mapping "/srv/c": Input/output error (5)',
        "rsync error: some files/attrs were not transferred (see previous errors) (code 23)",
    ]
    assert telling_line(lines) == lines[2]
    assert telling_line(lines[:2]) == lines[0]


def test_without_a_cause_the_last_meaningful_line() -> None:
    assert telling_line(["starting", "disk not found", "", "  "]) == "disk not found"
    assert telling_line(["rsync: connection unexpectedly closed (0 bytes received so far)",
                         "rsync error: error in rsync protocol data stream (code 12)"]) == (
        "rsync: connection unexpectedly closed (0 bytes received so far)")
    assert telling_line(RSYNC_31_ENOSPC[1:]) == RSYNC_31_ENOSPC[2]  # fallout over closing
    assert telling_line(["rsync error: unexplained error (code 255)"]) == (
        "rsync error: unexplained error (code 255)")
    refused = "ssh: connect to host pi port 22: Connection refused"
    assert telling_line(["[3 earlier lines cut]", refused]) == refused
    assert telling_line([]) is None
    assert telling_line(["", "   "]) is None


def test_root_cause_names_the_phrase() -> None:
    assert root_cause("write failed: No space left on device (28)") == "No space left on device"
    assert root_cause("Permission denied (13) then Input/output error (5)") == "Input/output error"
    assert root_cause("exit code 3: disk not found") is None


def test_hints_only_where_the_user_can_act() -> None:
    assert hint_for("rsync exit code 11: write failed: Disk quota exceeded (122)") == hint_for(
        "No space left on device (28)")
    assert "dmesg" in (hint_for("cannot write: Read-only file system (30)") or "")
    assert hint_for("exit code 3: disk not found") is None
    assert hint_for('rsync exit code 23: rsync: [sender] send_files failed to open "/a": '
                    "Permission denied (13)") is None


def test_with_hint_is_idempotent_and_reversible() -> None:
    problem = 'rsync exit code 11: write failed on "/d/f": No space left on device (28)'
    once = with_hint(problem)
    assert once != problem and once.startswith(problem) and "\n" not in once
    assert with_hint(once) == once
    assert without_hint(once) == problem
    assert with_hint("exit code 3: disk not found") == "exit code 3: disk not found"


# What a real `btrfs receive` printed when its destination filled up (issue 17).
RECEIVE_ENOSPC = [
    "At subvol vol",
    "ERROR: writing to blob03.bin failed: No space left on device",
]


def test_btrfs_receive_chatter_is_not_the_cause() -> None:
    assert telling_line(RECEIVE_ENOSPC) == RECEIVE_ENOSPC[1]
    # "At subvol …" says where receive is, not what went wrong, wherever it comes.
    assert telling_line(["ERROR: cannot find parent subvolume", "At snapshot vol"]) == (
        "ERROR: cannot find parent subvolume")
    assert telling_line(["At subvol vol"]) == "At subvol vol"  # better than nothing


def test_a_failure_is_one_line_whatever_it_is_built_from() -> None:
    failure = with_hint('source "vol" save failed: btrfs receive exited 1: '
                        + "\n".join(RECEIVE_ENOSPC))
    assert "\n" not in failure and "\r" not in failure
    assert failure.startswith('source "vol" save failed: btrfs receive exited 1: ')
    assert "ERROR: writing to blob03.bin failed: No space left on device" in failure
    assert "pibackup-async prune" in failure  # the hint still applies
    assert with_hint(failure) == failure
    assert with_hint("cannot open x:\r\n  Permission denied\n\n") == (
        "cannot open x: … Permission denied")
    assert with_hint("exit code 3: disk not found\n") == "exit code 3: disk not found"


@needs_btrfs
@pytest.mark.root
def test_a_receive_into_a_full_destination_fails_the_run_in_one_line(
    ws: Workspace, btrfs_fs: Callable[..., Btrfs]
) -> None:
    source = btrfs_fs(ws.src / "vol").subvolume("vol")
    fill_random(source, 24)
    btrfs_fs(ws.dest, 130)
    # Something else on the disk (the destination may hold other things)
    # leaves less room than the source needs: receive fails early, cheaply.
    room = os.statvfs(ws.dest)
    subprocess.run(["fallocate", "-l", str(room.f_bavail * room.f_frsize - 8 * MiB),
                    str(ws.dest / "other-things.img")], check=True)
    ws.write_config(btrfs_source("vol", source))
    result = ws.run("run", timeout=120)
    assert result.returncode == 1, result.stderr
    report = ws.report()
    failure = str(report["failure"])
    assert "\n" not in failure, failure
    assert failure.startswith('source "vol" save failed: btrfs receive '), failure
    assert "No space left on device" in failure and "At subvol" not in failure, failure
    # The step keeps receive's whole output, for the mail's "Failures" section.
    assert "At subvol" in report["sources"]["vol"]["save"]["stderr_tail"]


# --- the mail ----------------------------------------------------------------------------


def _failed_report(failure: str, stderr: list[str]) -> Report:
    step = Step(status="failed", start="2021-04-03T07:00:06.000000+02:00",
                end="2021-04-03T07:00:09.000000+02:00", duration_s=3.0, exit_code=11,
                stderr_tail="\n".join(stderr), command=["rsync", "/srv/data/", "/d/"])
    return Report(name="2021-04-03t07-00-05+0200", status="failed",
                  start="2021-04-03T07:00:05.500000+02:00", concurrency=1, failure=failure,
                  sources={"data": SourceReport(type="rsync", status="failed", snapshot=step)})


def test_subject_names_the_cause_when_the_line_is_too_long() -> None:
    failure = 'source "data" snapshot failed: ' + with_hint(
        f"rsync exit code 11: {RSYNC_31_ENOSPC[0]}")
    subject = render_subject(_failed_report(failure, RSYNC_31_ENOSPC), host="piserver")
    assert subject == ('[pibackup] FAILED piserver: source "data" snapshot failed: '
                       "No space left on device (2021-04-03t07-00-05+0200)")
    short = 'hook "disk" pre failed: exit code 32: mount: /mnt/b: special device /dev/x'
    assert gist(short) == short


def test_body_keeps_the_telling_line_in_view_after_much_fallout() -> None:
    fallout = [f'rsync: [receiver] rename "/d/f{i}" failed: Broken pipe (32)' for i in range(15)]
    stderr = [RSYNC_31_ENOSPC[0], *fallout, RSYNC_31_ENOSPC[1]]
    failure = 'source "data" snapshot failed: ' + with_hint(
        f"rsync exit code 11: {RSYNC_31_ENOSPC[0]}")
    body = render_body(_failed_report(failure, stderr), host="piserver")
    lines = body.splitlines()
    assert lines[1] == failure  # the headline carries the line and the hint
    shown = [ln for ln in lines if ln.startswith("    | ")]
    assert shown[0] == "    | [7 earlier lines cut]"
    assert shown[1] == "    | " + RSYNC_31_ENOSPC[0]
    assert shown[-1] == "    | " + RSYNC_31_ENOSPC[1]
    assert len(shown) == 11
