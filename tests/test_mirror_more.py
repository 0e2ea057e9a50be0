"""``mirror`` (SPEC §10), the harder cases: a backup the origin deletes while it is copied, a
copy cut in the middle of a big file and resumed, ``last_of_source`` when deciding what to copy,
and an origin on a filesystem of its own. Real runs, real rsync, real loop filesystems."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
from typing import TYPE_CHECKING

import pytest
from conftest import needs_rsync, wait_for
from datakit import table
from diskkit import ext4_filesystems, needs_loop
from mirrorkit import Bench, tree_bytes, tree_stats
from sshkit import needs_sshd

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from conftest import Workspace
    from diskkit import Ext4
    from sshkit import Sshd

pytestmark = needs_rsync

MiB = 1 << 20
PARTIAL_DIR = ".pibackup-partial"


@pytest.fixture
def ext4_fs(tmp_path: Path) -> Iterator[Callable[..., Ext4]]:
    yield from ext4_filesystems(tmp_path)


def _sizes(folder: Path) -> dict[str, int]:
    """Every regular file below ``folder`` (rsync's temporary files and partial folders
    included) and its size, read while rsync writes there: a file gone meanwhile is skipped."""
    found: dict[str, int] = {}
    for top, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(top, name)
            try:
                found[os.path.relpath(path, folder)] = os.lstat(path).st_size
            except FileNotFoundError:
                continue
    return found


def _in_transfer(folder: Path) -> dict[str, int]:
    """rsync's temporary files below ``folder`` (``.NAME.XXXXXX``) and their sizes."""
    return {path: size for path, size in _sizes(folder).items()
            if os.path.basename(path).startswith(".") and os.sep + PARTIAL_DIR not in
            os.sep + path}


