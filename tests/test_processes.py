"""The process helper (engine/processes.py): the line splitter, ending sessions, hooks' daemons.

Unit-level tests drive ``run_process``/``end_session`` directly on real
children; the end-to-end ones go through the CLI (SPEC §2 "Failures": a hook
that exits is finished and its background processes are left alone; nothing
waits forever; memory bounded whatever a child prints).
"""

from __future__ import annotations

import itertools
import logging
import shlex
import shutil
import signal
import time
from typing import TYPE_CHECKING

import anyio
import pytest
import structlog
from conftest import kill_mentioning, needs_rsync, processes_mentioning, thaw, wait_for
from hookkit import (
    release_marker,
    sleeper,
    source_toml,
    start,
    started_marker,
    tail_text,
    wait_marker,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from pibackup_async.engine import processes
from pibackup_async.engine.processes import (
    LineSplitter,
    Tail,
    end_session,
    managed_process,
    run_process,
    take_abandoned,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from conftest import Workspace

CAP = processes._LINE_CAP


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    """Logging as the CLI sets it up without -v: the splitter's fast path, no debug lines."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
                        logger_factory=structlog.ReturnLoggerFactory())
    try:
        yield
    finally:
        structlog.reset_defaults()


# --- the line splitter -----------------------------------------------------------------


def _expected(data: bytes, limit: int) -> tuple[list[str], int]:
    """What a tail of ``limit`` lines should hold after ``data``: (lines, dropped)."""
    *complete, last = data.split(b"\n")
    raw = complete + ([last] if last else [])
    lines = []
    for line in raw:
        text = line[:CAP].decode(errors="replace").rstrip("\r")
        lines.append(f"{text} [{len(line) - CAP} bytes cut]" if len(line) > CAP else text)
    return lines[-limit:], max(0, len(lines) - limit)


def _split(chunks: list[bytes], limit: int, debug: bool) -> Tail:
    tail = Tail(limit=limit)
    splitter = LineSplitter(tail, "stdout")
    splitter._debug = debug  # both paths must agree, whatever the logging set-up
    for chunk in chunks:
        splitter.feed(chunk)
    splitter.close()
    return tail


line_bytes = st.sampled_from([b"a", b"xyz", b"\n", b"\r\n", b"\xc3\xa9", b"z" * 700, b"\n\n\n"])


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(line_bytes, max_size=60), cuts=st.lists(st.integers(0, 5000)),
       limit=st.integers(1, 6), debug=st.booleans())
def test_the_splitter_keeps_the_last_lines_however_the_output_is_chunked(
    pieces: list[bytes], cuts: list[int], limit: int, debug: bool
) -> None:
    data = b"".join(pieces)
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    tail = _split(chunks, limit, debug)
    assert (list(tail.lines), tail.dropped) == _expected(data, limit)


def test_every_line_is_looked_at_only_when_debug_logging_is_on() -> None:
    assert LineSplitter(Tail(), "stdout")._debug is False
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
                        logger_factory=structlog.ReturnLoggerFactory())
    assert LineSplitter(Tail(), "stdout")._debug is True


def test_a_line_without_end_costs_no_more_than_its_cap() -> None:
    tail = Tail()
    splitter = LineSplitter(tail, "stdout")
    chunk = b"x" * (1 << 20)
    for _ in range(50):
        splitter.feed(chunk)
        assert len(splitter._line) <= CAP
    splitter.close()
    [line] = tail.lines
    assert line == "x" * CAP + f" [{50 * (1 << 20) - CAP} bytes cut]"


def test_many_short_lines_are_counted_not_kept() -> None:
    tail = _split([b"y\n" * 100_000] * 10, limit=20, debug=False)
    assert list(tail.lines) == ["y"] * 20
    assert tail.dropped == 1_000_000 - 20
    assert tail.text().startswith("[999980 earlier lines cut]\ny\n")


# --- run_process and end_session -------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def program(tmp_path: Path) -> Iterator[str]:
    """A copy of ``sleep`` under the test's folder; every copy still running is killed after."""
    path = tmp_path / "bin" / "sleeper"
    path.parent.mkdir()
    shutil.copy2("/bin/sleep", path)
    try:
        yield str(path)
    finally:
        kill_mentioning(str(tmp_path))


async def test_a_hooks_background_job_is_left_running_and_not_waited_for(program: str) -> None:
    # The job keeps our pipes open: reading to their end would wait 1000 s.
    script = f"echo before; {shlex.quote(program)} 1000 & echo after; echo err >&2"
    with anyio.fail_after(20):
        finished = await run_process(["/bin/sh", "-c", script], leave_background=True)
    assert finished.exit_code == 0
    assert list(finished.stdout.lines) == ["before", "after"]
    assert list(finished.stderr.lines) == ["err"]
    [(pid, _)] = processes_mentioning(program)
    assert _alive(pid)


async def test_without_leave_background_the_session_ends_with_the_child(program: str) -> None:
    script = f"{shlex.quote(program)} 1000 & echo started"
    with anyio.fail_after(20):
        finished = await run_process(["/bin/sh", "-c", script])
    assert finished.exit_code == 0
    assert list(finished.stdout.lines) == ["started"]
    assert processes_mentioning(program) == []


async def test_a_cancelled_hook_takes_its_background_jobs_along(program: str, tmp_path: Path
                                                                 ) -> None:
    marker = tmp_path / "started"
    script = (f"{shlex.quote(program)} 1000 & touch {shlex.quote(str(marker))}; "
              f"{shlex.quote(program)} 1000")
    with anyio.move_on_after(20) as outer:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: run_process(["/bin/sh", "-c", script], leave_background=True))
            while not marker.exists():  # noqa: ASYNC110
                await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
    assert not outer.cancelled_caught, "the hook did not start"
    assert processes_mentioning(program) == []


async def test_a_group_ignoring_sigterm_is_killed_after_the_grace(program: str,
                                                                  tmp_path: Path) -> None:
    marker = tmp_path / "trapped"
    q = shlex.quote
    script = (f"trap '' TERM; {q(program)} 1000 & {q(program)} 1000 & "
              f"touch {q(str(marker))}; wait")
    async with managed_process(["/bin/sh", "-c", script], grace=0.3) as process:
        with anyio.fail_after(10):
            while not marker.exists():  # noqa: ASYNC110
                await anyio.sleep(0.02)
        begun = time.monotonic()
        await end_session(process, grace=0.3)
        took = time.monotonic() - begun
    assert process.returncode == -signal.SIGKILL
    assert processes_mentioning(program) == []
    # A failure detector, not a measurement: SIGKILL acts at once.
    assert took < 0.3 + 5, took
    assert take_abandoned() == []


@pytest.mark.slow
async def test_a_process_stuck_in_the_kernel_is_abandoned_within_bounds(frozen: Path) -> None:
    """A write to a frozen filesystem sleeps uninterruptibly (D): SIGKILL cannot end it."""
    target = frozen / "file"
    async with managed_process(["/bin/sh", "-c", f"echo x > {shlex.quote(str(target))}"]
                               ) as process:
        wait_for(lambda: _state(process.pid) == "D", 10, "the writer to block")
        begun = time.monotonic()
        await end_session(process, grace=0.2, kill_bound=0.5)
        took = time.monotonic() - begun
        assert took < 0.2 + 0.5 + 5, took
        assert _state(process.pid) == "D"
        assert take_abandoned() == [
            f"pid {process.pid} (/bin/sh -c echo x > {target}) did not die after SIGKILL; "
            "abandoned"
        ]
        assert take_abandoned() == []
        thaw(frozen)
        with anyio.fail_after(10):
            await process.wait()
    # Both signals were pending; the first delivered on thawing ends it.
    assert process.returncode in (-signal.SIGTERM, -signal.SIGKILL)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except OSError:
        return "gone"


# --- end to end ------------------------------------------------------------------------


@needs_rsync
@pytest.mark.slow
def test_a_daemon_started_by_a_post_outlives_the_run(ws: Workspace) -> None:
    """``nohup daemon &`` in a snapshot hook's post, output redirected or not (issue 9 item 2)."""
    s = shlex.quote(str(sleeper(ws)))
    post = (f"nohup {s} 1001 > /dev/null 2>&1 &\n"   # a well-behaved daemon
            f"nohup {s} 1002 &\n"                    # one holding the hook's pipes
            "echo daemons started")
    ws.write_config(f'[[snapshot_hooks]]\nname = "svc"\npost = {_toml(post)}\n'
                    + source_toml("alpha", ws.make_source("alpha")))
    try:
        begun = time.monotonic()
        done = ws.run("run", timeout=60)
        took = time.monotonic() - begun
        assert done.returncode == 0, done.stderr
        daemons = sorted(cmd.split()[-1] for _, cmd in processes_mentioning(str(sleeper(ws))))
        assert daemons == ["1001", "1002"], "the post's daemons did not survive the run"
        assert took < 30, f"the run waited for the daemons ({took:.1f} s)"
        [post_step] = [h for h in ws.report()["hooks"] if h["phase"] == "post"]
        assert post_step["status"] == "ok"
        assert "daemons started" in tail_text(post_step["stderr_tail"])
    finally:
        kill_mentioning(str(sleeper(ws)))


def _vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


@needs_rsync
@pytest.mark.slow
def test_50_mb_of_output_without_a_newline_costs_little_memory(ws: Workspace) -> None:
    """Issue 9 item 9: the old engine kept and re-joined the whole line (131 MB, 20 s)."""
    pre = "head -c 50000000 /dev/zero | tr '\\0' x\n" + _block_lines(ws, "noisy")
    ws.write_config(f'[[backup_hooks]]\nname = "noisy"\npre = {_toml(pre)}\n'
                    + source_toml("alpha", ws.make_source("alpha")))
    with start(ws) as running:
        wait_marker(started_marker(ws, "noisy", "pre"), running, timeout=60)
        peak_mib = _vm_hwm_kib(running.proc.pid) / 1024
        release_marker(ws, "noisy", "pre").touch()
        rc = running.wait(60)
    assert rc == 0, running.stderr
    assert peak_mib <= 60, f"engine peak RSS {peak_mib:.0f} MiB"
    [step] = [h for h in ws.report()["hooks"] if h["hook"] == "noisy"]
    assert step["status"] == "ok"
    assert step["duration_s"] < 30, step  # the old engine took 20 s for this
    tail = tail_text(step["stderr_tail"])
    assert tail == "x" * CAP + f" [{50_000_000 - CAP} bytes cut]"


def _block_lines(ws: Workspace, hook: str) -> str:
    """Touch the hook's started marker, then wait for its release marker."""
    q = shlex.quote
    return (f"touch {q(str(started_marker(ws, hook, 'pre')))}\n"
            f"while [ ! -e {q(str(release_marker(ws, hook, 'pre')))} ]; do sleep 0.05; done")


def _toml(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
