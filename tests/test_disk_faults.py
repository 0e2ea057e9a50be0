"""End to end, on real loop-device ext4: the facts a run tells about its disks (issue 9).

Each test is a bug report: a full destination told as a broken pipe, a
failing mount told by its dmesg hint, the free space of the root disk
reported for an unmounted backup disk, backups nested inside each other
through a symbolic link, and a destination that vanishes mid-copy.
"""

from __future__ import annotations

import os
import re
import subprocess
from typing import TYPE_CHECKING

import msgspec
import pytest
from conftest import needs_root, needs_rsync, wait_for
from diskkit import MiB, ext4_filesystems, fill_until_free, needs_loop
from hookkit import (
    SLOW,
    HookSpec,
    assert_no_processes,
    hook_toml,
    in_progress,
    make_slow_source,
    source_toml,
    start,
    statuses,
    wait_no_processes,
)
from pibackup_async.engine.mail_body import render_subject
from pibackup_async.engine.report import Report

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from conftest import Workspace
    from diskkit import Ext4

pytestmark = [needs_rsync, needs_root]


@pytest.fixture
def ext4_fs(tmp_path: Path) -> Iterator[Callable[..., Ext4]]:
    yield from ext4_filesystems(tmp_path)


def _random_files(folder: Path, count: int, mib: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"big{i}.bin").write_bytes(os.urandom(mib * MiB))
    return folder


_BACKUP_NAME = re.compile(r"^\d{4}-\d\d-\d\dt\d\d-\d\d-\d\d[+-]\d{4}$")


def _backups(folder: Path) -> list[str]:
    """Complete backups in ``folder`` (an ext4 also holds lost+found)."""
    return sorted(n for n in os.listdir(folder) if _BACKUP_NAME.match(n))


def _files_under(folder: Path) -> list[str]:
    """Every non-directory entry below ``folder``, relative, sorted."""
    found = []
    for top, dirs, files in os.walk(folder):
        found += [os.path.relpath(os.path.join(top, f), folder) for f in files]
        found += [os.path.relpath(os.path.join(top, d), folder) for d in dirs
                  if os.path.islink(os.path.join(top, d))]
    return sorted(found)


# --- a: a destination that fills up ----------------------------------------------------


@needs_loop
@pytest.mark.slow
def test_full_destination_is_told_as_enospc_with_the_hint(
    ws: Workspace, ext4_fs: Callable[..., Ext4]
) -> None:
    fs = ext4_fs(ws.dest, 16)
    # Other things on the backup disk leave 4 MiB; the source needs 8.
    ballast = fill_until_free(fs.mount, 4 * MiB)
    data = _random_files(ws.src / "data", 2, 4)
    ws.write_config(source_toml("data", data))

    result = ws.run("run")
    assert result.returncode == 1, result.stderr
    assert_no_processes(ws)
    report = ws.report()
    failure = report["failure"]
    assert failure.startswith('source "data" snapshot failed: rsync exit code 11: '), failure
    assert "No space left on device" in failure
    assert "Broken pipe" not in failure and "rsync error" not in failure
    assert "pibackup-async prune" in failure and "[retention]" in failure
    assert "only after a successful backup" in failure
    assert "\n" not in failure
    assert in_progress(ws) == [] and _backups(ws.dest) == []
    # What the mail's subject says, from the report as written.
    decoded = msgspec.json.decode(ws.reports()[-1].read_bytes(), type=Report)
    assert render_subject(decoded, host="piserver") == (
        '[pibackup] FAILED piserver: source "data" snapshot failed: No space left on device '
        f"({decoded.name})")

    ballast.unlink()  # the user frees space
    again = ws.run("run")
    assert again.returncode == 0, again.stderr
    [backup] = _backups(ws.dest)
    assert _files_under(ws.dest / backup / "data") == ["big0.bin", "big1.bin"]
    assert ws.report()["status"] == "ok"


# --- b: a mount that fails in a backup hook ------------------------------------------------


def test_failing_mount_is_told_by_its_own_message(ws: Workspace) -> None:
    device = f"/dev/pibackup-test-nope-{os.getpid()}"
    hook = (f'[[backup_hooks]]\nname = "disk"\npre = "mount {device} {ws.dest}"\n'
            f'post = "umount {ws.dest}"\n')
    ws.write_config(hook + source_toml("data", ws.make_source("data")))

    result = ws.run("run")
    assert result.returncode == 1, result.stderr
    report = ws.report()
    [pre] = [h for h in report["hooks"] if h["phase"] == "pre"]
    assert pre["status"] == "failed" and pre["exit_code"] == 32
    # The real mount said both; the hint is what the old report showed.
    assert f"special device {device} does not exist" in pre["stderr_tail"]
    failure = report["failure"]
    assert failure.startswith('hook "disk" pre failed: exit code 32: mount: '), failure
    assert f"special device {device} does not exist" in failure
    assert "dmesg" not in failure
    assert_no_processes(ws)


