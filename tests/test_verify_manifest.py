"""``verify`` against the backups' manifests, ``--all``, ``--sample``, damaged copies kept
in ``state_dir``, and paths longer than PATH_MAX (SPEC §7 verify, §9).

The backups are made by real runs; their manifests are written here by the real
``sha256sum`` from inside the backup (what step 5 writes, in the format it writes),
so these tests do not depend on the engine's own manifest writer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from typing import TYPE_CHECKING

import pytest
from conftest import needs_rsync
from test_verify import MiB, backed_up, configure, flip_byte, make_sources, summary

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Workspace

pytestmark = [needs_rsync]


def write_manifests(backup: Path, sources: tuple[str, ...] = ("alpha", "beta")) -> None:
    """``.pibackup/<source>.sha256`` by sha256sum itself, and ``.pibackup/SOURCES``."""
    shutil.rmtree(backup / ".pibackup", ignore_errors=True)
    (backup / ".pibackup").mkdir()
    for source in sources:
        subprocess.run(f"find {source} -type f -print0 | sort -z | xargs -0 sha256sum "
                       f"> .pibackup/{source}.sha256", shell=True, cwd=backup, check=True)
    (backup / ".pibackup" / "SOURCES").write_text("".join(f"{s}\n" for s in sources))


def no_manifests(backup: Path) -> None:
    shutil.rmtree(backup / ".pibackup", ignore_errors=True)


def found_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if not line.startswith("verified ")]


def damaged(ws: Workspace) -> list[dict[str, object]]:
    path = ws.state / "damaged.json"
    if not path.exists():
        return []
    records: list[dict[str, object]] = json.loads(path.read_text())["destinations"][str(ws.dest)]
    return records


def checker(backup: Path, source: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sha256sum", "--check", "--quiet", f".pibackup/{source}.sha256"],
                          cwd=backup, capture_output=True, text=True)


# --- one backup -------------------------------------------------------------------------


def test_a_flipped_byte_is_found_without_the_source(ws: Workspace) -> None:
    name = backed_up(ws)
    backup = ws.dest / name
    write_manifests(backup)
    clean = ws.run("verify")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "manifests: alpha, beta" in summary(clean.stdout).string

    copy = backup / "alpha" / "big.bin"
    flip_byte(copy, 2 * MiB + 77)
    shutil.rmtree(ws.src)  # no source to compare with: the manifest alone tells
    assert checker(backup, "alpha").returncode == 1  # the standard checker agrees

    result = ws.run("verify")

    assert result.returncode == 1, result.stderr
    assert found_lines(result.stdout) == ["corrupt: alpha/big.bin: does not match the manifest"]
    found = summary(result.stdout)
    assert (found["corrupt"], found["unreadable"]) == ("1", "0")
    st = os.stat(copy)
    assert damaged(ws) == [{"backup": name, "source": "alpha", "path": "big.bin",
                            "dev": st.st_dev, "ino": st.st_ino}]


def test_missing_and_unlisted_files_are_corruption_uncovered_folders_are_named(
        ws: Workspace) -> None:
    name = backed_up(ws)
    backup = ws.dest / name
    write_manifests(backup)
    assert checker(backup, "alpha").returncode == 0  # odd names included
    (backup / "alpha" / "docs" / "a.txt").unlink()
    (backup / "alpha" / "docs" / "planted.txt").write_text("not backed up\n")
    (backup / "hookdir").mkdir()  # what a hook wrote: no manifest covers it
    (backup / "hookdir" / "dump.sql").write_text("select 1;\n")

    result = ws.run("verify")

    assert result.returncode == 1, result.stderr
    assert sorted(found_lines(result.stdout)) == [
        "corrupt: alpha/docs/a.txt: listed in the manifest, missing",
        "corrupt: alpha/docs/planted.txt: not in the manifest",
    ]
    line = summary(result.stdout).string
    assert "not covered by a manifest: hookdir" in line
    assert summary(result.stdout)["corrupt"] == "2"


def test_a_source_listed_without_its_manifest_is_corrupt(ws: Workspace) -> None:
    name = backed_up(ws)
    backup = ws.dest / name
    write_manifests(backup)
    (backup / ".pibackup" / "beta.sha256").unlink()

    result = ws.run("verify")

    assert result.returncode == 1
    assert found_lines(result.stdout) == [
        "corrupt: .pibackup/beta.sha256: missing (beta is listed in .pibackup/SOURCES)"]
    assert "not covered by a manifest: beta" in summary(result.stdout).string

    # A manifest that is not one sha256sum reads is corrupt too.
    (backup / ".pibackup" / "beta.sha256").write_text("garbage\n")
    garbled = ws.run("verify")
    assert garbled.returncode == 1
    [line] = found_lines(garbled.stdout)
    assert line.startswith("corrupt: .pibackup/beta.sha256: line 1: not a sha256sum line")


def test_a_backup_without_manifests_is_read_and_says_so(ws: Workspace) -> None:
    name = backed_up(ws)
    no_manifests(ws.dest / name)

    result = ws.run("verify")

    assert result.returncode == 0, result.stderr
    assert "no manifest (made before manifests)" in summary(result.stdout).string

    # .pibackup is never a source: --source refuses it as a name.
    refused = ws.run("verify", "--source", ".pibackup")
    assert refused.returncode == 2
    assert "--source" in refused.stderr or "source name" in refused.stderr


# --- --against-source: a truncated copy (bug a) --------------------------------------------


@pytest.mark.parametrize("manifest", [True, False])
def test_against_source_a_truncated_copy_is_corrupt(ws: Workspace, manifest: bool) -> None:
    name = backed_up(ws)
    backup = ws.dest / name
    if manifest:
        write_manifests(backup)
    else:
        no_manifests(backup)
    copy = backup / "alpha" / "docs" / "deep" / "b.txt"
    st = os.stat(copy)
    os.truncate(copy, 1000)  # size differs, mtime kept, the source unchanged
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))

    result = ws.run("verify", "--against-source")

    assert result.returncode == 1, result.stdout + result.stderr
    [line] = found_lines(result.stdout)
    assert line.startswith("corrupt: alpha/docs/deep/b.txt: ")
    assert summary(result.stdout)["changed"] == "0"


# --- --all, damaged copies, --sample ---------------------------------------------------------


def test_all_reads_a_shared_inode_once_and_reports_it_in_every_backup(ws: Workspace) -> None:
    backed_up(ws, runs=3)
    names = [n for n in ws.backups() if "." not in n]
    for name in names:
        write_manifests(ws.dest / name)
    copy = ws.dest / names[-1] / "alpha" / "big.bin"
    assert os.stat(copy).st_nlink == 3
    flip_byte(copy, 5)

    result = ws.run("verify", "--all")

    assert result.returncode == 1, result.stderr
    assert found_lines(result.stdout) == [
        f"corrupt: {n}/alpha/big.bin: does not match the manifest" for n in names]
    summaries = [line for line in result.stdout.splitlines() if line.startswith("verified ")]
    assert [summary(line)["name"] for line in summaries] == names  # oldest first
    read = [int(summary(line)["bytes"]) for line in summaries]
    # Every file the same inode as the backup before, but the manifests themselves.
    manifests = [sum(p.stat().st_size for p in (ws.dest / n / ".pibackup").iterdir())
                 for n in names]
    assert read[1:] == manifests[1:]
    assert read[0] > 3 * MiB
    assert all("carried over" in line for line in summaries[1:])
    st = os.stat(copy)
    assert sorted(d["backup"] for d in damaged(ws)) == names  # type: ignore[type-var]
    assert {(d["source"], d["path"], d["dev"], d["ino"]) for d in damaged(ws)} \
        == {("alpha", "big.bin", st.st_dev, st.st_ino)}


def test_a_verify_that_cannot_save_the_damaged_copies_says_so(ws: Workspace) -> None:
    name = backed_up(ws)
    write_manifests(ws.dest / name)
    flip_byte(ws.dest / name / "beta" / "one.txt", 0)
    (ws.state / "damaged.json").mkdir(parents=True)  # cannot be replaced by a file

    result = ws.run("verify")

    assert result.returncode == 1
    assert "cannot save the damaged copies" in result.stderr
    assert "damaged.json" in result.stderr


@pytest.mark.parametrize("percent", ["0", "101", "x", "5.5"])
def test_sample_must_be_a_percentage(ws: Workspace, percent: str) -> None:
    backed_up(ws)
    result = ws.run("verify", "--sample", percent)
    assert result.returncode == 2
    assert "--sample" in result.stderr
    assert "Traceback" not in result.stderr
    assert ws.event_lines() == []


def test_sample_reads_the_next_group_each_run_and_covers_everything(ws: Workspace) -> None:
    make_sources(ws)
    many = {f"many/f{i:03d}.txt": f"file {i}\n" for i in range(60)}
    ws.make_source("beta", {"one.txt": "1\n", "sub/two.txt": "22\n", **many})
    configure(ws)
    assert ws.run("run", "-q").returncode == 0
    [name] = [n for n in ws.backups() if "." not in n]
    backup = ws.dest / name
    write_manifests(backup)
    # Every file damaged: what each run reports is what it read.
    every = [p for p in backup.rglob("*") if p.is_file() and not p.is_symlink()
             and ".pibackup" not in p.parts and p.stat().st_size > 0]
    for path in every:
        flip_byte(path, 0)

    runs = [ws.run("verify", "--sample", "34") for _ in range(4)]  # ceil(100/34) = 3 groups

    reported = [{line.split(": ")[1] for line in found_lines(r.stdout)} for r in runs]
    assert [r.returncode for r in runs] == [1, 1, 1, 1]
    assert all(reported[:3]), reported
    assert not (reported[0] & reported[1] or reported[1] & reported[2]
                or reported[0] & reported[2])
    assert reported[0] | reported[1] | reported[2] == {
        str(p.relative_to(backup)).replace("\n", "\\n").replace("\udcff", "\\xff")
        for p in every}
    assert reported[3] == reported[0]  # round again
    assert all(re.search(r"sample: group \d of 3", summary(r.stdout).string) for r in runs)


# --- paths longer than PATH_MAX (bug b) ------------------------------------------------------


def deep_file(folder: Path, length: int = 4095, content: bytes = b"deep\n") -> bytes:
    """A file below ``folder`` whose path relative to ``folder``'s parent has ``length``
    bytes (made by directory descriptor: the whole path is too long for the kernel)."""
    rel = len(folder.name) + 1
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    parts = []
    for i in range(16):
        part = f"d{i:02d}" + "x" * 251
        os.mkdir(part, dir_fd=fd)
        inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = inner
        parts.append(part)
        rel += len(part) + 1
    name = "f" * (length - rel)
    out = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(out, content)
    os.close(out)
    os.close(fd)
    return os.fsencode(os.path.join(folder.name, *parts, name))


def test_a_path_longer_than_path_max_verifies_and_du_and_diff_read_it(ws: Workspace) -> None:
    backed_up(ws, runs=2)
    old, new = [n for n in ws.backups() if "." not in n]
    # rsync cannot read such a source (its whole path is too long), so the backups get
    # the deep file by hand: the same path in both, different content.
    rel = deep_file(ws.dest / old / "alpha", content=b"old\n")
    assert len(rel) == 4095
    deep_file(ws.dest / new / "alpha", content=b"new!\n")
    for name in (old, new):
        write_manifests(ws.dest / name)

    result = ws.run("verify", "--all")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "File name too long" not in result.stdout + result.stderr

    du = ws.run("du", "--json")
    assert du.returncode == 0, du.stderr
    diff = ws.run("diff", "--json")
    assert diff.returncode == 0, diff.stderr
    changes = json.loads(diff.stdout)
    deep = [c for c in changes if c["path"].endswith("fffffffff")]
    assert [(c["change"], c["old_size"], c["new_size"]) for c in deep] == [("M", 4, 5)]


def test_diff_and_du_do_not_take_pibackup_for_a_source(ws: Workspace) -> None:
    backed_up(ws, runs=2)
    old, new = [n for n in ws.backups() if "." not in n]
    write_manifests(ws.dest / old)
    write_manifests(ws.dest / new, ("alpha",))

    diff = ws.run("diff", "--json")
    assert diff.returncode == 0, diff.stderr
    assert not [c for c in json.loads(diff.stdout) if c["source"] == ".pibackup"]
    text = ws.run("diff")
    assert ".pibackup" not in text.stdout
    assert ws.run("diff", "--source", ".pibackup").returncode == 2

    before = json.loads(ws.run("du", "--json").stdout)
    no_manifests(ws.dest / new)
    after = json.loads(ws.run("du", "--json").stdout)
    # Its bytes still count in the backup's total.
    assert before["backups"][0]["total_bytes"] > after["backups"][0]["total_bytes"]


def test_a_manifest_in_any_order_is_sorted_in_bounded_chunks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pibackup_async.engine import verify
    from pibackup_async.engine.checksums import format_line

    paths = [f"data/d{i % 7}/f{i}".encode() for i in range(1000)]
    paths += [b"data/d1.x", b"data/d1/a\nb", b"data/d1/back\\slash", b"data/\xff"]
    random_order = sorted(paths, key=lambda p: hash(p) % 1009)
    manifest = tmp_path / "data.sha256"
    manifest.write_bytes(b"".join(format_line(f"{i:064x}", p)
                                  for i, p in enumerate(random_order)))
    monkeypatch.setattr(verify, "SORT_CHUNK", 64)  # 17 chunks spilled and merged
    spill = tmp_path / "spill"
    spill.mkdir()

    with open(manifest, "rb") as f:
        merged = list(verify.sorted_manifest(f, str(spill)))

    # The walk's order: component by component ("d1/..." before "d1.x").
    assert [k.replace(b"\0", b"/") for k, _ in merged] \
        == sorted(paths, key=lambda p: p.split(b"/"))
    digests = {p: f"{i:064x}" for i, p in enumerate(random_order)}
    assert all(d.hex() == digests[k.replace(b"\0", b"/")] for k, d in merged)
    assert list(spill.iterdir()) == []  # the spilled chunks are unlinked files
