"""Work on the disk in worker threads: cancellable, waited for within a bound, else abandoned.

A walk of a backup (removing it, measuring it, reading it back) runs in a
worker thread, so the event loop always hears a signal (SPEC §2). A thread
cannot be cancelled from outside: it checks for a cancel between items and
stops there; one held in a system call by a dying disk is abandoned, so the
run still ends. ``in_worker`` runs such work, ``Progress`` bounds it by how
long it goes without moving.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread

if TYPE_CHECKING:
    from collections.abc import Callable

T = TypeVar("T")

# How long a cancelled worker thread is waited for before it is abandoned. It
# stops at its next check within microseconds, unless a dying disk holds it in
# a system call: then the run must still end.
STOP_WAIT_S = 10.0
# How often a worker thread that makes progress pushes its deadline on.
_PUSH_EVERY_S = 1.0


class Progress:
    """The deadline of work on the destination, pushed on as long as the work moves.

    ``scope`` is cancelled when the work has shown no progress for
    ``stall_s``: a removal of a big backup may take an hour, but never a
    minute between two files. A worker thread calls ``check`` between items
    (it lands a cancel there too); the event loop calls ``moved``.
    """

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self.scope = anyio.CancelScope(deadline=anyio.current_time() + stall_s)
        self._pushed = time.monotonic()

    def moved(self) -> None:
        self.scope.deadline = anyio.current_time() + self.stall_s

    def check(self) -> None:
        anyio.from_thread.check_cancelled()
        now = time.monotonic()
        # One trip to the event loop a second (more often under a short
        # bound), not one per file.
        if now - self._pushed >= min(_PUSH_EVERY_S, self.stall_s / 4):
            self._pushed = now
            anyio.from_thread.run_sync(self.moved)

    @property
    def stalled(self) -> bool:
        """The deadline has passed (read on the event loop)."""
        return anyio.current_time() >= self.scope.deadline


async def in_worker(func: Callable[..., T], *args: object, progress: Progress | None = None) -> T:
    """Run destination work that checks for cancellation in a worker thread.

    On cancel the worker stops at its next ``check_cancelled``; it is waited
    for (so nothing still holds the destination open when a post unmounts
    it), but at most STOP_WAIT_S: a thread stuck on a dying disk is abandoned
    rather than keep the run from ending. One whose ``progress`` stalled is
    stuck already and is not waited for.
    """
    started, finished = threading.Event(), threading.Event()

    def work() -> T:
        started.set()
        try:
            return func(*args)
        finally:
            finished.set()

    try:
        return await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():
        # A work item cancelled before a worker took it is never run at all:
        # only one that started has anything to stop.
        if started.is_set() and not (progress is not None and progress.stalled):
            with anyio.move_on_after(STOP_WAIT_S, shield=True):
                await anyio.to_thread.run_sync(finished.wait, STOP_WAIT_S,
                                               abandon_on_cancel=True)
        raise
