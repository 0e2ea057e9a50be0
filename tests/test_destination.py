"""The destination as one adapter (issue 18 item 2), end to end through the real CLI.

Each test is a review finding: an OSError while removing a failed optional
source's folder cancelled every other source (bug 11).
"""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING

import pytest
from conftest import needs_root, needs_rsync
from hookkit import source_toml

if TYPE_CHECKING:
    from collections.abc import Iterator

    from conftest import Workspace

pytestmark = needs_rsync


# --- bug 11: a failed optional source's folder that cannot be removed --------------------


@pytest.fixture
def immutable_cleanup(ws: Workspace) -> Iterator[None]:
    yield
    # chattr +i files keep tmp_path from being removed: give them back.
    subprocess.run(["chattr", "-R", "-i", str(ws.dest)], check=False, capture_output=True)


@needs_root
@pytest.mark.usefixtures("immutable_cleanup")
def test_optional_source_folder_that_cannot_be_removed_cancels_no_other_source(
    ws: Workspace,
) -> None:
    # A snapshot hook leaves an immutable file in the optional source's folder:
    # removing that folder after the source fails raises EPERM.
    pre = ('mkdir -p "$PIBACKUP_BACKUP_DIR/laptop" && touch "$PIBACKUP_BACKUP_DIR/laptop/kept" '
           '&& chattr +i "$PIBACKUP_BACKUP_DIR/laptop/kept"')
    ws.write_config(
        f'[[snapshot_hooks]]\nname = "s1"\npre = {pre!r}\n'
        + source_toml("alpha", ws.make_source("alpha"))
        + source_toml("laptop", ws.src / "switched-off", optional=True)
        + source_toml("beta", ws.make_source("beta")))
    result = ws.run("run")
    assert result.returncode == 1, result.stderr
    report = ws.report()
    assert report["saved"] is True, report["failure"]
    assert report["status"] == "failed"
    assert 'source "laptop"' in report["failure"], report["failure"]
    assert "unexpected" not in report["failure"], report["failure"]
    assert report["sources"]["laptop"]["status"] == "failed"
    assert report["sources"]["alpha"]["status"] == "ok"
    assert report["sources"]["beta"]["status"] == "ok"
    [name] = ws.backups()
    assert (ws.dest / name / "alpha" / "file.txt").is_file()
    assert (ws.dest / name / "beta" / "file.txt").is_file()
    # What could not be removed is said, as a warning, with the folder.
    warned = [line for line in result.stderr.splitlines()
              if "laptop" in line and "not removed" in line]
    assert warned, result.stderr
