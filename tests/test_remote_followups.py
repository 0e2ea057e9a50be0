"""Remote hosts: follow-ups of issue 18's review.

- The OpenSSH master's control socket fits a Unix socket's path (107 bytes)
  whatever folder it was asked for: a deep one gets a short private folder.
- restore, verify and prune run remote backup hooks (SPEC §7) as run does.
- An identity file whose path holds a ``%`` reaches ssh literally.
- An IPv6 host's address is written ``[::1]:22`` in messages.

Against the real OpenSSH sshd of tests/sshkit.py (NOTES pitfall 6).
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import tempfile
from typing import TYPE_CHECKING

import anyio
import pytest
from conftest import needs_rsync, wait_for
from datakit import toml_value
from hookkit import HookSpec, hook_toml, order, source_toml
from pibackup_async.engine.config import Host
from pibackup_async.engine.remote import RemoteError, RemoteHost
from sshkit import Sshd, established_to, free_port, needs_sshd

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Workspace

pytestmark = [
    needs_rsync,
    needs_sshd,
]

# sun_path holds 108 bytes with the final NUL; OpenSSH first binds the
# socket's path plus ".XXXXXXXXXXXXXXXX", then renames it.
SOCKET_PATH_MAX = 107
OPENSSH_SUFFIX = 17


def host_of(server: Sshd) -> Host:
    return Host(address=server.address, port=server.port, user="root",
                identity_file=str(server.client.path), known_hosts=str(server.known_hosts))


def wait_disconnected(server: Sshd) -> None:
    wait_for(lambda: established_to(server.port) == 0, 10,
             f"connections to port {server.port} to close")


# --- the control socket's path ------------------------------------------------------------


async def test_a_control_folder_too_deep_for_a_socket_gets_a_short_private_one(
    sshd: Sshd, tmp_path: Path
) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    remote = RemoteHost("h1", host_of(sshd), str(deep))
    try:
        with anyio.fail_after(30):
            argv = await remote.command_argv("echo reached")
            finished = await anyio.run_process(argv, check=False)
        assert finished.returncode == 0, finished.stderr.decode(errors="replace")
        assert finished.stdout == b"reached\n"
        path = remote.control_path
        assert len(os.fsencode(path)) + OPENSSH_SUFFIX <= SOCKET_PATH_MAX, path
        assert stat.S_ISSOCK(os.lstat(path).st_mode), path
        # A folder of its own that no other user can enter or squat.
        private = os.path.dirname(path)
        info = os.lstat(private)
        assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700, private
        assert info.st_uid == os.geteuid()
    finally:
        await remote.aclose()
    assert not os.path.exists(private), "the private control folder was left behind"  # noqa: ASYNC240
    assert os.listdir(deep) == []
    wait_disconnected(sshd)


async def test_a_control_folder_short_enough_is_used_as_given(sshd: Sshd) -> None:
    # As a run's own (open_remotes): tmp_path is too deep for a socket.
    short = tempfile.mkdtemp(prefix="pibackup-test-ssh-")
    remote = RemoteHost("h1", host_of(sshd), short)
    try:
        with anyio.fail_after(30):
            await remote.ensure_master()
        assert remote.control_path == os.path.join(short, "h1")
        assert stat.S_ISSOCK(os.lstat(remote.control_path).st_mode)
    finally:
        await remote.aclose()
        shutil.rmtree(short, ignore_errors=True)
    wait_disconnected(sshd)


# --- remote backup hooks around restore, verify and prune (SPEC §7) ---------------------


def remote_event_hook(ws: Workspace, host: str) -> str:
    """A backup hook on ``host`` logging what the hooks of restore, verify and prune see."""
    events = shlex.quote(str(ws.events))
    lines = ["[[backup_hooks]]", 'name = "far"', f"host = {toml_value(host)}"]
    for phase in ("pre", "post"):
        line = f"{phase}|$PIBACKUP_COMMAND|$PIBACKUP_NAME|${{PIBACKUP_STATUS-unset}}"
        lines.append(f"{phase} = {toml_value(f'echo {chr(34)}{line}{chr(34)} >> {events}')}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("command", ["restore", "verify", "prune"])
def test_restore_verify_and_prune_run_a_remote_backup_hook_around_their_work(
    ws: Workspace, sshd: Sshd, command: str
) -> None:
    src = ws.make_source("data")
    sources = sshd.host_toml("h1") + source_toml("data", src)
    ws.write_config(sources)
    made = ws.run("run", timeout=60)
    assert made.returncode == 0, made.stderr
    [name] = [n for n in ws.backups() if not n.endswith(".in-progress")]
    ws.write_config(sources + remote_event_hook(ws, "h1"))
    args = {"restore": ["latest", "data", "--to", str(ws.root / "restored")],
            "verify": [], "prune": []}[command]

    result = ws.run(command, *args, timeout=60)

    assert result.returncode == 0, f"exit {result.returncode}\nstderr:\n{result.stderr}"
    asked, used = ("", "") if command == "prune" else ("latest", name)
    assert ws.event_lines() == [f"pre|{command}|{asked}|unset", f"post|{command}|{used}|ok"]
    if command == "restore":
        assert (ws.root / "restored" / "file.txt").read_text() == "content of data\n"
    wait_disconnected(sshd)


# --- an identity file with % in its path ----------------------------------------------


def test_an_identity_file_whose_path_holds_a_percent_sign_is_used_as_written(
    ws: Workspace, sshd: Sshd
) -> None:
    # %d is a token OpenSSH expands (the home folder): read as one, the key is not found.
    keys = ws.root / "100%d keys"
    keys.mkdir()
    key = keys / "client_key"
    shutil.copy2(sshd.client.path, key)
    src = ws.make_source("data", {"file.txt": "by key\n"})
    ws.write_config(sshd.host_toml("h1", identity_file=key)
                    + hook_toml(ws, HookSpec("r1")) + 'host = "h1"\n'
                    + source_toml("data", src, host="h1"))

    result = ws.run("run", timeout=60)

    assert result.returncode == 0, f"exit {result.returncode}\nstderr:\n{result.stderr}"
    report = ws.report()
    assert (ws.dest / report["name"] / "data" / "file.txt").read_text() == "by key\n"
    assert order(ws) == ["r1.pre", "r1.post"]
    wait_disconnected(sshd)


# --- how an IPv6 host is named in messages ------------------------------------------------


async def test_an_ipv6_host_is_named_with_its_address_in_brackets(tmp_path: Path) -> None:
    try:
        port = free_port("::1")  # nothing listens there: every connection is refused
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    host = Host(address="::1", port=port, user="root", known_hosts=str(known_hosts))
    said = []
    for attempt in ("master", "connection"):
        remote = RemoteHost("v6", host, str(tmp_path))
        try:
            with anyio.fail_after(30), pytest.raises(RemoteError) as caught:
                if attempt == "master":
                    await remote.ensure_master()
                else:
                    await remote.run("true", {})
        finally:
            await remote.aclose()
        said.append(str(caught.value))
    for message in said:
        assert f"host v6 ([::1]:{port})" in message, said
