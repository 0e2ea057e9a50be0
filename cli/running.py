"""Running a command of the engine from the CLI: signals become a cancel, and the outcome an
exit code.

``run``, ``prune``, ``restore`` and ``verify`` share it; meanwhile live
progress is drawn, or long steps log a heartbeat.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import anyio
from pibackup_async.engine import Interrupted, Interruption, LockHeld, PibackupError
from pibackup_async.engine.heartbeat import Register, registered, ticker
from pibackup_async.engine.lock import StateUnusable

from .exit_codes import EXIT_FAILED, EXIT_LOCKED, EXIT_OK, exit_for_signal
from .progress import draw, heartbeat_period
from .signals import SignalBridge

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from pibackup_async.engine import Report


def under_signals(command: str, work: Callable[[Interruption], Awaitable[Report]],
                  after: Callable[[Report], None] | None = None,
                  progress: str | None = None) -> int:
    """Run ``work`` with SIGINT/SIGTERM/SIGHUP turned into a cancel of ``command``; map its
    outcome to an exit code.

    Meanwhile live progress is drawn, named ``progress``, or else long steps
    log a heartbeat.
    """
    interruption = Interruption(command)
    bridge = SignalBridge()
    bridge.install()

    async def main() -> Report | PibackupError:
        bridge.connect(interruption.trigger)
        outcome: Report | PibackupError
        try:
            # The command's register: the steps of its run, which progress draws.
            with registered(Register()):
                async with anyio.create_task_group() as tg:
                    if progress is not None:
                        tg.start_soon(draw, progress)
                    else:
                        tg.start_soon(ticker, heartbeat_period())
                    try:
                        outcome = await work(interruption)
                    except (LockHeld, StateUnusable, Interrupted) as e:
                        outcome = e
                    tg.cancel_scope.cancel()
        finally:
            bridge.disconnect()
        return outcome

    outcome = anyio.run(main, backend="asyncio")
    if isinstance(outcome, LockHeld):
        print(f"error: another run holds the lock {outcome.lock_path}; not starting",
              file=sys.stderr)
        return EXIT_LOCKED
    if isinstance(outcome, Interrupted):
        return exit_for_signal(outcome.signum)
    if isinstance(outcome, PibackupError):
        print(f"error: {outcome}", file=sys.stderr)
        return EXIT_FAILED
    if after is not None:
        after(outcome)
    if outcome.status == "interrupted":
        return exit_for_signal(interruption.signum)
    if outcome.status != "ok" or "failed" in (outcome.delivery.status, outcome.monitor.status):
        return EXIT_FAILED
    return EXIT_OK
