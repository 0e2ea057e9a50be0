"""A source's ``bytes`` is what its new files take on the destination's disk (SPEC §6, issue 17).

The bug: a 1 GiB sparse image holding 1 MiB of data made the summary, the
mail, the metrics and the report say the run wrote a GiB (rsync's
transferred size), and the mail warned that free space was short. Real
rsync, a real SMTP server, a real pseudo-terminal, a small real ext4 disk.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from typing import TYPE_CHECKING, Any

import pytest
from conftest import needs_root, needs_rsync
from datakit import cli_ok, complete_backups, rsync_source
from diskkit import MiB, ext4_filesystems, needs_loop
from hookkit import Terminal
from pibackup_async.engine.allocated import walk_copy, written_bytes
from pibackup_async.engine.sources.rsync import RSYNC_BASE
from smtpkit import PASSWORD, USER, MailServer, Pki, parts

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from conftest import Workspace
    from diskkit import Ext4

pytestmark = needs_rsync

KiB = 1024
GiB = 1024 * MiB
# Folders are new in every backup (rsync makes them afresh): a few blocks.
FOLDERS = 16 * KiB


@pytest.fixture
def ext4_fs(tmp_path: Path) -> Iterator[Callable[..., Ext4]]:
    yield from ext4_filesystems(tmp_path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def _sparse_source(ws: Workspace) -> Path:
    """A 1 GiB image file that holds 1 MiB of data, at an offset, and a small file."""
    src = ws.make_source("images", {"notes.txt": "a disk image for the VM\n"})
    with open(src / "disk.img", "wb") as f:
        f.truncate(GiB)
        f.seek(300 * MiB)
        f.write(os.urandom(MiB))
    st = os.stat(src / "disk.img")
    assert st.st_size == GiB and st.st_blocks * 512 < 2 * MiB, "the source file is sparse"
    return src


def _bytes(ws: Workspace) -> int:
    return int(ws.report()["sources"]["images"]["bytes"])


def _mail_config(server: MailServer, pki: Pki, password_file: Path) -> str:
    return (f'[report]\nfrom = "pibackup@test.local"\nto = ["admin@example.com"]\n'
            f'when = "always"\n\n[report.smtp]\nhost = "127.0.0.1"\nport = {server.port}\n'
            f'security = "starttls"\nusername = "{USER}"\npassword_file = "{password_file}"\n'
            f'ca_file = "{pki.ca_file}"\ntimeout = "5s"\n')


@needs_root
@needs_loop
@pytest.mark.skipif(shutil.which("setsid") is None, reason="util-linux setsid is missing")
def test_a_sparse_image_counts_the_data_it_holds_everywhere(
        ws: Workspace, ext4_fs: Callable[..., Ext4], pki: Pki) -> None:
    # A 64 MiB backup disk: far less free space than the image's size, far
    # more than its data, so a warning about space would be a false alarm.
    fs = ext4_fs(ws.dest, 64)
    src = _sparse_source(ws)
    password_file = ws.root / "smtp-password"
    password_file.write_text(PASSWORD + "\n")
    metrics = ws.root / "pibackup.prom"
    with MailServer(pki) as server:
        ws.write_config(rsync_source("images", src) + _mail_config(server, pki, password_file)
                        + f'[monitor]\nmetrics_file = "{metrics}"\n')
        terminal = Terminal(ws, "run", "--no-progress")
        rc = terminal.finish()
        messages = list(server.messages)
    summary = terminal.text()
    assert rc == 0, summary

    [backup] = complete_backups(ws.dest)
    copy = os.stat(ws.dest / backup / "images" / "disk.img")
    assert copy.st_size == GiB and copy.st_blocks * 512 < 2 * MiB, "rsync kept it sparse"
    free, _ = fs.space()
    assert free < GiB

    written = _bytes(ws)
    assert MiB <= written < 2 * MiB, written
    assert f'pibackup_source_bytes{{destination="{ws.dest}",source="images"}} {written}' \
        in metrics.read_text().splitlines()

    [message] = messages
    mail = parts(message)
    assert "GiB" not in mail.text, mail.text
    assert "WARNING" not in mail.text, "free space is plenty for what this backup wrote"
    assert re.search(r"^  written +1\.\d MiB$", mail.text, re.MULTILINE), mail.text
    attached: dict[str, Any] = json.loads(mail.attachments[f"{backup}.json"])
    assert attached["sources"]["images"]["bytes"] == written

    row = next(line for line in summary.splitlines() if line.lstrip().startswith("images "))
    assert re.search(r" 1\.\d MiB ", row) and "GiB" not in row, row


def test_an_unchanged_second_run_writes_only_its_folders(ws: Workspace) -> None:
    ws.write_config(rsync_source("images", _sparse_source(ws)))
    cli_ok(ws, "run")
    assert MiB <= _bytes(ws) < 2 * MiB

    cli_ok(ws, "run")
    assert len(complete_backups(ws.dest)) == 2
    assert 0 <= _bytes(ws) <= FOLDERS, _bytes(ws)


def test_a_second_run_counts_the_one_new_file(ws: Workspace) -> None:
    src = _sparse_source(ws)
    ws.write_config(rsync_source("images", src))
    cli_ok(ws, "run")

    (src / "new.bin").write_bytes(os.urandom(100 * KiB))
    cli_ok(ws, "run")
    assert 100 * KiB <= _bytes(ws) <= 100 * KiB + FOLDERS, _bytes(ws)


def test_hard_links_inside_a_source_count_once(ws: Workspace) -> None:
    src = ws.make_source("images", {"notes.txt": "x\n"})
    (src / "a.bin").write_bytes(os.urandom(256 * KiB))
    os.link(src / "a.bin", src / "b.bin")
    ws.write_config(rsync_source("images", src))
    cli_ok(ws, "run")

    [backup] = complete_backups(ws.dest)
    copy = ws.dest / backup / "images"
    assert os.stat(copy / "a.bin").st_ino == os.stat(copy / "b.bin").st_ino, "rsync -H"
    assert 256 * KiB <= _bytes(ws) <= 256 * KiB + FOLDERS, _bytes(ws)


def test_a_new_link_to_an_unchanged_file_writes_nothing(ws: Workspace) -> None:
    src = ws.make_source("images", {"notes.txt": "x\n"})
    (src / "a.bin").write_bytes(os.urandom(256 * KiB))
    ws.write_config(rsync_source("images", src))
    cli_ok(ws, "run")
    # Named to come both before and after a.bin in a folder's listing.
    for name in ("0-link.bin", "z-link.bin"):
        os.link(src / "a.bin", src / name)

    cli_ok(ws, "run")
    first, second = (ws.dest / b / "images" for b in complete_backups(ws.dest))
    inodes = {os.stat(second / n).st_ino for n in ("a.bin", "0-link.bin", "z-link.bin")}
    assert inodes == {os.stat(first / "a.bin").st_ino}, "linked to the earlier backup's copy"
    assert 0 <= _bytes(ws) <= FOLDERS, _bytes(ws)


def test_the_logged_figure_is_the_reported_one(ws: Workspace) -> None:
    ws.write_config(rsync_source("images", _sparse_source(ws)))
    result = cli_ok(ws, "run", "--log-format", "json")
    logged = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    # The copy's bytes are counted by the manifest's walk: the save's line gives them.
    [finished] = [e for e in logged if e["event"] == "save finished"]
    assert finished["bytes"] == _bytes(ws) < 2 * MiB


def _rsync(src: Path, target: Path, link_dest: Path | None = None) -> None:
    extra = [f"--link-dest={link_dest}"] if link_dest else []
    subprocess.run([*RSYNC_BASE, *extra, f"{src}/", f"{target}/"], check=True,
                   capture_output=True)


def test_the_walk_pairs_each_entry_with_the_earlier_copy(ws: Workspace) -> None:
    src = ws.make_source("data", {"keep.txt": "same\n", "edit.txt": "v1\n",
                                  "sub/deep.txt": "deep\n"})
    (src / "to-sub").symlink_to("sub")
    first, second = ws.root / "first", ws.root / "second"
    _rsync(src, first)
    (src / "edit.txt").write_text("version 2\n")
    _rsync(src, second, first)

    found = {f.path: f.linked for f in walk_copy(str(second), str(first))}
    # A link to a folder is listed, never entered; folders are never "linked".
    assert set(found) == {"keep.txt", "edit.txt", "sub", "sub/deep.txt", "to-sub"}
    assert found["keep.txt"] and found["sub/deep.txt"]
    assert not found["edit.txt"] and not found["sub"]
    assert {f.path for f in walk_copy(str(first), None) if f.linked} == set()

    # Without the earlier copy to compare with, link counts tell the same.
    alone = written_bytes(str(second), None)
    assert alone == written_bytes(str(second), str(first))
    edited = os.lstat(second / "edit.txt").st_blocks * 512
    assert edited <= alone <= edited + FOLDERS, (alone, edited)
    assert written_bytes(str(ws.root / "missing"), None) == 0
