"""End to end: hooks and rsync sources on remote hosts, over a real OpenSSH sshd (SPEC §2, §4).

The "remote" host is this machine, reached through test sshd instances on
127.0.0.1 (tests/sshkit.py), so a remote source's path and a remote hook's
files are folders of the test's workspace, and the /proc scan of the
workspace finds what runs on the "remote" side too (the rsync server, a
hook's shell and its children). Remote hooks do not inherit the engine's
environment, so every path in their scripts is literal (hookkit does that).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from typing import TYPE_CHECKING, Any

import pytest
from conftest import needs_rsync, processes_mentioning, wait_for
from datakit import (
    describe_tree,
    diff_trees,
    hardlink_groups,
    max_overlap,
    settle_times,
    snapshot_intervals,
    toml_value,
)
from hookkit import (
    HookSpec,
    Running,
    complete_backups,
    events,
    hook_toml,
    in_progress,
    make_slow_source,
    order,
    release_marker,
    report_hooks,
    source_toml,
    start,
    started_marker,
    statuses,
    tail_text,
    wait_marker,
    wait_no_processes,
)
from sshkit import Sshd, descendants, established_to, free_port, needs_sshd

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from conftest import Workspace

pytestmark = [
    needs_rsync,
    needs_sshd,
]

SLOW_REMOTE = {"rsync_args": ["--bwlimit=300"]}


# --- fixtures -------------------------------------------------------------------------


# --- helpers --------------------------------------------------------------------------


def remote_hook(ws: Workspace, spec: HookSpec, host: str) -> str:
    return hook_toml(ws, spec) + f"host = {toml_value(host)}\n"


def remote_source(name: str, path: Path | str, host: str, **extra: Any) -> str:
    return source_toml(name, path, host=host, **extra)


def run_ok(ws: Workspace, *args: str) -> subprocess.CompletedProcess[str]:
    result = ws.run("run", *args, timeout=60)
    assert result.returncode == 0, f"exit {result.returncode}\nstderr:\n{result.stderr}"
    return result


def everything_said(report: dict[str, Any], stderr: str) -> str:
    """The report's failure, every stderr tail in it, and the CLI's stderr, as one text."""
    parts = [str(report.get("failure")), stderr]
    parts += [tail_text(h.get("stderr_tail")) for h in report["hooks"]]
    for source in report["sources"].values():
        for step in ("snapshot", "save"):
            if source.get(step):
                parts.append(tail_text(source[step].get("stderr_tail")))
    return "\n".join(parts)


def wait_disconnected(server: Sshd, timeout: float = 10) -> None:
    """Bounded wait until no client connection to ``server`` is left (masters included)."""
    try:
        wait_for(lambda: established_to(server.port) == 0, timeout,
                 f"connections to port {server.port} to close")
    except AssertionError:
        raise AssertionError(
            f"{established_to(server.port)} connection(s) to the test sshd left open "
            "after the run (an OpenSSH master or SSH connection not closed)"
        ) from None


def remote_rsyncs(server: Sshd) -> list[int]:
    """The rsync servers on the "remote" side: live processes below the test sshd.

    Found by their place, not by a path: with ``-s`` the paths travel inside
    rsync's protocol, and the server's command line names none.
    """
    assert server.proc is not None
    found = []
    for pid in descendants(server.proc.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        # A zombie's command line is empty: it is not running any more.
        if argv[0].endswith(b"rsync") and b"--server" in argv:
            found.append(pid)
    return found


def wait_remote_rsync(running: Running, server: Sshd) -> None:
    """Wait until the remote side's rsync server is copying."""
    def serving() -> bool:
        if running.proc.poll() is not None:
            raise AssertionError(f"the CLI exited early; stderr:\n{running.stderr}")
        return bool(remote_rsyncs(server))

    wait_for(serving, 20, "the remote rsync server")


