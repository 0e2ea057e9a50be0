"""The ``pibackup-async`` command: parse arguments, then hand over to the subcommand."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from typing import TYPE_CHECKING, NoReturn

from .exit_codes import EXIT_FAILED, EXIT_OK, exit_for_signal

if TYPE_CHECKING:
    from collections.abc import Sequence

DEFAULT_CONFIG = "/etc/pibackup-async/config.toml"


def _jobs(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _backup_name(text: str) -> str:
    from pibackup_async.engine.names import parse_name  # not for --help: it stays fast

    if parse_name(text) is None:
        raise argparse.ArgumentTypeError(
            f"not a backup name (such as 2021-04-02t07-00-12+0200): {text!r}")
    return text


# What bash completion offers for a path option, in shtab's terms (the
# generated completions/pibackup-async.bash; shtab itself is never imported).
_FILES = {"bash": "_shtab_compgen_files", "zsh": "_files", "tcsh": "f"}
_FOLDERS = {"bash": "_shtab_compgen_dirs", "zsh": "_files -/", "tcsh": "d"}


def _paths(action: argparse.Action, kind: dict[str, str]) -> None:
    action.complete = kind  # type: ignore[attr-defined]


def _common(*, top: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after its name.

    Given after the name they win; the subcommands' copies default to
    SUPPRESS so that they never overwrite what was given before the name.
    """
    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    common = argparse.ArgumentParser(add_help=False)
    _paths(common.add_argument("-c", "--config", default=default(None),
                               help="configuration file (default: $PIBACKUP_CONFIG, "
                               f"then {DEFAULT_CONFIG})"), _FILES)
    common.add_argument("--log-format", choices=("console", "json"), default=default("console"),
                        help="log lines on stderr: human-readable (default) or JSON")
    noise = common.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="store_true", default=default(False),
                       help="debug logs")
    noise.add_argument("-q", "--quiet", action="store_true", default=default(False),
                       help="warnings and errors only")
    return common


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pibackup-async")
    except PackageNotFoundError:
        return "unknown"


