"""What a person at a terminal reads (SPEC §5, §8): stdout results clear of live progress,
progress that says only what it knows, a summary in words, and a signal that names the
command it cancels.

The CLI runs under a real pseudo-terminal (hookkit.Terminal) or with plain pipes; a
backup hook waiting for a marker holds it where the test needs it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from typing import TYPE_CHECKING

import pytest
from conftest import needs_rsync, wait_for
from datakit import complete_backups
from hookkit import (
    HookSpec,
    Running,
    Terminal,
    release_marker,
    source_toml,
    started_marker,
    wait_marker,
    write_config,
)

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Workspace

_CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")


class Screen:
    """Enough of a terminal to replay what rich writes: text, CR, LF, cursor up, erase line.

    Lines never wrap: a row holds what was written on it, however long.
    """

    def __init__(self) -> None:
        self.rows: list[str] = [""]
        self.row = 0
        self.col = 0

    def feed(self, text: str) -> Screen:
        pos = 0
        while pos < len(text):
            escape = _CSI.match(text, pos)
            if escape is not None:
                self._control(escape.group(1), escape.group(2))
                pos = escape.end()
                continue
            char = text[pos]
            pos += 1
            if char == "\r":
                self.col = 0
            elif char == "\n":
                self.row += 1
                if self.row == len(self.rows):
                    self.rows.append("")
            elif char >= " ":
                line = self.rows[self.row].ljust(self.col)
                self.rows[self.row] = line[:self.col] + char + line[self.col + 1:]
                self.col += 1
        return self

    def _control(self, arg: str, op: str) -> None:
        if op == "A":
            self.row = max(0, self.row - int(arg or "1"))
        elif op == "K" and arg == "2":
            self.rows[self.row] = ""
        elif op == "K":
            self.rows[self.row] = self.rows[self.row][:self.col]
        # Colours, cursor shown or hidden: nothing a reader sees as text.

    def below_cursor(self) -> list[str]:
        """The cursor's row from the cursor on, and every row under it."""
        return [self.rows[self.row][self.col:], *self.rows[self.row + 1:]]


def test_the_screen_replays_a_redraw_in_place() -> None:
    # A pty turns each "\n" written into "\r\n".
    screen = Screen().feed("log\r\nframe 1\r\nframe 2\r\x1b[2K\x1b[1A\x1b[2Kresult\r\n")
    assert screen.rows == ["log", "result", ""]
    assert (screen.row, screen.col) == (2, 0)


# --- 1. verify's results start a line of their own, with no progress left on screen --------


def _corrupt_in_place(path: Path) -> None:
    """New bytes, same size and mtime: what a quick check cannot see, what verify must."""
    st = os.stat(path)
    path.write_bytes(b"\xff" * st.st_size)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# A frame of verify's progress: the line of the whole command, or one of a step.
_FRAME = re.compile(r"verify \S+: \d+ running|hook b1 \(pre\)")


@needs_rsync
@pytest.mark.skipif(shutil.which("setsid") is None, reason="util-linux setsid is missing")
def test_verify_results_on_a_terminal_are_clear_of_the_progress(ws: Workspace) -> None:
    src = ws.make_source("photos", {"a.jpg": "a picture\n" * 1000, "b.jpg": "another\n"})
    sources = source_toml("photos", src)
    write_config(ws, [], sources=sources)
    assert ws.run("run", "-q").returncode == 0
    [name] = complete_backups(ws.dest)
    _corrupt_in_place(ws.dest / name / "photos" / "a.jpg")
    write_config(ws, [HookSpec("b1", block=("pre",))], sources=sources)

    terminal = Terminal(ws, "verify", "--against-source")
    try:
        # Progress is on the screen before anything reaches stdout.
        wait_for(lambda: "hook b1 (pre)" in terminal.text(), timeout=30,
                 what="the held hook drawn")
        release_marker(ws, "b1", "pre").touch()
    finally:
        rc = terminal.finish()
    text = terminal.text()
    assert rc == 1, text
    corrupt = f"corrupt: photos/a.jpg: differs from {src / 'a.jpg'} at byte 0"

    # Where the result is written, the cursor is at a line's start and no frame is left
    # from there down: the result is neither glued to a frame nor followed by one.
    at = text.index("corrupt: ")
    before = Screen().feed(text[:at])
    assert before.col == 0, repr(before.rows[before.row])
    assert not any(before.below_cursor()), before.below_cursor()

    # What the person reads at the end: the whole result on its own line, the summary,
    # and no frame of progress anywhere.
    rows = Screen().feed(text).rows
    assert corrupt in rows, rows
    assert any(row.startswith(f"verified {name}: ") for row in rows), rows
    assert not [row for row in rows if _FRAME.search(row)], rows


