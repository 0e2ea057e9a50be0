"""Two manifests compared in the order the engine writes them (engine/manifest_pairs.py).

The manifests are real ones, written by ``write_manifest`` over real trees,
and every comparison is checked against the sorting comparison the mirror
used before (and still uses for a manifest out of that order).
"""

from __future__ import annotations

import io
import os
import random
from typing import TYPE_CHECKING

import pytest
from pibackup_async.engine.checksums import format_line, manifest_path
from pibackup_async.engine.manifest import write_manifest
from pibackup_async.engine.manifest_pairs import Unordered, differing

if TYPE_CHECKING:
    from pathlib import Path

NAMES = [b"a", b"b.txt", b"B", b"z z", b"back\\slash", b"new\nline", b"caf\xe9", b"a.b"]


def _tree(root: Path, rng: random.Random, depth: int = 0) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name in rng.sample(NAMES, rng.randint(0, len(NAMES))):
        (root / os.fsdecode(name)).write_bytes(name * rng.randint(0, 3))
    if depth < 3:
        for name in rng.sample(NAMES, rng.randint(0, 3)):
            if not (root / os.fsdecode(name)).exists():
                _tree(root / os.fsdecode(name), rng, depth + 1)


def _manifest(backup: Path) -> bytes:
    write_manifest(str(backup), "data", None)
    with open(manifest_path(str(backup), "data"), "rb") as f:
        return f.read()


def _by_sorting(old: bytes, new: bytes) -> set[tuple[bytes, str | None, str | None]]:
    from pibackup_async.engine.checksums import read_manifest

    a = {path: digest for digest, path in read_manifest(io.BytesIO(old))}
    b = {path: digest for digest, path in read_manifest(io.BytesIO(new))}
    return {(path, a.get(path), b.get(path)) for path in a.keys() | b.keys()
            if a.get(path) != b.get(path)}


def _mutate(tree: Path, rng: random.Random) -> None:
    files = sorted(p for p in tree.rglob("*") if p.is_file())
    for path in rng.sample(files, min(len(files), rng.randint(0, 4))):
        choice = rng.random()
        if choice < 0.4:
            path.write_bytes(b"changed " + os.fsencode(path.name))
        elif choice < 0.7:
            path.unlink()
        else:
            path.with_name(path.name + "-new").write_bytes(b"new")
    folders = [p for p in tree.rglob("*") if p.is_dir()]
    if folders and rng.random() < 0.5:
        (rng.choice(folders) / "added" / "deeper").mkdir(parents=True, exist_ok=True)
        (rng.choice(folders) / "added-file").write_bytes(b"x")


@pytest.mark.parametrize("seed", range(60))
def test_it_finds_what_sorting_both_finds(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    old, new = tmp_path / "old", tmp_path / "new"
    _tree(old / "data", rng)
    before = _manifest(old)
    os.rename(old, new)
    _mutate(new / "data", rng)
    after = _manifest(new)

    found = list(differing(io.BytesIO(before), io.BytesIO(after)))

    assert set(found) == _by_sorting(before, after)
    assert len(found) == len(set(found))


def test_equal_manifests_differ_nowhere_and_none_is_empty(tmp_path: Path) -> None:
    _tree(tmp_path / "b" / "data", random.Random(1))
    text = _manifest(tmp_path / "b")
    assert text.count(b"\n") > 5

    assert list(differing(io.BytesIO(text), io.BytesIO(text))) == []
    assert list(differing(None, None)) == []
    listed = list(differing(io.BytesIO(text), None))
    assert len(listed) == text.count(b"\n")
    assert all(new is None for _, _, new in listed)


def test_a_digest_written_in_capitals_is_the_same_digest() -> None:
    digest = "ab" * 32
    lower = format_line(digest, b"data/f")
    upper = format_line(digest.upper(), b"data/f")

    assert list(differing(io.BytesIO(lower), io.BytesIO(upper))) == []


def test_a_manifest_out_of_the_engines_order_is_told() -> None:
    digest = "0" * 64
    ordered = format_line(digest, b"data/a") + format_line(digest, b"data/sub/x")
    # sort(1)'s order (a subfolder's lines before a later file of its parent).
    shuffled = format_line("1" * 64, b"data/sub/x") + format_line("1" * 64, b"data/z")

    with pytest.raises(Unordered):
        list(differing(io.BytesIO(ordered), io.BytesIO(shuffled)))


def test_a_malformed_line_names_its_number() -> None:
    good = format_line("0" * 64, b"data/a")

    with pytest.raises(ValueError, match="line 2"):
        list(differing(io.BytesIO(good + b"no digest here\n"), io.BytesIO(good)))
