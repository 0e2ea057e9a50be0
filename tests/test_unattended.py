"""End to end: the nights nobody watches (issue 9) — posts, signals, logging, state, the clock.

Each test is one of the bug reports of issue 9, reproduced on real parts:
a real terminal that goes away (a pty), a real pipe closed under stderr, a
real sshd killed while a remote post runs, real files in the state folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import pytest
from conftest import CLI, needs_root, needs_rsync, processes_mentioning, wait_for
from hookkit import (
    ORDER_OK,
    HookSpec,
    Terminal,
    assert_no_processes,
    complete_backups,
    events,
    hook_toml,
    in_progress,
    make_slow_source,
    order,
    release_marker,
    report_hooks,
    sleeper,
    source_toml,
    standard_hooks,
    start,
    started_marker,
    statuses,
    wait_marker,
    wait_no_processes,
    write_config,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from conftest import Workspace
    from sshkit import Sshd

pytestmark = needs_rsync


def _toml(value: object) -> str:
    import json

    return json.dumps(value)


# --- item 4: an unexpected error never skips the remaining posts ---------------------

# A bug cannot be made by a real component: it is injected into the CLI
# process by a sitecustomize module, which makes the one process helper raise
# an error nobody foresaw (a RuntimeError) for commands that carry a marker.
_BUG = """
import sys

import pibackup_async.engine.processes as processes

_real = processes.run_process


async def run_process(argv, **kwargs):
    if any("INJECT-BUG" in str(a) for a in argv):
        raise RuntimeError("injected bug")
    return await _real(argv, **kwargs)


# The engine's modules bound the helper when the package was imported.
for name, module in list(sys.modules.items()):
    if name.startswith("pibackup_async") and getattr(module, "run_process", None) is _real:
        module.run_process = run_process
