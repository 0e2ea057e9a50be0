"""Copies that ``verify`` found damaged, kept in ``state_dir`` for the next run (SPEC §9).

rsync's ``--link-dest`` trusts size and mtime, so the next run would
hard-link a rotten copy into the new backup. ``verify`` records each damaged
copy here (its backup, source, path, and inode); a run copies such a path
afresh from the source instead of linking it. The file is
``<state_dir>/damaged.json``: the records of every destination this
``state_dir`` serves, each under the destination's path. It is replaced
atomically (write, fsync, rename): losing it would let damage spread.
"""

from __future__ import annotations

import contextlib
import os

import msgspec

FILE_NAME = "damaged.json"


class Damage(msgspec.Struct, frozen=True, kw_only=True):
    """One damaged copy: ``<destination>/<backup>/<source>/<path>``, inode ``(dev, ino)``."""

    backup: str
    source: str
    # Relative to the source's folder, as pathtext.show_path writes it (parse_path reads it).
    path: str
    dev: int
    ino: int


class _File(msgspec.Struct):
    destinations: dict[str, list[Damage]] = msgspec.field(default_factory=dict)


def _path(state_dir: str) -> str:
    return os.path.join(state_dir, FILE_NAME)


def _read(state_dir: str) -> _File:
    try:
        with open(_path(state_dir), "rb") as f:
            return msgspec.json.decode(f.read(), type=_File)
    except FileNotFoundError:
        return _File()
    except msgspec.DecodeError as e:
        raise OSError(f"{_path(state_dir)}: not a list of damaged copies: {e}") from None


def load(state_dir: str, destination: str) -> list[Damage]:
    """The damaged copies recorded for ``destination``; [] when none.

    Raises OSError when the file exists but cannot be read or decoded.
    """
    return _read(state_dir).destinations.get(destination, [])


def save(state_dir: str, destination: str, found: list[Damage],
         *, backups: set[str] | None = None) -> None:
    """Add ``found`` to what is kept for ``destination``, durably.

    ``backups``: the destination's backups now; records of other backups
    (deleted by retention since) are dropped. Raises OSError when it
    cannot be written.
    """
    data = _read(state_dir)
    kept = data.destinations.get(destination, [])
    if backups is not None:
        kept = [d for d in kept if d.backup in backups]
    merged = list(dict.fromkeys([*kept, *found]))
    if merged:
        data.destinations[destination] = merged
    else:
        data.destinations.pop(destination, None)
    target = _path(state_dir)
    temporary = f"{target}.new"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        with open(fd, "wb", closefd=True) as f:
            f.write(msgspec.json.encode(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    folder = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