class _Version(argparse.Action):
    """``--version``, looked up only when asked: reading the installed metadata costs
    0.1 s, which every other command would pay at start-up."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(f"pibackup-async {_version()}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pibackup-async",
        description="Concurrent backups of a small server: hooks, rsync sources, reports.",
        parents=[_common(top=True)],
    )
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="show the version and exit")
    common = _common(top=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", parents=[common], help="make one backup")
    run.add_argument("-j", "--jobs", type=_jobs, help="sources at once (overrides concurrency)")
    run.add_argument("--dry-run", action="store_true",
                     help="print every step and command, change nothing")
    run.add_argument("--no-progress", action="store_true", help="no live progress")
    run.add_argument("--no-report", action="store_true",
                     help="send no mail (the JSON report is still written)")

    check = commands.add_parser("check", parents=[common], help="validate the configuration")
    check.add_argument("--connect", action="store_true",
                       help="also connect to SSH hosts and the mail server")
    check.add_argument("--send-test", action="store_true", help="mail a test message")

    listing = commands.add_parser("list", parents=[common], help="list backups")
    listing.add_argument("--json", action="store_true", help="a JSON array instead of a table")

    prune = commands.add_parser("prune", parents=[common], help="apply retention alone")
    prune.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")
    prune.add_argument("--discard", metavar="NAME", type=_backup_name,
                       help="delete that one backup instead, whatever keeps it (a backup "
                            "dated ahead by a wrong clock)")

    restore = commands.add_parser("restore", parents=[common],
                                  help="copy a backup (or a file or folder of it) back")
    restore.add_argument("backup", metavar="BACKUP", help="a backup name, or latest")
    restore.add_argument("item", metavar="SOURCE[/PATH]",
                         help="a source of the backup, or a file or folder inside it")
    _paths(restore.add_argument("--to", required=True, metavar="TARGET",
                                help="a local folder (created if missing), or HOST:PATH"),
           _FOLDERS)
    restore.add_argument("--dry-run", action="store_true",
                         help="list what would change, write nothing")
    restore.add_argument("--delete", action="store_true",
                         help="remove files the backup does not have, inside the restored item")
    restore.add_argument("--no-progress", action="store_true", help="no live progress")

    diff = commands.add_parser("diff", parents=[common],
                               help="what changed between two backups")
    diff.add_argument("old", metavar="OLD", nargs="?", help="default: the second newest")
    diff.add_argument("new", metavar="NEW", nargs="?", help="default: the newest")
    diff.add_argument("--source", metavar="NAME", help="only this source")
    diff.add_argument("--json", action="store_true", help="a JSON array instead of lines")

    du = commands.add_parser("du", parents=[common], help="the size of every backup")
    du.add_argument("--json", action="store_true", help="JSON instead of a table")

    verify = commands.add_parser("verify", parents=[common],
                                 help="read a backup back; find what cannot be read")
    verify.add_argument("backup", metavar="BACKUP", nargs="?",
                        help="a backup name, or latest (default)")
    verify.add_argument("--all", action="store_true", dest="every",
                        help="every complete backup, oldest first")
    verify.add_argument("--source", metavar="NAME", help="only this source")
    verify.add_argument("--against-source", action="store_true",
                        help="also compare unchanged files with the live source")
    verify.add_argument("--sample", metavar="PERCENT",
                        help="read only the next of ceil(100/PERCENT) groups of the files")
    verify.add_argument("--no-progress", action="store_true", help="no live progress")

    init = commands.add_parser("init", parents=[common],
                               help="write a first configuration, every option commented")
    _paths(init.add_argument("--destination", metavar="PATH", help="where the backups go"),
           _FOLDERS)
    _paths(init.add_argument("--source", metavar="PATH", action="append", default=[],
                             dest="sources",
                             help="a folder or btrfs subvolume to back up (repeat)"), _FOLDERS)
    _paths(init.add_argument("--output", metavar="FILE",
                             help="default: -c, else $PIBACKUP_CONFIG, else " + DEFAULT_CONFIG),
           _FILES)

    mirror = commands.add_parser("mirror", parents=[common],
                                 help="copy the backups of [origin] that this destination lacks")
    mirror.add_argument("--dry-run", action="store_true",
                        help="print what would be copied and deleted, change nothing")
    mirror.add_argument("--no-report", action="store_true",
                        help="send no mail (the JSON report is still written)")
    mirror.add_argument("--no-progress", action="store_true", help="no live progress")

    serve = commands.add_parser("serve", parents=[common],
                                help="the forced command of a mirror's SSH key (on the origin)")
    serve.add_argument("--read-only", action="store_true", required=True,
                       help="let only reads through (the one mode there is)")
    _paths(serve.add_argument("path", metavar="PATH",
                              help="the folder served: rsync reads and btrfs send under it"),
           _FOLDERS)
    return parser


def _structlog_without_rich() -> None:
    """Import structlog without rich, which it would load (0.1 s) for tracebacks we never show.

    rich is for live progress alone, loaded when it is drawn; a night run
    without a terminal, and every command's start-up, are spared it. A
    ``None`` in ``sys.modules`` makes that one import fail, as if rich were
    not installed.
    """
    if "rich" in sys.modules or "structlog" in sys.modules:
        return
    sys.modules["rich"] = None  # type: ignore[assignment]
    try:
        import structlog.dev  # noqa: F401
    finally:
        del sys.modules["rich"]


def _children_without_threads() -> None:
    """On Python 3.11, wait for children through pidfds, as 3.12 does by default.

    3.11's default watcher starts (and waits for) a thread per child:
    about 1 ms of every rsync, ssh and hook the engine runs.
    """
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    import asyncio

    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return  # a kernel before 5.3, or a sandbox that refuses it
    asyncio.set_child_watcher(asyncio.PidfdChildWatcher())


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        # Before anything else is imported: sshd starts it for every rsync of a mirror.
        from .serve import serve

        return serve(args.path, os.environ)
    try:
        _structlog_without_rich()
        from .logs import hold_warnings

        hold_warnings()
        _children_without_threads()
        from .commands import dispatch  # deferred: `--help` stays fast

        code = dispatch(args, args.config or os.environ.get("PIBACKUP_CONFIG") or DEFAULT_CONFIG)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # stdout closed early (`list | head`): stop quietly. Python would
        # complain again when it flushes stdout at exit: point it elsewhere.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        # A Ctrl-C before the run installed its own handler: nothing started yet.
        print("pibackup-async: interrupted", file=sys.stderr)
        return exit_for_signal(signal.SIGINT)
    except Exception as e:
        # The last resort (SPEC §2): what escaped every step's and adapter's
        # mapping — a bug, or the process out of file descriptors — is one
        # line and exit 1; its traceback is for -v. Nothing is imported here:
        # the error may be that nothing more can be opened.
        if args.verbose:
            import traceback

            traceback.print_exc()
        else:
            # Freeing what the error held (a half-made event loop) runs
            # destructors that fail in turn; Python would print their
            # tracebacks as "Exception ignored in …".
            sys.unraisablehook = _ignore
        print(f"error: unexpected error: {_one_line(e)}", file=sys.stderr)
        return EXIT_FAILED  # SPEC §5: the command failed


def _ignore(unraisable: sys.UnraisableHookArgs) -> None:
    pass


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def every_warning_once() -> None:
    """Let every warning through once per place, deprecations of libraries included.

    Python hides a library's DeprecationWarning but shows a UserWarning; both
    go to the log (cli/logs.py), where ``-v`` decides. For the command's own
    process only (a test suite keeps its own filters); ``-W`` or
    PYTHONWARNINGS still win. Here, not in logs.py: importing that module
    loads structlog, which ``--help`` must not pay for.
    """
    if not sys.warnoptions:
        warnings.simplefilter("default")


def entry() -> NoReturn:
    """The command: ``main``, then an exit that skips the interpreter's teardown.

    Everything that matters is on disk and flushed by then (the report is
    fsynced, no child is left); tearing down a few hundred modules would cost
    every run about 35 ms, and a worker thread stuck on a dying disk (SPEC §2:
    abandoned) would hold a normal exit, and the exit code, forever.
    """
    every_warning_once()
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):
        pass  # the reader went away, or the stream was closed: nothing to keep
    os._exit(code)
