"""``verify`` end to end through the CLI, on real backups made by ``run`` (SPEC §7).

The read error is a real I/O error: the destination is a squashfs image on a
loop device whose first compressed data block (a file's) was overwritten, so
the kernel fails to decompress it and ``read`` returns EIO, as a dying disk
does; the other files of the image still read.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import stat
from typing import TYPE_CHECKING

import pytest
from btrfskit import _check, _detach, _kill_leftovers, _loop_devices, _unmount
from conftest import needs_root, needs_rsync
from diskkit import needs_loop
from hookkit import Running, source_toml, wait_for

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from conftest import Workspace

pytestmark = [needs_rsync]

MiB = 1024 * 1024
SUMMARY = re.compile(
    r"verified (?P<name>\S+): (?P<files>\d+) files, (?P<folders>\d+) folders, "
    r"(?P<bytes>\d+) bytes \([^)]*\) read; (?P<problems>\d+) problems?"
    r"(?: \((?P<unreadable>\d+) unreadable, (?P<corrupt>\d+) corrupt\))?"
    # What the manifests covered, carried over, sampled (SPEC §9).
    r"(?:; (?!against the source)[^;]*)*"
    r"(?:; against the source: (?P<same>\d+) same, \d+ corrupt, (?P<changed>\d+) changed since, "
    r"(?P<not_compared>\d+) not compared)?$")


# --- the data -------------------------------------------------------------------------


def make_sources(ws: Workspace) -> None:
    """Two sources: folders, a symbolic link, a file of several chunks, an odd name."""
    alpha = ws.make_source("alpha", {
        "notes.txt": "notes\n",
        "docs/a.txt": "a" * 5000,
        "docs/deep/b.txt": "b" * 70000,
        "docs/deep/empty.txt": "",
    })
    (alpha / "big.bin").write_bytes(os.urandom(3 * MiB + 12345))
    (alpha / "docs" / "link").symlink_to("a.txt")
    os.makedirs(alpha / "emptydir")
    with open(os.path.join(os.fsencode(alpha), b"odd\nname\xff.txt"), "wb") as f:
        f.write(b"odd")
    ws.make_source("beta", {"one.txt": "1\n", "sub/two.txt": "22\n"})


def hook_toml(ws: Workspace) -> str:
    """A backup hook logging PIBACKUP_COMMAND, NAME, BACKUP_DIR (and STATUS in the post)."""
    line = "$PIBACKUP_COMMAND|$PIBACKUP_NAME|$PIBACKUP_BACKUP_DIR|${PIBACKUP_STATUS-}"
    events = shlex.quote(str(ws.events))
    pre = f'echo "pre|{line}" >> {events}'
    post = f'echo "post|{line}" >> {events}'
    return f'[[backup_hooks]]\nname = "log"\npre = {json.dumps(pre)}\npost = {json.dumps(post)}\n'


def configure(ws: Workspace, *, dest: Path | None = None) -> None:
    sources = source_toml("alpha", ws.src / "alpha") + source_toml("beta", ws.src / "beta")
    body = hook_toml(ws) + sources
    ws.write_config(body)
    if dest is not None:
        text = ws.config_path.read_text().replace(f'destination = "{ws.dest}"',
                                                  f'destination = "{dest}"')
        ws.config_path.write_text(text)


def backed_up(ws: Workspace, runs: int = 1) -> str:
    """Make the sources, back them up ``runs`` times; the newest backup's name."""
    make_sources(ws)
    configure(ws)
    for _ in range(runs):
        result = ws.run("run", "-q")
        assert result.returncode == 0, result.stderr
    names = [n for n in ws.backups() if "." not in n]
    ws.events.unlink(missing_ok=True)
    return names[-1]


def tree_counts(root: Path) -> tuple[int, int, int]:
    """Regular files, folders (``root`` itself not counted) and bytes below ``root``."""
    files = folders = size = 0
    for dirpath, dirnames, filenames in os.walk(root):
        folders += len(dirnames)
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                files += 1
                size += st.st_size
    return files, folders, size


def summary(stdout: str) -> re.Match[str]:
    last = stdout.splitlines()[-1]
    match = SUMMARY.match(last)
    assert match, f"no summary line in {stdout!r}"
    return match


def hook_lines(ws: Workspace) -> list[list[str]]:
    return [line.split("|") for line in ws.event_lines()]


