"""``restore`` never follows a link on the way and checks what it restores (SPEC §7, §9).

Real backups made by ``run``, real rsync; manifests written by the real
``sha256sum`` inside each backup (the engine's manifest writer is not needed
for these tests: the format is coreutils').
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import pytest
from conftest import CLI, needs_rsync, wait_for
from datakit import cli_ok, complete_backups, rsync_source
from hookkit import EXIT_FOR, Running
from sshkit import SSHD

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Workspace
    from sshkit import Sshd

pytestmark = needs_rsync


def restore(ws: Workspace, *args: str) -> subprocess.CompletedProcess[str]:
    return ws.run("restore", *args, timeout=120)


def expect(result: subprocess.CompletedProcess[str], code: int) -> None:
    assert result.returncode == code, (
        f"exit {result.returncode}, expected {code}\nstdout:\n{result.stdout}\n"
        f"stderr:\n{result.stderr}")


def write_manifest(backup: Path, source: str = "data") -> None:
    """``<backup>/.pibackup/<source>.sha256`` as coreutils writes it (SPEC §9)."""
    (backup / ".pibackup").mkdir(exist_ok=True)
    subprocess.run(
        f"find {source} -type f -print0 | sort -z | xargs -0 sha256sum "
        f"> .pibackup/{source}.sha256",
        shell=True, cwd=backup, check=True)


def flip_byte(path: Path, offset: int = 0) -> None:
    """Damage a copy in place: same size, same mtime (what rsync's quick check trusts)."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def run_backup(ws: Workspace) -> Path:
    """One ``run``; the new backup's folder."""
    before = set(complete_backups(ws.dest))
    cli_ok(ws, "run")
    [name] = set(complete_backups(ws.dest)) - before
    return ws.dest / name


# --- 1. links on the way ----------------------------------------------------------------


def test_a_link_on_the_way_is_refused_and_nothing_outside_the_backup_restored(
        ws: Workspace) -> None:
    src = ws.make_source("data", {"plain.txt": "plain\n"})
    os.symlink("/etc", src / "etclink")
    ws.write_config(rsync_source("data", src))
    backup = run_backup(ws)
    assert os.readlink(backup / "data" / "etclink") == "/etc"
    target = ws.root / "r"

    for name in ("latest", backup.name):
        result = restore(ws, name, "data/etclink/hostname", "--to", str(target))
        expect(result, 2)
        assert "data/etclink" in result.stderr and "link" in result.stderr, result.stderr
        assert not (target / "hostname").exists()
        assert "restoring from" not in result.stderr, result.stderr

    result = restore(ws, "latest", "data/etclink/hostname", "--to", str(target), "--dry-run")
    expect(result, 2)
    assert "data/etclink" in result.stderr
    assert not (target / "hostname").exists()


def test_a_link_as_the_last_component_is_restored_as_the_link(ws: Workspace) -> None:
    src = ws.make_source("data", {"plain.txt": "plain\n"})
    os.symlink("/etc", src / "etclink")
    ws.write_config(rsync_source("data", src))
    run_backup(ws)
    target = ws.root / "r"

    cli_ok(ws, "restore", "latest", "data/etclink", "--to", str(target))

    assert os.path.islink(target / "etclink")
    assert os.readlink(target / "etclink") == "/etc"


def test_latest_is_the_newest_backup_holding_the_path_without_following_links(
        ws: Workspace) -> None:
    src = ws.make_source("data", {"d/hostname": "the backed-up one\n"})
    ws.write_config(rsync_source("data", src))
    older = run_backup(ws)
    (src / "d" / "hostname").unlink()
    (src / "d").rmdir()
    os.symlink("/etc", src / "d")
    newer = run_backup(ws)
    assert os.path.islink(newer / "data" / "d")
    target = ws.root / "r"

    result = cli_ok(ws, "restore", "latest", "data/d/hostname", "--to", str(target))

    assert (target / "hostname").read_text() == "the backed-up one\n"
    assert older.name in result.stderr
    # Named explicitly, the newer backup's link is refused.
    expect(restore(ws, newer.name, "data/d/hostname", "--to", str(ws.root / "r2")), 2)


def test_the_manifest_folder_is_not_a_source(ws: Workspace) -> None:
    src = ws.make_source("data")
    ws.write_config(rsync_source("data", src))
    backup = run_backup(ws)
    write_manifest(backup)
    target = ws.root / "r"

    for item in (".pibackup", ".pibackup/data.sha256"):
        result = restore(ws, "latest", item, "--to", str(target))
        expect(result, 1)
        assert "no complete backup holds .pibackup" in result.stderr, result.stderr
        expect(restore(ws, backup.name, item, "--to", str(target)), 1)
        expect(restore(ws, "latest", item, "--to", str(target), "--dry-run"), 1)
    assert not target.exists() or not os.listdir(target)


# --- 2. the manifest check ---------------------------------------------------------------


def test_a_damaged_file_is_not_written_the_others_are_and_the_restore_fails(
        ws: Workspace) -> None:
    src = ws.make_source("data", {"a.txt": "aaaa\n", "b.txt": "bbbb\n",
                                  "sub/c.txt": "cccc\n", "star*": "a star\n",
                                  "starX": "not the star\n", "new\nline": "nl\n",
                                  "br[ac]ket": "class\n", "braket": "not the class\n",
                                  "back\\slash": "bs\n", "back\\slasX": "not bs\n",
                                  "m\\i*x": "both\n", "m\\iZx": "not both\n"})
    ws.write_config(rsync_source("data", src))
    backup = run_backup(ws)
    write_manifest(backup)
    flip_byte(backup / "data" / "b.txt")
    flip_byte(backup / "data" / "star*")
    flip_byte(backup / "data" / "new\nline")
    flip_byte(backup / "data" / "br[ac]ket")
    flip_byte(backup / "data" / "back\\slash")
    flip_byte(backup / "data" / "m\\i*x")
    target = ws.root / "r"
    target.mkdir()
    (target / "b.txt").write_text("the target's own\n")

    result = restore(ws, "latest", "data", "--to", str(target), "--delete")

    expect(result, 1)
    for shown in ("data/b.txt", "data/star*", "data/new\\nline", "data/br[ac]ket",
                  "data/back\\\\slash"):
        assert shown in result.stderr, (shown, result.stderr)
    assert "no backup holds a good copy" in result.stderr
    assert (target / "b.txt").read_text() == "the target's own\n"
    assert not (target / "star*").exists()
    assert not (target / "new\nline").exists()
    assert (target / "a.txt").read_text() == "aaaa\n"
    assert (target / "sub" / "c.txt").read_text() == "cccc\n"
    assert (target / "starX").read_text() == "not the star\n"
    assert (target / "braket").read_text() == "not the class\n"
    assert (target / "back\\slasX").read_text() == "not bs\n"
    assert not (target / "br[ac]ket").exists()
    assert not (target / "back\\slash").exists()
    assert not (target / "m\\i*x").exists()
    assert (target / "m\\iZx").read_text() == "not both\n"

    # One damaged file on its own: nothing written, exit 1.
    alone = ws.root / "alone"
    result = restore(ws, "latest", "data/b.txt", "--to", str(alone))
    expect(result, 1)
    assert "data/b.txt" in result.stderr
    assert not (alone / "b.txt").exists()
    # A folder holding no damaged file restores as before.
    cli_ok(ws, "restore", "latest", "data/sub", "--to", str(ws.root / "fine"))
    assert (ws.root / "fine" / "sub" / "c.txt").read_text() == "cccc\n"


def test_the_newest_backup_with_a_good_copy_is_named(ws: Workspace) -> None:
    src = ws.make_source("data", {"a.txt": "aaaa\n", "b.txt": "bbbb\n"})
    ws.write_config(rsync_source("data", src))
    backups = []
    for moment in (1_500_000_000, 1_500_000_100, 1_500_000_200):
        # A new mtime: each run copies b.txt afresh (its own inode, same content).
        os.utime(src / "b.txt", (moment, moment))
        backups.append(run_backup(ws))
        write_manifest(backups[-1])
    first, second, third = backups
    assert os.stat(second / "data" / "b.txt").st_ino != os.stat(first / "data" / "b.txt").st_ino
    # The second's manifest has the right digest but its copy rotted too.
    flip_byte(third / "data" / "b.txt")
    flip_byte(second / "data" / "b.txt")
    target = ws.root / "r"

    result = restore(ws, "latest", "data", "--to", str(target))

    expect(result, 1)
    assert "data/b.txt" in result.stderr
    assert f"good copy is in backup {first.name}" in result.stderr, result.stderr
    assert (target / "a.txt").read_text() == "aaaa\n"
    assert not (target / "b.txt").exists()

    cli_ok(ws, "restore", first.name, "data/b.txt", "--to", str(target))
    assert (target / "b.txt").read_text() == "bbbb\n"


def test_a_backup_without_a_manifest_restores_as_before(ws: Workspace) -> None:
    src = ws.make_source("data", {"a.txt": "aaaa\n"})
    ws.write_config(rsync_source("data", src))
    backup = run_backup(ws)
    # As made before manifests existed (the run may write one now).
    shutil.rmtree(backup / ".pibackup", ignore_errors=True)
    flip_byte(backup / "data" / "a.txt")

    cli_ok(ws, "restore", "latest", "data", "--to", str(ws.root / "r"))

    assert (ws.root / "r" / "a.txt").read_bytes() == (backup / "data" / "a.txt").read_bytes()


def test_dry_run_names_the_damaged_files_and_writes_nothing(ws: Workspace) -> None:
    src = ws.make_source("data", {"a.txt": "aaaa\n", "b.txt": "bbbb\n"})
    ws.write_config(rsync_source("data", src))
    backup = run_backup(ws)
    write_manifest(backup)
    flip_byte(backup / "data" / "b.txt")
    target = ws.root / "r"

    result = restore(ws, "latest", "data", "--to", str(target), "--dry-run")

    expect(result, 1)
    assert "data/b.txt" in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith(">f") and line.endswith(" a.txt") for line in lines), lines
    assert not any(line.startswith(">f") and line.endswith(" b.txt") for line in lines), lines
    assert not target.exists()


