"""The command line itself: options before or after the command's name, --version (SPEC §5)."""

from __future__ import annotations

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