def _digests(root: Path) -> dict[str, str]:
    found = {}
    for top, _, files in os.walk(root):
        for name in files:
            path = os.path.join(top, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = hashlib.file_digest(f, "sha256").hexdigest()
    return found


def _stop(process: object) -> None:
    import subprocess

    assert isinstance(process, subprocess.Popen)
    if process.poll() is None:
        process.kill()
        process.communicate(timeout=30)


# --- 1. a backup the origin deletes while it is being copied ------------------------------


def test_a_backup_the_origin_deletes_while_it_is_copied_is_dropped(ws: Workspace) -> None:
    bench = Bench(ws)

    def big(data: Path) -> None:
        for i in range(3):
            (data / f"big-{i}.bin").write_bytes(os.urandom(2 * MiB))

    doomed = bench.backup(big)
    later = bench.backup(lambda data: [p.unlink() for p in data.glob("big-*.bin")])
    bench.write_mirror_config(origin={"bwlimit": "1MiB"})
    copying = ws.dest / f"{doomed}.in-progress" / "data"
    process = ws.start("mirror")
    try:
        # big-0.bin is on its way (at 1 MiB/s, two seconds of it): the origin's
        # retention deletes the backup as it does, renamed .deleting first.
        wait_for(lambda: any(p.startswith(".big-0.bin.") for p in _in_transfer(copying)),
                 60, "big-0.bin in transfer")
        deleting = bench.origin / f"{doomed}.deleting"
        (bench.origin / doomed).rename(deleting)
        shutil.rmtree(deleting)
        _, stderr = process.communicate(timeout=120)
    finally:
        _stop(process)

    assert process.returncode == 0, stderr
    report = bench.mirror_report()
    assert [(c["name"], c["status"]) for c in report["copied"]] == [
        (doomed, "dropped"), (later, "ok")]
    assert report["status"] == "ok" and report["failure"] is None
    assert "the origin deleted it while it was copied" in stderr
    # Said when rsync found files vanished, not after checking a half copy against it.
    assert "do not match" not in stderr
    assert not (ws.dest / f"{doomed}.in-progress").exists()
    assert bench.mirror_backups() == [later]
    assert tree_bytes(ws.dest / later) == tree_bytes(bench.origin / later)


# --- 2. a copy cut in the middle of a big file is continued, not restarted ----------------


def _cut_and_resumed(ws: Workspace, bench: Bench, files: int, per_file: int,
                     into_file: int) -> None:
    """One origin backup of ``files`` random files of ``per_file`` bytes, its copy cut by
    SIGTERM once a third has come and a file is ``into_file`` bytes into its transfer, then
    continued: at most 5% of it is sent twice."""
    total = files * per_file

    def big(data: Path) -> None:
        for i in range(files):
            with open(data / f"big-{i}.bin", "wb") as f:
                for _ in range(per_file // MiB):
                    f.write(os.urandom(MiB))

    name = bench.backup(big)
    copying = ws.dest / f"{name}.in-progress" / "data"
    arrived: list[int] = []

    def into_a_file() -> bool:
        # Restarting the file in transfer would send ``into_file`` again: well over 5%.
        sizes = _sizes(copying) if copying.exists() else {}
        arrived[:] = [sum(sizes.values())]
        return arrived[0] >= total // 3 and any(
            size >= into_file for size in _in_transfer(copying).values())

    process = ws.start("mirror")
    try:
        wait_for(into_a_file, 180, "a third of the copy, in the middle of a file")
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        _stop(process)
    assert process.returncode == 143, stderr
    cut = bench.mirror_report()
    assert [(c["name"], c["status"]) for c in cut["copied"]] == [(name, "cancelled")]
    # What the cut run received is at least what was there when it was cut (the file
    # in transfer included) and at least what it left (rsync's --stats of a pass cut
    # short is never written, so its report cannot say).
    received_before = max(arrived[0], sum(_sizes(copying).values()))

    result = bench.mirror()

    assert result.returncode == 0, result.stderr
    [again] = bench.mirror_report()["copied"]
    assert again["resumed"] is True and again["status"] == "ok"
    sent_twice = received_before + again["received_bytes"] - total
    assert sent_twice <= 0.05 * total, (received_before, again["received_bytes"])
    assert _digests(ws.dest / name) == _digests(bench.origin / name)
    assert not list((ws.dest / name).rglob(PARTIAL_DIR))
    verified = ws.run("verify", "--all")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_copy_cut_in_a_big_file_resumes_it_and_sends_little_twice(ws: Workspace) -> None:
    bench = Bench(ws)
    bench.write_mirror_config(origin={"bwlimit": "40MiB"})
    _cut_and_resumed(ws, bench, 4, 50 * MiB, 15 * MiB)


@needs_sshd
def test_over_ssh_a_copy_cut_in_a_big_file_resumes_it(ws: Workspace, sshd: Sshd) -> None:
    bench = Bench(ws)
    sshd.serve_only(bench.origin)
    bench.write_mirror_config(origin={"host": "piserver", "bwlimit": "8MiB"},
                              extra=sshd.host_toml("piserver"))
    _cut_and_resumed(ws, bench, 4, 16 * MiB, 4 * MiB)
    assert "refused" not in sshd.log_text()


def test_partial_files_an_interrupted_copy_left_never_reach_the_complete_backup(
        ws: Workspace) -> None:
    bench = Bench(ws)
    bench.backups(2)
    bench.write_mirror_config()
    assert bench.mirror().returncode == 0
    # An interrupted copy of the next backup whose partial files no pass will use:
    # one of a file the origin does not have, one of a file linked to the previous copy.
    third = bench.backup(lambda data: (data / "new.txt").write_text("new\n"))
    for folder in ("data", "data/deep"):
        left = ws.dest / f"{third}.in-progress" / folder / PARTIAL_DIR
        left.mkdir(parents=True)
        (left / "same.txt").write_text("never\n")
        (left / "gone.bin").write_bytes(b"half a file")

    result = bench.mirror()

    assert result.returncode == 0, result.stderr
    [copied] = bench.mirror_report()["copied"]
    assert copied["name"] == third and copied["resumed"] is True
    assert not list((ws.dest / third).rglob(PARTIAL_DIR))
    assert tree_bytes(ws.dest / third) == tree_bytes(bench.origin / third)
    verified = ws.run("verify", "--all")
    assert verified.returncode == 0, verified.stdout + verified.stderr


# --- 4. an origin on a filesystem of its own -----------------------------------------------


@needs_loop
def test_an_origin_on_another_filesystem_is_copied_and_never_written(
        ws: Workspace, ext4_fs: Callable[..., Ext4]) -> None:
    ext4_fs(ws.dest, 64)
    origin = ext4_fs(ws.root / "origin", 64).mount
    assert os.stat(origin).st_dev != os.stat(ws.dest).st_dev
    bench = Bench(ws, origin=origin)

    def odd_entries(data: Path) -> None:
        (data / "pair-a.txt").write_text("one inode, two names\n")
        os.link(data / "pair-a.txt", data / "pair-b.txt")
        os.symlink("same.txt", data / "link")
        with open(data / "sparse.bin", "wb") as f:
            f.truncate(8 * MiB)
            f.write(b"start")
        os.setxattr(data / "same.txt", "user.note", b"kept")
        os.chmod(data / "pair-a.txt", 0o640)

    names = [bench.backup(odd_entries), *bench.backups(2)]
    bench.write_mirror_config()
    stats, content = tree_stats(origin), tree_bytes(origin)

    result = bench.mirror()

    assert result.returncode == 0, result.stderr
    assert tree_stats(origin) == stats
    assert tree_bytes(origin) == content
    assert bench.mirror_backups() == names
    for name in names:
        assert tree_bytes(ws.dest / name) == tree_bytes(origin / name)
        data = ws.dest / name / "data"
        assert os.lstat(data / "pair-a.txt").st_ino == os.lstat(data / "pair-b.txt").st_ino
        assert os.readlink(data / "link") == "same.txt"
        assert os.getxattr(data / "same.txt", "user.note") == b"kept"
        assert os.lstat(data / "pair-a.txt").st_mode & 0o777 == 0o640
        assert os.lstat(data / "sparse.bin").st_blocks * 512 < MiB
    # A later backup: the nightly copy leaves the origin as it was too.
    names += bench.backups(1)
    stats, content = tree_stats(origin), tree_bytes(origin)
    assert bench.mirror().returncode == 0
    assert tree_stats(origin) == stats and tree_bytes(origin) == content
    assert bench.mirror_backups() == names


# --- 3. last_of_source when deciding what to copy ---------------------------------------


def test_retention_decides_what_to_copy_as_it_prunes_afterwards(ws: Workspace) -> None:
    bench = Bench(ws)
    laptop = ws.make_source("laptop", {"notes.txt": "only in the oldest backup\n"})
    from datakit import rsync_source

    bench.write_origin_config(rsync_source("laptop", laptop))
    oldest = bench.backup()
    bench.write_origin_config()
    names = [oldest, *bench.backups(2)]
    assert (bench.origin / oldest / "laptop").is_dir()
    bench.write_mirror_config(extra=table("[retention]", keep_last=1))

    planned = bench.mirror("--dry-run")
    result = bench.mirror()

    assert result.returncode == 0, result.stderr
    report = bench.mirror_report()
    copied = [c["name"] for c in report["copied"]]
    # A mirror's sources are the folders of its newest backup (SPEC §10), which holds
    # them all: last_of_source keeps nothing there that keep_last = 1 does not, and the
    # oldest backup, the only one holding "laptop", is neither copied nor deleted.
    assert copied == [names[-1]]
    assert report["retention"]["deleted"] == []
    assert bench.mirror_backups() == copied
    assert report["retention"]["kept"] == {names[-1]: ["newest", "keep_last"]}
    assert [line for line in planned.stdout.splitlines() if line.startswith("would copy")] \
        == [f"would copy {n}" + ("" if i == 0 else f" (linked against {copied[i - 1]})")
            for i, n in enumerate(copied)]


# --- 5. what SPEC §10 says around the copies ------------------------------------------------


def test_the_mail_subject_names_the_newest_by_its_time_not_its_name() -> None:
    from pibackup_async.engine.mail_body import render_subject
    from pibackup_async.engine.report import CopiedBackup, MirrorReport

    # Copied oldest first across a change of UTC offset: the later one has the lesser name.
    earlier, later = "2024-05-01t03-00-00+0200", "2024-05-01t02-30-00+0000"
    report = MirrorReport(name="mirror-x", start="s", concurrency=1, origin="/mnt/a",
                          copied=[CopiedBackup(name=earlier, status="ok"),
                                  CopiedBackup(name=later, status="ok")])
    assert render_subject(report, host="box") == (
        f"[pibackup] OK box: mirrored 2 backups of /mnt/a ({later})")


def test_the_newest_100_mirror_reports_are_kept_apart_from_runs(ws: Workspace) -> None:
    bench = Bench(ws)
    bench.backups(1)
    bench.write_mirror_config()
    reports = ws.state / "reports"
    reports.mkdir(parents=True)
    old = [reports / f"mirror-2020-01-01t00-{i // 60:02d}-{i % 60:02d}+0000.json"
           for i in range(105)]
    runs = [reports / f"2020-01-0{d}t00-00-00+0000.json" for d in range(1, 4)]
    for age, path in enumerate([*runs, *old]):
        path.write_text("{}")
        os.utime(path, (1_600_000_000 + age, 1_600_000_000 + age))

    assert bench.mirror().returncode == 0

    left = sorted(p.name for p in reports.glob("mirror-*.json"))
    assert len(left) == 100
    assert bench.mirror_reports()[-1].name not in {p.name for p in old}
    assert left[:-1] == [p.name for p in old[-99:]]
    assert all(p.exists() for p in runs)