# --- c: free space of the disk a hook mounts --------------------------------------------------


@needs_loop
@pytest.mark.slow
def test_free_space_is_the_backup_disks_measured_before_the_post_unmounts_it(
    ws: Workspace, ext4_fs: Callable[..., Ext4]
) -> None:
    fs = ext4_fs(ws.dest, 24, mounted=False)
    disk = (f'[[backup_hooks]]\nname = "disk"\npre = "mount {fs.device} {ws.dest}"\n'
            f'post = "umount {ws.dest}"\n')
    ws.write_config(disk + source_toml("data", _random_files(ws.src / "data", 1, 4)))

    result = ws.run("run")
    assert result.returncode == 0, result.stderr
    assert not fs.is_mounted(), "the post unmounted the backup disk"
    reported = ws.report()["destination"]
    assert reported is not None, "the destination was visible before the post"

    fs.mount_now()
    free, total = fs.space()
    [backup] = _backups(ws.dest)
    assert _files_under(ws.dest / backup / "data") == ["big0.bin"]
    fs.unmount()
    root = os.statvfs(ws.dest)  # what is under the mount point: the root disk
    assert root.f_blocks * root.f_frsize != total
    assert reported["total_bytes"] == total, (reported, total)
    # Within 1 MiB, less than the backup's 4 MiB: measured after it was written.
    assert abs(reported["free_bytes"] - free) <= MiB, (reported, free)


# --- d: a destination reached through a symbolic link ----------------------------------------


def _layout(ws: Workspace, how: str) -> tuple[Path, Path, Path]:
    """(real destination, destination as configured, source path as configured)."""
    data = ws.make_source("data", {"a.txt": "a\n", "b.txt": "b\n", "sub/c.txt": "c\n"})
    real_dest = data / "backups"
    real_dest.mkdir()
    if how == "destination is a link into the source":
        link = ws.root / "dest-link"
        link.symlink_to(real_dest)
        return real_dest, link, data
    link = ws.root / "data-link"
    link.symlink_to(data)
    return real_dest, real_dest, link


@pytest.mark.slow
@pytest.mark.parametrize("how", ["destination is a link into the source",
                                 "source is a link to a folder holding the destination"])
def test_backups_never_nest_through_a_symbolic_link(ws: Workspace, how: str) -> None:
    real_dest, dest, source = _layout(ws, how)
    ws.config_path.write_text(f'destination = "{dest}"\nstate_dir = "{ws.state}"\n\n'
                              + source_toml("data", source))
    counts = []
    for _ in range(3):
        result = ws.run("run")
        assert result.returncode == 0, result.stderr
        newest = _backups(real_dest)[-1]
        counts.append(len(_files_under(real_dest / newest / "data")))
    assert counts == [3, 3, 3]
    assert _files_under(real_dest / newest / "data") == ["a.txt", "b.txt", "sub/c.txt"]


# --- e: the destination vanishing mid-run --------------------------------------------------


@needs_loop
@pytest.mark.slow
def test_destination_vanishing_mid_run_fails_with_a_line_saying_so(
    ws: Workspace, ext4_fs: Callable[..., Ext4]
) -> None:
    ext4_fs(ws.dest, 16)
    data = make_slow_source(ws, "data", mib=2)
    ws.write_config(hook_toml(ws, HookSpec("b1")) + source_toml("data", data, **SLOW))

    with start(ws) as running:
        def copying() -> bool:
            assert running.proc.poll() is None, running.stderr
            return any(os.listdir(folder) for folder in ws.dest.glob("*.in-progress/data"))

        wait_for(copying, 30, "rsync to write into the in-progress folder")
        subprocess.run(["umount", "-l", str(ws.dest)], check=True, timeout=30)
        code = running.wait(120)
        stderr = running.stderr

    report = ws.report()
    failure = report["failure"] or ""
    assert "destination" in failure, failure
    assert re.search(r"vanish|no longer|disappeared|not mounted|unmounted|gone", failure), failure
    assert "unexpected" not in failure.lower(), failure
    assert code == 1, stderr
    assert report["status"] == "failed" and report["saved"] is False, failure
    assert "Traceback" not in stderr
    wait_no_processes(ws)
    assert statuses(ws)["b1.post"] == "failed"
