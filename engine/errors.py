"""Errors the engine raises to its caller; each maps to one exit code in the CLI."""

from __future__ import annotations


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
