"""Live progress on a terminal, and the heartbeat where there is none (SPEC §8).

The CLI runs under a real pseudo-terminal (hookkit.Terminal) or with plain
pipes; the steps it draws are held by a hook waiting for a marker, or slowed by
rsync's own ``--bwlimit``.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
from conftest import needs_rsync, wait_for
from hookkit import (
    HookSpec,
    Terminal,
    make_slow_source,
    release_marker,
    source_toml,
    started_marker,
    write_config,
)

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Workspace

pytestmark = [
    needs_rsync,
    pytest.mark.skipif(shutil.which("setsid") is None, reason="util-linux setsid is missing"),
]

# rich moves the cursor up and clears lines to redraw in place.
_REDRAW = re.compile(r"\x1b\[(?:\d*A|2K)")


def _slow_config(ws: Workspace, hooks: list[HookSpec]) -> None:
    slow = make_slow_source(ws, "slow", mib=2)
    write_config(ws, hooks, sources=source_toml("slow", slow, rsync_args=["--bwlimit=500"])
                 + source_toml("quick", ws.make_source("quick")))


@pytest.mark.slow
def test_progress_draws_each_running_step_and_redraws_it_in_place(ws: Workspace) -> None:
    _slow_config(ws, [HookSpec("b1", block=("pre",))])
    terminal = Terminal(ws, "run")
    try:
        # Held in its pre, the hook is drawn, and drawn again.
        wait_for(lambda: terminal.text().count("hook b1 (pre)") >= 3, timeout=30,
                 what="the held hook drawn three times")
        assert started_marker(ws, "b1", "pre").exists()
        release_marker(ws, "b1", "pre").touch()
        # The slow copy shows its bytes as they grow (rsync's progress feed).
        wait_for(lambda: re.search(r"snapshot slow +\d[\d.]* [kMG]?i?B",
                                   _plain(terminal.text())) is not None,
                 timeout=30, what="the slow source drawn with its bytes")
    finally:
        rc = terminal.finish()
    text = terminal.text()
    assert rc == 0, text
    assert len(_REDRAW.findall(text)) >= 3, "redrawn in place"
    plain = _plain(text)
    assert re.search(r"run \S+: \d+ running, \d+ done", plain), plain
    # Log lines print above the progress, whole.
    assert "run finished" in plain and "snapshot finished" in plain
    assert "WAITED" in plain  # the summary after it


def test_no_progress_on_a_terminal_draws_nothing_but_keeps_the_summary(ws: Workspace) -> None:
    write_config(ws, [HookSpec("b1")])
    terminal = Terminal(ws, "run", "--no-progress")
    rc = terminal.finish()
    text = terminal.text()
    assert rc == 0, text
    assert not _REDRAW.search(text), text
    assert "running," not in text
    assert "WAITED" in text


def test_json_logs_on_a_terminal_stay_pure_json_lines(ws: Workspace) -> None:
    write_config(ws, [HookSpec("b1")])
    terminal = Terminal(ws, "--log-format", "json", "run")
    rc = terminal.finish()
    lines = [line for line in terminal.text().replace("\r\n", "\n").split("\n") if line]
    assert rc == 0, lines
    assert lines, "the run logged"
    for line in lines:
        json.loads(line)  # neither progress nor a summary in between


@pytest.mark.slow
def test_without_a_terminal_a_long_copy_logs_a_heartbeat_with_bytes(ws: Workspace) -> None:
    _slow_config(ws, [])
    result = ws.run("run", env={"_PIBACKUP_HEARTBEAT_S": "1"})
    assert result.returncode == 0, result.stderr
    assert not _REDRAW.search(result.stderr), "no progress without a terminal"
    beats = [line for line in result.stderr.splitlines()
             if "still running" in line and "source=slow" in line]
    assert beats, result.stderr
    assert any(re.search(r"bytes=[1-9]\d*", line) for line in beats), beats
    assert not any("source=quick" in line and "still running" in line
                   for line in result.stderr.splitlines())


def _plain(text: str) -> str:
    """The terminal's text without escape sequences."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


_HEAVY = ("rich", "httpx", "prometheus_client")
# The CLI in this process's interpreter; at exit, the heavy modules it had loaded.
_PROBE = ("import atexit, sys\n"
          "def said():\n"
          "    loaded = {m.split('.')[0] for m in sys.modules if sys.modules[m] is not None}\n"
          f"    print('LOADED', sorted(loaded & set({_HEAVY!r})), file=sys.__stderr__)\n"
          "atexit.register(said)\n"
          "{preload}\n"
          "from pibackup_async.cli.main import main\n"
          "sys.exit(main(sys.argv[1:]))\n")


def _heavy_imports(*argv: str, env: dict[str, str] | None = None, preload: str = ""
                   ) -> list[str]:
    result = subprocess.run([sys.executable, "-c", _PROBE.replace("{preload}", preload),
                             *argv], capture_output=True, text=True, timeout=60, env=env)
    [line] = [line for line in result.stderr.splitlines() if line.startswith("LOADED")]
    return list(ast.literal_eval(line.removeprefix("LOADED ")))


def test_help_and_a_night_run_import_nothing_of_rich_httpx_or_prometheus(
        ws: Workspace) -> None:
    assert _heavy_imports("--help") == []
    write_config(ws, [HookSpec("b1")])
    # A run without a terminal, ping or metrics: progress is not drawn, nothing is sent.
    assert _heavy_imports("run", "-c", str(ws.config_path), env=ws.env()) == []
    assert _heavy_imports("-c", str(ws.config_path), "list") == []
    # The probe can tell.
    assert _heavy_imports("--help", preload="import rich.console") == ["rich"]


def test_a_step_line_names_the_step_and_says_files_bytes_and_rate() -> None:
    from pibackup_async.cli.progress import Rates, step_line
    from pibackup_async.engine.heartbeat import Beat

    copy = Beat("snapshot", {"source": "data"}, started=100.0, bytes=0, files=0)
    hook = Beat("hook", {"hook": "mount", "phase": "pre"}, started=100.0)
    rates = Rates()
    rates.sample([copy, hook], 101.0)
    copy.bytes, copy.files = 4 * 1024 * 1024, 1234
    rate = rates.sample([copy, hook], 103.0)
    assert rate[id(hook)] is None
    line = step_line(copy, rate[id(copy)], 135.0)
    assert re.match(r"snapshot data +1,234 files +4\.0 MiB +2\.0 MiB/s +35s", line), line
    assert step_line(hook, None, 101.0).startswith("hook mount (pre)")
    # A step that ended is forgotten.
    assert rates.sample([hook], 104.0) == {id(hook): None}


def test_most_written_reads_the_busiest_process_of_a_running_tree(tmp_path: Path) -> None:
    from pibackup_async.engine.proc_io import most_written

    # A shell whose child has written 3 MB and waits: the shell itself wrote nothing.
    writer = ("import sys; open('out', 'wb').write(b'x' * 3_000_000); print('ready', flush=True);"
              " sys.stdin.read()")
    with subprocess.Popen(["sh", "-c", f'{sys.executable} -c "{writer}"'], cwd=tmp_path,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as tree:
        assert tree.stdout is not None and tree.stdin is not None
        assert tree.stdout.readline() == "ready\n"
        written = most_written(tree.pid)
        assert written is not None and 3_000_000 <= written < 3_100_000
        tree.stdin.close()
    assert most_written(tree.pid) is None  # gone
