"""A mirror's test bench (SPEC §10): an origin destination with real backups made by real
``run``s, and a mirror configuration that copies it.

``Bench`` keeps the origin's configuration apart from the mirror's (the
workspace's ``config.toml`` is the mirror's: ``ws.run("mirror")`` works), so
the tests of mirror-core, mirror-ssh and mirror-btrfs share one way to make an
origin. Everything here runs the real CLI; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import TYPE_CHECKING, Any

from conftest import CLI
from datakit import BACKUP_NAME, rsync_source, table

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from conftest import Workspace

# One entry of a tree's snapshot: everything lstat says that a write would change.
Stat = tuple[int, int, int, int, int, int, int, int]


class Bench:
    """An origin (``ws.root/origin``, its own state) and the mirror (``ws.dest``)."""

    def __init__(self, ws: Workspace, origin: Path | None = None) -> None:
        self.ws = ws
        self.origin = origin or ws.root / "origin"
        self.origin.mkdir(exist_ok=True)
        self.origin_state = ws.root / "origin-state"
        self.origin_config = ws.root / "origin.toml"
        self.data = ws.make_source("data", {"same.txt": "never changes\n"})
        self.write_origin_config()

    def write_origin_config(self, extra: str = "") -> None:
        self.origin_config.write_text(
            f'destination = "{self.origin}"\nstate_dir = "{self.origin_state}"\n'
            + rsync_source("data", self.data) + extra)

    def origin_run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """One real ``run`` of the origin's configuration; fails the test unless it exits 0."""
        result = subprocess.run([*CLI, "run", "-c", str(self.origin_config), *args],
                                capture_output=True, text=True, timeout=120,
                                env=self.ws.env())
        assert result.returncode == 0, result.stderr
        return result

    def backup(self, change: Callable[[Path], None] | None = None) -> str:
        """Change the source (``change(data folder)``), make one origin backup, return its name."""
        if change is not None:
            change(self.data)
        before = set(self.origin_backups())
        self.origin_run()
        [made] = set(self.origin_backups()) - before
        return made

    def backups(self, count: int) -> list[str]:
        """``count`` origin backups, each with a file of its own and one edited file."""
        names = []
        for i in range(count):
            def change(data: Path, i: int = i) -> None:
                (data / f"only-{i}.txt").write_text(f"backup {i}\n")
                (data / "edit.txt").write_text(f"version {i}\n" * (i + 1))
            names.append(self.backup(change))
        return names

    def origin_backups(self) -> list[str]:
        return sorted(p.name for p in self.origin.iterdir() if BACKUP_NAME.fullmatch(p.name))

    def mirror_backups(self) -> list[str]:
        return sorted(p.name for p in self.ws.dest.iterdir() if BACKUP_NAME.fullmatch(p.name))

    def write_mirror_config(self, *, origin: dict[str, Any] | None = None,
                            extra: str = "") -> Path:
        """The mirror's configuration (the workspace's): ``[origin]`` with ``path`` the
        origin (``origin`` adds or replaces keys), then ``extra`` tables."""
        keys: dict[str, Any] = {"path": str(self.origin), **(origin or {})}
        return self.ws.write_config(table("[origin]", **keys) + extra)

    def mirror(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.ws.run("mirror", *args, timeout=timeout)

    def mirror_reports(self) -> list[Path]:
        folder = self.ws.state / "reports"
        return sorted(folder.glob("mirror-*.json")) if folder.exists() else []

    def mirror_report(self) -> dict[str, Any]:
        reports = self.mirror_reports()
        assert reports, "no mirror report was written"
        return dict(json.loads(reports[-1].read_text()))


def tree_stats(root: Path) -> dict[str, Stat]:
    """Every entry below ``root`` (itself included), by relative path: inode, mode, links,
    owner, size, mtime and ctime, read with ``lstat``. Equal before and after means nothing
    was written, renamed, linked or deleted there."""
    found: dict[str, Stat] = {}
    for folder, dirs, files in os.walk(root):
        for name in [".", *dirs, *files]:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            found[os.path.relpath(path, root)] = (
                st.st_ino, st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_size,
                st.st_mtime_ns, st.st_ctime_ns)
    return found


def tree_bytes(root: Path) -> dict[str, bytes]:
    """The content of every regular file below ``root``, by relative path."""
    found: dict[str, bytes] = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                with open(path, "rb") as f:
                    found[os.path.relpath(path, root)] = f.read()
    return found
