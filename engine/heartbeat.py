"""The heartbeat of long steps (SPEC §8): a journal shows that a long night run is alive.

Whenever live progress is not drawn, every source step, hook, deletion,
restore and verify lasting over a minute logs ``still running`` every minute,
with bytes and files where known. Steps register while they run (``beating``);
one ticker task, started by the command line around the work, logs for all of
them: no task per step, nothing that could change how a step ends.

The steps register in the ``Register`` of the task's context (``registered``):
each run has its own, which passes its steps on to the command's (the one
the ticker and live progress read), so two runs in one process never see
each other's steps. Outside any register (a test driving one adapter) a
process-wide one stands in.
"""

from __future__ import annotations

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


@dataclass
class Finished:
    """What the steps that have ended carried, for the run's line of live progress."""

    steps: int = 0
    bytes: int = 0
    # None until a step that counts its files has ended: an rsync copy knows its
    # bytes (from /proc), not its files.
    files: int | None = None

    def add(self, beat: Beat) -> None:
        self.steps += 1
        self.bytes += beat.bytes or 0
        if beat.files is not None:
            self.files = (self.files or 0) + beat.files


class Register:
    """The steps running in one run (or one command), and what the ended ones carried.

    A register made inside another (``parent``: a run inside the command
    that draws its progress) passes each step on to it as well.
    """

    def __init__(self, parent: Register | None = None) -> None:
        self.parent = parent
        self.finished = Finished()
        # By identity: a Beat is a mutable dataclass, not hashable.
        self._running: dict[int, Beat] = {}

    def running(self) -> list[Beat]:
        """Every step running now, oldest first."""
        return list(self._running.values())

    def _chain(self) -> Iterator[Register]:
        register: Register | None = self
        while register is not None:
            yield register
            register = register.parent


# Where the steps of code outside every register go (tests driving one adapter).
_outside = Register()
# The register of the run (or command) a task belongs to; None: ``_outside``.
_register: ContextVar[Register | None] = ContextVar("pibackup_register", default=None)
# The step a task is running, for the code deep inside it (rsync's probe, the
# btrfs stream) that knows how far it has got.
_current: ContextVar[Beat | None] = ContextVar("pibackup_beat", default=None)


def current() -> Beat | None:
    """The innermost step registered by this task (None outside any)."""
    return _current.get()


def current_register() -> Register | None:
    """The register this task's steps go to (None: none was set; the process-wide one)."""
    return _register.get()


@contextmanager
def registered(register: Register) -> Iterator[Register]:
    """Register the steps of the block (and of the tasks it starts) in ``register``."""
    token = _register.set(register)
    try:
        yield register
    finally:
        _register.reset(token)


def running() -> list[Beat]:
    """Every step running now in this task's register, oldest first (what progress draws)."""
    register = _register.get()
    return (register or _outside).running()


def finished_steps() -> Finished:
    """What the ended steps of this task's register carried."""
    register = _register.get()
    return finished if register is None else register.finished


# The ended steps outside every register (``finished_steps`` outside any).
finished = _outside.finished


@contextmanager
def beating(what: str, **fields: Any) -> Iterator[Beat]:
    """Register a step (``what``: "hook", "snapshot", "deletion", …) while the block runs."""
    beat = Beat(what, fields)
    register = _register.get()
    registers = list(register._chain()) if register is not None else [_outside]
    for each in registers:
        each._running[id(beat)] = beat
    token = _current.set(beat)
    try:
        yield beat
    finally:
        _current.reset(token)
        for each in registers:
            del each._running[id(beat)]
            # Outside every register: the module's ``finished``, which a test may replace.
            (each.finished if register is not None else finished).add(beat)


def beat_now(period: float = PERIOD_S) -> int:
    """Log ``still running`` for every step of this task's register that has run another
    ``period``; return how many."""
    now = time.monotonic()
    count = 0
    for beat in running():
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
