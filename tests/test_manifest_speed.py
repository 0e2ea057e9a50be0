"""The manifest's folder-at-a-time paths give the lines a full read would (SPEC §9).

A nightly manifest takes whole blocks of the earlier one (a folder whose
files are all linked and whose names are the block's), swaps only the
fresh lines in a block whose names match, and falls back to a name-by-name
look-up elsewhere. Whatever path a folder takes, the manifest must be
byte for byte the one written by reading everything, and only what the run
wrote is read. Real rsync copies (``--link-dest``), checked by the real
``sha256sum``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import TYPE_CHECKING

import pytest
from conftest import needs_rsync
from pibackup_async.engine.manifest import write_manifest
from pibackup_async.engine.sources.rsync import RSYNC_BASE

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [needs_rsync,
              pytest.mark.skipif(shutil.which("sha256sum") is None,
                                 reason="coreutils sha256sum is missing")]

# Escaped in a manifest (a backslash, a newline): their lines are never taken as they stand.
ODD = [b"back\\slash", b"new\nline"]


def _write(root: Path, relative: bytes, data: bytes) -> None:
    path = os.path.join(os.fsencode(root), relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _source(root: Path) -> Path:
    src = root / "src"
    for folder in (b"all-linked", b"one-rewritten", b"one-added", b"one-deleted",
                   b"gone-later", b"odd", b"odd/deeper"):
        for i in range(12):
            _write(src, folder + b"/f%02d" % i, b"%s %d\n" % (folder, i))
    for name in ODD:
        _write(src, b"odd/" + name, b"odd " + name)
    os.link(src / "all-linked" / "f00", src / "one-added" / "hard-link")
    return src


def _nightly_changes(src: Path) -> int:
    """Change the source as a day would; the bytes the next copy writes as new files."""
    written = 0
    rewritten = src / "one-rewritten" / "f05"
    rewritten.write_bytes(b"a new version, longer than before\n")
    os.utime(rewritten, (1_700_000_000, 1_700_000_000))
    written += rewritten.stat().st_size
    added = src / "one-added" / "f99"
    added.write_bytes(b"added\n")
    written += added.stat().st_size
    (src / "one-deleted" / "f11").unlink()
    shutil.rmtree(src / "gone-later")
    _write(src, b"new-folder/f00", b"new\n")
    written += 4
    odd = os.path.join(os.fsencode(src), b"odd/" + ODD[1])
    with open(odd, "wb") as f:
        f.write(b"odd, rewritten")
    os.utime(odd, (1_700_000_000, 1_700_000_000))
    written += len(b"odd, rewritten")
    # A regular file that became a link: no line.
    (src / "odd" / "f03").unlink()
    (src / "odd" / "f03").symlink_to("f04")
    return written


def _rsync(src: Path, target: Path, link_dest: Path | None = None) -> None:
    extra = [f"--link-dest={link_dest}"] if link_dest else []
    target.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([*RSYNC_BASE, *extra, f"{src}/", f"{target}/"], check=True,
                   capture_output=True, timeout=60)


def _manifest(backup: Path) -> bytes:
    return (backup / ".pibackup" / "data.sha256").read_bytes()


def _check(backup: Path) -> None:
    checked = subprocess.run(["sha256sum", "--check", "--strict", ".pibackup/data.sha256"],
                             cwd=backup, capture_output=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_nightly_manifest_is_the_one_a_full_read_writes(tmp_path: Path) -> None:
    src = _source(tmp_path)
    first = tmp_path / "first"
    _rsync(src, first / "data")
    made = write_manifest(str(first), "data", None)
    assert made.inherited == 0 and made.files == 7 * 12 + len(ODD) + 1

    written = _nightly_changes(src)
    second, alone = tmp_path / "second", tmp_path / "alone"
    _rsync(src, second / "data", first / "data")
    _rsync(src, alone / "data")
    made = write_manifest(str(second), "data", str(first / "data"))
    full = write_manifest(str(alone), "data", None)

    _check(second)
    assert _manifest(second) == _manifest(alone)
    assert made.files == full.files
    assert made.hashed_bytes == written, made
    assert made.inherited == made.files - 4, made

    # A night with nothing changed: every block taken whole, nothing read.
    third = tmp_path / "third"
    _rsync(src, third / "data", second / "data")
    made = write_manifest(str(third), "data", str(second / "data"))
    assert _manifest(third) == _manifest(alone)
    assert made.hashed_bytes == 0 and made.inherited == made.files == full.files, made


def test_an_earlier_manifest_with_stale_and_uppercase_lines_still_lends(tmp_path: Path) -> None:
    src = _source(tmp_path)
    first = tmp_path / "first"
    _rsync(src, first / "data")
    write_manifest(str(first), "data", None)
    lines = _manifest(first).split(b"\n")[:-1]
    # A line of a file no copy holds at the end of a folder's block, another
    # before the first folder, and one digest in capitals (coreutils reads them).
    at = next(i for i, line in enumerate(lines) if line.endswith(b"all-linked/f11"))
    lines.insert(at + 1, b"0" * 64 + b"  data/all-linked/zz-never-copied")
    lines.insert(0, b"1" * 64 + b"  data/0-never-copied/x")
    upper = next(i for i, line in enumerate(lines) if line.endswith(b"one-added/f03"))
    lines[upper] = lines[upper][:64].upper() + lines[upper][64:]
    (first / ".pibackup" / "data.sha256").write_bytes(b"".join(line + b"\n" for line in lines))

    second, alone = tmp_path / "second", tmp_path / "alone"
    _rsync(src, second / "data", first / "data")
    _rsync(src, alone / "data")
    made = write_manifest(str(second), "data", str(first / "data"))
    write_manifest(str(alone), "data", None)
    assert _manifest(second) == _manifest(alone)
    assert made.hashed_bytes == 0 and made.inherited == made.files, made
