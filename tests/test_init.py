"""``init`` (SPEC §7): a first configuration that ``check`` accepts, never over a file.

Everything goes through the real CLI: ``init`` writes the file, ``check``
judges it. The btrfs case uses a loop-mounted btrfs (tests/btrfskit.py).
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import tomllib
from typing import TYPE_CHECKING, Any

import pytest
from btrfskit import needs_btrfs
from conftest import CLI
from pibackup_async.engine.config import load_config

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from btrfskit import Btrfs
    from conftest import Workspace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def init(ws: Workspace, *args: str, output: Path | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``init`` with ``args``; ``-c`` (the workspace's config) unless ``output`` is given."""
    where = ["--output", str(output)] if output is not None else ["-c", str(ws.config_path)]
    return subprocess.run([*CLI, "init", *args, *where], capture_output=True, text=True,
                          timeout=60, env=ws.env(env))


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "check", "-c", str(path)], capture_output=True, text=True,
                          timeout=60)


def sources_of(path: Path) -> list[dict[str, Any]]:
    with open(path, "rb") as f:
        return list(tomllib.load(f)["sources"])


def test_rsync_sources_named_uniquely_and_check_passes(ws: Workspace) -> None:
    data = ws.make_source("srv/data")
    other_data = ws.make_source("home/data")
    odd = ws.make_source("My Photos (2021)")
    result = init(ws, "--destination", str(ws.dest), "--source", str(data),
                  "--source", str(other_data) + "/", "--source", str(odd))
    assert result.returncode == 0, result.stderr
    # One line on stderr: what was written, and what to do next.
    [note] = result.stderr.strip().splitlines()
    assert str(ws.config_path) in note
    assert f"pibackup-async check -c {ws.config_path}" in note
    assert result.stdout == ""

    sources = sources_of(ws.config_path)
    assert [(s["name"], s["type"], s["path"]) for s in sources] == [
        ("data", "rsync", f"{data}/"),
        ("data-2", "rsync", f"{other_data}/"),
        ("My-Photos-2021", "rsync", f"{odd}/"),
    ]
    assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", s["name"]) for s in sources)
    with open(ws.config_path, "rb") as f:
        assert tomllib.load(f)["destination"] == str(ws.dest)
    # Hook commands and tokens may be added to it: private from the start.
    assert stat.S_IMODE(os.stat(ws.config_path).st_mode) == 0o600

    checked = check(ws.config_path)
    assert checked.returncode == 0, checked.stderr
    assert "ok (3 sources, 0 hooks)" in checked.stderr


def test_every_option_of_the_sample_is_shown(ws: Workspace, tmp_path: Path) -> None:
    result = init(ws, "--source", str(ws.make_source("data")), output=tmp_path / "c.toml")
    assert result.returncode == 0, result.stderr

    def keys(text: str) -> set[str]:
        found = set(re.findall(r"^[ #]*\[{1,2}([a-z_.]+)\]{1,2}", text, re.M))
        return found | set(re.findall(r"^[ #]*([a-z_]+) *=", text, re.M))

    with open(os.path.join(REPO, "sample-config.toml")) as f:
        sample = keys(f.read())
    written = (tmp_path / "c.toml").read_text()
    assert {"destination", "sources", "retention", "hosts.nas", "report.smtp",
            "snapshot_dir", "password_file"} <= sample
    assert sample - keys(written) == set()
    # Without --destination: a default under /mnt/backup, said so in the file.
    with open(tmp_path / "c.toml", "rb") as f:
        assert tomllib.load(f)["destination"].startswith("/mnt/backup/")
    assert "no --destination given" in written
    checked = check(tmp_path / "c.toml")
    assert checked.returncode == 0, checked.stderr


def test_require_mountpoint_is_always_written_true(ws: Workspace) -> None:
    # An unmounted backup disk's folder on the root disk: the night its mount
    # hook is forgotten, only require_mountpoint stops the run filling the root disk.
    result = init(ws, "--destination", str(ws.dest), "--source", str(ws.make_source("data")))
    assert result.returncode == 0, result.stderr
    with open(ws.config_path, "rb") as f:
        assert tomllib.load(f)["require_mountpoint"] is True
    checked = check(ws.config_path)
    assert checked.returncode == 0, checked.stderr
    assert f"{ws.dest} is not on a mounted filesystem" in checked.stderr


def test_the_sample_and_init_keep_the_lock_in_state_dir(ws: Workspace) -> None:
    # A lock in a folder every user can write (/run/lock) lets anyone stop every backup.
    sample = load_config(os.path.join(REPO, "sample-config.toml"))
    assert sample.lock_path == os.path.join(sample.state_dir, "lock")
    result = init(ws, "--destination", str(ws.dest), "--source", str(ws.make_source("data")))
    assert result.returncode == 0, result.stderr
    written = load_config(str(ws.config_path))
    assert written.lock_path == os.path.join(written.state_dir, "lock")


