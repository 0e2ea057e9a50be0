"""The heartbeat of long steps (SPEC §8): a journal shows that a long night run is alive.

Whenever live progress is not drawn, every source step, hook, deletion,
restore and verify lasting over a minute logs ``still running`` every minute,
with bytes and files where known. Steps register while they run (``beating``);
one ticker task, started by the command line around the work, logs for all of
them: no task per step, nothing that could change how a step ends.
"""

from __future__ import annotations

import itertools
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import structlog

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

log = structlog.get_logger("pibackup")

PERIOD_S = 60.0
_TICK_S = 1.0


@dataclass
class Beat:
    """One running step; its owner may update ``bytes`` and ``files`` as they grow.

    Or it sets ``probe``, which reads them where they are kept (a child
    process's counters) when someone looks: ``refresh``.
    """

    what: str
    fields: dict[str, Any]
    started: float = field(default_factory=time.monotonic)
    bytes: int | None = None
    files: int | None = None
    beats: int = 0
    probe: Callable[[Beat], None] | None = None

    def refresh(self) -> None:
        """Bring ``bytes`` and ``files`` up to date; a failing probe only stops probing."""
        if self.probe is not None:
            try:
                self.probe(self)
            except Exception:
                self.probe = None


_running: dict[int, Beat] = {}
_ids = itertools.count()
# The step a task is running, for the code deep inside it (rsync's probe, the
# btrfs stream) that knows how far it has got.
_current: ContextVar[Beat | None] = ContextVar("pibackup_beat", default=None)


def current() -> Beat | None:
    """The innermost step registered by this task (None outside any)."""
    return _current.get()


def running() -> list[Beat]:
    """Every step running now, oldest first (what live progress draws)."""
    return list(_running.values())


@dataclass
class Finished:
    """What the steps that have ended carried, for the run's line of live progress."""

    steps: int = 0
    bytes: int = 0
    # None until a step that counts its files has ended: an rsync copy knows its
    # bytes (from /proc), not its files.
    files: int | None = None


finished = Finished()


@contextmanager
def beating(what: str, **fields: Any) -> Iterator[Beat]:
    """Register a step (``what``: "hook", "snapshot", "deletion", …) while the block runs."""
    key = next(_ids)
    beat = Beat(what, fields)
    _running[key] = beat
    token = _current.set(beat)
    try:
        yield beat
    finally:
        _current.reset(token)
        del _running[key]
        finished.steps += 1
        finished.bytes += beat.bytes or 0
        if beat.files is not None:
            finished.files = (finished.files or 0) + beat.files


def beat_now(period: float = PERIOD_S) -> int:
    """Log ``still running`` for every step that has run another ``period``; return how many."""
    now = time.monotonic()
    count = 0
    for beat in list(_running.values()):
        elapsed = now - beat.started
        if elapsed < (beat.beats + 1) * period:
            continue
        beat.beats = int(elapsed // period)
        beat.refresh()
        extra = {k: v for k, v in (("bytes", beat.bytes), ("files", beat.files)) if v is not None}
        log.info("still running", step=beat.what, running_s=round(elapsed), **beat.fields,
                 **extra)
        count += 1
    return count


async def ticker(period: float = PERIOD_S, tick: float = _TICK_S) -> None:
    """A heartbeat for each step every ``period`` seconds of its run, checked every ``tick``."""
    while True:
        await anyio.sleep(tick)
        beat_now(period)
