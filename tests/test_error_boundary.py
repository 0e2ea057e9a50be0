"""One error boundary (issue 18 item 3): what an adapter's library raises becomes one line.

SPEC §2: an unexpected error anywhere is a failure of the step that hit it;
the remaining posts run, the report is written and sent, one line names the
error, and no traceback reaches the user except with ``-v``. Each case here
is a real fault: a TCP server that answers garbage to the ping, a host name
that the IDNA codec refuses, a program that cannot be started, a process out
of file descriptors.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from typing import TYPE_CHECKING, Any

import pytest
from conftest import CLI, needs_rsync
from hookkit import (
    HookSpec,
    argv_program,
    events,
    hook_toml,
    order,
    report_hooks,
    source_toml,
    write_config,
)
from pibackup_async.engine.errors import (
    CannotStart,
    DeliveryError,
    DestinationError,
    PibackupError,
    StepError,
    describe,
    map_errors,
    os_errors,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from conftest import Workspace

pytestmark = needs_rsync


def _traceback_free(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    # structlog's pretty exceptions draw boxes; none may reach the user either.
    assert "╭" not in stderr, stderr


# --- the ping: a server that answers something other than HTTP ---------------------------


class GarbageServer:
    """A TCP server on 127.0.0.1 that answers every request with a line that is not HTTP."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed: the test is over
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                with self._lock:
                    self.requests.append(data.split(b"\r\n", 1)[0].decode(errors="replace"))
                conn.sendall(b"garbage\r\n")

    def request_lines(self) -> list[str]:
        with self._lock:
            return list(self.requests)

    def close(self) -> None:
        # shutdown() wakes the accept() blocked in the thread; close() alone may not.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(10)


@pytest.fixture
def garbage_server() -> Iterator[GarbageServer]:
    server = GarbageServer()
    try:
        yield server
    finally:
        server.close()


def test_a_ping_server_answering_garbage_fails_the_ping_not_the_run(
        ws: Workspace, garbage_server: GarbageServer) -> None:
    metrics = ws.root / "metrics.prom"
    url = f"http://127.0.0.1:{garbage_server.port}/ping/abc"
    write_config(ws, [HookSpec("b1")], source_toml("alpha", ws.make_source("alpha"))
                 + f'[monitor]\nping_url = "{url}"\nmetrics_file = "{metrics}"\n')
    result = ws.run("run")
    # The backup is made: a failed /start is only logged (SPEC §8).
    assert order(ws) == ["b1.pre", "b1.post"], result.stderr
    report = ws.report()
    assert (report["status"], report["saved"], report["failure"]) == ("ok", True, None)
    # The final ping could not be delivered: exit 1, never the status.
    assert result.returncode == 1, result.stderr
    assert report["monitor"]["status"] == "failed"
    assert report["monitor"]["error"] == (
        f"ping http://127.0.0.1:{garbage_server.port}/… failed: "
        "not an HTTP answer: BadStatusLine: garbage")
    assert garbage_server.request_lines() == (["GET /ping/abc/start HTTP/1.1"] * 3
                                              + ["POST /ping/abc HTTP/1.1"] * 3)
    assert metrics.exists(), result.stderr
    _traceback_free(result.stderr)


# --- SMTP: a host name the IDNA codec refuses --------------------------------------------

_TOO_LONG = "a" * 64  # a DNS label holds at most 63 characters


def _mail_config(ws: Workspace) -> None:
    write_config(ws, [HookSpec("b1")], source_toml("alpha", ws.make_source("alpha"))
                 + '[report]\nfrom = "pibackup@example.com"\nto = ["admin@example.com"]\n'
                 + f'[report.smtp]\nhost = "{_TOO_LONG}"\nsecurity = "none"\ntimeout = "5s"\n')


def test_an_smtp_host_the_resolver_refuses_fails_the_delivery_in_one_line(ws: Workspace
                                                                           ) -> None:
    _mail_config(ws)
    result = ws.run("run")
    assert result.returncode == 1, result.stderr
    report = ws.report()
    assert (report["status"], report["saved"]) == ("ok", True)
    error = report["delivery"]["error"]
    assert report["delivery"]["status"] == "failed"
    assert "label too long" in error and "\n" not in error, error
    _traceback_free(result.stderr)


def test_check_connect_names_an_smtp_host_the_resolver_refuses(ws: Workspace) -> None:
    _mail_config(ws)
    result = ws.run("check", "--connect")
    assert result.returncode == 1, result.stderr
    said = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(said) == 1 and said[0].startswith(f"error: mail server {_TOO_LONG}: "), said
    assert "label too long" in said[0]
    _traceback_free(result.stderr)


