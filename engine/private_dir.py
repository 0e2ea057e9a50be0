"""A folder only the engine's user may read: ``state_dir``, and the reports' folder in it."""

from __future__ import annotations

import os


def make_private_dir(path: str) -> None:
    """Create ``path`` (and missing parents) mode 0700; an existing folder is left as it is.

    Reports hold hook command lines and their output: only the engine's
    user may read them.
    """
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path.rstrip("/"))
    if parent and parent != path:
        os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    # mkdir's mode is masked by the umask, which may leave less than 0700.
    os.chmod(path, 0o700)
