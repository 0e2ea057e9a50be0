"""The manifest walk's count of what a copy takes on disk equals ``written_bytes``'s.

The mirror's check writes a manifest of each source's copy and takes the
copy's bytes from that same walk (``Made.allocated``) instead of walking the
copy a second time. Real rsync makes the copies (``--link-dest`` the earlier
one, as a run and a mirror do); the trees hold what the count must get right:
sparse files, hard links inside the source, long and short symbolic links,
fifos, nested and empty folders, files linked to the earlier copy and files
rewritten since.
"""

from __future__ import annotations

import os
import random
import subprocess
from typing import TYPE_CHECKING

import pytest
from conftest import needs_rsync
from pibackup_async.engine.allocated import written_bytes
from pibackup_async.engine.manifest import write_manifest
from pibackup_async.engine.sources.rsync import RSYNC_BASE

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = needs_rsync


def _source(root: Path, rng: random.Random) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for depth in range(rng.randint(1, 3)):
        folder = root.joinpath(*[f"d{depth}-{i}" for i in range(depth)])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "empty").mkdir(exist_ok=True)
        for i in range(rng.randint(2, 12)):
            (folder / f"f{i}").write_bytes(os.urandom(rng.choice([0, 10, 5000, 70000])))
        if rng.random() < 0.7:
            with open(folder / "sparse.img", "wb") as f:
                f.seek(8 << 20)
                f.write(b"end")
        if rng.random() < 0.7:
            os.link(folder / "f0", folder / "f0-hardlink")
        os.symlink("f1", folder / "short-link")
        os.symlink("x" * 300, folder / "long-link")  # a block of its own on ext4
        if rng.random() < 0.5:
            os.mkfifo(folder / "fifo")


def _change(root: Path, rng: random.Random) -> None:
    files = sorted(p for p in root.rglob("f*") if p.is_file() and not p.is_symlink())
    for path in rng.sample(files, min(len(files), rng.randint(0, 5))):
        path.write_bytes(os.urandom(rng.choice([1, 9000])))
    for path in rng.sample(files, min(len(files), rng.randint(0, 2))):
        if path.exists():
            os.link(path, path.with_name(path.name + "-newlink"))
    (root / f"added-{rng.randint(0, 99)}").mkdir(exist_ok=True)


def _copy(source: Path, target: Path, earlier: Path | None) -> None:
    link = [f"--link-dest={earlier}"] if earlier is not None else []
    target.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([*RSYNC_BASE, *link, f"{source}/", f"{target}/"], check=True,
                   capture_output=True)


@pytest.mark.parametrize("seed", range(12))
def test_the_manifest_walk_counts_what_written_bytes_counts(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    source = tmp_path / "source"
    _source(source, rng)
    first, second = tmp_path / "b1", tmp_path / "b2"
    _copy(source, first / "data", None)
    _assert_same_count(first, None)
    _change(source, rng)
    _copy(source, second / "data", first / "data")
    _assert_same_count(second, first / "data")
    # And the first again, now that most of its files have a link outside it.
    _assert_same_count(first, None)


def _assert_same_count(backup: Path, earlier: Path | None) -> None:
    expected = written_bytes(str(backup / "data"), None if earlier is None else str(earlier))
    made = write_manifest(str(backup), "data", None if earlier is None else str(earlier))
    assert made.allocated == expected, backup.name
    assert expected > 0
