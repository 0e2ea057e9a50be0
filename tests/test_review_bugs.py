"""Issue 18's code review, reproduced with the real parts (bug 4, the snapshot listing of a
host that stops answering, is in test_remote_btrfs.py beside its fixtures).

9: the destination and state_dir inside an rsync source are left out of it
whatever characters their names hold (rsync matches a pattern without
wildcards literally: a backslash is no escape there).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from conftest import needs_rsync
from datakit import cli_ok, complete_backups, rsync_source, toml_value, write_raw_config

if TYPE_CHECKING:
    from conftest import Workspace


# --- bug 9: exclusions of the engine's folders, with rsync's special characters -------------


@needs_rsync
@pytest.mark.parametrize("folder", ["back\\slash dest", "[x] dest", "star* q? \\[x] dest"])
def test_destination_and_state_with_special_characters_are_left_out_of_their_source(
        ws: Workspace, folder: str) -> None:
    src = ws.make_source("src", {"keep.txt": "keep\n", "sub/other.txt": "other\n",
                                 # Names a wrong pattern could match instead.
                                 "backslash dest/decoy.txt": "decoy\n",
                                 "x dest/decoy.txt": "decoy\n"})
    dest, state = src / folder, src / f"{folder} state"
    dest.mkdir()
    write_raw_config(ws, f"destination = {toml_value(str(dest))}\n"
                         f"state_dir = {toml_value(str(state))}\n"
                         + rsync_source("src", src))

    cli_ok(ws, "run")
    cli_ok(ws, "run")  # the first backup and its report now lie inside the source

    latest = dest / complete_backups(dest)[-1] / "src"
    assert sorted(p.name for p in latest.iterdir()) == sorted(
        ["keep.txt", "sub", "backslash dest", "x dest"]), (
        "the destination or state_dir was backed up into itself")
    assert (latest / "keep.txt").read_text() == "keep\n"
    assert (latest / "sub" / "other.txt").read_text() == "other\n"
    assert (latest / "backslash dest" / "decoy.txt").read_text() == "decoy\n"
    assert (latest / "x dest" / "decoy.txt").read_text() == "decoy\n"