"""


def _with_bug(ws: Workspace) -> dict[str, str]:
    folder = ws.root / "inject"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(_BUG)
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": f"{folder}:{path}" if path else str(folder)}


def test_an_unexpected_error_in_a_post_runs_the_other_posts_with_failed(ws: Workspace) -> None:
    bad = HookSpec("s2", kind="snapshot", phases=("pre",))
    ws.write_config(
        hook_toml(ws, HookSpec("b1")) + hook_toml(ws, HookSpec("s1", kind="snapshot"))
        + hook_toml(ws, bad) + 'post = "echo INJECT-BUG"\n'
        + source_toml("alpha", ws.make_source("alpha"))
    )
    result = ws.run("run", env=_with_bug(ws))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    # s2's post failed unexpectedly; s1's and b1's posts still ran, told the truth.
    assert order(ws) == ["b1.pre", "s1.pre", "s2.pre", "s1.post", "b1.post"]
    assert statuses(ws) == {"b1.pre": "-", "s1.pre": "-", "s2.pre": "-",
                            "s1.post": "failed", "b1.post": "failed"}
    report = ws.report()
    assert report["status"] == "failed"
    assert report["saved"] is True  # the copies were taken; only a post failed
    assert 's2" post failed: unexpected error' in report["failure"]
    assert "injected bug" in report["failure"]
    assert ("s2", "post", "failed") in report_hooks(report)


def test_an_unexpected_error_in_a_source_is_a_failed_run_for_the_posts(ws: Workspace) -> None:
    ws.write_config(
        hook_toml(ws, HookSpec("b1")) + hook_toml(ws, HookSpec("s1", kind="snapshot"))
        + source_toml("alpha", ws.make_source("alpha"), rsync_args=["--chmod=INJECT-BUG"])
    )
    result = ws.run("run", env=_with_bug(ws))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert order(ws) == ["b1.pre", "s1.pre", "s1.post", "b1.post"]
    assert statuses(ws)["s1.post"] == "failed"
    assert statuses(ws)["b1.post"] == "failed"
    report = ws.report()
    assert report["status"] == "failed"
    assert report["saved"] is False
    assert "alpha" in report["failure"] and "unexpected error" in report["failure"]
    assert ws.backups() == []


def test_an_unexpected_error_in_step_7_still_runs_the_earlier_backup_posts(
    ws: Workspace,
) -> None:
    ws.write_config(
        hook_toml(ws, HookSpec("b1")) + hook_toml(ws, HookSpec("b2"))
        + "[[backup_hooks]]\nname = \"bug\"\npre = \"true\"\npost = \"echo INJECT-BUG\"\n"
        + source_toml("alpha", ws.make_source("alpha"))
    )
    result = ws.run("run", env=_with_bug(ws))
    assert result.returncode == 1, result.stderr
    assert order(ws) == ["b1.pre", "b2.pre", "b2.post", "b1.post"]
    assert statuses(ws)["b2.post"] == "failed"
    assert statuses(ws)["b1.post"] == "failed"


# --- item 4, remote: a connection lost under a post ------------------------------------


@needs_root
def test_sshd_killed_while_a_remote_post_runs_the_next_post_still_runs(
    ws: Workspace, sshd: Sshd
) -> None:
    remote = HookSpec("r1", block=("post",))
    ws.write_config(
        sshd.host_toml("h1")
        + hook_toml(ws, HookSpec("b1")) + hook_toml(ws, remote) + 'host = "h1"\n'
        + source_toml("alpha", ws.make_source("alpha"))
    )
    with start(ws) as running:
        wait_marker(started_marker(ws, "r1", "post"), running)
        sshd.stop()  # the server and its per-connection processes: the connection drops
        rc = running.wait(60)
    assert rc == 1, running.stderr
    assert "Traceback" not in running.stderr
    assert order(ws) == ["b1.pre", "r1.pre", "r1.post", "b1.post"]
    assert statuses(ws)["b1.post"] == "failed"
    report = ws.report()
    assert report["status"] == "failed"
    assert report["saved"] is True
    assert 'hook "r1" post failed' in report["failure"]
    assert ("r1", "post", "failed") in report_hooks(report)
    assert ("b1", "post", "ok") in report_hooks(report)
    # The hook's shell on the "remote" side lost its sshd; it is that host's, not ours.
    release_marker(ws, "r1", "post").touch()


@needs_root
def test_a_remote_post_leaves_its_daemon_running_and_is_not_waited_for(
    ws: Workspace, sshd: Sshd
) -> None:
    # `post = "myapp start"` on the host, whose script runs the daemon in the
    # background without redirecting its output: the daemon holds the SSH
    # channel's output open.
    daemon = HookSpec("r1", phases=("pre",))
    daemon_cmd = f"{sleeper(ws)} 1000 &"
    ws.write_config(
        sshd.host_toml("h1")
        + hook_toml(ws, daemon) + 'host = "h1"\n' + f"post = {_toml(daemon_cmd)}\n"
        + source_toml("alpha", ws.make_source("alpha"))
    )
    with start(ws) as running:
        rc = running.wait(40)
    assert rc == 0, running.stderr
    program = str(sleeper(ws))
    alive = [pid for pid, cmd in processes_mentioning(program) if cmd.startswith(program)]
    assert len(alive) == 1, "the daemon the post started is still running"
    assert ws.report()["status"] == "ok"
    for pid in alive:
        os.kill(pid, signal.SIGKILL)


# --- item 7: the terminal going away, a closed stderr ---------------------------------


@pytest.mark.skipif(shutil.which("setsid") is None, reason="util-linux setsid is missing")
def test_the_terminal_going_away_interrupts_the_run_cleanly(ws: Workspace) -> None:
    write_config(ws, standard_hooks(s1={"block": ("pre",)}))
    terminal = Terminal(ws, "run")
    try:
        wait_marker(started_marker(ws, "s1", "pre"))
        terminal.hang_up()
        rc = terminal.proc.wait(60)
    finally:
        if terminal.proc.poll() is None:
            terminal.proc.kill()
            terminal.proc.wait()
    assert rc == 129, terminal.output.decode(errors="replace")
    assert_no_processes(ws)
    # s1's pre was cut short: its post runs, then every other post, in reverse.
    assert order(ws) == ["b1.pre", "b2.pre", "s1.pre", "s1.post", "b2.post", "b1.post"]
    assert {statuses(ws)[p] for p in ("s1.post", "b2.post", "b1.post")} == {"interrupted"}
    assert ws.backups() == []
    report = ws.report()
    assert report["status"] == "interrupted"
    assert report["saved"] is False


def test_a_closed_stderr_neither_stops_nor_fails_the_run(ws: Workspace) -> None:
    # `run 2>&1 | head -3`: the reader goes away after three lines.
    write_config(ws, standard_hooks(b2={"block": ("pre",)}))
    proc = subprocess.Popen([*CLI, "run", "-c", str(ws.config_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=ws.env())
    try:
        assert proc.stdout is not None
        for _ in range(3):
            proc.stdout.readline()
        proc.stdout.close()
        # Only now does the run go on: everything it logs from here hits a closed pipe.
        wait_marker(started_marker(ws, "b2", "pre"))
        release_marker(ws, "b2", "pre").touch()
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0
    assert order(ws) == ORDER_OK
    assert len(complete_backups(ws)) == 1
    assert in_progress(ws) == []
    assert ws.report()["status"] == "ok"
    assert_no_processes(ws)


def test_sighup_is_an_interrupt_with_exit_129(ws: Workspace) -> None:
    write_config(ws, standard_hooks(b2={"block": ("post",)}))
    with start(ws) as running:
        wait_marker(started_marker(ws, "b2", "post"), running)
        running.send(signal.SIGHUP)
        # A signal in step 7 lets the running post finish.
        release_marker(ws, "b2", "post").touch()
        rc = running.wait(30)
    assert rc == 129, running.stderr
    assert statuses(ws)["b1.post"] == "interrupted"
    report = ws.report()
    assert report["status"] == "interrupted"
    assert report["saved"] is True
    assert len(complete_backups(ws)) == 1


def test_a_signal_ignored_at_start_stays_ignored(ws: Workspace) -> None:
    # `nohup pibackup-async run &`: SIGHUP was ignored before we started.
    write_config(ws, standard_hooks(b2={"block": ("pre",)}))
    proc = subprocess.Popen(
        ["nohup", *CLI, "run", "-c", str(ws.config_path)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=ws.env(), cwd=ws.root)
    try:
        wait_marker(started_marker(ws, "b2", "pre"))
        os.kill(proc.pid, signal.SIGHUP)
        # The kernel discards an ignored signal at once: nothing to wait for
        # but the run itself, which must go on to the end.
        release_marker(ws, "b2", "pre").touch()
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert rc == 0
    assert order(ws) == ORDER_OK
    assert ws.report()["status"] == "ok"


# --- item 6: a state folder or lock file that cannot be used --------------------------


@pytest.mark.parametrize("what", ["state_dir is a file", "lock_file is a folder",
                                  "lock_file is a symbolic link"])
def test_an_unusable_state_fails_before_any_hook_in_one_line(ws: Workspace, what: str) -> None:
    target = ws.root / "elsewhere"
    target.write_text("must stay as it is\n")
    header = ""
    if what == "state_dir is a file":
        ws.state.write_text("not a folder\n")
    elif what == "lock_file is a folder":
        (ws.root / "lockdir").mkdir()
        header = f'lock_file = "{ws.root / "lockdir"}"'
    else:
        (ws.root / "lock").symlink_to(target)
        header = f'lock_file = "{ws.root / "lock"}"'
    write_config(ws, standard_hooks(), header=header)
    result = ws.run("run")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "ExceptionGroup" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert ("state_dir" in errors[0]) if "state_dir" in what else ("lock_file" in errors[0])
    assert events(ws) == []
    assert ws.backups() == []
    assert target.read_text() == "must stay as it is\n"
    check = ws.run("check")
    assert check.returncode == 1, check.stderr


# --- item 15: private state, secrets kept from children -------------------------------


def test_state_is_private_and_the_lock_is_not_followed(ws: Workspace) -> None:
    write_config(ws, [HookSpec("b1")])
    old = os.umask(0o022)
    try:
        result = ws.run("run")
    finally:
        os.umask(old)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(ws.state.stat().st_mode) == 0o700
    assert stat.S_IMODE((ws.state / "reports").stat().st_mode) == 0o700
    [report] = ws.reports()
    assert stat.S_IMODE(report.stat().st_mode) == 0o600


def test_password_env_is_not_passed_to_hooks_or_rsync(ws: Workspace) -> None:
    seen = ws.root / "hook-env"
    rsync_env: list[bytes] = []
    slow = make_slow_source(ws, "slow", mib=1)
    dump = f"env > {seen}"
    ws.write_config(
        "[[backup_hooks]]\nname = \"dump\"\n"
        f"pre = {_toml(dump)}\n"
        + source_toml("slow", slow, rsync_args=["--bwlimit=300"])
        + "[report]\nfrom = \"a@b.c\"\nto = [\"d@e.f\"]\nwhen = \"never\"\n"
        + "[report.smtp]\nhost = \"127.0.0.1\"\nusername = \"u\"\n"
        + "password_env = \"PIBACKUP_TEST_SECRET\"\n"
    )
    proc = ws.start("run", env={"PIBACKUP_TEST_SECRET": "hunter2-secret"})

    def rsync_seen() -> bool:
        for pid, cmd in processes_mentioning(str(slow)):
            if cmd.startswith("rsync"):
                try:
                    with open(f"/proc/{pid}/environ", "rb") as f:
                        rsync_env.append(f.read())
                except OSError:
                    continue
                return True
        return proc.poll() is not None

    try:
        wait_for(rsync_seen, 30, "rsync to run")
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert rc == 0
    assert "PIBACKUP_TEST_SECRET" not in seen.read_text()
    assert rsync_env and all(b"hunter2-secret" not in env for env in rsync_env)


# --- item 14: the clock guard compares the backup's name ------------------------------


def _name_after(seconds: int) -> str:
    return (datetime.now().astimezone() + timedelta(seconds=seconds)).strftime(
        "%Y-%m-%dt%H-%M-%S%z")


def test_a_clock_earlier_than_the_newest_backup_fails_the_run(ws: Workspace) -> None:
    future = _name_after(3600)
    (ws.dest / future / "alpha").mkdir(parents=True)
    write_config(ws, [HookSpec("b1")])
    result = ws.run("run")
    assert result.returncode == 1, result.stderr
    report = ws.report()
    assert future in report["failure"] and "clock" in report["failure"]
    assert ws.backups() == [future]
    assert statuses(ws)["b1.post"] == "failed"


def test_the_clock_stepped_forward_during_a_pre_cannot_date_a_backup_in_the_past(
    ws: Workspace,
) -> None:
    # The pre makes a backup dated one second after the run's name, then waits
    # until the clock has passed it: as if NTP stepped the clock during the
    # pre and another machine's run saved a backup meanwhile.
    script = r"""