def test_slash_is_named_root_and_nested_sources_are_left_out_of_it(ws: Workspace) -> None:
    data = ws.make_source("data")
    result = init(ws, "--destination", str(ws.dest), "--source", "/", "--source", str(data))
    assert result.returncode == 0, result.stderr
    root, second = sources_of(ws.config_path)
    assert (root["name"], root["type"], root["path"]) == ("root", "rsync", "/")
    # The system's pseudo-filesystems are left out, and the other source is not copied twice.
    assert {"/proc/*", "/sys/*", "/dev/*", "/run/*"} <= set(root["exclude"])
    assert f"{data}/*" in root["exclude"]
    assert second["name"] == "data" and "exclude" not in second
    checked = check(ws.config_path)
    assert checked.returncode == 0, checked.stderr


def test_never_overwrites(ws: Workspace) -> None:
    ws.config_path.write_text("# mine\n")
    os.chmod(ws.config_path, 0o640)
    result = init(ws, "--source", str(ws.make_source("data")))
    assert result.returncode == 2
    assert "already exists" in result.stderr
    assert ws.config_path.read_text() == "# mine\n"
    assert stat.S_IMODE(os.stat(ws.config_path).st_mode) == 0o640
    # Nothing left beside it either (no temporary file).
    assert sorted(p.name for p in ws.root.iterdir() if p.name.startswith(".init")) == []


def test_needs_a_source_and_an_existing_folder(ws: Workspace) -> None:
    result = init(ws, "--destination", str(ws.dest))
    assert result.returncode == 2
    assert "--source" in result.stderr
    assert not ws.config_path.exists()

    missing = init(ws, "--source", str(ws.src / "nope"))
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr
    assert not ws.config_path.exists()

    inside = ws.dest / "inside"
    inside.mkdir()
    refused = init(ws, "--destination", str(ws.dest), "--source", str(inside))
    assert refused.returncode == 2
    assert "inside the destination" in refused.stderr
    assert not ws.config_path.exists()
    assert [p.name for p in ws.root.iterdir() if p.name.startswith(".init")] == []


def test_output_defaults_to_dash_c_then_pibackup_config(ws: Workspace, tmp_path: Path) -> None:
    data = ws.make_source("data")
    # -c names the file to write (ws.config_path: init() passes -c without --output).
    result = init(ws, "--source", str(data))
    assert result.returncode == 0, result.stderr
    assert sources_of(ws.config_path)[0]["name"] == "data"

    # Without -c: $PIBACKUP_CONFIG; its folder is created when missing.
    target = tmp_path / "etc" / "pibackup-async" / "config.toml"
    env = {**ws.env(), "PIBACKUP_CONFIG": str(target)}
    plain = subprocess.run([*CLI, "init", "--source", str(data)], capture_output=True,
                           text=True, timeout=60, env=env)
    assert plain.returncode == 0, plain.stderr
    assert sources_of(target)[0]["path"] == f"{data}/"
    assert stat.S_IMODE(os.stat(target.parent).st_mode) == 0o700


@needs_btrfs
@pytest.mark.root
@pytest.mark.slow
def test_btrfs_subvolume_becomes_a_btrfs_source(ws: Workspace,
                                                btrfs_fs: Callable[..., Btrfs]) -> None:
    fs = btrfs_fs(ws.src / "vol")
    db = fs.subvolume("db")
    plain = ws.make_source("vol/plain")
    result = init(ws, "--destination", str(ws.dest), "--source", str(db),
                  "--source", str(plain), "--source", str(fs.mount))
    assert result.returncode == 0, result.stderr
    db_source, plain_source, top = sources_of(ws.config_path)
    assert (db_source["name"], db_source["type"], db_source["path"]) == ("db", "btrfs", str(db))
    assert "exclude" not in db_source
    assert (plain_source["name"], plain_source["type"]) == ("plain", "rsync")
    # The filesystem's top is a subvolume too, but its default snapshot_dir (beside it)
    # is on another filesystem: rsync, with the reason in a comment, and the other two
    # sources inside it left out.
    assert (top["name"], top["type"]) == ("vol", "rsync")
    assert set(top["exclude"]) == {"/db/*", "/plain/*"}
    assert "is a btrfs subvolume, but" in ws.config_path.read_text()
    checked = check(ws.config_path)
    assert checked.returncode == 0, checked.stderr
    assert "ok (3 sources, 0 hooks)" in checked.stderr
