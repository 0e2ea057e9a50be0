"""A backup restores what the source held: modes, owners, times, links, ACLs, xattrs, holes.

Each test builds a source tree, runs the real CLI (real rsync) and compares
the backup's ``<name>/<source>/`` with the source, field by field.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from typing import TYPE_CHECKING

import pytest
from conftest import needs_root, needs_rsync
from datakit import (
    ODD_NAMES,
    acl_listing,
    build_tree,
    cli_ok,
    describe_tree,
    diff_trees,
    hardlink_groups,
    have_tool,
    only_backup,
    rsync_source,
    set_mtime,
    settle_times,
)

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Workspace

pytestmark = needs_rsync

def run_backup(ws: Workspace, src: Path) -> Path:
    ws.write_config(rsync_source("data", src))
    cli_ok(ws, "run")
    return only_backup(ws.dest) / "data"


def test_modes_times_links_names_and_contents_are_kept(ws: Workspace) -> None:
    src = ws.src / "data"
    src.mkdir()
    build_tree(src)
    os.chmod(src, 0o750)
    set_mtime(src, 1_500_000_000_000_000_001)

    copy = run_backup(ws, src)

    problems = diff_trees(describe_tree(src), describe_tree(copy))
    assert problems == [], "backup differs from source:\n" + "\n".join(problems)
    # Odd names really are there as bytes (not re-encoded).
    names = set(os.listdir(os.fsencode(copy)))
    assert set(ODD_NAMES) <= names
    assert os.readlink(os.fsencode(copy / "dangling")) == b"/nonexistent/target"
    assert (copy / "empty-dir").is_dir() and list((copy / "empty-dir").iterdir()) == []


def test_hard_links_stay_one_inode_in_the_backup(ws: Workspace) -> None:
    src = ws.src / "data"
    src.mkdir()
    build_tree(src)

    copy = run_backup(ws, src)

    want = hardlink_groups(src)
    assert want == {frozenset({b"hard-a", b"sub dir/hard-b"})}
    assert hardlink_groups(copy) == want
    a, b = os.lstat(copy / "hard-a"), os.lstat(copy / "sub dir" / "hard-b")
    assert a.st_ino == b.st_ino


def test_sparse_file_stays_sparse(ws: Workspace) -> None:
    src = ws.src / "data"
    src.mkdir()
    build_tree(src)
    source_blocks = os.stat(src / "sparse.img").st_blocks
    if source_blocks * 512 > 4 * 1024 * 1024:
        pytest.skip("this filesystem does not keep holes in the source file")

    copy = run_backup(ws, src)

    st = os.stat(copy / "sparse.img")
    assert st.st_size == 64 * 1024 * 1024
    # 64 MiB apparent; data is 8 KiB. Allow generous filesystem overhead, far below 64 MiB.
    assert st.st_blocks * 512 <= 1024 * 1024, f"backup uses {st.st_blocks * 512} bytes on disk"
    assert (copy / "sparse.img").read_bytes() == (src / "sparse.img").read_bytes()


def _setfattr_or_skip(path: Path, name: str, value: bytes) -> None:
    try:
        os.setxattr(path, name, value)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            pytest.skip(f"the filesystem refuses user xattrs: {e}")
        raise


def test_xattrs_are_kept(ws: Workspace) -> None:
    src = ws.src / "data"
    src.mkdir()
    (src / "tagged").write_text("x\n")
    (src / "dir").mkdir()
    _setfattr_or_skip(src / "tagged", "user.colour", b"blue")
    os.setxattr(src / "tagged", "user.binary", b"\x00\x01\xff")
    os.setxattr(src / "dir", "user.note", b"a folder note")
    settle_times(src)

    copy = run_backup(ws, src)

    assert os.getxattr(copy / "tagged", "user.colour") == b"blue"
    assert os.getxattr(copy / "tagged", "user.binary") == b"\x00\x01\xff"
    assert os.getxattr(copy / "dir", "user.note") == b"a folder note"
    problems = diff_trees(describe_tree(src), describe_tree(copy))
    assert problems == [], "\n".join(problems)


def test_acls_are_kept(ws: Workspace) -> None:
    if not (have_tool("setfacl") and have_tool("getfacl")):
        pytest.skip("setfacl/getfacl are not installed")
    src = ws.src / "data"
    src.mkdir()
    (src / "shared.txt").write_text("shared\n")
    (src / "team").mkdir()
    (src / "team" / "doc").write_text("doc\n")
    commands = [
        ["setfacl", "-m", "u:12345:r-x,g:23456:rw-", str(src / "shared.txt")],
        ["setfacl", "-m", "u:12345:rwx", str(src / "team")],
        ["setfacl", "-d", "-m", "u:12345:r-x", str(src / "team")],
    ]
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"the filesystem refuses ACLs: {result.stderr.strip()}")

    copy = run_backup(ws, src)

    want = acl_listing(src)
    assert any("user:12345:r-x" in block for block in want.values())
    assert acl_listing(copy) == want
    assert "default:user:12345:r-x" in want["# file: team"]


@needs_root
def test_numeric_owners_and_special_files_are_kept(ws: Workspace) -> None:
    src = ws.src / "data"
    src.mkdir()
    owned = src / "owned"
    owned.write_text("belongs to nobody known\n")
    os.chown(owned, 12345, 12345)
    (src / "owned-dir").mkdir()
    os.chown(src / "owned-dir", 12345, 54321)
    os.symlink("owned", src / "owned-link")
    os.chown(src / "owned-link", 12345, 12345, follow_symlinks=False)
    os.mkfifo(src / "fifo")
    os.mknod(src / "null-dev", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    settle_times(src)

    copy = run_backup(ws, src)

    st = os.lstat(copy / "owned")
    assert (st.st_uid, st.st_gid) == (12345, 12345)
    st = os.lstat(copy / "owned-dir")
    assert (st.st_uid, st.st_gid) == (12345, 54321)
    st = os.lstat(copy / "owned-link")
    assert (st.st_uid, st.st_gid) == (12345, 12345)
    assert stat.S_ISFIFO(os.lstat(copy / "fifo").st_mode)
    dev = os.lstat(copy / "null-dev")
    assert stat.S_ISCHR(dev.st_mode) and dev.st_rdev == os.makedev(1, 3)
    problems = diff_trees(describe_tree(src), describe_tree(copy))
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("trailing_slash", [False, True], ids=["no-slash", "slash"])
def test_source_contents_land_in_a_folder_named_after_the_source(
    ws: Workspace, trailing_slash: bool
) -> None:
    src = ws.make_source("photos", {"a.jpg": "A", "deep/b.jpg": "B"})
    path = str(src) + ("/" if trailing_slash else "")
    ws.write_config(rsync_source("pics", path))

    cli_ok(ws, "run")

    copy = only_backup(ws.dest) / "pics"
    assert sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*")) == [
        "a.jpg", "deep", "deep/b.jpg",
    ]
    assert (copy / "a.jpg").read_text() == "A"
    assert not (copy / "photos").exists()
