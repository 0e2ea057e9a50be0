"""End to end: ``restore`` gets back what ``run`` saved (SPEC §7).

Every test makes real backups with ``run`` and restores them through the
CLI with real rsync; btrfs on loop devices and a real OpenSSH sshd where the
test says so.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from typing import TYPE_CHECKING

import pytest
from btrfskit import btrfs_source, is_subvolume, needs_btrfs, save_command
from conftest import needs_root, needs_rsync
from datakit import (
    acl_listing,
    assert_same_tree,
    build_tree,
    cli_ok,
    complete_backups,
    have_tool,
    rsync_source,
    settle_times,
    write_raw_config,
)
from hookkit import HookSpec, hook_toml, release_marker, start, started_marker, wait_marker
from sshkit import SSHD

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from btrfskit import Btrfs
    from conftest import Workspace
    from sshkit import Sshd

pytestmark = needs_rsync


# --- helpers ----------------------------------------------------------------------------


def fidelity_tree(root: Path) -> None:
    """test_fidelity's tree plus what needs root or tools: owners, ACLs, xattrs."""
    root.mkdir(parents=True, exist_ok=True)
    build_tree(root)
    (root / "tagged").write_text("tagged\n")
    os.setxattr(root / "tagged", "user.binary", b"\x00\x01\xff")
    os.setxattr(root / "sub dir", "user.note", b"a folder note")
    if os.geteuid() == 0:
        (root / "owned").write_text("owned by ids nobody knows\n")
        os.chown(root / "owned", 12345, 54321)
        os.chown(root / "sub dir" / "inner", 23456, 34567)
    if have_tool("setfacl"):
        subprocess.run(["setfacl", "-m", "u:12345:r-x,g:23456:rw-", str(root / "tagged")],
                       check=True)
        subprocess.run(["setfacl", "-d", "-m", "u:12345:r-x", str(root / "sub dir")],
                       check=True)
    os.utime(root / "tagged", ns=(1_500_000_000_000_000_000,) * 2)
    os.utime(root / "sub dir", ns=(1_500_000_000_000_000_000,) * 2)
    os.utime(root, ns=(1_500_000_000_000_000_000,) * 2)


def assert_restored(source: Path, restored: Path) -> None:
    assert_same_tree(source, restored)
    if have_tool("getfacl"):
        assert acl_listing(restored) == acl_listing(source)
    st = os.stat(restored / "sparse.img")
    assert st.st_size == 64 * 1024 * 1024
    if os.stat(source / "sparse.img").st_blocks * 512 <= 4 * 1024 * 1024:
        assert st.st_blocks * 512 <= 1024 * 1024, "the restored sparse file lost its holes"


def restore(ws: Workspace, *args: str) -> subprocess.CompletedProcess[str]:
    return ws.run("restore", *args, timeout=120)


def expect(result: subprocess.CompletedProcess[str], code: int) -> None:
    assert result.returncode == code, (
        f"exit {result.returncode}, expected {code}\nstdout:\n{result.stdout}\n"
        f"stderr:\n{result.stderr}")


def two_backups(ws: Workspace, src: Path, between: Callable[[], None],
                **keys: object) -> tuple[str, str]:
    """Back up ``src``, call ``between``, back up again: the two names, older first."""
    ws.write_config(rsync_source("data", src, **keys))
    cli_ok(ws, "run")
    between()
    cli_ok(ws, "run")
    older, newer = sorted(complete_backups(ws.dest))
    return older, newer


def event_hook(ws: Workspace) -> str:
    """A backup hook logging what restore's hooks must see (SPEC §7)."""
    line = ('{phase}|$PIBACKUP_COMMAND|$PIBACKUP_NAME|$PIBACKUP_BACKUP_DIR|'
            '${{PIBACKUP_STATUS-unset}}')
    events = shlex.quote(str(ws.events))
    return hook_toml(ws, HookSpec("mount", phases=())) + "\n".join([
        f'pre = \'echo "{line.format(phase="pre")}" >> {events}\'',
        f'post = \'echo "{line.format(phase="post")}" >> {events}\'',
    ]) + "\n"


# --- 1. round trips ---------------------------------------------------------------------


