"""The run lock (SPEC §2 "One run at a time") and the private state folder it lives in."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

import structlog

from .errors import LockHeld, PibackupError
from .preflight import read_only_warnings, state_problems, writable_by_others
from .private_dir import make_private_dir

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .config import Config

log = structlog.get_logger("pibackup")


class StateUnusable(PibackupError):
    """``state_dir`` or ``lock_file`` cannot be used; the message names the path and why."""


@contextmanager
def run_lock(lock_path: str) -> Iterator[None]:
    """Hold an exclusive flock on ``lock_path`` for the block.

    Raises LockHeld if another run holds it, StateUnusable if the file is a
    symbolic link, not a regular file or owned by another user. The link is
    never followed (O_NOFOLLOW), so a planted link cannot make the engine
    truncate a file elsewhere. The descriptor is close-on-exec: a stray child
    can never keep the lock alive. On a read-only filesystem the lock is
    taken on the file opened read-only, or on its folder where the file
    cannot be created (SPEC §2).
    """
    parent = os.path.dirname(lock_path) or "."
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise StateUnusable(f"lock_file {lock_path} cannot be created: its folder {parent}: "
                            f"{e.strerror or e}") from None
    fd, opened = _open_lock(lock_path, parent)
    try:
        st = os.fstat(fd)
        # The folder is judged with state_dir, or, for a lock_file of its own,
        # by who else can write it (writable_by_others).
        if opened != "folder":
            if not stat.S_ISREG(st.st_mode):
                raise StateUnusable(f"lock_file {lock_path} is not a regular file")
            if st.st_uid != os.geteuid():
                raise StateUnusable(f"lock_file {lock_path} is owned by uid {st.st_uid}, "
                                    f"not by this user (uid {os.geteuid()})")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockHeld(lock_path) from None
            raise
        if opened == "file":
            try:
                # Who holds it, for a person looking; a full disk must not stop the run.
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except OSError:
                pass
        yield
    finally:
        os.close(fd)


def _open_lock(lock_path: str, parent: str
               ) -> tuple[int, Literal["file", "read-only file", "folder"]]:
    """The descriptor to flock, and what it was opened on."""
    nofollow = os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(lock_path, os.O_RDWR | os.O_CREAT | nofollow, 0o600), "file"
    except OSError as e:
        if e.errno != errno.EROFS:
            raise _unopenable(lock_path, e) from None
    # A filesystem remounted read-only after errors: flock asks for no write
    # access, so the file as it is, or else the folder that would hold it,
    # still keeps two runs apart — and the run goes on to mail its report.
    try:
        return os.open(lock_path, os.O_RDONLY | nofollow), "read-only file"
    except FileNotFoundError:
        pass
    except OSError as e:
        raise _unopenable(lock_path, e) from None
    try:
        return os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), "folder"
    except OSError as e:
        raise StateUnusable(f"lock_file {lock_path} cannot be created (read-only filesystem) "
                            f"and its folder cannot be opened to lock instead: "
                            f"{e.strerror or e}") from None


def _unopenable(lock_path: str, e: OSError) -> StateUnusable:
    if e.errno == errno.ELOOP:
        return StateUnusable(f"lock_file {lock_path} is a symbolic link; refusing to follow it")
    if e.errno == errno.EISDIR:
        return StateUnusable(f"lock_file {lock_path} is a folder, not a file")
    return StateUnusable(f"lock_file {lock_path} cannot be opened: {e.strerror}")


@contextmanager
def private_state(config: Config) -> Iterator[list[str]]:
    """Step 0: check ``state_dir`` and ``lock_file``, create ``state_dir`` (0700), hold the lock.

    Raises StateUnusable (one line naming the path) before anything else
    happens, LockHeld if another run holds the lock. Yields (and logs) the
    warnings: a read-only filesystem under them, folders on their way that
    other users can write (the paths are still used while usable: a warning
    costs no night's backup).
    """
    problems = state_problems(config)
    if problems:
        raise StateUnusable(problems[0])
    try:
        make_private_dir(config.state_dir)
    except OSError as e:
        raise StateUnusable(f"state_dir {config.state_dir} cannot be created: "
                            f"{e.strerror or e}") from None
    with run_lock(config.lock_path):
        warnings = read_only_warnings(config) + writable_by_others(config)
        for warning in warnings:
            log.warning(warning)
        yield warnings
