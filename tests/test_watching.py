"""Watching a run as it goes and after (SPEC §8): the heartbeat, the end-of-run summary."""

from __future__ import annotations

import re
import shutil
import time
from typing import TYPE_CHECKING

import anyio
import pytest
import structlog
from conftest import needs_rsync
from hookkit import HookSpec, Terminal, write_config
from pibackup_async.engine import heartbeat

if TYPE_CHECKING:
    from conftest import Workspace


async def test_a_long_step_logs_still_running_every_period_and_a_short_one_never() -> None:
    with structlog.testing.capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeat.ticker, 0.2, 0.02)
            with heartbeat.beating("snapshot", source="long") as beat:
                beat.bytes, beat.files = 1234, 5
                with heartbeat.beating("hook", hook="short"):
                    await anyio.sleep(0.1)
                # Bounded: the third beat of the long step is due after 0.6 s.
                deadline = time.monotonic() + 10
                while sum(e["event"] == "still running" for e in logs) < 3:
                    assert time.monotonic() < deadline, logs
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
    beats = [e for e in logs if e["event"] == "still running"]
    assert all(e["source"] == "long" and e["step"] == "snapshot" for e in beats), beats
    assert [e["bytes"] for e in beats] == [1234] * len(beats)
    assert beats[0]["running_s"] == 0  # rounded 0.2 s
    assert not any(e.get("hook") == "short" for e in logs)


@needs_rsync
@pytest.mark.skipif(shutil.which("setsid") is None, reason="util-linux setsid is missing")
def test_a_run_on_a_terminal_ends_with_the_summary(ws: Workspace) -> None:
    write_config(ws, [HookSpec("b1")])
    terminal = Terminal(ws, "run")
    rc = terminal.finish()
    text = terminal.text()
    assert rc == 0, text
    assert "SOURCE" in text and "WAITED" in text
    assert "alpha" in text and "beta" in text
    assert "snapshot window" in text
    assert "source time" in text
    assert "free of" in text
    # Not on a terminal: no summary.
    result = ws.run("run")
    assert result.returncode == 0 and "WAITED" not in result.stderr


@needs_rsync
def test_the_console_log_reads_at_100_columns(ws: Workspace) -> None:
    write_config(ws, [HookSpec("b1")])
    result = ws.run("run")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines
    for line in lines:
        # Local time to the second; the level only when it is not plain information.
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (\[warning\] )?[a-z]", line), line
        # Paths are as long as they are; everything else fits.
        if "/" not in line:
            assert len(line) <= 100, line
        # Durations for a person: hundredths at most.
        for value in re.findall(r"\b\w+_s=(\S+)", line):
            assert re.fullmatch(r"\d+(\.\d{1,2})?", value), line