@needs_root
def test_whole_source_round_trip_is_identical(ws: Workspace) -> None:
    src = ws.src / "data"
    fidelity_tree(src)
    ws.write_config(rsync_source("data", src))
    cli_ok(ws, "run")

    target = ws.root / "restored"
    result = cli_ok(ws, "restore", "latest", "data", "--to", str(target))

    assert_restored(src, target)
    [name] = complete_backups(ws.dest)
    assert f"restoring from backup {name} (latest)" in result.stderr
    assert result.stdout == ""
    # restore writes no report file.
    assert [p.name for p in ws.reports()] == [f"{name}.json"]


@needs_root
@needs_btrfs
@pytest.mark.slow
@pytest.mark.root
def test_btrfs_source_received_into_btrfs_restores_identically(
        ws: Workspace, btrfs_fs: Callable[..., Btrfs]) -> None:
    source = btrfs_fs(ws.src / "vol").subvolume("data")
    btrfs_fs(ws.dest)
    fidelity_tree(source)
    ws.write_config(btrfs_source("data", source))
    cli_ok(ws, "run")
    [name] = complete_backups(ws.dest)
    assert "receive" in " ".join(save_command(ws.report()))
    assert is_subvolume(ws.dest / name / "data")

    target = ws.root / "restored"
    cli_ok(ws, "restore", "latest", "data", "--to", str(target))

    assert_restored(source, target)


@needs_root
@pytest.mark.skipif(not os.path.exists(SSHD), reason="OpenSSH sshd is not installed")
def test_push_to_a_host_over_ssh_is_identical(ws: Workspace, sshd: Sshd) -> None:
    src = ws.src / "data"
    fidelity_tree(src)
    ws.write_config(sshd.host_toml("far") + rsync_source("data", src))
    cli_ok(ws, "run")
    logins = sshd.logins()

    target = ws.root / "pushed"
    cli_ok(ws, "restore", "latest", "data", "--to", f"far:{target}")

    assert_restored(src, target)
    assert sshd.logins() > logins, "the restore did not go through the test sshd"


@needs_root
@pytest.mark.skipif(not os.path.exists(SSHD), reason="OpenSSH sshd is not installed")
def test_push_refuses_a_host_whose_key_does_not_match(ws: Workspace, sshd: Sshd) -> None:
    src = ws.make_source("data")
    ws.write_config(sshd.host_toml("far", known_hosts=sshd.wrong_known_hosts())
                    + rsync_source("data", src))
    cli_ok(ws, "run")

    target = ws.root / "pushed"
    result = restore(ws, "latest", "data", "--to", f"far:{target}")

    expect(result, 1)
    assert "host key" in result.stderr.lower() or "verif" in result.stderr.lower()
    assert not target.exists()


# --- 2. items, dry run, delete -------------------------------------------------------------


def test_one_file_and_one_folder_land_under_their_own_names(ws: Workspace) -> None:
    src = ws.src / "data"
    src.mkdir()
    build_tree(src)
    ws.write_config(rsync_source("data", src))
    cli_ok(ws, "run")
    target = ws.root / "r"

    cli_ok(ws, "restore", "latest", "data/sub dir/inner", "--to", str(target))
    cli_ok(ws, "restore", "latest", "data/sub dir", "--to", str(target))
    # An odd name, written as every output shows it (SPEC §7).
    cli_ok(ws, "restore", "latest", "data/new\\nline", "--to", str(target))

    assert sorted(os.listdir(os.fsencode(target))) == [b"inner", b"new\nline", b"sub dir"]
    assert (target / "inner").read_bytes() == (src / "sub dir" / "inner").read_bytes()
    assert os.stat(target / "inner").st_mtime_ns == os.stat(src / "sub dir" / "inner").st_mtime_ns
    assert_same_tree(src / "sub dir", target / "sub dir")
    assert (target / "new\nline").read_bytes() == (src / "new\nline").read_bytes()


