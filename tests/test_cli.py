"""The command line itself: options before or after the command's name, --version (SPEC §5)."""

from __future__ import annotations

import json
import re
import subprocess
from typing import TYPE_CHECKING

from conftest import CLI

if TYPE_CHECKING:
    from conftest import Workspace


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60)


def test_version_prints_the_version_and_exits_0() -> None:
    result = _cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("pibackup-async ")
    assert result.stdout.split()[1][0].isdigit()


def test_common_options_work_before_or_after_the_command(ws: Workspace) -> None:
    ws.write_config('[[sources]]\nname = "a"\ntype = "rsync"\npath = "/etc"\n')
    before = _cli("-c", str(ws.config_path), "--log-format", "json", "list", "--json")
    after = _cli("list", "--json", "-c", str(ws.config_path), "--log-format", "json")
    assert before.returncode == after.returncode == 0, before.stderr + after.stderr
    assert before.stdout == after.stdout == "[]\n"
    # After the name wins over before it.
    both = _cli("-c", "/nonexistent.toml", "list", "-c", str(ws.config_path))
    assert both.returncode == 0, both.stderr


def test_console_logs_read_as_local_times_and_name_the_backup_once(ws: Workspace) -> None:
    ws.make_source("a")
    ws.write_config(f'[[sources]]\nname = "a"\ntype = "rsync"\npath = "{ws.src / "a"}"\n')
    result = subprocess.run([*CLI, "run", "-c", str(ws.config_path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    # 2021-04-02 07:00:12, as a backup name reads; no UTC ISO stamp.
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S", line) for line in lines), lines
    named = [line for line in lines if "backup=" in line]
    assert [line[20:].split()[:2] for line in named] == [
        ["run", "started"], ["run", "finished"]]
    # JSON lines keep it on every event about the run, for filtering.
    result = subprocess.run([*CLI, "run", "-c", str(ws.config_path), "--log-format", "json"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]
    assert all("backup" in e for e in events if e["event"] != "report written"), events
