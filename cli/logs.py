"""Logging, configured once for the whole process: readable on a terminal, JSON lines on demand."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal, TextIO

if TYPE_CHECKING:
    from collections.abc import Iterator

import structlog

LogFormat = Literal["console", "json"]


class QuietStream:
    """stderr that never raises: logging must not change the run (SPEC §2).

    A terminal that went away, a closed pipe (``run 2>&1 | head -3``) or a
    full disk under a redirect make writes fail; the run goes on without
    its log rather than stop half-way with the disk mounted.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.raw = stream
        self.broken = False

    @contextmanager
    def redirected(self, target: TextIO) -> Iterator[None]:
        """Write through ``target`` for a while (live progress prints log lines above it)."""
        self._stream = target
        try:
            yield
        finally:
            self._stream = self.raw

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                self._stream.write(text)
            except (OSError, ValueError):
                self.broken = True
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self.broken = True

    def isatty(self) -> bool:
        try:
            return self._stream.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:
        return self._stream.encoding


def quiet_stderr() -> None:
    """Replace ``sys.stderr`` by a QuietStream, once."""
    if not isinstance(sys.stderr, QuietStream):
        sys.stderr = QuietStream(sys.stderr)


class _Warnings:
    """Python warnings, as log events rather than raw text on stderr (issue 17).

    A dependency's deprecation notice (cryptography's ``DSA is deprecated``
    when asyncssh is imported) is not the user's business and would break
    JSON lines: each warning becomes one debug event naming the library it
    came from, shown with ``-v`` only. Warnings raised before logging is
    configured are held and logged once it is.
    """

    def __init__(self) -> None:
        self.held: list[tuple[Warning | str, type[Warning], str]] = []
        self.configured = False
        # One event per library and warning: cryptography's DSA notice fires at
        # each of the five places asyncssh touches DSA.
        self.said: set[tuple[str, str, str]] = set()

    def show(self, message: Warning | str, category: type[Warning], filename: str,
             lineno: int, file: TextIO | None = None, line: str | None = None) -> None:
        if not self.configured:
            self.held.append((message, category, filename))
            return
        what = (library_of(filename), f"{category.__module__}.{category.__qualname__}",
                str(message))
        if what in self.said:
            return
        self.said.add(what)
        library, kind, text = what
        structlog.get_logger().debug("library warning", library=library, category=kind,
                                     warning=text)

    def replay(self) -> None:
        self.configured = True
        held, self.held = self.held, []
        for message, category, filename in held:
            self.show(message, category, filename, 0)


_warnings = _Warnings()


def hold_warnings() -> None:
    """Route Python warnings to the log from now on (held until logging is configured)."""
    warnings.showwarning = _warnings.show


def library_of(filename: str) -> str:
    """The top-level package a source file belongs to: ``asyncssh`` for
    ``…/site-packages/asyncssh/crypto/misc.py``; the file's own name elsewhere."""
    path = os.path.abspath(filename)
    for entry in sorted((os.path.abspath(p) for p in sys.path if p), key=len, reverse=True):
        if path.startswith(entry + os.sep):
            first = path[len(entry) + 1:].split(os.sep, 1)[0]
            return first.removesuffix(".py")
    return os.path.basename(path).removesuffix(".py")


_NAMED_EVENTS = ("run started", "run finished")


def _for_a_person(logger: object, method: str, event: structlog.typing.EventDict
                  ) -> structlog.typing.EventDict:
    """Only what a person reading along needs: a line reads at 100 columns.

    The backup's name where the run starts and ends, not on every line; the
    level only when it is not plain information; ``saved`` only when it says
    more than ``status``; durations to the hundredth (the JSON log and the
    report keep them all).
    """
    if event.get("event") not in _NAMED_EVENTS:
        event.pop("backup", None)
    if event.get("level") == "info":
        del event["level"]
    if event.get("status") == "ok" and event.get("saved") is True:
        del event["saved"]
    for key, value in event.items():
        if key.endswith("_s") and isinstance(value, float):
            event[key] = round(value, 2) if value < 10 else round(value, 1)
    return event


def configure_logging(fmt: LogFormat, verbosity: int) -> None:
    """Send structlog events to stderr; ``verbosity`` -1 quiet, 0 normal, 1 debug.

    Colours only when stderr is a terminal, so a journal or a redirected
    file stays readable. Standard-library loggers (asyncssh) go the same way.
    """
    quiet_stderr()
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    renderer: structlog.typing.Processor
    if fmt == "json":
        processors += [structlog.processors.TimeStamper(fmt="iso", utc=True),
                       structlog.processors.format_exc_info]
        renderer = structlog.processors.JSONRenderer()
    else:
        # For a person: local time to the second, as the backup names read,
        # and the backup's name said where the run starts and ends, not on
        # every line (JSON lines keep it everywhere, for filtering).
        processors += [structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=False),
                       _for_a_person]
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(), pad_event_to=20,
                                                 pad_level=False)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries that log through the standard library (asyncssh) get the same
    # renderer, so a JSON log stays JSON lines. Their INFO is chatty: shown
    # only with -v.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=processors,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.INFO if verbosity > 0 else logging.WARNING)
    hold_warnings()
    _warnings.replay()