def test_dry_run_lists_the_changes_and_writes_nothing(ws: Workspace) -> None:
    src = ws.src / "data"
    src.mkdir()
    build_tree(src)
    ws.write_config(event_hook(ws) + rsync_source("data", src))
    cli_ok(ws, "run")
    [name] = complete_backups(ws.dest)
    ws.events.unlink()
    target = ws.root / "r"

    result = cli_ok(ws, "restore", "latest", "data", "--to", str(target), "--dry-run")

    assert not target.exists()
    assert not ws.events.exists(), "a dry run ran a hook"
    assert f"backup {name} (latest)" in result.stdout
    lines = result.stdout.splitlines()
    for shown in ("new\\nline", "bad \\xff\\xfe byte", "tab\\there", "sub dir/inner"):
        assert any(line.endswith(" " + shown) and line.startswith(">f") for line in lines), (
            shown, result.stdout)
    assert "nothing was changed" in lines[-1]

    # On an existing target: only what differs, still nothing written.
    cli_ok(ws, "restore", "latest", "data", "--to", str(target))
    (target / "plain.txt").write_text("changed since\n")
    (target / "extra").write_text("not in the backup\n")
    before = sorted(os.listdir(target))

    result = cli_ok(ws, "restore", "latest", "data", "--to", str(target), "--dry-run",
                    "--delete")

    changes = [line for line in result.stdout.splitlines() if line[:1] in ">*c."]
    assert any(line.startswith(">f") and line.endswith(" plain.txt") for line in changes)
    assert "*deleting   extra" in changes
    assert not any("inner" in line for line in changes), result.stdout
    assert (target / "plain.txt").read_text() == "changed since\n"
    assert sorted(os.listdir(target)) == before


def test_delete_removes_only_what_the_backup_lacks_and_never_what_it_leaves_out(
        ws: Workspace) -> None:
    src = ws.make_source("data", {"keep.txt": "v1\n", "photos/2020/a.jpg": "a\n",
                                  "photos/2020/tmp/scratch": "s\n", "cache/c": "c\n"})
    settle_times(src)
    ws.write_config(rsync_source("data", src,
                                 exclude=["cache/", "*.tmp", "/photos/2020/tmp/"]))
    cli_ok(ws, "run")
    target = ws.root / "r"
    cli_ok(ws, "restore", "latest", "data", "--to", str(target))
    assert not (target / "cache").exists() and not (target / "photos/2020/tmp").exists()
    (target / "keep.txt").write_text("edited later, longer\n")
    for rel in ("stray", "photos/2020/stray.jpg", "cache/local", "photos/x.tmp",
                "photos/2020/tmp/mine"):
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        (target / rel).write_text("only in the target\n")
    (ws.root / "beside").mkdir()
    (ws.root / "beside" / "other").write_text("outside the item\n")

    cli_ok(ws, "restore", "latest", "data", "--to", str(target))

    assert (target / "keep.txt").read_text() == "v1\n"
    assert (target / "stray").exists() and (target / "photos/2020/stray.jpg").exists()

    # A folder two levels down: the anchored exclude still protects its part.
    cli_ok(ws, "restore", "latest", "data/photos/2020", "--to", str(ws.root / "beside"),
           "--delete")
    cli_ok(ws, "restore", "latest", "data", "--to", str(target), "--delete")

    assert not (target / "stray").exists()
    assert not (target / "photos/2020/stray.jpg").exists()
    for kept in ("cache/local", "photos/x.tmp", "photos/2020/tmp/mine"):
        assert (target / kept).exists(), f"--delete removed excluded {kept}"
    assert (ws.root / "beside" / "other").exists(), "--delete acted outside the item"
    assert (ws.root / "beside" / "2020" / "a.jpg").read_text() == "a\n"


def test_delete_into_the_live_source_keeps_the_destination_and_state_it_excludes(
        ws: Workspace) -> None:
    tree = ws.root / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "conf").write_text("good\n")
    write_raw_config(ws, (f'destination = "{tree}/backups"\nstate_dir = "{tree}/state"\n'
                          + rsync_source("root", tree)))
    (tree / "backups").mkdir()
    cli_ok(ws, "run")
    (tree / "etc" / "conf").write_text("broken\n")
    (tree / "junk").write_text("new since\n")

    cli_ok(ws, "restore", "latest", "root", "--to", str(tree), "--delete")

    assert (tree / "etc" / "conf").read_text() == "good\n"
    assert not (tree / "junk").exists()
    assert len(complete_backups(tree / "backups")) == 1
    assert (tree / "state" / "reports").is_dir()

    # A retired source (not configured): nothing says what is left out, so refused.
    write_raw_config(ws, (f'destination = "{tree}/backups"\nstate_dir = "{tree}/state"\n'
                          + rsync_source("other", ws.make_source("other"))))
    result = restore(ws, "latest", "root", "--to", str(tree), "--delete")
    expect(result, 2)
    assert "refused" in result.stderr
    # Without --delete nothing is removed: allowed, and SOURCE need not be configured.
    (tree / "etc" / "conf").write_text("broken again\n")
    cli_ok(ws, "restore", "latest", "root/etc", "--to", str(tree))
    assert (tree / "etc" / "conf").read_text() == "good\n"