def build_tree(root: Path) -> None:
    """Modes, owners, a symlink (and a dangling one), hard links and xattrs; settled times."""
    root.mkdir(parents=True)
    files = {"plain.txt": 0o644, "private": 0o600, "script.sh": 0o750, "readonly": 0o444}
    for name, mode in files.items():
        (root / name).write_text(f"{name} content\n")
        os.chmod(root / name, mode)
    sub = root / "sub dir"
    sub.mkdir()
    os.chmod(sub, 0o2750)
    (sub / "nested.txt").write_text("nested\n")
    os.symlink("sub dir/nested.txt", root / "link")
    os.symlink("/nonexistent/target", root / "dangling")
    (root / "hard-a").write_text("one inode, two names\n")
    os.link(root / "hard-a", sub / "hard-b")
    (root / "owned").write_text("someone else's\n")
    os.chown(root / "owned", 1234, 5678)
    try:
        os.setxattr(root / "plain.txt", "user.colour", b"blue")
        os.setxattr(sub, "user.note", b"\x00\x01\xff")
    except OSError as e:
        pytest.skip(f"the filesystem refuses user xattrs: {e}")
    settle_times(root)


# --- the test sshd itself -------------------------------------------------------------


def test_the_test_sshd_serves_quiet_commands_and_rsync(ws: Workspace, sshd: Sshd) -> None:
    """The fixture's own check: a quiet login shell (rsync needs it) and rsync over ssh."""
    quiet = subprocess.run([*sshd.ssh_argv(), "root@127.0.0.1", "true"],
                           capture_output=True, text=True, timeout=30)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    src = ws.make_source("by-hand", {"a/b.txt": "over ssh\n"})
    copied = subprocess.run(
        ["rsync", "-a", "-e", " ".join(sshd.ssh_argv()), f"root@127.0.0.1:{src}/",
         str(ws.root / "copy")],
        capture_output=True, text=True, timeout=30,
    )
    assert copied.returncode == 0, copied.stderr
    assert (ws.root / "copy" / "a" / "b.txt").read_text() == "over ssh\n"
    assert sshd.logins() == 2


# --- 1. remote rsync sources ----------------------------------------------------------


def test_remote_source_is_copied_with_full_fidelity_and_linked_on_the_next_run(
    ws: Workspace, sshd: Sshd
) -> None:
    src = ws.src / "data"
    build_tree(src)
    ws.write_config(sshd.host_toml("h1") + remote_source("data", src, "h1"))

    run_ok(ws)
    [first] = complete_backups(ws)
    copy = ws.dest / first / "data"
    problems = diff_trees(describe_tree(src), describe_tree(copy))
    assert problems == [], "remote backup differs from the source:\n" + "\n".join(problems)
    assert hardlink_groups(copy) == {frozenset({b"hard-a", b"sub dir/hard-b"})}
    report = ws.report()
    assert report["status"] == "ok"
    assert report["sources"]["data"]["status"] == "ok"

    (src / "private").write_text("changed, and longer than before\n")
    (src / "added.txt").write_text("new in the second run\n")
    run_ok(ws)
    first_again, second = complete_backups(ws)
    assert first_again == first
    one, two = ws.dest / first / "data", ws.dest / second / "data"
    for unchanged in ("plain.txt", "script.sh", "readonly", "owned", "sub dir/nested.txt",
                      "hard-a", "sub dir/hard-b"):
        assert os.lstat(one / unchanged).st_ino == os.lstat(two / unchanged).st_ino, (
            f"{unchanged} was not hard-linked against the previous backup"
        )
    assert os.lstat(one / "private").st_ino != os.lstat(two / "private").st_ino
    assert (two / "private").read_text() == "changed, and longer than before\n"
    assert (two / "added.txt").read_text() == "new in the second run\n"
    assert (one / "private").read_text() == "private content\n"
    assert os.getxattr(two / "plain.txt", "user.colour") == b"blue"
    wait_disconnected(sshd)


# --- 2. remote hooks ------------------------------------------------------------------


