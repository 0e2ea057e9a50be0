"""I/O errors say what they are (issue 18 bugs 12 and 15).

The failing disk is real as far as the engine can tell: a FUSE filesystem
served by this test process (``FailingDisk``) that answers every request
but the handshake with EIO, so ``lstat`` of its mount point, or of anything
rsync finds there, fails with "Input/output error" as a dying disk's would.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import resource
import struct
import subprocess
import threading
from typing import TYPE_CHECKING, Any

import pytest
from conftest import needs_root, needs_rsync
from hookkit import source_toml
from pibackup_async.engine.sources import btrfs
from prunekit import make_backup, rsync_source

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from conftest import Workspace

pytestmark = [needs_root, needs_rsync,
              pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")]

# --- a disk that fails every read: a FUSE filesystem answering EIO --------------------------

# Linux's FUSE protocol (include/uapi/linux/fuse.h): a request starts with a
# 40-byte header (len, opcode, unique, nodeid, uid, gid, pid, padding), a
# reply with a 16-byte one (len, error, unique).
_IN_HEADER = struct.Struct("<IIQQIIII")
_OUT_HEADER = struct.Struct("<IiQ")
_INIT, _FORGET, _INTERRUPT, _BATCH_FORGET = 26, 2, 36, 42
_NO_REPLY = (_FORGET, _INTERRUPT, _BATCH_FORGET)
# fuse_init_out of protocol 7.31: major, minor, max_readahead, flags,
# max_background, congestion_threshold, max_write, time_gran, max_pages,
# map_alignment, then unused words up to 64 bytes.
_INIT_OUT = struct.Struct("<IIIIHHIIHH8I")


class FailingDisk:
    """A FUSE filesystem mounted on ``mount`` that fails every operation with EIO.

    Served by a thread of the test process; unmounted (and the thread ended)
    by ``close``, whatever the test did.
    """

    def __init__(self, mount: Path) -> None:
        self.mount = mount
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        options = f"fd={self.fd},rootmode=40000,user_id=0,group_id=0".encode()
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"failing-disk", str(mount).encode(), b"fuse", 0, options) != 0:
            code = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(code, os.strerror(code), str(mount))
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                request = os.read(self.fd, 1 << 20)
            except OSError:
                return  # ENODEV: unmounted
            _, opcode, unique, *_ = _IN_HEADER.unpack_from(request)
            if opcode in _NO_REPLY:
                continue
            if opcode == _INIT:
                body = _INIT_OUT.pack(7, 31, 0, 0, 0, 0, 4096, 0, 0, 0, *[0] * 8)
                reply = _OUT_HEADER.pack(_OUT_HEADER.size + len(body), 0, unique) + body
            else:
                reply = _OUT_HEADER.pack(_OUT_HEADER.size, -errno.EIO, unique)
            with contextlib.suppress(OSError):  # the request was interrupted meanwhile
                os.write(self.fd, reply)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.mount)], capture_output=True, check=False)
        self._thread.join(10)
        os.close(self.fd)


@pytest.fixture
def failing_disks() -> Iterator[list[FailingDisk]]:
    disks: list[FailingDisk] = []
    try:
        yield disks
    finally:
        for disk in disks:
            disk.close()


def _events(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


# --- bug 15: prune on a failing disk ---------------------------------------------------------

_OLD = ["2025-01-01t03-00-00+0100", "2025-01-02t03-00-00+0100", "2025-01-03t03-00-00+0100"]
_NEWEST = "2025-01-04t03-00-00+0100"


def test_prune_on_a_failing_disk_says_input_output_error(
        ws: Workspace, failing_disks: list[FailingDisk]) -> None:
    for name in [*_OLD, _NEWEST]:
        make_backup(ws.dest, name)
    # The two oldest cannot be read any more; the third old one can.
    failing = _OLD[:2]
    for name in failing:
        failing_disks.append(FailingDisk(ws.dest / name))
    ws.write_config(rsync_source(ws.src) + "[retention]\nkeep_last = 1\n")
    result = ws.run("prune", "--log-format", "json")
    assert result.returncode == 1, result.stderr
    errors = {e["backup"]: e["error"] for e in _events(result.stderr)
              if e["event"] == "retention deletion failed"}
    assert sorted(errors) == failing, result.stderr
    for name in failing:
        assert "Input/output error" in errors[name], errors
    assert "not a folder" not in result.stderr
    # What could be read was deleted; the newest is kept.
    assert sorted(p.name for p in ws.dest.iterdir()) == [*failing, _NEWEST]


# --- bug 15: a long rsync error line keeps its end ------------------------------------------


def test_a_long_rsync_error_line_keeps_its_cause(
        ws: Workspace, failing_disks: list[FailingDisk]) -> None:
    source = ws.make_source("alpha")
    # rsync names what failed by its whole path: deep enough for a line of
    # 2 kB, which used to be cut before the error that ends it.
    deep = source.joinpath(*["d" * 9] * 200)
    deep.mkdir(parents=True)
    (deep / "disk").mkdir()
    failing_disks.append(FailingDisk(deep / "disk"))
    ws.write_config(source_toml("alpha", source))
    result = ws.run("run")
    assert result.returncode == 1, result.stderr
    failure = ws.report()["failure"]
    assert failure.startswith('source "alpha" snapshot failed: rsync exit code 23: rsync: '), (
        failure)
    assert failure.endswith('/ddddddddd/disk") failed: Input/output error (5)'), failure
    assert "bytes cut" not in failure
    # One line, short enough to read: the middle of the path gave way.
    assert "\n" not in failure and len(failure) < 600, failure


# --- bug 12: a btrfs send | receive that cannot make its pipes leaks no descriptor ------------


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


async def test_a_send_receive_short_of_descriptors_leaks_none(tmp_path: Path) -> None:
    """With room for one pipe only, the second cannot be made; the first must not stay open."""
    before = _open_fds()
    free = [n for n in range(max(before) + 4) if n not in before]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # The first pipe takes the two lowest free numbers; the next one is past the limit.
    resource.setrlimit(resource.RLIMIT_NOFILE, (free[1] + 1, hard))
    try:
        with pytest.raises(OSError) as caught:
            await btrfs.send_receive(btrfs.Site(), str(tmp_path / "snapshot"), None,
                                     str(tmp_path))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert caught.value.errno == errno.EMFILE
    assert _open_fds() == before
