"""Signals for the whole life of a run: SIGINT, SIGTERM and SIGHUP become a cancel.

Children run in their own sessions and never see the terminal's Ctrl-C or
hang-up (NOTES pitfall 2): the engine catches the signal and ends them.
Plain ``signal.signal`` handlers are used rather than the event loop's,
because they must outlive the loop: a signal after the report was written
(while Python winds down) must neither kill the process nor change its exit
code. A signal that was already ignored when we started (``nohup``, a
script's background job) stays ignored.
"""

from __future__ import annotations

import asyncio
import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class SignalBridge:
    """Hands signals to the running event loop; before and after it, keeps them."""

    def __init__(self) -> None:
        self.early: list[int] = []
        self._target: Callable[[int], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self) -> None:
        for signum in HANDLED:
            if signal.getsignal(signum) is signal.SIG_IGN:
                continue
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Runs in the main thread between two bytecodes, possibly inside a
        # write to stderr: no logging here, only a hand-over to the loop.
        loop, target = self._loop, self._target
        if loop is None or target is None:
            self.early.append(signum)
            return
        try:
            loop.call_soon_threadsafe(target, signum)
        except RuntimeError:  # the loop is closing
            self.early.append(signum)

    def connect(self, target: Callable[[int], None]) -> None:
        """From now on (in the running loop) every signal goes to ``target``; earlier ones too."""
        self._loop = asyncio.get_running_loop()
        self._target = target
        pending, self.early = self.early, []
        for signum in pending:
            target(signum)

    def disconnect(self) -> None:
        """Later signals are kept, and change nothing."""
        self._loop = None
        self._target = None