def test_remote_hooks_run_on_the_host_in_order_with_local_ones(
    ws: Workspace, sshd: Sshd
) -> None:
    where = ws.markers / "where"
    where_script = f'echo "$SSH_CONNECTION" > {where}'
    hooks = [HookSpec("b1"), HookSpec("r1"), HookSpec("s1", kind="snapshot"),
             HookSpec("r2", kind="snapshot")]
    body = (
        sshd.host_toml("h1")
        + hook_toml(ws, hooks[0]) + remote_hook(ws, hooks[1], "h1")
        + hook_toml(ws, hooks[2]) + remote_hook(ws, hooks[3], "h1")
        # Where it ran: sshd sets SSH_CONNECTION (client ip, port, server ip, port).
        + "[[backup_hooks]]\nname = \"where\"\nhost = \"h1\"\n"
        + f"pre = {toml_value(where_script)}\n"
        + source_toml("local", ws.make_source("local"))
    )
    ws.write_config(body)

    result = run_ok(ws)

    assert result.stdout == ""
    assert order(ws) == ["b1.pre", "r1.pre", "s1.pre", "r2.pre",
                         "r2.post", "s1.post", "r1.post", "b1.post"]
    server_port = where.read_text().split()[3]
    assert server_port == str(sshd.port), "the remote hook did not run through the test sshd"
    [name] = complete_backups(ws)
    final = str(ws.dest / name)
    in_prog = final + ".in-progress"
    seen = {e.label: e for e in events(ws)}
    for label in ("r1.pre", "r2.pre", "r2.post", "r1.post"):
        event = seen[label]
        assert event.name == name, event
        assert event.destination == str(ws.dest), event
        assert event.phase == label.split(".")[1], event
    assert seen["r1.pre"].backup_dir == in_prog
    assert seen["r2.pre"].backup_dir == in_prog
    assert seen["r1.pre"].status == "-", "PIBACKUP_STATUS is unset in pre"
    # A snapshot hook's post runs inside the unfinished backup (SPEC §4).
    assert seen["r2.post"].backup_dir == in_prog
    assert seen["r1.post"].backup_dir == final
    assert statuses(ws)["r2.post"] == "ok"
    assert statuses(ws)["r1.post"] == "ok"
    # The remote hooks saw what the local ones saw.
    for remote, local in (("r1.pre", "b1.pre"), ("r2.post", "s1.post")):
        assert (seen[remote].name, seen[remote].destination, seen[remote].backup_dir) == (
            seen[local].name, seen[local].destination, seen[local].backup_dir)
    report = ws.report()
    assert report["status"] == "ok"
    assert all(status == "ok" for _, _, status in report_hooks(report))
    wait_disconnected(sshd)


# --- 3. cancellation ------------------------------------------------------------------


@pytest.mark.slow
def test_sigint_during_a_remote_hook_kills_it_there_and_runs_the_posts(
    ws: Workspace, sshd: Sshd
) -> None:
    hooks = [HookSpec("b1"), HookSpec("r1"),
             HookSpec("r2", kind="snapshot", block=("pre",), children=("pre",))]
    ws.write_config(
        sshd.host_toml("h1")
        + hook_toml(ws, hooks[0]) + remote_hook(ws, hooks[1], "h1")
        + remote_hook(ws, hooks[2], "h1")
        + source_toml("local", ws.make_source("local"))
    )
    with start(ws) as running:
        wait_marker(started_marker(ws, "r2", "pre"), running)
        # The blocked remote hook and its two background children are running there.
        assert len([c for _, c in processes_mentioning(str(ws.root)) if "sleeper" in c]) >= 2
        running.send(signal.SIGINT)
        rc = running.wait(40)
    assert rc == 130, running.stderr
    wait_no_processes(ws, timeout=15)
    assert not release_marker(ws, "r2", "pre").exists()
    # r2's pre was cut short: its post runs too (SPEC §2).
    assert order(ws) == ["b1.pre", "r1.pre", "r2.pre", "r2.post", "r1.post", "b1.post"]
    assert statuses(ws)["r2.post"] == "interrupted"
    assert statuses(ws)["r1.post"] == "interrupted"
    assert statuses(ws)["b1.post"] == "interrupted"
    assert ws.backups() == []
    report = ws.report()
    assert report["status"] == "interrupted"
    assert report_hooks(report)[:6] == [
        ("b1", "pre", "ok"), ("r1", "pre", "ok"), ("r2", "pre", "cancelled"),
        ("r2", "post", "ok"), ("r1", "post", "ok"), ("b1", "post", "ok"),
    ]
    wait_disconnected(sshd)


