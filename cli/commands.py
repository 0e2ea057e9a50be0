"""The subcommands: each loads the configuration, calls the engine and returns an exit code."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import anyio
import msgspec
import structlog
from pibackup_async.engine.config import command_problem, load_config
from pibackup_async.engine.errors import ConfigError
from pibackup_async.engine.secret_env import withhold_secrets

from .exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from .logs import configure_logging
from .render import listing_table, summary_table  # at start: a run may outlive an upgrade

# What one command alone uses is imported by that command when it runs: each
# module loaded delays every command's start, from a cold page cache (issue 21).
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

    from pibackup_async.engine import Config, Listed, Report


log = structlog.get_logger("pibackup")



def dispatch(args: argparse.Namespace, config_path: str) -> int:
    configure_logging(args.log_format, -1 if args.quiet else (1 if args.verbose else 0))
    if args.command == "init":
        from .init import init_command  # writes a configuration: there is none to load

        return init_command(args, args.output or config_path)
    try:
        config = load_config(config_path)
    except ConfigError as e:
        for problem in e.problems:
            print(f"error: {e.path}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    withhold_secrets(config)
    refused = command_problem(config, args.command)
    if refused is not None:
        print(f"error: {config_path}: {refused}", file=sys.stderr)
        return EXIT_USAGE
    command: Callable[[argparse.Namespace, Config], int] = {
        "run": _run, "check": _check, "list": _list, "prune": _prune,
        "restore": _restore, "diff": _diff, "du": _du, "verify": _verify,
        "mirror": _mirror,
    }[args.command]
    return command(args, config)


def _check(args: argparse.Namespace, config: Config) -> int:
    from .check import check_command

    return check_command(args, config)


def _restore(args: argparse.Namespace, config: Config) -> int:
    from .restore import restore_command

    return restore_command(args, config)


def _diff(args: argparse.Namespace, config: Config) -> int:
    from .inspect import diff_command

    return diff_command(args, config)


def _du(args: argparse.Namespace, config: Config) -> int:
    from .inspect import du_command

    return du_command(args, config)


def _mirror(args: argparse.Namespace, config: Config) -> int:
    from .mirror import mirror_command

    return mirror_command(args, config)


def _verify(args: argparse.Namespace, config: Config) -> int:
    from .verify import verify_command

    return verify_command(args, config)


def _run(args: argparse.Namespace, config: Config) -> int:
    from pibackup_async.engine.context import RunOptions
    from pibackup_async.engine.pipeline import run_backup
    from pibackup_async.engine.plan import plan_run

    from .progress import wanted
    from .running import under_signals

    if args.dry_run:
        print("\n".join(anyio.run(plan_run, config, args.jobs, args.no_report,
                                   backend="asyncio")))
        return EXIT_OK
    options = RunOptions(jobs=args.jobs, no_report=args.no_report)
    show = (args.log_format == "console" and not args.quiet and sys.stderr.isatty())
    return under_signals("run", lambda interruption: run_backup(config, options, interruption),
                         after=_print_summary if show else None,
                         progress="run" if wanted(args) else None)


def _print_summary(report: Report) -> None:
    """The end-of-run summary on a terminal (SPEC §8), on stderr."""
    print(summary_table(report), file=sys.stderr)


def _read_backups(config: Config) -> list[Listed] | None:
    """The destination as it is (no lock, no hook); None, said on stderr, if unreadable."""
    from pibackup_async.engine.errors import DestinationUnavailable
    from pibackup_async.engine.listing import list_backups

    try:
        return list_backups(config)
    except DestinationUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    except OSError as e:
        print(f"error: cannot read the destination {config.destination}: {e.strerror} "
              "(is the backup disk mounted?)", file=sys.stderr)
        return None


def _list(args: argparse.Namespace, config: Config) -> int:
    rows = _read_backups(config)
    if rows is None:
        return EXIT_FAILED
    if args.json:
        print(msgspec.json.encode(rows).decode())
    else:
        print(listing_table(rows))
    return EXIT_OK


def _prune(args: argparse.Namespace, config: Config) -> int:
    name: str | None = args.discard
    if not args.dry_run:
        from pibackup_async.engine.pruning import discard_backup, prune_backups

        from .running import under_signals

        if name is not None:
            return under_signals("prune", lambda interruption: discard_backup(
                config, interruption, name))
        return under_signals("prune", lambda interruption: prune_backups(config, interruption))
    rows = _read_backups(config)
    if rows is None:
        return EXIT_FAILED
    if name is not None and not any(r.name == name and r.state == "complete" for r in rows):
        print(f"error: prune --discard: {name} is not a complete backup in "
              f"{config.destination}", file=sys.stderr)
        return EXIT_FAILED
    doomed = ([name] if name is not None else
              [r.name for r in rows if r.state == "complete" and not r.kept_by])
    for backup in doomed:
        print(f"would delete {os.path.join(config.destination, backup)}")
    kept = sum(1 for r in rows if r.state == "complete" and r.name not in doomed)
    print(f"dry run: {len(doomed)} backups would be deleted, {kept} kept; nothing was changed")
    return EXIT_OK
