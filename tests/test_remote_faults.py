"""RemoteHost against a real OpenSSH sshd whose connection is cut (issue 9 item 4, remote half).

Whatever asyncssh raises when the connection breaks under a running command
must come out of ``RemoteHost.run`` as RemoteError naming the host; the next
command connects again.
"""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING

import anyio
import pytest
from conftest import kill_mentioning, needs_root, processes_mentioning
from pibackup_async.engine.config import Host
from pibackup_async.engine.remote import RemoteError, RemoteHost
from sshkit import SSHD, Sshd, cut_connections

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

pytestmark = [
    needs_root,  # the test sshd logs in as root
    pytest.mark.skipif(not os.path.exists(SSHD), reason="OpenSSH sshd is not installed"),
]


@pytest.fixture
def program(tmp_path: Path) -> Iterator[str]:
    """A copy of ``sleep`` under the test's folder, run "remotely"; killed after the test."""
    path = tmp_path / "bin" / "remote-sleeper"
    path.parent.mkdir()
    shutil.copy2("/bin/sleep", path)
    try:
        yield str(path)
    finally:
        kill_mentioning(str(path))


def _host(server: Sshd) -> Host:
    return Host(address="127.0.0.1", port=server.port, user="root",
                identity_file=str(server.client.path), known_hosts=str(server.known_hosts))


async def test_a_connection_cut_under_a_running_command_is_a_remote_error(
    new_sshd: Callable[[], Sshd], program: str, tmp_path: Path
) -> None:
    server = new_sshd()
    remote = RemoteHost("h1", _host(server), str(tmp_path))
    errors: list[BaseException] = []
    ended = anyio.Event()

    async def run_it() -> None:
        try:
            await remote.run(f"{program} 1000", {})
        except Exception as error:  # the test wants to see any type that escapes
            errors.append(error)
        finally:
            ended.set()

    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_it)
                # A command that fails before it starts (an import error, say) must fail
                # the test at once, not after the bound.
                while not processes_mentioning(program):
                    assert not ended.is_set(), f"the command ended before it ran: {errors!r}"
                    await anyio.sleep(0.02)
                assert cut_connections(server) > 0
        assert len(errors) == 1, errors
        [error] = errors
        assert isinstance(error, RemoteError), repr(error)
        assert "connection to host h1 (127.0.0.1:" in str(error)
        assert "lost while running '/" in str(error), str(error)
        # The next command gets a new connection.
        with anyio.fail_after(30):
            again = await remote.run("echo again", {})
        assert (again.exit_code, list(again.stdout.lines)) == (0, ["again"])
    finally:
        await remote.aclose()


async def test_a_stopped_server_is_a_remote_error_for_the_next_command(
    new_sshd: Callable[[], Sshd], tmp_path: Path
) -> None:
    server = new_sshd()
    remote = RemoteHost("h1", _host(server), str(tmp_path))
    try:
        with anyio.fail_after(30):
            assert (await remote.run("true", {})).exit_code == 0
            server.stop()
            with pytest.raises(RemoteError, match="host h1"):
                await remote.run("true", {})
    finally:
        await remote.aclose()