@pytest.mark.slow
def test_sigint_during_a_remote_rsync_kills_both_sides_and_runs_the_posts(
    ws: Workspace, sshd: Sshd
) -> None:
    slow = make_slow_source(ws, "data")
    ws.write_config(
        sshd.host_toml("h1")
        + hook_toml(ws, HookSpec("b1")) + remote_hook(ws, HookSpec("r1"), "h1")
        + remote_source("data", slow, "h1", **SLOW_REMOTE)
    )
    with start(ws) as running:
        wait_remote_rsync(running, sshd)
        running.send(signal.SIGINT)
        rc = running.wait(40)
    assert rc == 130, running.stderr
    # The local rsync and its ssh, and the rsync server on the "remote" side.
    wait_no_processes(ws, timeout=15)
    wait_for(lambda: remote_rsyncs(sshd) == [], 15, "the remote rsync server to end")
    wait_disconnected(sshd)
    assert order(ws) == ["b1.pre", "r1.pre", "r1.post", "b1.post"]
    assert statuses(ws)["r1.post"] == "interrupted"
    assert ws.backups() == [], "the in-progress folder is removed, no backup added"
    report = ws.report()
    assert report["status"] == "interrupted"
    assert report["saved"] is False
    assert report["sources"]["data"]["status"] == "cancelled"


def test_a_failing_remote_hook_reports_its_exit_code_and_stderr(
    ws: Workspace, sshd: Sshd
) -> None:
    failing = HookSpec("r1", fail={"pre": 3}, stderr_lines=3, stdout=True)
    ws.write_config(
        sshd.host_toml("h1") + hook_toml(ws, HookSpec("b1")) + remote_hook(ws, failing, "h1")
        + source_toml("local", ws.make_source("local"))
    )

    result = ws.run("run", timeout=60)

    assert result.returncode == 1, result.stderr
    assert result.stdout == "", "a remote hook's output reached the engine's stdout"
    assert order(ws) == ["b1.pre", "r1.pre", "b1.post"]
    assert statuses(ws)["b1.post"] == "failed"
    report = ws.report()
    assert report["status"] == "failed"
    assert "r1" in report["failure"]
    [r1_pre] = [h for h in report["hooks"] if (h["hook"], h["phase"]) == ("r1", "pre")]
    assert r1_pre["status"] == "failed"
    assert r1_pre["exit_code"] == 3
    tail = tail_text(r1_pre["stderr_tail"])
    assert "r1.pre err-0003" in tail, tail
    assert "pibackup-pgid" not in tail, "the engine's own marker leaked into the stderr tail"
    assert complete_backups(ws) == []


@pytest.mark.slow
def test_a_remote_hook_past_its_timeout_is_killed_there(ws: Workspace, sshd: Sshd) -> None:
    # The timeout counts from the connection's start: 4 s leaves a loaded machine's login
    # time to the pre, which must have started for the test to mean anything.
    stuck = HookSpec("r1", block=("pre",), timeout="4s", children=("pre",))
    ws.write_config(
        sshd.host_toml("h1") + remote_hook(ws, stuck, "h1")
        + source_toml("local", ws.make_source("local"))
    )

    result = ws.run("run", timeout=60)

    assert result.returncode == 1, result.stderr
    wait_no_processes(ws, timeout=15)
    # Cut short by its timeout: its post runs (SPEC §2).
    assert order(ws) == ["r1.pre", "r1.post"]
    report = ws.report()
    assert report["status"] == "failed"
    assert "r1" in report["failure"]
    assert report_hooks(report)[0] == ("r1", "pre", "failed")
    wait_disconnected(sshd)


# --- 4. untrusted and unreachable hosts -----------------------------------------------


@pytest.mark.parametrize("key", ["changed", "unknown"])
@pytest.mark.parametrize("what", ["hook", "source"])
def test_an_untrusted_host_key_stops_everything_of_that_host(
    ws: Workspace, sshd: Sshd, what: str, key: str
) -> None:
    if key == "changed":
        wrong = sshd.wrong_known_hosts()
    else:
        wrong = ws.root / "empty_known_hosts"
        wrong.write_text("")
    body = sshd.host_toml("impostor", known_hosts=wrong) + hook_toml(ws, HookSpec("b1"))
    if what == "hook":
        body += remote_hook(ws, HookSpec("r1"), "impostor")
    body += remote_source("data", ws.make_source("data"), "impostor")
    body += source_toml("local", ws.make_source("local"))
    ws.write_config(body)

    result = ws.run("run", timeout=60)

    assert result.returncode == 1, result.stderr
    assert "r1.pre" not in order(ws), "a hook ran on a host whose key is not trusted"
    assert order(ws) == ["b1.pre", "b1.post"]
    assert sshd.logins() == 0, "something logged in to a host whose key is not trusted"
    assert complete_backups(ws) == [] and in_progress(ws) == []
    report = ws.report()
    assert report["status"] == "failed"
    said = everything_said(report, result.stderr)
    assert str(wrong) in said, f"the known_hosts file is not named:\n{said}"
    assert "impostor" in said, f"the host is not named:\n{said}"
    if what == "source":
        assert report["sources"]["data"]["status"] == "failed"
        assert "data" in report["failure"]


