"""A dependency's warnings never reach the user raw (issue 17, SPEC §5 and §6).

cryptography 51 deprecates DSA and asyncssh 2.24 touches it on import, so a
plain ``import asyncssh`` prints a Python warning with its source line. The
command turns every warning into one debug log event naming the library: not
shown at the default level, one event with ``-v``, JSON in JSON mode.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING

import pytest
from conftest import needs_rsync
from hookkit import source_toml
from sshkit import needs_sshd

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Workspace
    from sshkit import Sshd


# What Python prints for a warning it shows itself: "<file>:<line>: <Category>: <text>",
# then the source line (cryptography's is "warnings.warn(...)").
RAW = re.compile(r"\w+Warning: |warnings\.warn\(")


def _asyncssh_warns() -> bool:
    """Whether importing the installed asyncssh raises a warning at all (cryptography ≥ 51)."""
    shown = subprocess.run([sys.executable, "-W", "always", "-c", "import asyncssh"],
                           capture_output=True, text=True, timeout=60)
    return "Warning" in shown.stderr


def _json_lines(text: str) -> list[dict[str, object]]:
    events = []
    for line in text.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}\nwhole stderr:\n{text}") from None
    return events


def _noisy_libraries(folder: Path) -> Path:
    """Two importable libraries that warn on import, as cryptography does under asyncssh."""
    for name, category in (("noisy_early", "DeprecationWarning"), ("noisy_late", "UserWarning")):
        package = folder / name
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(
            f"import warnings\nwarnings.warn('{name} is deprecated', {category}, stacklevel=1)\n")
    return folder


def _driver(fmt: str, verbosity: int) -> str:
    # The command's own order: warnings held from the start, logging configured later.
    return textwrap.dedent(f"""
        from pibackup_async.cli import logs, main
        main.every_warning_once()
        logs.hold_warnings()
        import noisy_early
        logs.configure_logging({fmt!r}, {verbosity})
        import noisy_late
        import structlog
        structlog.get_logger().info("done")
    """)


def _drive(tmp_path: Path, fmt: str, verbosity: int) -> subprocess.CompletedProcess[str]:
    libraries = _noisy_libraries(tmp_path / "site")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["PYTHONPATH"] = str(libraries)
    return subprocess.run([sys.executable, "-c", _driver(fmt, verbosity)], capture_output=True,
                          text=True, timeout=60, env=env)


def test_a_library_warning_is_one_json_event_with_v_naming_the_library(tmp_path: Path) -> None:
    done = _drive(tmp_path, "json", 1)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    events = _json_lines(done.stderr)
    warned = [e for e in events if e["event"] == "library warning"]
    assert [(e["library"], e["level"]) for e in warned] == [
        ("noisy_early", "debug"), ("noisy_late", "debug")], events
    assert warned[0]["category"] == "builtins.DeprecationWarning"
    assert warned[0]["warning"] == "noisy_early is deprecated"
    assert [e["event"] for e in events][-1] == "done"


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_a_library_warning_is_not_shown_at_the_default_level(tmp_path: Path, fmt: str) -> None:
    done = _drive(tmp_path, fmt, 0)
    assert done.returncode == 0, done.stderr
    assert "deprecated" not in done.stderr, done.stderr
    assert "done" in done.stderr  # the log itself still works


def test_a_library_warning_is_one_console_line_with_v(tmp_path: Path) -> None:
    done = _drive(tmp_path, "console", 1)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "deprecated" in line]
    assert len(lines) == 2, done.stderr
    assert all("library warning" in line for line in lines), done.stderr
    assert not RAW.search(done.stderr), done.stderr


@needs_sshd
def test_check_connect_prints_no_python_warning(ws: Workspace, sshd: Sshd) -> None:
    ws.write_config(sshd.host_toml("nas") + source_toml("local", ws.make_source("local")))
    quiet = ws.run("check", "--connect", timeout=60)
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    assert "nas" in quiet.stdout + quiet.stderr
    assert not RAW.search(quiet.stderr), quiet.stderr

    verbose = ws.run("check", "--connect", "-v", "--log-format", "json", timeout=60)
    assert verbose.returncode == 0, verbose.stdout + verbose.stderr
    # check's own verdicts ("host nas: ok") are plain lines; every log event is JSON.
    assert not RAW.search(verbose.stderr), verbose.stderr
    events = _json_lines("\n".join(line for line in verbose.stderr.splitlines()
                                    if line.startswith("{")))
    warned = [e for e in events if e["event"] == "library warning"]
    if _asyncssh_warns():
        # One event per warning (an older asyncssh trips over several of cryptography's
        # deprecations), each naming the library, never the same one twice.
        assert warned and {e["library"] for e in warned} == {"asyncssh"}, warned
        texts = [e["warning"] for e in warned]
        assert len(set(texts)) == len(texts), texts
    else:
        assert warned == []


@needs_rsync
@needs_sshd
def test_a_json_log_of_a_remote_run_is_json_lines_only(ws: Workspace, sshd: Sshd) -> None:
    src = ws.make_source("far")
    # A remote hook goes through asyncssh (the remote rsync through OpenSSH's ssh).
    hook = '[[backup_hooks]]\nname = "remote"\nhost = "nas"\npre = "true"\npost = "true"\n'
    ws.write_config(sshd.host_toml("nas") + hook + source_toml("far", src, host="nas"))
    for extra in ((), ("-v",)):
        done = ws.run("run", "--log-format", "json", *extra, timeout=120)
        assert done.returncode == 0, done.stderr
        events = _json_lines(done.stderr)
        assert any(e["event"] == "run finished" for e in events), events