def test_the_check_is_cancelled_at_once_by_a_signal(ws: Workspace) -> None:
    src = ws.make_source("data", {"a.txt": "aaaa\n"})
    ws.write_config(rsync_source("data", src))
    backup = run_backup(ws)
    big = backup / "data" / "big.img"
    with open(big, "wb") as f:
        f.truncate(64 << 30)  # sparse: minutes of hashing, no disk
    (backup / ".pibackup").mkdir(exist_ok=True)
    with open(backup / ".pibackup" / "data.sha256", "a") as f:
        f.write(f"{'0' * 64}  data/big.img\n")
    target = ws.root / "r"

    def hashing(pid: int) -> bool:
        folder = f"/proc/{pid}/fd"
        for fd in os.listdir(folder):
            try:
                if os.readlink(os.path.join(folder, fd)) == str(big):
                    return True
            except FileNotFoundError:
                continue  # closed since the listing
        return False

    with Running(ws.start("restore", "latest", "data", "--to", str(target))) as running:
        wait_for(lambda: hashing(running.proc.pid), 30, "the big file to be hashed")
        sent = time.monotonic()
        running.send(signal.SIGTERM)
        code = running.wait(30)
        took = time.monotonic() - sent

    assert code == EXIT_FOR[signal.SIGTERM], running.stderr
    # Not the 10 s a worker that never looks is waited for before it is abandoned.
    assert took < 5, took
    assert not (target / "big.img").exists()