def test_an_unreachable_host_fails_its_source_quickly(
    ws: Workspace, sshd: Sshd
) -> None:
    closed = free_port()
    ws.write_config(
        sshd.host_toml("offline", port=closed)
        + remote_source("data", ws.make_source("data"), "offline")
        + source_toml("local", ws.make_source("local"))
    )
    began = time.monotonic()
    result = ws.run("run", timeout=60)
    took = time.monotonic() - began

    assert result.returncode == 1, result.stderr
    assert took < 20, f"an unreachable host held the run for {took:.1f}s"
    report = ws.report()
    assert report["status"] == "failed"
    assert report["saved"] is False
    assert report["sources"]["data"]["status"] == "failed"
    assert "data" in report["failure"]
    assert "offline" in everything_said(report, result.stderr)
    assert complete_backups(ws) == [] and in_progress(ws) == []


# --- 5. one connection per host -------------------------------------------------------


def test_hooks_and_sources_of_a_host_share_its_connections(ws: Workspace, sshd: Sshd) -> None:
    hooks = [HookSpec("r1"), HookSpec("r2"), HookSpec("r3", kind="snapshot")]
    sources = {n: ws.make_source(n, {"file.txt": f"{n} over ssh\n"}) for n in ("a", "b", "c")}
    ws.write_config(
        sshd.host_toml("h1")
        + "".join(remote_hook(ws, h, "h1") for h in hooks)
        + "".join(remote_source(n, p, "h1") for n, p in sources.items()),
        header="concurrency = 3",
    )

    run_ok(ws)

    assert order(ws) == ["r1.pre", "r2.pre", "r3.pre", "r3.post", "r2.post", "r1.post"]
    [name] = complete_backups(ws)
    for n in sources:
        assert (ws.dest / name / n / "file.txt").read_text() == f"{n} over ssh\n"
    logins = sshd.logins()
    assert 1 <= logins <= 2, (
        f"{logins} logins for one host in one run (expected the asyncssh connection "
        f"and the OpenSSH master only):\n{sshd.log_text()}"
    )
    # Six hook phases and three rsyncs, all through those two connections.
    assert sshd.log_text().count("Starting session:") >= 9, sshd.log_text()
    wait_disconnected(sshd)


@pytest.mark.parametrize(("max_sessions", "peak"), [(1, 1), (None, 2)], ids=["one", "default"])
def test_max_sessions_limits_a_host_below_the_global_limit(
    ws: Workspace, sshd: Sshd, max_sessions: int | None, peak: int
) -> None:
    # ~300 KiB at 500 KiB/s: each copy lasts long enough for three to overlap.
    slow = {"rsync_args": ["--bwlimit=500"]}
    host = sshd.host_toml("h1")
    if max_sessions is not None:
        host += f"max_sessions = {max_sessions}\n"
    sources = ""
    for n in ("a", "b", "c"):
        path = ws.src / n
        path.mkdir()
        (path / "blob.bin").write_bytes(os.urandom(300 * 1024))
        sources += remote_source(n, path, "h1", **slow)
    ws.write_config(host + sources, header="concurrency = 3")

    run_ok(ws)

    report = ws.report()
    assert max_overlap(snapshot_intervals(report).values()) == peak, report["sources"]


# --- 6. an optional source on a host that is off ---------------------------------------


