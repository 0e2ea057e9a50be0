"""``diff`` and ``du``: read the destination as it is, no lock, no hook (SPEC §7).

The reading runs in worker threads (a signal is always heard and stops it);
``diff`` writes its lines from there as it finds them, so memory stays
bounded whatever the number of changes.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, TextIO

import anyio
import anyio.from_thread
import msgspec
from pibackup_async.engine import Interruption, PibackupError
from pibackup_async.engine.destination import destination_problem
from pibackup_async.engine.diffing import (
    Change,
    Summary,
    check_args,
    diff_backups,
    holds_source,
    pick_backups,
    source_names,
)
from pibackup_async.engine.lookup import UsageProblem
from pibackup_async.engine.pathtext import show_path
from pibackup_async.engine.threads import in_worker
from pibackup_async.engine.units import human_bytes
from pibackup_async.engine.usage import Usage, measure

from .exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE, exit_for_signal
from .signals import SignalBridge

if TYPE_CHECKING:
    import argparse
    from collections.abc import Awaitable, Callable

    from pibackup_async.engine import Config


def _under_signals(command: str, work: Callable[[], Awaitable[int]]) -> int:
    """Run ``work`` with SIGINT/SIGTERM/SIGHUP turned into a cancel of ``command`` (exit
    128+n)."""
    interruption = Interruption(command)
    bridge = SignalBridge()
    bridge.install()

    async def main() -> int:
        bridge.connect(interruption.trigger)
        try:
            with anyio.CancelScope() as scope:
                interruption.attach(scope)
                return await work()
            return EXIT_FAILED  # cancelled: the signal decides the exit code
        finally:
            bridge.disconnect()

    code = anyio.run(main, backend="asyncio")
    if interruption.signum is not None:
        return exit_for_signal(interruption.signum)
    return code


async def _readable(config: Config) -> bool:
    problem = await in_worker(destination_problem, config)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
    return problem is None


def _failed(e: Exception, config: Config) -> int:
    if isinstance(e, OSError) and not isinstance(e, PibackupError):
        where = e.filename if e.filename is not None else config.destination
        print(f"error: cannot read {os.fsdecode(where)}: {e.strerror or e}", file=sys.stderr)
    else:
        print(f"error: {e}", file=sys.stderr)
    return EXIT_FAILED


# --- diff ------------------------------------------------------------------------------


def _size_text(item: Change) -> str:
    old, new = item.old_size, item.new_size
    if old is not None and new is not None and old != new:
        return f"{old}->{new}"
    size = new if new is not None else old
    return "-" if size is None else str(size)


def _summary_text(source: str, summary: Summary, where: str) -> str:
    if summary.empty:
        return f"{source}: no changes{where}"
    return (f"{source}: {summary.added} added, {summary.removed} removed, "
            f"{summary.changed} changed, {summary.retyped} retyped; "
            f"{summary.bytes_added} bytes added, {summary.bytes_removed} bytes removed{where}")


def _write_diff(out: TextIO, destination: str, old: str, new: str, sources: list[bytes],
                as_json: bool, check: Callable[[], None]) -> None:
    """Runs in a worker thread: every change of every source, written as found."""
    encode = msgspec.json.Encoder().encode
    if as_json:
        out.write("[")
    else:
        out.write(f"{old} -> {new}\n")
    separator = "\n"
    for source in sources:
        shown = show_path(source)
        summary = Summary()
        if not as_json:
            out.write(f"\n{shown}\n")
        for item in diff_backups(destination, old, new, source, check):
            summary.count(item)
            path = show_path(item.path)
            if as_json:
                out.write(separator)
                out.write(encode({"source": shown, "path": path, "change": item.change,
                                  "old_size": item.old_size,
                                  "new_size": item.new_size}).decode())
                separator = ",\n"
            else:
                out.write(f"{item.change} {_size_text(item):>12}  {path}\n")
        if not as_json:
            in_old = holds_source(destination, old, source)
            in_new = holds_source(destination, new, source)
            where = "" if in_old == in_new else (f" (only in {new})" if in_new
                                                  else f" (only in {old})")
            out.write(_summary_text(shown, summary, where) + "\n")
    if as_json:
        out.write("\n]\n" if separator != "\n" else "]\n")
    out.flush()


def diff_command(args: argparse.Namespace, config: Config) -> int:
    try:
        check_args(args.old, args.new)
        if args.source is not None and (not args.source or "/" in args.source
                                        or args.source in (".", "..", ".pibackup")):
            raise UsageProblem(f"--source {args.source!r} is not a source folder's name")
    except UsageProblem as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE

    async def work() -> int:
        if not await _readable(config):
            return EXIT_FAILED
        dest = config.destination
        try:
            old, new = await in_worker(pick_backups, dest, args.old, args.new)
            sources = await in_worker(source_names, dest, old, new, args.source)
            await in_worker(_write_diff, sys.stdout, dest, old, new, sources, args.json,
                             anyio.from_thread.check_cancelled)
        except BrokenPipeError:
            raise  # stdout closed early (`diff | head`): main stops quietly
        except (PibackupError, OSError) as e:
            return _failed(e, config)
        return EXIT_OK

    return _under_signals("diff", work)


# --- du --------------------------------------------------------------------------------


def usage_table(usage: Usage) -> str:
    """One line a backup, newest first, then the destination's total."""
    rows = [("BACKUP", "TOTAL", "EXCLUSIVE")]
    rows += [(b.name, human_bytes(b.total_bytes), human_bytes(b.exclusive_bytes))
             for b in usage.backups]
    rows.append(("destination", human_bytes(usage.destination_bytes), ""))
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{width[0]}}  {b:>{width[1]}}  {c:>{width[2]}}".rstrip() for a, b, c in rows]
    if not usage.backups:
        lines.insert(1, "no complete backups")
    return "\n".join(lines)


def du_command(args: argparse.Namespace, config: Config) -> int:
    async def work() -> int:
        if not await _readable(config):
            return EXIT_FAILED
        try:
            usage = await measure(config.destination)
        except (PibackupError, OSError) as e:
            return _failed(e, config)
        if args.json:
            print(msgspec.json.encode(usage).decode())
        else:
            print(usage_table(usage))
        return EXIT_OK

    return _under_signals("du", work)

