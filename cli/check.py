"""``check``: validate the configuration and what it names; with ``--connect``, reach out."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import anyio
import structlog
from pibackup_async.engine import Config, preflight
from pibackup_async.engine.preflight import details, state_problems, writable_by_others

from .exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:
    import argparse

    from pibackup_async.engine.config import Smtp

log = structlog.get_logger("pibackup")


def check_command(args: argparse.Namespace, config: Config) -> int:
    problems, warnings = preflight(config)
    # Unusable, or open to other users (`run` only warns about those): either way an error.
    unusable = state_problems(config) + writable_by_others(config)
    for warning in warnings:
        log.warning(warning)
    if args.verbose:
        for line in details(config):
            print(line, file=sys.stderr)
    for problem in problems:
        print(f"error: {args.config or 'configuration'}: {problem}", file=sys.stderr)
    for problem in unusable:
        print(f"error: {problem}", file=sys.stderr)
    # What the file asks for cannot work (a btrfs source that is no
    # subvolume): a configuration error, like the refusals at load time.
    if problems:
        return EXIT_USAGE
    # The file is right but state_dir or the lock is not: `run` fails (exit 1).
    failed = bool(unusable)
    if args.connect or args.send_test:
        failed = bool(anyio.run(_connect, config, args.send_test, backend="asyncio")) or failed
    if failed:
        return EXIT_FAILED
    print(f"{args.config or 'configuration'}: ok ({len(config.sources)} sources, "
          f"{len(config.backup_hooks) + len(config.snapshot_hooks)} hooks)", file=sys.stderr)
    return EXIT_OK


async def _connect(config: Config, send_test: bool) -> int:
    """``check --connect``: try every host (and the mail server); count what failed."""
    from pibackup_async.engine.remote import check_hosts

    failed = 0
    if config.origin is not None:
        failed += await _check_origin(config)
        origin_host = config.origin.host
        if origin_host is not None:
            # The origin's key runs nothing but `serve`: `true` is not how it is tried.
            import msgspec

            config = msgspec.structs.replace(config, hosts={
                name: host for name, host in config.hosts.items() if name != origin_host})
    for name, problem in (await check_hosts(config)).items():
        if problem is None:
            print(f"host {name}: ok", file=sys.stderr)
        else:
            print(f"error: {problem}", file=sys.stderr)
            failed += 1
    if config.monitor is not None and config.monitor.ping_url is not None:
        # The server only, never the check itself: a HEAD of scheme://host/.
        from pibackup_async.engine.monitor import check_ping_server

        problem = await check_ping_server(config.monitor.ping_url)
        if problem is None:
            print("monitor ping server: answers", file=sys.stderr)
        else:
            print(f"error: monitor ping server {problem}", file=sys.stderr)
            failed += 1
    if config.report is None:
        if send_test:
            print("error: --send-test needs a [report] table", file=sys.stderr)
            failed += 1
        return failed
    from pibackup_async.engine.mail import check_smtp

    problem = await check_smtp(config.report, send_test=send_test)
    what = _smtp_tried(config.report.smtp)
    if send_test:
        what += ", test message sent"
    if problem is None:
        print(f"mail server {config.report.smtp.host}: {what}", file=sys.stderr)
    else:
        print(f"error: mail server {config.report.smtp.host}: {problem}", file=sys.stderr)
        failed += 1
    return failed


async def _check_origin(config: Config) -> int:
    """A mirror's origin (SPEC §10): it can be read, and its key cannot write there."""
    from pibackup_async.engine.mirror_ssh import check_origin, origin_of

    problems = await check_origin(config)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not problems:
        remote = config.origin is not None and config.origin.host is not None
        print(f"origin {origin_of(config).label}: ok"
              + (" (read through a key that cannot write there)" if remote else ""),
              file=sys.stderr)
    return len(problems)


def _smtp_tried(smtp: Smtp) -> str:
    """What ``check --connect`` did with the mail server: only what it tried is called ok."""
    login = smtp.username is not None
    if smtp.security == "none":
        return "connected (no TLS), login ok" if login else "connected (no TLS, no login)"
    tls = "STARTTLS" if smtp.security == "starttls" else "TLS"
    return f"connected, {tls} and login ok" if login else f"connected, {tls} ok, no login"
