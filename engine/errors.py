"""The engine's errors, and ``map_errors``, which makes them where a library's errors enter.

Every adapter (child processes, the destination's OS calls, the HTTP ping,
SMTP, SSH) converts what its library raises into one of these at its
boundary, as httpcore's ``map_exceptions`` does: a step then sees an engine
error whose message is one line for the report, or a bug, which the
pipeline records as an unexpected error and ``-v`` shows in full.

Errors about an OS call are OSErrors too (``errno``, ``strerror`` and
``filename`` as the call raised them), so code that handles an OSError
keeps handling them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping
    from contextlib import AbstractContextManager


class PibackupError(Exception):
    """Base of the errors that end a command with a message and no traceback."""


class ConfigError(PibackupError):
    """The configuration file cannot be used; ``problems`` lists every reason."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(f"{path}: {p}" for p in problems))


class LockHeld(PibackupError):
    """Another run holds the lock file."""

    def __init__(self, lock_path: str) -> None:
        self.lock_path = lock_path
        super().__init__(f"another run holds the lock {lock_path}")


class DestinationUnavailable(PibackupError):
    """The destination cannot be read as it is now (missing, or its disk not mounted)."""


class Interrupted(PibackupError):
    """A signal arrived before the lock was taken: nothing ran."""

    def __init__(self, signum: int | None) -> None:
        self.signum = signum
        super().__init__("interrupted before the run started")


class StepError(PibackupError):
    """Work outside the engine failed (a child, the disk, the network); the message is one
    line, fit for the report's ``failure``."""


class OSStepError(StepError, OSError):
    """A StepError caused by an OS call: also an OSError with that call's errno, strerror
    and filename; ``str()`` is the one-line message."""

    def __init__(self, message: str, cause: OSError | None = None) -> None:
        if cause is None:
            OSError.__init__(self, message)
        else:
            OSError.__init__(self, cause.errno, cause.strerror, cause.filename)
        self.message = message

    def __str__(self) -> str:
        return self.message


class CannotStart(OSStepError):
    """A child process could not be started: its program is missing or not executable."""


class DestinationError(OSStepError):
    """An OS call on the destination failed (an I/O error, a full disk, a vanished mount)."""


class DeliveryError(StepError):
    """The monitor ping or the mail could not be delivered (their adapters return this as
    the report's ``monitor`` or ``delivery``, never raise it out of a run)."""


def describe(error: BaseException) -> str:
    """``error`` in one line: an OSError by its strerror (and file), an engine error by its
    message, anything else by its type and text (``UnicodeError: label too long``)."""
    if isinstance(error, StepError):
        return _one_line(str(error))
    if isinstance(error, OSError) and error.strerror:
        where = error.filename if isinstance(error.filename, str) else None
        return f"{where}: {error.strerror}" if where else error.strerror
    text = _one_line(str(error))
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _one_line(text: str) -> str:
    return " ".join(text.split())


@contextmanager
def map_errors(mapping: Mapping[type[Exception], Callable[[Exception], Exception]]
               ) -> Iterator[None]:
    """Convert what the block raises: the first entry of ``mapping`` whose type matches
    makes the error raised instead (chained to the original, for ``-v``).

    Only ``Exception`` is looked at, never a cancellation; an engine error
    passes as it is, and so does anything ``mapping`` does not name (a bug
    stays a bug). Works around ``await`` too: an adapter's async calls sit
    inside the block.
    """
    try:
        yield
    except PibackupError:
        raise
    except Exception as error:
        for kind, make in mapping.items():
            if isinstance(error, kind):
                raise make(error) from error
        raise


def os_errors(doing: str, kind: type[OSStepError] = DestinationError
              ) -> AbstractContextManager[None]:
    """``map_errors`` for OS calls: an OSError becomes ``kind`` (DestinationError by
    default), saying ``"<doing>: <strerror>"``.

        with os_errors(f"destination: cannot rename {path}"):
            os.rename(path, target)
    """
    return map_errors({OSError: lambda e: kind(f"{doing}: {_strerror(e)}", _as_os_error(e))})


def _strerror(error: Exception) -> str:
    return (error.strerror if isinstance(error, OSError) and error.strerror
            else _one_line(str(error)))


def _as_os_error(error: Exception) -> OSError | None:
    return error if isinstance(error, OSError) else None