def flip_byte(path: Path, offset: int) -> None:
    """Change one byte in place, keeping size and mtime (corruption the disk hides)."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# --- the tests ------------------------------------------------------------------------


def test_clean_backup_reads_everything_and_exits_0(ws: Workspace) -> None:
    name = backed_up(ws)
    reports = ws.reports()

    result = ws.run("verify")

    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1, result.stdout  # nothing found: the summary
    found = summary(result.stdout)
    files, folders, size = tree_counts(ws.dest / name)
    assert (found["name"], int(found["files"]), int(found["folders"]), int(found["bytes"])) \
        == (name, files, folders, size)
    # alpha: 6 files, 4 folders; beta: 2 and 2; beside them the manifests (SPEC §9)
    assert (files, folders) == (8, 6) or (files, folders) == (8 + 3, 6 + 1)
    assert found["problems"] == "0"
    # The hooks ran around it; the post saw the backup used. No report, no mail.
    assert hook_lines(ws) == [
        ["pre", "verify", "latest", "", ""],
        ["post", "verify", name, str(ws.dest / name), "ok"],
    ]
    assert ws.reports() == reports


def test_against_source_finds_a_flipped_byte_and_counts_changed_files(ws: Workspace) -> None:
    # Two runs: the newest backup's files are hard-linked to the first one's.
    name = backed_up(ws, runs=2)
    copy = ws.dest / name / "alpha" / "big.bin"
    assert os.stat(copy).st_nlink == 2
    flip_byte(copy, 2 * MiB + 77)
    # A source file changed since the backup: new content, new mtime. Not corruption.
    notes = ws.src / "alpha" / "notes.txt"
    notes.write_text("edited\n")
    os.utime(notes, (1_800_000_000, 1_800_000_000))

    result = ws.run("verify", "--against-source")

    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:-1] == [
        f"corrupt: alpha/big.bin: differs from {ws.src / 'alpha' / 'big.bin'} "
        f"at byte {2 * MiB + 77}",
    ]
    found = summary(result.stdout)
    _, _, size = tree_counts(ws.dest / name)
    assert (found["corrupt"], found["unreadable"], found["changed"], found["not_compared"]) \
        == ("1", "0", "1", "0")
    # Only the sources' files have a live copy (not the manifests beside them, SPEC §9).
    in_sources = sum(tree_counts(ws.dest / name / s)[0] for s in ("alpha", "beta"))
    assert int(found["same"]) == in_sources - 2
    assert int(found["bytes"]) == size
    assert "1 corrupt" in result.stderr
    assert hook_lines(ws)[-1] == ["post", "verify", name, str(ws.dest / name), "failed"]

    # Without the source to compare with, the manifest finds it (SPEC §9); a backup
    # without one reads back fine.
    has_manifest = (ws.dest / name / ".pibackup").exists()
    assert ws.run("verify").returncode == (1 if has_manifest else 0)


def test_against_source_skips_what_it_cannot_reach(ws: Workspace) -> None:
    name = backed_up(ws)
    shutil.rmtree(ws.src / "beta")

    result = ws.run("verify", "--against-source")

    assert result.returncode == 0, result.stderr
    assert "source cannot be read" in result.stderr and "beta" in result.stderr
    found = summary(result.stdout)
    assert found["not_compared"] == "2"  # beta's two files
    assert int(found["same"]) == tree_counts(ws.dest / name / "alpha")[0]


def test_source_option(ws: Workspace) -> None:
    name = backed_up(ws)

    result = ws.run("verify", "--source", "beta", name)

    assert result.returncode == 0, result.stderr
    found = summary(result.stdout)
    files, folders, size = tree_counts(ws.dest / name / "beta")
    assert (int(found["files"]), int(found["folders"]), int(found["bytes"])) \
        == (files, folders + 1, size)  # + beta's own folder

    # A source the backups do not hold (configured or not): exit 1, saying so.
    missing = ws.run("verify", "--source", "gamma")
    assert missing.returncode == 1
    assert "no complete backup holds gamma" in missing.stderr
    assert missing.stdout == ""
    # A source no longer configured is still verified (a retired machine's data).
    ws.write_config(hook_toml(ws) + source_toml("beta", ws.src / "beta"))
    retired = ws.run("verify", "--source", "alpha", "--against-source")
    assert retired.returncode == 0, retired.stderr
    assert "not in the configuration" in retired.stderr
    assert summary(retired.stdout)["files"] == str(tree_counts(ws.dest / name / "alpha")[0])


def test_a_backup_that_does_not_exist_exits_1(ws: Workspace) -> None:
    backed_up(ws)

    result = ws.run("verify", "2001-01-01t00-00-00+0000")

    assert result.returncode == 1
    assert "holds no complete backup 2001-01-01t00-00-00+0000" in result.stderr
    assert result.stdout == ""
    # Under the hooks: the post saw no backup used.
    assert hook_lines(ws) == [
        ["pre", "verify", "2001-01-01t00-00-00+0000", "", ""],
        ["post", "verify", "", "", "failed"],
    ]


@pytest.mark.parametrize("args", [("not-a-name",), ("--source", "../alpha")])
def test_malformed_arguments_exit_2_before_any_hook(ws: Workspace, args: tuple[str, ...]
                                                    ) -> None:
    backed_up(ws)

    result = ws.run("verify", *args)

    assert result.returncode == 2
    assert "error:" in result.stderr
    assert ws.event_lines() == []


def test_lock_held_exits_3(ws: Workspace) -> None:
    backed_up(ws)
    with open(ws.state / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = ws.run("verify")
    assert result.returncode == 3
    assert "holds the lock" in result.stderr
    assert ws.event_lines() == []


@pytest.mark.slow
def test_a_signal_stops_a_long_read_promptly(ws: Workspace) -> None:
    name = backed_up(ws)
    # A file of 1 TiB of holes: reading it takes minutes.
    with open(ws.dest / name / "alpha" / "huge.bin", "wb") as f:
        f.truncate(1 << 40)

    with Running(ws.start("verify")) as running:
        wait_for(lambda: "verifying backup" in running.stderr, 30, "the verify to start")
        running.send(signal.SIGTERM)
        assert running.wait(20) == 143
    assert hook_lines(ws)[-1] == ["post", "verify", name, str(ws.dest / name), "interrupted"]


# --- a real read error: a squashfs destination with a corrupted block -------------------


@pytest.fixture
def squash(ws: Workspace) -> Iterator[Callable[[], Path]]:
    """``squash()`` packs the destination into a squashfs image, overwrites its first data
    block, attaches it to a loop device and mounts it read-only; the mount point. The
    fixture unmounts and detaches it at the end, even after a failure."""
    if shutil.which("mksquashfs") is None:
        pytest.skip("mksquashfs is not installed (Debian package squashfs-tools)")
    image = ws.root / "dest.squashfs"
    mount = ws.root / "squashed"

    def pack() -> Path:
        mount.mkdir()
        # Files are packed in name order and the first one fills whole blocks: its
        # first compressed block starts right after the 96-byte superblock.
        _check(["mksquashfs", str(ws.dest), str(image), "-noappend", "-quiet",
                "-no-progress", "-comp", "gzip"])
        with open(image, "r+b") as f:
            f.seek(96 + 64)
            f.write(b"\xff" * 256)
        device = _check(["losetup", "--find", "--show", "--read-only", str(image)]).strip()
        _check(["mount", "-t", "squashfs", "-o", "ro", device, str(mount)])
        return mount

    try:
        yield pack
    finally:
        _kill_leftovers(ws.root)
        _unmount(mount)
        _detach(image)
        assert not _loop_devices(image), "the squashfs loop device is still attached"


@needs_root
@needs_loop
def test_read_error_is_reported_and_exits_1(ws: Workspace, squash: Callable[[], Path]
                                            ) -> None:
    make_sources(ws)
    # A compressible file first in name order, big enough for whole blocks: the block
    # the fixture overwrites is its first one.
    (ws.src / "alpha" / "aaa-log.txt").write_text(
        "".join(f"line {i}\n" for i in range(100_000)))
    configure(ws)
    assert ws.run("run", "-q").returncode == 0
    ws.events.unlink(missing_ok=True)
    [name] = ws.backups()
    dest = squash()
    configure(ws, dest=dest)
    with pytest.raises(OSError, match="Input/output error"):
        (dest / name / "alpha" / "aaa-log.txt").read_bytes()

    result = ws.run("verify")

    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines()[:-1] == ["unreadable: alpha/aaa-log.txt: Input/output error"]
    found = summary(result.stdout)
    files, folders, size = tree_counts(ws.dest / name)
    assert (int(found["files"]), int(found["folders"])) == (files, folders)
    assert (found["unreadable"], found["corrupt"]) == ("1", "0")
    # Everything else was read to its end.
    assert int(found["bytes"]) == size - (ws.dest / name / "alpha" / "aaa-log.txt").stat().st_size
    assert "1 unreadable" in result.stderr
    assert hook_lines(ws)[-1] == ["post", "verify", name, str(dest / name), "failed"]
