"""Live progress on a terminal (SPEC §8): a line per running step, one for the whole run.

It draws the heartbeat's register of running steps (``engine/heartbeat.py``),
which the steps keep current themselves (the btrfs stream, verify's readers)
or let be read when drawn (rsync's writes, from /proc): one task redraws it
twice a second, and the log lines go above it. rich is imported here only,
and only when drawing: ``--help`` and every night run without a terminal
never load it.
Drawing can never end a run: if it fails, the heartbeat takes over.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import TYPE_CHECKING, TextIO, cast

import anyio
import structlog
from pibackup_async.engine import heartbeat
from pibackup_async.engine.durations import format_duration
from pibackup_async.engine.units import human_bytes

from .logs import QuietStream

if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterator

    from pibackup_async.engine.heartbeat import Beat
    from rich.live import Live

log = structlog.get_logger("pibackup")

# Twice a second: a rate reads smoothly, and drawing stays under 1% of a CPU-bound run.
REFRESH_S = 0.5
# A rate over the last few seconds, not since the start: it says how fast
# the copy goes now.
_RATE_SAMPLES = 6
# Which of a step's fields names it, in this order.
_NAMING = ("source", "hook", "item", "backup", "folder")


def heartbeat_period() -> float:
    """The heartbeat's period: a minute; the tests shorten it (not a user setting)."""
    try:
        return float(os.environ.get("_PIBACKUP_HEARTBEAT_S", heartbeat.PERIOD_S))
    except ValueError:
        return heartbeat.PERIOD_S


def wanted(args: argparse.Namespace) -> bool:
    """Progress is drawn only for a person watching (SPEC §8)."""
    return (args.log_format == "console" and not args.quiet
            and not getattr(args, "no_progress", False) and sys.stderr.isatty())


class Rates:
    """Bytes per second of each running step, from the samples the drawer takes."""

    def __init__(self) -> None:
        self._samples: dict[int, deque[tuple[float, int]]] = {}

    def sample(self, beats: list[Beat], now: float) -> dict[int, float | None]:
        alive = {id(b) for b in beats}
        for key in [k for k in self._samples if k not in alive]:
            del self._samples[key]
        rates: dict[int, float | None] = {}
        for beat in beats:
            if beat.bytes is None:
                rates[id(beat)] = None
                continue
            samples = self._samples.setdefault(id(beat), deque(maxlen=_RATE_SAMPLES))
            samples.append((now, beat.bytes))
            (t0, b0), (t1, b1) = samples[0], samples[-1]
            rates[id(beat)] = (b1 - b0) / (t1 - t0) if t1 > t0 else None
        return rates


def step_line(beat: Beat, rate: float | None, now: float) -> str:
    """``snapshot data   1,234 files   12.3 MB   4.5 MB/s   35s``."""
    name = next((str(beat.fields[k]) for k in _NAMING if k in beat.fields), "")
    phase = beat.fields.get("phase")
    label = f"{beat.what} {name}" + (f" ({phase})" if phase else "")
    parts = [f"{label:<28}"]
    if beat.files is not None:
        parts.append(f"{beat.files:>9,} {_files(beat.files)}")
    if beat.bytes is not None:
        parts.append(f"{human_bytes(beat.bytes):>10}")
    if rate is not None:
        parts.append(f"{human_bytes(round(rate)):>10}/s")
    parts.append(format_duration(now - beat.started))
    return "  ".join(parts)


def run_line(command: str, beats: list[Beat], started: float, now: float) -> str:
    """The whole run: time so far, steps running and done, files (where counted) and bytes
    so far."""
    done = heartbeat.finished_steps()
    written = done.bytes + sum(b.bytes or 0 for b in beats)
    counts = [n for n in (done.files, *(b.files for b in beats)) if n is not None]
    # No step that counts files (rsync copies, hooks): say nothing rather than "0 files".
    files = f"{sum(counts):,} {_files(sum(counts))}, " if counts else ""
    return (f"{command} {format_duration(now - started)}: {len(beats)} running, "
            f"{done.steps} done, {files}{human_bytes(written)}")


def _files(count: int) -> str:
    return "file" if count == 1 else "files"


class _Drawn:
    """The progress on the screen now, and the lock that keeps a redraw off it meanwhile."""

    def __init__(self, live: Live) -> None:
        self.live = live
        self.lock = threading.Lock()


# Set while progress is drawn. One drawer a process: commands write their
# results (from any thread) through ``cleared`` without being handed it.
_drawn: _Drawn | None = None


@contextmanager
def cleared() -> Iterator[None]:
    """Erase the progress, if drawn, and keep it off the screen while the block writes.

    What the block writes to stdout then starts a line of its own and is
    followed by no frame when stdout is the same terminal; in a file it is
    unchanged. The progress comes back at the next redraw. Blocks only other
    writers of results, never the drawing: a stdout that does not drain
    stalls only the thread writing to it.
    """
    drawn = _drawn
    if drawn is None:
        yield
        return
    from rich.console import Group

    with drawn.lock:
        try:
            # Nothing to draw is drawn as nothing: the old frame is erased, the
            # cursor left at the start of its first line.
            drawn.live.update(Group(), refresh=True)
        except Exception:  # a drawing bug must not cost a result
            log.debug("erasing live progress failed", exc_info=True)
        yield


@contextmanager
def _logs_above(console: object, stream: QuietStream) -> Iterator[None]:
    """Log lines go through rich while it draws, so they print above the progress."""
    from rich.console import Console
    from rich.file_proxy import FileProxy

    assert isinstance(console, Console)
    with stream.redirected(cast("TextIO", FileProxy(console, stream.raw))):
        yield


async def draw(command: str) -> None:
    """Redraw progress until cancelled; on any failure, hand over to the heartbeat."""
    stream = sys.stderr
    if not isinstance(stream, QuietStream):
        await heartbeat.ticker(heartbeat_period())
        return
    try:
        await _draw(command, stream)
    except Exception:  # a drawing bug must not end the run: the journal still gets beats
        log.debug("live progress failed; falling back to the heartbeat", exc_info=True)
    await heartbeat.ticker(heartbeat_period())


async def _draw(command: str, stream: QuietStream) -> None:
    from rich.console import Console, Group
    from rich.live import Live
    from rich.text import Text

    # The console writes through its own QuietStream: a terminal that went
    # away stops the drawing, never the run.
    console = Console(file=cast("TextIO", QuietStream(stream.raw)), stderr=True)
    rates = Rates()
    started = time.monotonic()

    def frame() -> Group:
        now = time.monotonic()
        beats = heartbeat.running()
        for beat in beats:
            beat.refresh()
        rate = rates.sample(beats, now)
        lines = [run_line(command, beats, started, now)]
        lines += ["  " + step_line(b, rate[id(b)], now) for b in beats]
        return Group(*(Text(line, no_wrap=True, overflow="ellipsis") for line in lines))

    global _drawn
    # auto_refresh off: no drawing thread; this task redraws, between the
    # engine's own events.
    with Live(frame(), console=console, auto_refresh=False, transient=True,
              redirect_stdout=False, redirect_stderr=False) as live, \
            _logs_above(console, stream):
        drawn = _drawn = _Drawn(live)
        try:
            while True:
                await anyio.sleep(REFRESH_S)
                shown = frame()
                # A result being written: skip this redraw rather than wait, on the
                # event loop, for a stdout that may not drain.
                if drawn.lock.acquire(blocking=False):
                    try:
                        live.update(shown, refresh=True)
                    finally:
                        drawn.lock.release()
        finally:
            _drawn = None
