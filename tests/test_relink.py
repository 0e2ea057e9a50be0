"""Damage does not spread (SPEC §9): a copy verify found damaged is copied afresh, not linked.

rsync's ``--link-dest`` trusts size and mtime, so a byte flipped in a backup
file (size and mtime kept) would be hard-linked into every later backup.
The tests flip such a byte by hand and record it in ``state_dir`` as
``verify`` does (``damaged.save``), then run the real CLI: the new backup
must hold a fresh copy of the source's file, and the older backups keep the
damaged one (history) untouched.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from conftest import needs_rsync
from datakit import cli_ok, complete_backups, rsync_source
from pibackup_async.engine import damaged
from pibackup_async.engine.mail_body import render_body
from pibackup_async.engine.pathtext import show_path
from pibackup_async.engine.report import Report, SourceReport, Step

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from btrfskit import Btrfs
    from conftest import Workspace
    from sshkit import Sshd

pytestmark = needs_rsync

CONTENT = b"a file that never changes in the source, long enough to hold byte 10\n"


def flip_byte(path: Path | bytes, offset: int = 10) -> None:
    """Rot one byte in place, as a failing disk does: size and times stay as they were."""
    st = os.lstat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def record(ws: Workspace, backup: str, source: str, rel: bytes) -> os.stat_result:
    """Record ``<backup>/<source>/<rel>`` as damaged, as verify does; its stat."""
    st = os.lstat(os.path.join(bytes(ws.dest), backup.encode(), source.encode(), rel))
    damaged.save(str(ws.state), str(ws.dest), [damaged.Damage(
        backup=backup, source=source, path=show_path(rel), dev=st.st_dev, ino=st.st_ino)])
    return st


def new_backup(ws: Workspace, before: list[str]) -> str:
    [name] = set(complete_backups(ws.dest)) - set(before)
    return name


def assert_copied_afresh(ws: Workspace, source: str, rel: bytes, damaged_st: os.stat_result,
                         expected: bytes, older: list[str], newest: str) -> None:
    copy = os.path.join(bytes(ws.dest), newest.encode(), source.encode(), rel)
    st = os.lstat(copy)
    assert (st.st_dev, st.st_ino) != (damaged_st.st_dev, damaged_st.st_ino), (
        "the new backup hard-linked the damaged copy")
    with open(copy, "rb") as f:
        assert f.read() == expected
    assert st.st_nlink == 1
    # The older backups keep their damaged copy as it is: history, reported by verify.
    for name in older:
        old = os.path.join(bytes(ws.dest), name.encode(), source.encode(), rel)
        assert os.lstat(old).st_ino == damaged_st.st_ino, name
        with open(old, "rb") as f:
            assert f.read() != expected, name


def test_a_damaged_copy_is_copied_afresh_into_the_next_backup(ws: Workspace) -> None:
    odd = b"odd\nname \xff"  # a newline and a byte that is not UTF-8: the record escapes them
    src = ws.make_source("data", {"a.txt": CONTENT.decode(), "same.txt": "left alone\n"})
    with open(os.path.join(bytes(src), odd), "wb") as f:
        f.write(CONTENT)
    ws.write_config(rsync_source("data", src))
    cli_ok(ws, "run")
    cli_ok(ws, "run")
    first, second = complete_backups(ws.dest)
    rels = (b"a.txt", odd)
    for rel in rels:
        flip_byte(os.path.join(bytes(ws.dest), second.encode(), b"data", rel))
    bad = {rel: record(ws, second, "data", rel) for rel in rels}
    assert all(st.st_nlink == 2 for st in bad.values()), "the two backups share each copy"

    cli_ok(ws, "run")

    third = new_backup(ws, [first, second])
    for rel in rels:
        assert_copied_afresh(ws, "data", rel, bad[rel], CONTENT, [first, second], third)
    # What verify did not name is linked as ever.
    assert (os.lstat(ws.dest / third / "data" / "same.txt").st_ino
            == os.lstat(ws.dest / first / "data" / "same.txt").st_ino)
    report = ws.report()
    assert report["status"] == "ok", report
    assert report["sources"]["data"]["relinked"] == 2

    # The next run links the fresh copy: nothing is copied afresh again.
    cli_ok(ws, "run")
    fourth = new_backup(ws, [first, second, third])
    assert (os.lstat(ws.dest / fourth / "data" / "a.txt").st_ino
            == os.lstat(ws.dest / third / "data" / "a.txt").st_ino)
    assert ws.report()["sources"]["data"]["relinked"] == 0


def test_a_changed_or_vanished_file_and_a_link_on_the_way_are_not_copied(ws: Workspace) -> None:
    """Only the damaged inode is replaced: a path that now names another file (or leads
    through a symbolic link in the new backup) is left to rsync."""
    src = ws.make_source("data", {"a.txt": CONTENT.decode(), "dir/b.txt": CONTENT.decode()})
    outside = ws.root / "outside"
    outside.mkdir()
    (outside / "b.txt").write_bytes(CONTENT)
    ws.write_config(rsync_source("data", src))
    cli_ok(ws, "run")
    [first] = complete_backups(ws.dest)
    flip_byte(ws.dest / first / "data" / "a.txt")
    record(ws, first, "data", b"a.txt")
    record(ws, first, "data", b"dir/b.txt")
    # In the source, a.txt is rewritten (rsync copies it anyway) and dir becomes a link.
    (src / "a.txt").write_bytes(CONTENT + b"more\n")
    (src / "dir" / "b.txt").unlink()
    (src / "dir").rmdir()
    (src / "dir").symlink_to(outside)

    cli_ok(ws, "run")

    second = new_backup(ws, [first])
    assert (ws.dest / second / "data" / "a.txt").read_bytes() == CONTENT + b"more\n"
    assert os.path.islink(ws.dest / second / "data" / "dir")
    assert (outside / "b.txt").read_bytes() == CONTENT, "a link on the way was followed"
    assert ws.report()["sources"]["data"]["relinked"] == 0


def test_a_btrfs_source_saved_by_rsync_copies_its_damaged_copy_afresh(
        ws: Workspace, btrfs_fs: Callable[..., Btrfs]) -> None:
    from btrfskit import btrfs_source

    source = btrfs_fs(ws.src / "vol").subvolume("data")
    (source / "a.txt").write_bytes(CONTENT)
    ws.write_config(btrfs_source("data", source))
    cli_ok(ws, "run")
    cli_ok(ws, "run")
    first, second = complete_backups(ws.dest)
    flip_byte(ws.dest / second / "data" / "a.txt")
    bad = record(ws, second, "data", b"a.txt")

    cli_ok(ws, "run")

    third = new_backup(ws, [first, second])
    assert_copied_afresh(ws, "data", b"a.txt", bad, CONTENT, [first, second], third)
    report = ws.report()
    assert report["sources"]["data"]["relinked"] == 1
    assert report["sources"]["data"]["save"]["status"] == "ok"


def test_a_remote_source_copies_its_damaged_copy_afresh(ws: Workspace, sshd: Sshd) -> None:
    src = ws.make_source("data", {"a.txt": CONTENT.decode(), "same.txt": "left alone\n"})
    ws.write_config(sshd.host_toml("h1") + rsync_source("data", src, host="h1"))
    cli_ok(ws, "run")
    [first] = complete_backups(ws.dest)
    flip_byte(ws.dest / first / "data" / "a.txt")
    bad = record(ws, first, "data", b"a.txt")

    cli_ok(ws, "run")

    second = new_backup(ws, [first])
    assert_copied_afresh(ws, "data", b"a.txt", bad, CONTENT, [first], second)
    assert ws.report()["sources"]["data"]["relinked"] == 1


def test_records_of_deleted_backups_are_dropped(ws: Workspace) -> None:
    src = ws.make_source("data", {"a.txt": CONTENT.decode()})
    ws.write_config(rsync_source("data", src))
    cli_ok(ws, "run")
    [first] = complete_backups(ws.dest)
    record(ws, first, "data", b"a.txt")
    damaged.save(str(ws.state), str(ws.dest), [damaged.Damage(
        backup="2001-01-01t00-00-00+0000", source="data", path="a.txt", dev=1, ino=2)])

    cli_ok(ws, "run")

    assert [d.backup for d in damaged.load(str(ws.state), str(ws.dest))] == [first]


def _report_with(relinked: dict[str, int]) -> Report:
    stamp = "2021-04-02T07:00:12+02:00"
    step: dict[str, Any] = {"status": "ok", "start": stamp, "end": stamp, "duration_s": 1.0}
    return Report(
        name="2021-04-02t07-00-12+0200", status="ok", saved=True, start=stamp, end=stamp,
        duration_s=1.0, concurrency=1,
        sources={name: SourceReport(type="rsync", status="ok", bytes=10, snapshot=Step(**step),
                                    save=None, relinked=count)
                 for name, count in relinked.items()})


def test_the_mail_says_which_files_were_copied_afresh() -> None:
    body = render_body(_report_with({"data": 1, "photos": 3, "etc": 0}), host="pi")
    assert "data: 1 file copied afresh: verify found its copy damaged" in body
    assert "photos: 3 files copied afresh: verify found their copies damaged" in body
    assert "etc:" not in body
    quiet = render_body(_report_with({"data": 0}), host="pi")
    assert "afresh" not in quiet


def test_verify_finds_the_flipped_byte_and_the_next_run_copies_it_afresh(ws: Workspace) -> None:
    """The whole way through the CLI: verify (its manifest) records, run relinks."""
    src = ws.make_source("data", {"a.txt": CONTENT.decode(), "same.txt": "left alone\n"})
    ws.write_config(rsync_source("data", src))
    cli_ok(ws, "run")
    cli_ok(ws, "run")
    first, second = complete_backups(ws.dest)
    copy = ws.dest / second / "data" / "a.txt"
    flip_byte(copy)
    bad = os.lstat(copy)

    verified = ws.run("verify")
    assert verified.returncode == 1, (verified.returncode, verified.stderr, verified.stdout)
    assert [d.path for d in damaged.load(str(ws.state), str(ws.dest))] == ["a.txt"]
    cli_ok(ws, "run")

    third = new_backup(ws, [first, second])
    assert_copied_afresh(ws, "data", b"a.txt", bad, CONTENT, [first, second], third)
    assert ws.report()["sources"]["data"]["relinked"] == 1


def test_with_a_precopy_the_damaged_copy_is_not_linked_from_the_precopied_folder(
        ws: Workspace) -> None:
    """The precopy links the damaged inode too, and step 3 links from what it precopied:
    neither may bring it back."""
    src = ws.make_source("data", {"a.txt": CONTENT.decode(), "same.txt": "left alone\n"})
    os.utime(src / "a.txt", (1_600_000_000, 1_600_000_000))  # old: the precopy's copy is trusted
    hook = '[[snapshot_hooks]]\nname = "window"\npre = "true"\n'
    ws.write_config(rsync_source("data", src) + hook)
    cli_ok(ws, "run")
    [first] = complete_backups(ws.dest)
    flip_byte(ws.dest / first / "data" / "a.txt")
    bad = record(ws, first, "data", b"a.txt")

    cli_ok(ws, "run")

    report = ws.report()
    assert report["sources"]["data"]["precopy"]["status"] == "ok", report
    second = new_backup(ws, [first])
    assert_copied_afresh(ws, "data", b"a.txt", bad, CONTENT, [first], second)
    assert report["sources"]["data"]["relinked"] == 1
