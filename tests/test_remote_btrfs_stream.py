"""A remote btrfs send streams over the host's OpenSSH master into a local receive (issue 12).

``sources.btrfs.send_receive`` on a remote ``Site``, driven in-process against
a real OpenSSH sshd on 127.0.0.1 (tests/sshkit.py) and real loop-mounted
btrfs filesystems: the send runs as a local ``ssh`` process multiplexed on the
run's master, joined to ``btrfs receive`` by ``splice`` (no asyncssh channel,
no Python relay); the running step's heartbeat counts the bytes as they pass
(issue 11); a connection cut under the stream fails it with RemoteError and
leaves nothing running, here or on the host.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import pytest
from btrfskit import Btrfs, assert_received, fill_random, needs_btrfs
from conftest import kill_mentioning, processes_mentioning
from pibackup_async.engine import heartbeat
from pibackup_async.engine.config import Host
from pibackup_async.engine.remote import RemoteError, RemoteHost
from pibackup_async.engine.sources import btrfs
from sshkit import SSHD, Sshd, children, cut_connections

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

pytestmark = [
    needs_btrfs,
    pytest.mark.root,
    pytest.mark.skipif(not os.path.exists(SSHD), reason="OpenSSH sshd is not installed"),
]

DATA_MIB = 160


@dataclass
class Stream:
    server: Sshd
    snapshot: Path
    dest: Path


@pytest.fixture
def stream(tmp_path: Path, btrfs_fs: Callable[..., Btrfs],
           new_sshd: Callable[[], Sshd]) -> Iterator[Stream]:
    """A read-only snapshot of 160 MiB on a "remote" btrfs, an empty local btrfs to receive."""
    source = btrfs_fs(tmp_path / "src", 512)
    volume = source.subvolume("data")
    fill_random(volume, DATA_MIB)
    (source.mount / "snaps").mkdir()
    snapshot = source.mount / "snaps" / "data"
    subprocess.run(["btrfs", "subvolume", "snapshot", "-r", str(volume), str(snapshot)],
                   check=True, capture_output=True)
    subprocess.run(["btrfs", "filesystem", "sync", str(source.mount)], check=True,
                   capture_output=True)
    # Started after the source is mounted: its private mount namespace has it.
    server = new_sshd()
    dest = btrfs_fs(tmp_path / "dest", 512)
    try:
        yield Stream(server, snapshot, dest.mount)
    finally:
        kill_mentioning(str(tmp_path))


def _host(server: Sshd) -> Host:
    return Host(address="127.0.0.1", port=server.port, user="root",
                identity_file=str(server.client.path), known_hosts=str(server.known_hosts))


def _pipe(pid: int, fd: int) -> str:
    return os.readlink(f"/proc/{pid}/fd/{fd}")


def _holds(pid: int, target: str) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return True
        except OSError:
            continue
    return False


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _sends(snapshot: Path) -> list[int]:
    """Live ``btrfs send`` processes of this snapshot (on the "host": this machine)."""
    return [pid for pid, cmd in processes_mentioning(str(snapshot))
            if cmd.startswith("btrfs send")]


def _our_children(server: Sshd) -> list[tuple[int, str]]:
    """This process's children but the test sshd (the engine's: ssh, receive, the master)."""
    assert server.proc is not None
    return [(pid, _command(pid)) for pid in children(os.getpid()) if pid != server.proc.pid]


async def _until(predicate: Callable[[], bool], what: str) -> None:
    """Poll ``predicate`` in the event loop (the caller bounds it with ``fail_after``)."""
    while not predicate():  # noqa: ASYNC110
        await anyio.sleep(0.005)
    assert predicate(), what


async def test_a_remote_send_goes_through_ssh_and_splice_and_counts_its_bytes(
        stream: Stream, tmp_path: Path) -> None:
    remote = RemoteHost("h1", _host(stream.server), str(tmp_path))
    seen: list[int] = []
    wiring: dict[str, str] = {}
    size = 0

    async def save() -> None:
        nonlocal size
        with heartbeat.beating("save", source="data"):
            size = (await btrfs.send_receive(btrfs.Site(remote), str(stream.snapshot), None,
                                             str(stream.dest))).bytes

    def watch() -> None:
        # What live progress reads: the running steps, from this same event loop.
        for beat in heartbeat.running():
            if beat.what == "save" and beat.bytes is not None and beat.bytes not in seen:
                seen.append(beat.bytes)
        if "ssh" in wiring:
            return
        ours = _our_children(stream.server)
        ssh = [pid for pid, cmd in ours if cmd.startswith("ssh ") and "btrfs send" in cmd]
        receive = [pid for pid, cmd in ours if cmd.startswith("btrfs receive ")]
        if ssh and receive and seen:
            wiring["ssh"] = _pipe(ssh[0], 1)
            wiring["receive"] = _pipe(receive[0], 0)
            wiring["ssh stdout read here"] = str(_holds(os.getpid(), wiring["ssh"]))

    try:
        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                tg.start_soon(save)
                while size == 0:
                    watch()
                    await anyio.sleep(0.005)
        assert remote._connection is None, "the send went through an asyncssh channel"
    finally:
        await remote.aclose()

    # A local ssh wrote into a pipe the engine reads; receive read another pipe.
    assert wiring, f"no ssh | receive pair seen; children: {_our_children(stream.server)}"
    assert wiring["ssh"].startswith("pipe:") and wiring["receive"].startswith("pipe:"), wiring
    assert wiring["ssh"] != wiring["receive"], wiring
    assert wiring["ssh stdout read here"] == "True", wiring
    # The count grew while the stream passed, and ended at the stream's size.
    assert len(seen) >= 3, seen
    assert seen == sorted(seen) and seen[-1] == size, (seen[-3:], size)
    assert size > DATA_MIB * 1024 * 1024, size
    assert_received(stream.dest / "data", stream.snapshot)
    assert _our_children(stream.server) == []
    assert _sends(stream.snapshot) == []


@pytest.mark.slow
async def test_a_connection_cut_mid_send_is_a_remote_error_and_leaves_nothing_running(
        stream: Stream, tmp_path: Path) -> None:
    remote = RemoteHost("h1", _host(stream.server), str(tmp_path))
    errors: list[BaseException] = []

    async def save() -> None:
        try:
            with heartbeat.beating("save", source="data"):
                await btrfs.send_receive(btrfs.Site(remote), str(stream.snapshot), None,
                                         str(stream.dest))
        except Exception as error:  # the test wants to see any type that escapes
            errors.append(error)

    def flowing() -> bool:
        return any(b.what == "save" and (b.bytes or 0) > 0 for b in heartbeat.running())

    try:
        with anyio.fail_after(90):
            async with anyio.create_task_group() as tg:
                tg.start_soon(save)
                await _until(flowing, "the stream to flow")
                assert _sends(stream.snapshot), "no btrfs send on the host"
                assert cut_connections(stream.server) > 0
    finally:
        await remote.aclose()

    assert len(errors) == 1, errors
    [error] = errors
    assert isinstance(error, RemoteError), repr(error)
    assert "connection to host h1 (127.0.0.1:" in str(error) and "lost" in str(error), error
    # Nothing of ours runs on (local ssh, receive, the master), nor the send on the host.
    with anyio.fail_after(15):
        await _until(lambda: _our_children(stream.server) == [], "our children to end")
        await _until(lambda: _sends(stream.snapshot) == [], "the remote send to end")
    assert not (stream.dest / "data").exists(), "a partial received subvolume is left"
