"""Remote hosts and what goes to them (issue 18): how a remote command ended, host names,
paths with spaces, IPv6 addresses.

Against the real OpenSSH sshd of tests/sshkit.py (NOTES pitfall 6): the
"remote" host is this machine, so a remote source's path is a folder of the
test's workspace.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
import pytest
from btrfskit import btrfs_source, fill_random, needs_btrfs, sync
from conftest import needs_rsync
from datakit import toml_value
from hookkit import HookSpec, hook_script, hook_toml, order, report_hooks, source_toml, statuses
from pibackup_async.engine.config import Host
from pibackup_async.engine.remote import RemoteHost
from sshkit import Sshd, free_port, needs_sshd

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

    from btrfskit import Btrfs
    from conftest import Workspace
    from sshkit import ClientKey

pytestmark = [
    needs_rsync,
    needs_sshd,
]


def host_of(server: Sshd, address: str = "127.0.0.1") -> Host:
    return Host(address=address, port=server.port, user="root",
                identity_file=str(server.client.path), known_hosts=str(server.known_hosts))


@asynccontextmanager
async def remote_host(host: Host) -> AsyncIterator[RemoteHost]:
    """A RemoteHost as a run has it: its control socket in a short folder of its own."""
    # A socket path is short (108 bytes): tmp_path is too deep for it.
    control = tempfile.mkdtemp(prefix="pibackup-test-ssh-")
    remote = RemoteHost("h1", host, control)
    try:
        yield remote
    finally:
        await remote.aclose()
        shutil.rmtree(control, ignore_errors=True)


# --- how a remote command ended (SPEC §2 Failures) ------------------------------------


@pytest.mark.parametrize("sudo", [False, True], ids=["plain", "sudo"])
def test_a_remote_pre_killed_by_a_signal_is_cut_short_and_its_post_runs(
    ws: Workspace, sshd: Sshd, sudo: bool
) -> None:
    if sudo and shutil.which("sudo") is None:
        pytest.skip("sudo is not installed")
    r1 = HookSpec("r1")
    # The hook's own shell is killed, as the OOM killer would: it did not end on its own.
    pre = hook_script(ws, r1, "pre") + "\nkill -KILL $$\n"
    hook = (
        '[[backup_hooks]]\nname = "r1"\nhost = "h1"\n'
        f"pre = {toml_value(pre)}\npost = {toml_value(hook_script(ws, r1, 'post'))}\n"
    )
    ws.write_config(
        sshd.host_toml("h1", sudo=sudo) + hook_toml(ws, HookSpec("b1")) + hook
        + source_toml("local", ws.make_source("local"))
    )

    result = ws.run("run", timeout=60)

    assert result.returncode == 1, result.stderr
    # Cut short, not failed on its own: its post runs (SPEC §2), the run stops there.
    assert order(ws) == ["b1.pre", "r1.pre", "r1.post", "b1.post"]
    assert statuses(ws)["r1.post"] == "failed"
    report = ws.report()
    assert report["status"] == "failed"
    assert report_hooks(report)[:2] == [("b1", "pre", "ok"), ("r1", "pre", "failed")]
    [r1_pre] = [h for h in report["hooks"] if (h["hook"], h["phase"]) == ("r1", "pre")]
    assert r1_pre["exit_code"] == -9, r1_pre
    failure = str(report["failure"])
    assert "killed by SIGKILL" in failure, failure
    assert "setsid" not in failure and "No such file" not in failure, failure


async def test_a_remote_stream_killed_by_sigpipe_ends_as_ssh_says_a_signal(sshd: Sshd) -> None:
    """A remote sender whose reader went away dies of SIGPIPE: ssh says so with its 255
    (the master still up, so not a lost connection), never as an ordinary exit code."""
    async with remote_host(host_of(sshd)) as remote:
        argv = await remote.command_argv("exec yes")
        # A pipe of our own: the reader closes its end for real, as a failed receive does.
        reader, writer = os.pipe()
        with anyio.fail_after(30):
            try:
                async with await anyio.open_process(argv, stdin=subprocess.DEVNULL,
                                                    stdout=writer) as ssh:
                    os.close(writer)
                    writer = -1
                    assert await anyio.to_thread.run_sync(os.read, reader, 1) == b"y"
                    os.close(reader)
                    reader = -1
                    assert ssh.stderr is not None
                    said = b""
                    async for chunk in ssh.stderr:
                        said += chunk
                    code = await ssh.wait()
            finally:
                for fd in (reader, writer):
                    if fd >= 0:
                        os.close(fd)
            said_text = said.decode(errors="replace")
            assert await remote.lost(said_text) is None
    assert "setsid" not in said_text, said_text
    assert code == 255, f"ssh exited {code}: {said_text}"


# --- what OpenSSH reads in its options ---------------------------------------------------


def test_a_known_hosts_path_with_a_space_and_a_percent_is_used_whole(
    ws: Workspace, sshd: Sshd
) -> None:
    # OpenSSH splits UserKnownHostsFile at whitespace (a list of files) and
    # expands %-tokens in it: the host key must still be found in this file.
    folder = ws.root / "ssh files %h"
    folder.mkdir()
    known = folder / "known hosts"
    shutil.copy(sshd.known_hosts, known)
    src = ws.make_source("data", {"file.txt": "over ssh\n"})
    hook = '[[backup_hooks]]\nname = "r1"\nhost = "h1"\npre = "true"\n'
    ws.write_config(sshd.host_toml("h1", known_hosts=known) + hook
                    + source_toml("data", src, host="h1"))

    result = ws.run("run", timeout=60)

    assert result.returncode == 0, result.stderr
    report = ws.report()
    assert (ws.dest / report["name"] / "data" / "file.txt").read_text() == "over ssh\n"


# --- paths through the remote shell (rsync before 3.2.4) -------------------------------

# rsync before 3.2.4 (Debian 11, Raspberry Pi OS bullseye) hands a remote path
# to the remote shell, which splits it at spaces; rsync 3.2.4 and later behave
# so with RSYNC_OLD_ARGS=1, unless the command line asks for -s.
OLD_RSYNC = {"RSYNC_OLD_ARGS": "1"}


def test_a_remote_source_whose_path_has_a_space_and_a_quote_is_pulled_whole(
    ws: Workspace, sshd: Sshd
) -> None:
    src = ws.make_source("it's my data", {"a file.txt": "spaced out\n", "sub/b": "b\n"})
    ws.write_config(sshd.host_toml("h1") + source_toml("data", src, host="h1"))

    result = ws.run("run", timeout=60, env=OLD_RSYNC)

    assert result.returncode == 0, result.stderr
    report = ws.report()
    copy = ws.dest / report["name"] / "data"
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*")) == [
        "a file.txt", "sub", "sub/b"]
    assert (copy / "a file.txt").read_text() == "spaced out\n"
    command = report["sources"]["data"]["snapshot"]["command"]
    assert "-s" in command or "--protect-args" in command, command


def test_a_restore_to_a_host_path_with_a_space_and_a_quote_lands_there(
    ws: Workspace, sshd: Sshd
) -> None:
    src = ws.make_source("data", {"a file.txt": "spaced out\n"})
    ws.write_config(sshd.host_toml("h1") + source_toml("data", src))
    assert ws.run("run", timeout=60).returncode == 0
    target = ws.root / "it's restored here"

    result = ws.run("restore", "latest", "data", "--to", f"h1:{target}", timeout=60,
                    env=OLD_RSYNC)

    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in target.iterdir()) == ["a file.txt"]
    assert (target / "a file.txt").read_text() == "spaced out\n"


# --- IPv6 addresses ---------------------------------------------------------------------


@pytest.fixture
def sshd6(tmp_path_factory: pytest.TempPathFactory, client_key: ClientKey) -> Iterator[Sshd]:
    """A test sshd listening on ``::1`` only."""
    try:
        free_port("::1")
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    server = Sshd(tmp_path_factory.mktemp("sshd6"), client_key, address="::1")
    try:
        yield server.start()
    finally:
        server.stop()


def test_a_host_at_an_ipv6_address_runs_hooks_gives_sources_and_takes_restores(
    ws: Workspace, sshd6: Sshd
) -> None:
    src = ws.make_source("data", {"file.txt": "over IPv6\n"})
    ws.write_config(sshd6.host_toml("v6")
                    + hook_toml(ws, HookSpec("r1")) + 'host = "v6"\n'
                    + source_toml("data", src, host="v6"))

    result = ws.run("run", timeout=60)

    assert result.returncode == 0, result.stderr
    assert order(ws) == ["r1.pre", "r1.post"]
    report = ws.report()
    assert (ws.dest / report["name"] / "data" / "file.txt").read_text() == "over IPv6\n"
    # rsync needs the brackets: without them root@::1:/srv reads as a daemon's HOST::MODULE.
    assert f"root@[::1]:{src}/" in report["sources"]["data"]["snapshot"]["command"]
    assert sshd6.logins() >= 1

    # Without the hook: restore runs the backup hooks, and a remote one there is
    # another matter (it fails with KeyError: restore opens no connection for hooks).
    ws.write_config(sshd6.host_toml("v6") + source_toml("data", src, host="v6"))
    target = ws.root / "restored"
    pushed = ws.run("restore", "latest", "data", "--to", f"v6:{target}", timeout=60)

    assert pushed.returncode == 0, pushed.stderr
    assert (target / "file.txt").read_text() == "over IPv6\n"


@needs_btrfs
@pytest.mark.slow
def test_a_remote_send_ended_by_a_failing_receive_reports_the_receive(
    ws: Workspace, btrfs_fs: Callable[..., Btrfs], new_sshd: Callable[[], Sshd]
) -> None:
    """The same on a real run: receive fails (more incompressible data than the
    destination holds), the send on the host dies of the broken pipe, a symptom only."""
    src_fs = btrfs_fs(ws.src / "vol", 512)
    source = src_fs.subvolume("data")
    fill_random(source, 250)
    sync(src_fs)
    server = new_sshd()  # after the mount: the server's namespace has it
    btrfs_fs(ws.dest, 130)
    ws.write_config(server.host_toml("h1") + btrfs_source("data", source, host="h1"))

    result = ws.run("run", timeout=120)

    assert result.returncode == 1, result.stderr
    failure = str(ws.report()["failure"])
    assert "btrfs receive" in failure and "No space left on device" in failure, failure
    assert "btrfs send" not in failure, failure
