"""asyncssh's errors enter the engine through one adapter (issue 18 item 3): a host that
refuses the login is a RemoteError, a StepError of one line naming the host and saying
so, remembered for the run; the source and destination errors are StepErrors too."""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

import anyio
import pytest
from conftest import needs_root
from pibackup_async.engine.config import Host
from pibackup_async.engine.destination import DestinationLost
from pibackup_async.engine.errors import StepError
from pibackup_async.engine.remote import RemoteError, RemoteHost
from pibackup_async.engine.sources.errors import SourceError
from sshkit import SSHD, Sshd, keygen

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path


def test_the_step_errors_of_sources_hosts_and_the_destination_are_one_hierarchy() -> None:
    assert issubclass(SourceError, StepError)
    assert issubclass(RemoteError, StepError)
    lost = DestinationLost("destination /d vanished")
    assert isinstance(lost, StepError) and isinstance(lost, OSError)
    assert (lost.errno, str(lost)) == (errno.EIO, "destination /d vanished")


@needs_root  # the test sshd logs in as root
@pytest.mark.skipif(not os.path.exists(SSHD), reason="OpenSSH sshd is not installed")
async def test_a_refused_login_is_a_remote_error_saying_so_and_remembered(
    new_sshd: Callable[[], Sshd], tmp_path: Path
) -> None:
    server = new_sshd()
    stranger = tmp_path / "stranger_key"
    keygen(stranger, "not authorized anywhere")
    host = Host(address="127.0.0.1", port=server.port, user="root",
                identity_file=str(stranger), known_hosts=str(server.known_hosts))
    remote = RemoteHost("h1", host, str(tmp_path))
    try:
        with anyio.fail_after(30):
            with pytest.raises(RemoteError) as refused:
                await remote.run("true", {})
            with pytest.raises(RemoteError) as again:
                await remote.run("true", {})
    finally:
        await remote.aclose()
    said = str(refused.value)
    assert said.startswith(f"host h1 (127.0.0.1:{server.port}): "), said
    assert "login refused: " in said, said
    assert "\n" not in said
    assert str(again.value) == said
    assert server.logins() == 0
