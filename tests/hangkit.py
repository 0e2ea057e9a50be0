"""A destination that stops answering, for real: a FUSE mount whose daemon never answers.

No FUSE library or daemon is needed: the test opens ``/dev/fuse``, mounts it
over a folder (``mount(2)`` through ctypes) and then never reads a request,
not even the kernel's INIT. From then on every access at or below the mount
point waits, as on a disk that died under a process or a hung network mount;
only SIGKILL ends a process that waits there (so rsync ignores its SIGTERM,
as it does on a dying disk). ``stop`` closes the descriptor, which aborts the
connection (every waiter gets ENOTCONN), and detaches the mount. Nothing of
the test itself may touch the folder between ``start`` and ``stop``: it
would wait too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_MNT_DETACH = 2


def skip_reason() -> str | None:
    """Why a hanging mount cannot be made here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (mount)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    return None


needs_fuse = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")


class Hang:
    """A mount over ``folder`` that never answers, between ``start`` and ``stop``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._fd: int | None = None

    def start(self) -> None:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        options = f"fd={fd},rootmode=40000,user_id=0,group_id=0".encode()
        if _libc.mount(b"pibackup-hang", os.fsencode(self.folder), b"fuse", 0, options) != 0:
            code = ctypes.get_errno()
            os.close(fd)
            pytest.skip(f"cannot mount FUSE here: {os.strerror(code)}")
        self._fd = fd

    def stop(self) -> None:
        if self._fd is None:
            return
        os.close(self._fd)  # aborts the connection: every waiter gets ENOTCONN
        self._fd = None
        if _libc.umount2(os.fsencode(self.folder), _MNT_DETACH) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(self.folder))


@contextlib.contextmanager
def hanging(folder: Path) -> Iterator[Hang]:
    """A Hang over ``folder``, stopped on the way out whatever happened."""
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    hang = Hang(folder)
    try:
        yield hang
    finally:
        hang.stop()