t=$(echo "$PIBACKUP_NAME" | sed -E 's/^(.{10})t(..)-(..)-(..)(.....)$/\1 \2:\3:\4 \5/')
s=$(date -d "$t" +%s)
later=$(date -d "@$((s + 1))" +%Y-%m-%dt%H-%M-%S%z)
mkdir -p "$PIBACKUP_DESTINATION/$later/alpha"
while [ "$(date +%s)" -le "$((s + 1))" ]; do sleep 0.05; done
"""
    ws.write_config("[[backup_hooks]]\nname = \"step\"\n"
                    f"pre = {_toml(script)}\n"
                    + source_toml("alpha", ws.make_source("alpha")))
    result = ws.run("run")
    assert result.returncode == 1, result.stderr
    assert "clock" in ws.report()["failure"]
    assert len(ws.backups()) == 1, "only the backup the pre made; none dated before it"
    wait_no_processes(ws)


# --- item 6: the report is never lost silently -----------------------------------------


@pytest.fixture
def small_disk(ws: Workspace) -> Iterator[Path]:
    """A 4 MiB tmpfs: a real filesystem that fills up to its last byte (ext4 keeps
    blocks in reserve for its own metadata)."""
    mount = ws.root / "statedisk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs",
                           str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill_to_the_last_block(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\xa5" * 4096)
    except OSError as e:
        assert e.errno == 28, e
    finally:
        os.close(fd)


@needs_root
def test_a_full_state_disk_still_mails_the_report(
    ws: Workspace, small_disk: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import json

    from smtpkit import PASSWORD, USER, MailServer, Pki

    pki = Pki(tmp_path_factory.mktemp("pki"))
    password = ws.root / "smtp-password"
    password.write_text(PASSWORD + "\n")
    state = small_disk / "state"
    with MailServer(pki) as server:
        ws.write_config(
            source_toml("alpha", ws.make_source("alpha"))
            + "[report]\nfrom = \"pibackup@test\"\nto = [\"admin@test\"]\n"
            + server.smtp_table(username=_toml(USER), password_file=_toml(str(password)),
                                ca_file=_toml(str(pki.ca_file)), timeout='"5s"'),
        )
        # Workspace writes its own state_dir: point it at the small disk.
        text = ws.config_path.read_text().replace(f'state_dir = "{ws.state}"',
                                                  f'state_dir = "{state}"')
        ws.config_path.write_text(text)
        first = ws.run("run")  # makes state/, its lock and reports/ while there is room
        assert first.returncode == 0, first.stderr
        _fill_to_the_last_block(small_disk / "ballast.bin")
        result = ws.run("run")
        assert len(server.messages) == 2
        mailed = server.messages[1].message()
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "report not written" in result.stderr
    assert "No space left on device" in result.stderr
    assert len(list((state / "reports").glob("*.json"))) == 1, "only the first run's report"
    attachment = next(part for part in mailed.iter_attachments())
    report = json.loads(attachment.get_content())
    assert report["status"] == "ok"
    assert report["saved"] is True
    assert len(complete_backups(ws)) == 2