# --- the CLI's last resort ------------------------------------------------------------


def _starved(ws: Workspace, *args: str) -> Any:
    """The CLI with five file descriptors: stdin, stdout, stderr and two to spare, too few for
    an event loop (epoll and its self-pipe)."""
    import subprocess

    return subprocess.run(["prlimit", "--nofile=5", *CLI, *args, "-c", str(ws.config_path)],
                          capture_output=True, text=True, timeout=60, env=ws.env())


def test_an_unexpected_error_is_one_line_and_exit_1_with_the_traceback_only_under_v(
        ws: Workspace) -> None:
    write_config(ws, [HookSpec("b1")])
    result = _starved(ws, "run")
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unexpected error: "), lines
    _traceback_free(result.stderr)
    assert order(ws) == []  # nothing ran
    verbose = _starved(ws, "run", "-v")
    assert verbose.returncode == 1, verbose.stderr
    assert "Traceback" in verbose.stderr
    assert lines[0] in verbose.stderr.splitlines()


# --- child processes: a program that cannot start ------------------------------------------


@pytest.mark.parametrize(("what", "said"), [("missing", "No such file or directory"),
                                            ("not executable", "Permission denied")])
def test_a_hook_program_that_cannot_start_is_told_as_such(ws: Workspace, what: str,
                                                          said: str) -> None:
    program = ws.root / "bin" / "mount-backup-disk"
    program.parent.mkdir(exist_ok=True)
    if what == "not executable":
        program.write_text("#!/bin/sh\nexit 0\n")
        program.chmod(0o644)
    # TOML reads JSON's arrays of strings as they are.
    pre, post = [str(program), "--now"], [str(argv_program(ws)), "b2.post"]
    body = (hook_toml(ws, HookSpec("b1"))
            + f'[[backup_hooks]]\nname = "b2"\npre = {json.dumps(pre)}\n'
            + f"post = {json.dumps(post)}\n")
    ws.write_config(body + source_toml("alpha", ws.make_source("alpha")))
    result = ws.run("run")
    assert result.returncode == 1, result.stderr
    report = ws.report()
    assert report["failure"] == f"hook \"b2\" pre failed: cannot start '{program}': {said}"
    # Failed on its own, having done nothing: no post of its own, the earlier hook's runs.
    assert order(ws) == ["b1.pre", "b1.post"]
    assert [e.status for e in events(ws)] == ["-", "failed"]
    assert report_hooks(report) == [("b1", "pre", "ok"), ("b2", "pre", "failed"),
                                    ("b1", "post", "ok"), ("b2", "post", "skipped")]
    b2_pre = next(h for h in report["hooks"] if (h["hook"], h["phase"]) == ("b2", "pre"))
    assert b2_pre["exit_code"] is None  # never ran, so no exit code (not setpriv's 127)
    _traceback_free(result.stderr)


# --- map_errors itself -------------------------------------------------------------------


def test_map_errors_converts_what_it_names_and_lets_the_rest_through() -> None:
    mapping = {OSError: lambda e: DeliveryError(f"cannot reach it: {describe(e)}")}
    with pytest.raises(DeliveryError, match=r"^cannot reach it: Connection refused$") as caught:
        with map_errors(mapping):
            raise ConnectionRefusedError(111, "Connection refused")
    assert isinstance(caught.value.__cause__, ConnectionRefusedError)  # kept for -v
    with pytest.raises(KeyError), map_errors(mapping):
        raise KeyError("a bug stays a bug")
    engine_error = CannotStart("cannot start 'x': No such file or directory")
    with pytest.raises(CannotStart) as passed, map_errors(mapping):
        raise engine_error
    assert passed.value is engine_error


def test_an_os_error_on_the_destination_stays_an_os_error_with_one_line() -> None:
    with pytest.raises(DestinationError) as caught, \
            os_errors("destination: cannot rename /mnt/backup/x"):
        os.rename("/nonexistent/x", "/nonexistent/y")
    error = caught.value
    assert str(error) == "destination: cannot rename /mnt/backup/x: No such file or directory"
    assert isinstance(error, OSError) and isinstance(error, StepError)
    assert isinstance(error, PibackupError)
    assert (error.errno, error.strerror, error.filename) == (2, "No such file or directory",
                                                             "/nonexistent/x")