@pytest.mark.slow
def test_an_optional_source_on_a_stopped_host_costs_only_its_folder(
    ws: Workspace, new_sshd: Callable[[], Sshd]
) -> None:
    up1, up2, down = new_sshd(), new_sshd(), new_sshd()
    down.stop()
    paths = {n: ws.make_source(n, {"file.txt": f"from {n}\n"}) for n in ("a", "b", "c", "l")}
    ws.write_config(
        up1.host_toml("h1") + up2.host_toml("h2") + down.host_toml("laptop")
        + remote_source("a", paths["a"], "h1")
        + remote_source("b", paths["b"], "h2")
        + remote_source("c", paths["c"], "laptop", optional=True)
        + source_toml("l", paths["l"])
    )

    result = ws.run("run", timeout=60)

    assert result.returncode == 1, result.stderr
    [name] = complete_backups(ws)
    assert in_progress(ws) == []
    backup = ws.dest / name
    # .pibackup: the manifests of the sources saved (SPEC §9).
    assert sorted(p.name for p in backup.iterdir()) == [".pibackup", "a", "b", "l"]
    for n in ("a", "b", "l"):
        assert (backup / n / "file.txt").read_text() == f"from {n}\n"
    report = ws.report()
    assert report["status"] == "failed"
    assert report["saved"] is True
    assert report["sources"]["c"]["status"] == "failed"
    assert [report["sources"][n]["status"] for n in ("a", "b", "l")] == ["ok"] * 3
    assert '"c"' in report["failure"] or "c" in report["failure"].split()
    assert up1.logins() >= 1 and up2.logins() >= 1
    wait_disconnected(up1)
    wait_disconnected(up2)


# --- 7. check --connect ---------------------------------------------------------------


def test_check_connect_reports_each_host(ws: Workspace, new_sshd: Callable[[], Sshd]) -> None:
    up, other = new_sshd(), new_sshd()
    local = source_toml("local", ws.make_source("local"))
    ws.write_config(up.host_toml("reachable-host") + local)
    ok = ws.run("check", "--connect", timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "reachable-host" in ok.stdout + ok.stderr
    assert up.logins() == 1, "check --connect did not log in to the host"

    ws.write_config(
        up.host_toml("reachable-host")
        + up.host_toml("offline-host", port=free_port())
        + other.host_toml("impostor-host", known_hosts=other.wrong_known_hosts())
        + local
    )
    bad = ws.run("check", "--connect", timeout=60)
    said = bad.stdout + bad.stderr
    assert bad.returncode == 1, said
    assert "offline-host" in said, said
    assert "impostor-host" in said, said
    assert other.logins() == 0
    assert up.logins() == 2


@pytest.mark.skipif(shutil.which("sudo") is None, reason="sudo is not installed")
def test_sudo_runs_remote_hooks_and_rsync_through_sudo(ws: Workspace, sshd: Sshd) -> None:
    src = ws.make_source("data")
    # A remote hook gets only its own variables: the events file is named in it.
    hook = (
        '[[backup_hooks]]\nname = "who"\nhost = "h1"\n'
        f"pre = {toml_value(f'echo sudo:$SUDO_USER:$PIBACKUP_PHASE >> {ws.events}')}\n"
    )
    ws.write_config(sshd.host_toml("h1", sudo=True) + hook + remote_source("data", src, "h1"))
    run_ok(ws)
    assert ws.event_lines() == ["sudo:root:pre"]
    report = ws.report()
    assert "--rsync-path=sudo -n rsync" in report["sources"]["data"]["snapshot"]["command"]
    assert (ws.dest / report["name"] / "data" / "file.txt").read_text() == "content of data\n"


@pytest.mark.slow
def test_a_host_that_never_answers_fails_its_optional_source_within_the_bound(
        ws: Workspace, sshd: Sshd) -> None:
    from smtpkit import silent_server  # a port that accepts and never says a word

    local = ws.make_source("local")
    remote = ws.make_source("far")
    with silent_server() as port:
        ws.write_config(
            sshd.host_toml("mute", port=port)
            + source_toml("local", local)
            + remote_source("far", remote, "mute", optional=True))
        t0 = time.monotonic()
        result = ws.run("run", timeout=90)
        elapsed = time.monotonic() - t0
    assert result.returncode == 1, result.stderr
    # The connect timeout (15 s, banner exchange included) bounds it, not the test's 90 s.
    assert elapsed < 40, elapsed
    report = ws.report()
    assert (report["status"], report["saved"]) == ("failed", True)
    assert report["sources"]["far"]["status"] == "failed"
    assert report["sources"]["local"]["status"] == "ok"
    assert sorted(p.name for p in (ws.dest / report["name"]).iterdir()) == [".pibackup", "local"]
