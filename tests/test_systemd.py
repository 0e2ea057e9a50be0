"""The shipped systemd units (examples/systemd/): valid for systemd, and a command line the CLI
accepts (issue 11: a unit whose ExecStart named a binary the README never installed)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pibackup_async.cli.main import DEFAULT_CONFIG, _parser

UNITS = Path(__file__).resolve().parent.parent / "examples" / "systemd"
INSTALLED = "/opt/pibackup-async/bin/pibackup-async"  # where the README installs it


def _exec_start() -> list[str]:
    text = (UNITS / "pibackup-async.service").read_text()
    [line] = [ln for ln in text.splitlines() if ln.startswith("ExecStart=")]
    return shlex.split(line.removeprefix("ExecStart="))


def test_the_unit_runs_the_binary_the_readme_installs_with_arguments_the_cli_takes() -> None:
    argv = _exec_start()
    assert argv[0] == INSTALLED
    readme = (UNITS.parent.parent / "README.md").read_text()
    assert "python3 -m venv /opt/pibackup-async" in readme
    args = _parser().parse_args(argv[1:])
    assert args.command == "run"
    assert args.config == DEFAULT_CONFIG


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd is not installed")
def test_systemd_analyze_verify_passes_on_the_unit_and_the_timer(tmp_path: Path) -> None:
    # verify also checks that ExecStart's program exists: point it at this install.
    here = str(Path(sys.executable).with_name("pibackup-async"))
    service = (UNITS / "pibackup-async.service").read_text().replace(INSTALLED, here)
    (tmp_path / "pibackup-async.service").write_text(service)
    shutil.copy(UNITS / "pibackup-async.timer", tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "pibackup-async.service"),
         str(tmp_path / "pibackup-async.timer")],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "pibackup-async" not in result.stderr, result.stderr


def test_the_verify_unit_reads_a_sample_of_every_backup_and_takes_a_held_lock_as_success(
        ) -> None:
    text = (UNITS / "pibackup-async-verify.service").read_text()
    [line] = [ln for ln in text.splitlines() if ln.startswith("ExecStart=")]
    argv = shlex.split(line.removeprefix("ExecStart="))
    assert argv[0] == INSTALLED
    args = _parser().parse_args(argv[1:])
    assert (args.command, args.every, args.sample, args.backup) == ("verify", True, "5", None)
    assert "SuccessExitStatus=3" in text.splitlines()  # the lock held by a run: exit 3
    timer = (UNITS / "pibackup-async-verify.timer").read_text()
    [when] = [ln for ln in timer.splitlines() if ln.startswith("OnCalendar=")]
    assert when == "OnCalendar=*-*-* 05:30:00"  # daily, after the backup's 03:00


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd is not installed")
def test_systemd_analyze_verify_passes_on_the_verify_unit_and_its_timer(tmp_path: Path) -> None:
    here = str(Path(sys.executable).with_name("pibackup-async"))
    service = (UNITS / "pibackup-async-verify.service").read_text().replace(INSTALLED, here)
    (tmp_path / "pibackup-async-verify.service").write_text(service)
    shutil.copy(UNITS / "pibackup-async-verify.timer", tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "pibackup-async-verify.service"),
         str(tmp_path / "pibackup-async-verify.timer")],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "pibackup-async" not in result.stderr, result.stderr


def test_the_mirror_unit_pulls_with_its_own_configuration_after_the_origins_backup() -> None:
    """The mirror's side of 3-2-1 (SPEC §10, README): `mirror` with a configuration of its
    own, a mirror still copying (a long first copy holds the lock: exit 3) not a failure."""
    text = (UNITS / "pibackup-async-mirror.service").read_text()
    [line] = [ln for ln in text.splitlines() if ln.startswith("ExecStart=")]
    argv = shlex.split(line.removeprefix("ExecStart="))
    assert argv[0] == INSTALLED
    args = _parser().parse_args(argv[1:])
    assert args.command == "mirror" and not args.dry_run
    assert args.config == "/etc/pibackup-async/mirror.toml"
    assert "SuccessExitStatus=3" in text.splitlines()
    readme = (UNITS.parent.parent / "README.md").read_text()
    assert "pibackup-async-mirror.timer" in readme
    timer = (UNITS / "pibackup-async-mirror.timer").read_text()
    [when] = [ln for ln in timer.splitlines() if ln.startswith("OnCalendar=")]
    assert when == "OnCalendar=*-*-* 04:30:00"  # after the origin's 03:00 backup


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd is not installed")
def test_systemd_analyze_verify_passes_on_the_mirror_unit_and_its_timer(tmp_path: Path) -> None:
    here = str(Path(sys.executable).with_name("pibackup-async"))
    service = (UNITS / "pibackup-async-mirror.service").read_text().replace(INSTALLED, here)
    (tmp_path / "pibackup-async-mirror.service").write_text(service)
    shutil.copy(UNITS / "pibackup-async-mirror.timer", tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "pibackup-async-mirror.service"),
         str(tmp_path / "pibackup-async-mirror.timer")],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "pibackup-async" not in result.stderr, result.stderr