# --- refusals and lookups -------------------------------------------------------------------


def test_refusals_exit_2_before_any_hook(ws: Workspace) -> None:
    src = ws.make_source("data")
    ws.write_config(event_hook(ws) + rsync_source("data", src))
    cli_ok(ws, "run")
    ws.events.unlink()
    ok_target = str(ws.root / "r")
    refused = [
        ("2021-13-45", "data", ok_target),                       # malformed name
        ("yesterday", "data", ok_target),
        ("latest", "data/../etc", ok_target),                    # PATH with ..
        ("latest", "data/a/../../x", ok_target),
        ("latest", "../data", ok_target),                        # not a source name
        ("latest", "data/bad\\q", ok_target),                    # malformed escape
        ("latest", "data", str(ws.dest / "inside")),             # TARGET in the destination
        ("latest", "data", str(ws.dest)),
        ("latest", "data", str(ws.state / "x")),                 # TARGET in state_dir
        ("latest", "data", "nohost:/tmp/x"),                     # a host [hosts] lacks
    ]
    for backup, item, target in refused:
        result = restore(ws, backup, item, "--to", target)
        expect(result, 2)
        assert result.stderr.startswith("error: "), result.stderr
    # --delete into a folder that holds the destination, not left out by the source.
    result = restore(ws, "latest", "data", "--to", str(ws.root), "--delete")
    expect(result, 2)
    assert str(ws.dest) in result.stderr
    assert not ws.events.exists(), "a refused restore ran a hook"
    assert not (ws.root / "r").exists()


def test_what_the_destination_lacks_exits_1_and_names_the_backup_that_has_it(
        ws: Workspace) -> None:
    src = ws.make_source("data", {"old.txt": "old\n"})
    older, newer = two_backups(ws, src, lambda: (src / "new.txt").write_text("new\n"))
    target = ws.root / "r"

    result = restore(ws, older, "data/new.txt", "--to", str(target))
    expect(result, 1)
    assert f"backup {older} does not hold data/new.txt" in result.stderr
    assert f"the newest backup that holds it is {newer}" in result.stderr

    result = restore(ws, "latest", "data/never.txt", "--to", str(target))
    expect(result, 1)
    assert "no complete backup holds data/never.txt" in result.stderr
    expect(restore(ws, "latest", "other", "--to", str(target)), 1)
    expect(restore(ws, "2001-01-01t00-00-00+0000", "data", "--to", str(target)), 1)
    expect(restore(ws, "latest", "data", "--to", str(ws.root / "no" / "r")), 1)
    expect(restore(ws, "latest", "data", "--dry-run", "--to", str(ws.root / "no" / "r")), 1)
    assert not target.exists()

    # Explicitly named, the older backup restores its own content.
    cli_ok(ws, "restore", older, "data", "--to", str(target))
    assert sorted(os.listdir(target)) == ["old.txt"]


def test_a_run_holding_the_lock_makes_restore_exit_3(ws: Workspace) -> None:
    src = ws.make_source("data")
    ws.write_config(hook_toml(ws, HookSpec("b1", block=("pre",)))
                    + rsync_source("data", src))
    with start(ws) as running:
        wait_marker(started_marker(ws, "b1", "pre"), running)
        result = restore(ws, "latest", "data", "--to", str(ws.root / "r"))
        release_marker(ws, "b1", "pre").touch()
        assert running.wait() == 0, running.stderr

    expect(result, 3)
    assert "lock" in result.stderr
    assert not (ws.root / "r").exists()


def test_the_backup_hooks_run_around_a_restore(ws: Workspace) -> None:
    src = ws.make_source("data")
    ws.write_config(event_hook(ws) + rsync_source("data", src))
    cli_ok(ws, "run")
    [name] = complete_backups(ws.dest)
    ws.events.unlink()

    cli_ok(ws, "restore", "latest", "data", "--to", str(ws.root / "r"))
    failed = restore(ws, "latest", "data/missing", "--to", str(ws.root / "r2"))

    expect(failed, 1)
    assert ws.event_lines() == [
        "pre|restore|latest||unset",
        f"post|restore|{name}|{ws.dest / name}|ok",
        "pre|restore|latest||unset",
        "post|restore|||failed",
    ]
