"""A manifest per source that rsync saves, checked by the real ``sha256sum`` (SPEC §9).

Every run through the CLI with real rsync. The manifest must be what
coreutils checks from inside the backup (``cd <backup> && sha256sum --check
.pibackup/data.sha256``), whatever the names hold; a nightly run reads only
what it wrote (the report's ``hashed_bytes``); the save is the manifest step
and runs after the snapshot hooks' ``post``; its failure fails the source.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import TYPE_CHECKING, Any

import pytest
from btrfskit import btrfs_source, needs_btrfs
from conftest import needs_rsync
from datakit import cli_ok, complete_backups, rsync_source, set_mtime, table

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from btrfskit import Btrfs
    from conftest import Workspace

pytestmark = [needs_rsync,
              pytest.mark.skipif(shutil.which("sha256sum") is None,
                                 reason="coreutils sha256sum is missing")]

# Names sha256sum must escape (backslash, newline), one it writes raw (a
# carriage return), one that is not UTF-8, and spaces.
ODD_NAMES = [b"back\\slash.txt", b"new\nline.txt", b"carriage\rreturn.txt",
             b"latin1-caf\xe9.txt", b"two  spaces .txt", b"folder with space/inner file"]


def sha256sum_check(backup: Path, source: str = "data") -> subprocess.CompletedProcess[bytes]:
    """The standard checker, run as a rescue system would: from inside the backup."""
    return subprocess.run(["sha256sum", "--check", "--strict", f".pibackup/{source}.sha256"],
                           cwd=backup, capture_output=True, timeout=60)


def manifest_lines(backup: Path, source: str = "data") -> list[bytes]:
    # Not splitlines(): a carriage return inside a name is not a line's end.
    text = (backup / ".pibackup" / f"{source}.sha256").read_bytes()
    assert text.endswith(b"\n")
    return text.split(b"\n")[:-1]


def regular_file_names(root: Path, prefix: bytes) -> set[bytes]:
    """Every name of a regular file below ``root``, as ``<prefix>/<path>`` bytes."""
    found = set()
    for folder, _, files in os.walk(os.fsencode(root)):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not os.path.islink(path):
                found.add(prefix + b"/" + os.path.relpath(path, os.fsencode(root)))
    return found


def odd_source(ws: Workspace) -> Path:
    src = ws.make_source("data", {"plain.txt": "plain\n", "sub/deeper/leaf.txt": "leaf\n"})
    for name in ODD_NAMES:
        path = os.path.join(os.fsencode(src), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"contents of " + name)
    # Hard links inside the source: each name gets its line.
    os.link(src / "plain.txt", src / "sub" / "plain-again.txt")
    os.link(os.path.join(os.fsencode(src), ODD_NAMES[1]), os.path.join(
        os.fsencode(src), b"sub/linked\nname"))
    (src / "empty").write_bytes(b"")
    (src / "link-to-plain").symlink_to("plain.txt")  # not a regular file: no line
    return src


def distinct_bytes(root: Path) -> int:
    """The size of every regular file below ``root``, each inode once."""
    seen: dict[int, int] = {}
    for folder, _, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            if not os.path.islink(os.path.join(folder, name)):
                seen[st.st_ino] = st.st_size
    return sum(seen.values())


def saved(ws: Workspace) -> tuple[Path, dict[str, Any]]:
    """The newest complete backup and its report."""
    backup = ws.dest / complete_backups(ws.dest)[-1]
    report = ws.report()
    assert report["name"] == backup.name and report["status"] == "ok", report
    return backup, report


def log_events(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def test_the_manifest_checks_with_sha256sum_whatever_the_names(ws: Workspace) -> None:
    src = odd_source(ws)
    ws.write_config(rsync_source("data", src))
    cli_ok(ws, "run")
    backup, report = saved(ws)

    checked = sha256sum_check(backup)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    lines = manifest_lines(backup)
    # The newline names are escaped: one line per name all the same.
    assert len(lines) == len(regular_file_names(src, b"data")), lines
    assert (backup / ".pibackup" / "SOURCES").read_bytes() == b"data\n"

    record = report["sources"]["data"]
    save = record["save"]
    assert isinstance(save, dict) and save["status"] == "ok", record
    assert save["start"] is not None and save["duration_s"] is not None
    # Everything is read once: each hard-linked file once, not once per name.
    assert record["hashed_bytes"] == distinct_bytes(src), record


def test_a_nightly_run_reads_only_what_it_wrote(ws: Workspace) -> None:
    src = odd_source(ws)
    ws.write_config(rsync_source("data", src))
    first = cli_ok(ws, "run", "--log-format", "json")
    told = [e for e in log_events(first.stderr) if "nothing inherited" in e.get("event", "")]
    assert len(told) == 1 and told[0]["source"] == "data", first.stderr

    edited = src / "sub" / "deeper" / "leaf.txt"
    edited.write_text("a new version of the leaf, longer than before\n")
    set_mtime(edited, 1_700_000_000_000_000_000)
    second = cli_ok(ws, "run", "--log-format", "json")
    backup, report = saved(ws)
    assert report["sources"]["data"]["hashed_bytes"] == edited.stat().st_size, report["sources"]
    assert not [e for e in log_events(second.stderr) if "nothing inherited" in e.get("event", "")]
    checked = sha256sum_check(backup)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert len(manifest_lines(backup)) == len(regular_file_names(src, b"data"))

    # A third run with nothing changed reads nothing at all.
    cli_ok(ws, "run")
    backup, report = saved(ws)
    assert report["sources"]["data"]["hashed_bytes"] == 0, report["sources"]
    assert sha256sum_check(backup).returncode == 0


def test_without_an_earlier_manifest_everything_is_read_once_and_the_log_says_so(
        ws: Workspace) -> None:
    src = ws.make_source("data", {f"f{i}.txt": f"file {i}\n" * 100 for i in range(20)})
    ws.write_config(rsync_source("data", src))
    cli_ok(ws, "run")
    [first] = complete_backups(ws.dest)
    # A backup made before manifests existed (the first run after an upgrade).
    shutil.rmtree(ws.dest / first / ".pibackup")
    second = cli_ok(ws, "run", "--log-format", "json")
    backup, report = saved(ws)
    assert report["sources"]["data"]["hashed_bytes"] == distinct_bytes(src)
    told = [e for e in log_events(second.stderr) if "nothing inherited" in e.get("event", "")]
    assert len(told) == 1 and told[0]["level"] == "info", second.stderr
    assert "no manifest" in told[0]["reason"], told
    assert sha256sum_check(backup).returncode == 0


def test_two_sources_saved_at_once_both_listed(ws: Workspace) -> None:
    names = [f"s{i}" for i in range(4)]
    config = "".join(rsync_source(n, ws.make_source(n, {f"{n}/{j}.txt": f"{n} {j}\n"
                                                        for j in range(50)}))
                     for n in names)
    ws.write_config(config, header="concurrency = 4\n")
    cli_ok(ws, "run")
    backup, report = saved(ws)
    assert (backup / ".pibackup" / "SOURCES").read_bytes().splitlines() == [
        n.encode() for n in names]
    for n in names:
        assert report["sources"][n]["save"]["status"] == "ok"
        checked = sha256sum_check(backup, n)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert len(manifest_lines(backup, n)) == 50
    assert sorted(os.listdir(backup / ".pibackup")) == sorted(
        ["SOURCES", *(f"{n}.sha256" for n in names)]), "no temporary file is left"


def test_the_manifest_runs_after_the_posts_and_its_failure_fails_the_source(
        ws: Workspace) -> None:
    src = ws.make_source("data")
    # The snapshot hooks' post leaves a file where the manifests' folder goes:
    # the manifest cannot be written, so the source (and the backup) fails.
    hook = table("[[snapshot_hooks]]", name="db", pre="true",
                 post='touch "$PIBACKUP_BACKUP_DIR/.pibackup"')
    ws.write_config(rsync_source("data", src) + hook)
    result = ws.run("run")
    assert result.returncode == 1, result.stderr
    report = ws.report()
    save = report["sources"]["data"]["save"]
    assert save["status"] == "failed", report["sources"]
    assert "manifest" in report["failure"] and "data" in report["failure"], report["failure"]
    assert complete_backups(ws.dest) == [], "a backup holds every source or does not exist"
    [post_step] = [h for h in report["hooks"] if h["phase"] == "post"]
    assert post_step["end"] <= save["start"], (post_step, save)


@pytest.mark.root
@needs_btrfs
def test_a_btrfs_source_saved_onto_a_plain_folder_gets_its_manifest(
        ws: Workspace, btrfs_fs: Callable[..., Btrfs]) -> None:
    src_fs = btrfs_fs(ws.src / "vol", 200)
    source = src_fs.subvolume("data")
    (source / "a.txt").write_text("a btrfs file\n")
    (source / "sub").mkdir()
    (source / "sub" / "b.bin").write_bytes(os.urandom(70_000))
    ws.write_config(btrfs_source("data", source))
    cli_ok(ws, "run")
    backup, report = saved(ws)
    assert sha256sum_check(backup).returncode == 0
    assert len(manifest_lines(backup)) == 2
    assert report["sources"]["data"]["hashed_bytes"] == 13 + 70_000

    (source / "a.txt").write_text("a btrfs file, changed\n")
    cli_ok(ws, "run")
    backup, report = saved(ws)
    assert sha256sum_check(backup).returncode == 0
    assert report["sources"]["data"]["hashed_bytes"] == len("a btrfs file, changed\n")


def _two_copies(ws: Workspace) -> tuple[Path, Path]:
    """Two backups of one source by real rsync, the second linked against the first."""
    src = ws.make_source("data", {f"d{i % 3}/f{i}.txt": f"file {i}\n" for i in range(30)})
    first, second = ws.root / "b1", ws.root / "b2"
    for backup, link in ((first, None), (second, first / "data")):
        backup.mkdir()
        argv = ["rsync", "-aH", *([f"--link-dest={link}"] if link else []),
                f"{src}/", f"{backup}/data/"]
        subprocess.run(argv, check=True)
    return first, second


@pytest.mark.parametrize("damage", ["shuffled", "malformed"])
def test_an_earlier_manifest_out_of_order_or_malformed_only_costs_reads(
        ws: Workspace, damage: str) -> None:
    from pibackup_async.engine.manifest import write_manifest

    first, second = _two_copies(ws)
    made = write_manifest(str(first), "data", None)
    assert made.files == 30 and made.inherited == 0
    manifest = first / ".pibackup" / "data.sha256"
    lines = manifest.read_bytes().split(b"\n")[:-1]
    if damage == "shuffled":
        lines.reverse()
    else:
        lines[10] = b"not a line of sha256sum"
    manifest.write_bytes(b"".join(line + b"\n" for line in lines))

    made = write_manifest(str(second), "data", str(first / "data"))
    checked = sha256sum_check(second)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert made.files == 30 and made.hashed_bytes > 0
    if damage == "malformed":
        assert made.inherited == 10 and "malformed" in str(made.unused_earlier), made