# --- 2. progress says only what it knows -------------------------------------------------


def test_the_run_line_leaves_out_a_file_count_no_step_knows(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from pibackup_async.cli.progress import run_line
    from pibackup_async.engine import heartbeat
    from pibackup_async.engine.heartbeat import Beat, Finished

    monkeypatch.setattr(heartbeat, "finished", Finished())
    # An rsync copy: bytes from /proc, files unknown.
    copy = Beat("snapshot", {"source": "data"}, started=100.0, bytes=3 * 1024 * 1024)
    line = run_line("run", [copy], 100.0, 105.0)
    assert "file" not in line, line
    assert "3.0 MiB" in line
    with heartbeat.beating("hook", hook="mount"):
        pass  # an ended step that counts no files does not make the count known
    assert "file" not in run_line("run", [copy], 100.0, 105.0)

    # Verify counts what it reads: the count is known and shown, 0 included.
    reading = Beat("verify", {"backup": "x"}, started=100.0, bytes=0, files=0)
    assert re.search(r"\b0 files\b", run_line("verify", [reading], 100.0, 101.0))
    reading.files = 12
    assert re.search(r"\b12 files\b", run_line("verify", [reading, copy], 100.0, 101.0))


# --- 3. the summary says what concurrency bought, in words ------------------------------


def _summary(concurrency: int, duration: float, work: float, sources: int = 3) -> str:
    from pibackup_async.cli.render import summary_table
    from pibackup_async.engine.report import Report, SourceReport, Step

    report = Report(name="2024-01-01t00-00-00+0000", start="2024-01-01T00:00:00+00:00",
                    concurrency=concurrency, duration_s=duration, source_seconds_total=work,
                    sources={f"s{i}": SourceReport(type="rsync", status="ok", bytes=0,
                                                   snapshot=Step(status="ok",
                                                                 duration_s=work / sources),
                                                   save=None)
                             for i in range(sources)})
    return summary_table(report)


def test_the_summary_says_what_concurrency_bought_in_words() -> None:
    gained = _summary(concurrency=4, duration=4.1, work=12.3)
    assert "source time 12s in a run of 4.1s (3.0× through concurrency, up to 4 at once)" \
        in gained
    assert "in parallel" not in gained

    # Sources worked less than the run lasted: no multiplier that reads as a slow-down.
    less = _summary(concurrency=4, duration=4.1, work=0.8)
    assert "×" not in less and "in parallel" not in less, less
    assert "source time 0.8s in a run of 4.1s" in less
    assert "no gain from concurrency to show" in less

    # One at a time, said so.
    one_at_a_time = _summary(concurrency=1, duration=4.1, work=3.9)
    assert "(sources ran one at a time: concurrency 1)" in one_at_a_time, one_at_a_time
    one_source = _summary(concurrency=4, duration=4.1, work=3.9, sources=1)
    assert "(one source: nothing ran side by side)" in one_source, one_source


# --- 4. a signal names the command it cancels -------------------------------------------


@needs_rsync
@pytest.mark.parametrize("command", [
    ("restore", "latest", "data", "--to", "{target}"),
    ("verify",),
    ("prune",),
])
def test_a_signal_names_the_command_it_cancels(ws: Workspace, command: tuple[str, ...]
                                               ) -> None:
    sources = source_toml("data", ws.make_source("data"))
    write_config(ws, [], sources=sources)
    assert ws.run("run", "-q").returncode == 0
    write_config(ws, [HookSpec("b1", block=("pre",))], sources=sources)
    args = [a.replace("{target}", str(ws.root / "restored")) for a in command]

    with Running(ws.start(*args)) as running:
        wait_marker(started_marker(ws, "b1", "pre"), running)
        running.send(signal.SIGINT)
        assert running.wait() == 130, running.stderr
    assert f"signal received; cancelling the {command[0]}" in running.stderr, running.stderr
    assert "the run" not in running.stderr