# Runs a command and prints its peak memory (KiB), exiting as it did.
_PEAK_OF = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:]); "
            "_, status, usage = os.wait4(p.pid, 0); print(usage.ru_maxrss); "
            "sys.exit(os.waitstatus_to_exitcode(status))")


def test_one_file_through_a_manifest_of_a_million_lines(ws: Workspace) -> None:
    src = ws.make_source("data", {"one.txt": "one\n"})
    ws.write_config(rsync_source("data", src))
    backup = run_backup(ws)
    write_manifest(backup)
    with open(backup / ".pibackup" / "data.sha256", "ab") as f:
        line = "ab" * 32 + "  data/some/deep/folder/that/is/long/file-{:08d}.jpg\n"
        for start in range(0, 1_000_000, 10_000):
            f.write("".join(line.format(i) for i in range(start, start + 10_000)).encode())
    target = ws.root / "r"

    # Started from a small process of its own: a child forked from this test's
    # process would count this process's memory as its own peak.
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_OF, *CLI, "restore", "latest", "data/one.txt",
         "--to", str(target), "-c", str(ws.config_path)],
        capture_output=True, text=True, timeout=120, env=ws.env())

    expect(result, 0)
    peak_kib = int(result.stdout.splitlines()[-1])
    assert (target / "one.txt").read_text() == "one\n"
    # A manifest of 124 MB held in memory as parsed lines would take ten times this.
    assert peak_kib < 80 * 1024, peak_kib


@pytest.mark.skipif(not os.path.exists(SSHD), reason="OpenSSH sshd is not installed")
def test_a_push_to_a_host_leaves_the_damaged_file_out(ws: Workspace, sshd: Sshd) -> None:
    src = ws.make_source("data", {"a.txt": "aaaa\n", "b[1].txt": "bbbb\n"})
    ws.write_config(sshd.host_toml("far") + rsync_source("data", src))
    backup = run_backup(ws)
    write_manifest(backup)
    flip_byte(backup / "data" / "b[1].txt")
    target = ws.root / "pushed"
    target.mkdir()
    (target / "b[1].txt").write_text("the host's own\n")
    logins = sshd.logins()

    result = restore(ws, "latest", "data", "--to", f"far:{target}", "--delete")

    expect(result, 1)
    assert "data/b[1].txt" in result.stderr
    assert sshd.logins() > logins, "the restore did not go through the test sshd"
    assert (target / "a.txt").read_text() == "aaaa\n"
    assert (target / "b[1].txt").read_text() == "the host's own\n"
