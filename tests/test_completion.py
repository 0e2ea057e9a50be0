"""Bash completion: the shipped script is the parser's, and bash completes with it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import shtab
from pibackup_async.cli.main import _parser

SCRIPT = Path(__file__).resolve().parent.parent / "completions" / "pibackup-async.bash"
REGENERATE = ('python -c "import shtab; from pibackup_async.cli.main import _parser; '
              "print(shtab.complete(_parser(), 'bash'), end='')\" "
              "> completions/pibackup-async.bash")


def test_the_shipped_completion_is_generated_from_the_current_parser() -> None:
    assert SCRIPT.read_text() == shtab.complete(_parser(), "bash"), (
        f"completions/pibackup-async.bash is stale; regenerate it: {REGENERATE}")


def _complete(*words: str) -> list[str]:
    """What bash offers for the last of ``words`` after ``pibackup-async``."""
    line = " ".join(("pibackup-async", *words))
    script = (f"source {SCRIPT}\n"
              f"COMP_WORDS=(pibackup-async {' '.join(words)}); COMP_CWORD={len(words)}\n"
              f"COMP_LINE='{line}'; COMP_POINT={len(line)}\n"
              "_shtab_pibackup_async; printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_bash_completes_commands_and_their_options() -> None:
    assert _complete("ve") == ["verify"]
    assert set(_complete("")) >= {"run", "check", "list", "prune", "restore", "diff", "du",
                                  "verify", "init"}
    assert _complete("run", "--no") == ["--no-progress", "--no-report"]
    # Common options after the command too.
    assert "--log-format" in _complete("list", "--lo")


def test_bash_completes_paths_for_the_config(tmp_path: Path) -> None:
    (tmp_path / "night.toml").write_text("")
    assert _complete("check", "-c", f"{tmp_path}/ni") == [f"{tmp_path}/night.toml"]
