"""``check`` beyond the file (SPEC §5): its warnings, and state_dir / lock_file it refuses.

Warnings never fail ``check`` (exit 0): a backup hook may mount the disk,
install the program, create the source. An unusable ``state_dir`` or lock
file fails it with exit 1, one line naming the path, judged by type, owner
and mode bits, never by writing.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from typing import TYPE_CHECKING

import pytest
from btrfskit import btrfs_source, mount_points, needs_btrfs
from conftest import CLI, needs_root
from datakit import rsync_source, table, toml_value
from pibackup_async.engine.config import load_config
from smtpkit import PASSWORD, USER, MailServer, Pki

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from btrfskit import Btrfs
    from conftest import Workspace
    from smtpkit import Security

NOBODY = 65534
MOUNT_HOOK = table("[[backup_hooks]]", name="mount", pre=["true"], post=["true"])


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A small tmpfs mounted under the test's folder: a filesystem other than the root one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=755", "tmpfs", str(mount)],
                   check=True)
    try:
        yield mount
    finally:
        while str(mount) in mount_points():
            subprocess.run(["umount", "-l", str(mount)], check=True)


def write(ws: Workspace, body: str = "", *, header: str = "") -> None:
    ws.write_config(body or rsync_source("data", ws.make_source("data")), header=header)


def check(ws: Workspace, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = ws.run("check", env=env)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def assert_ok_with_warning(result: subprocess.CompletedProcess[str], *texts: str) -> None:
    assert result.returncode == 0, result.stderr
    assert "ok (" in result.stderr, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "[warning" in line]
    for text in texts:
        assert any(text in line for line in warnings), f"{text!r} not warned:\n{result.stderr}"


def assert_unusable(result: subprocess.CompletedProcess[str], *texts: str) -> None:
    assert result.returncode == 1, f"exit {result.returncode}:\n{result.stderr}"
    assert "ok (" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    for text in texts:
        assert any(text in line for line in errors), f"{text!r} not an error:\n{result.stderr}"


# --- warnings ----------------------------------------------------------------------------


@needs_root
def test_a_clean_config_has_no_warning(ws: Workspace, tmpfs: Path) -> None:
    # Off the root filesystem, require_mountpoint is not needed to keep it safe.
    dest = tmpfs / "backups"
    dest.mkdir()
    ws.config_path.write_text(f'destination = "{dest}"\nstate_dir = "{ws.state}"\n'
                              + rsync_source("data", ws.make_source("data")))
    result = check(ws)
    assert result.returncode == 0, result.stderr
    assert "[warning" not in result.stderr, result.stderr


def test_warns_when_require_mountpoint_and_the_destination_is_on_the_root_disk(
        ws: Workspace) -> None:
    from pibackup_async.engine.preflight import on_mounted_filesystem

    assert not on_mounted_filesystem(str(ws.dest)), "the test needs tmp on the root filesystem"
    write(ws, header="require_mountpoint = true")
    result = check(ws)
    assert_ok_with_warning(result, f"destination: {ws.dest} is not on a mounted filesystem")
    assert "backup hook" not in result.stderr, "no backup hook could mount it"
    assert "root filesystem" not in result.stderr, "require_mountpoint keeps the root disk safe"

    write(ws, MOUNT_HOOK + rsync_source("data", ws.src / "data"),
          header="require_mountpoint = true")
    assert_ok_with_warning(check(ws), "a run fails unless a backup hook mounts it")


def test_warns_when_the_destination_is_on_the_root_disk_without_require_mountpoint(
        ws: Workspace) -> None:
    # The night the mount hook is forgotten or fails, the run fills the root disk.
    write(ws)
    assert_ok_with_warning(check(ws), f"destination: {ws.dest} is on the root filesystem "
                           "and require_mountpoint is not set")


@pytest.mark.parametrize("hooks", [
    "",
    table("[[snapshot_hooks]]", name="db", pre=["true"]),
    table("[[backup_hooks]]", name="only post", post=["true"]),
], ids=["no hooks", "a snapshot hook", "a backup hook without pre"])
def test_no_mount_hint_for_a_missing_destination_without_a_backup_pre(
        ws: Workspace, hooks: str) -> None:
    missing = ws.root / "disk" / "backups"
    ws.config_path.write_text(f'destination = "{missing}"\nstate_dir = "{ws.state}"\n'
                              + hooks + rsync_source("data", ws.make_source("data")))
    result = check(ws)
    assert_ok_with_warning(result, f"destination: {missing} does not exist")
    assert "backup hook" not in result.stderr, result.stderr


def test_mount_hint_for_a_missing_destination_with_a_backup_pre(ws: Workspace) -> None:
    missing = ws.root / "disk" / "backups"
    ws.config_path.write_text(f'destination = "{missing}"\nstate_dir = "{ws.state}"\n'
                              + MOUNT_HOOK + rsync_source("data", ws.make_source("data")))
    assert_ok_with_warning(check(ws), f"destination: {missing} does not exist (yet); "
                           "a backup hook may mount it")


@needs_root
def test_no_warning_when_the_destination_lies_on_a_mounted_disk(ws: Workspace,
                                                                 tmpfs: Path) -> None:
    dest = tmpfs / "backups"
    dest.mkdir()
    ws.config_path.write_text(f'destination = "{dest}"\nstate_dir = "{ws.state}"\n'
                              "require_mountpoint = true\n"
                              + rsync_source("data", ws.make_source("data")))
    result = check(ws)
    assert result.returncode == 0, result.stderr
    assert "[warning" not in result.stderr, result.stderr


def test_warns_when_a_local_rsync_source_does_not_exist(ws: Workspace) -> None:
    write(ws, rsync_source("data", ws.make_source("data"))
          + rsync_source("gone", ws.src / "gone")
          + "[hosts.nas]\naddress = \"127.0.0.1\"\n"
          + rsync_source("far", "/no/such/folder/on/nas", host="nas"))
    result = check(ws)
    assert_ok_with_warning(result, f"sources[1].path: {ws.src / 'gone'} does not exist")
    assert "sources[2]" not in result.stderr, "a remote path is not looked at without --connect"
    assert "sources[0]" not in result.stderr


def test_warns_about_list_form_hooks_whose_program_cannot_start(ws: Workspace) -> None:
    plain = ws.root / "not-executable.sh"
    plain.write_text("#!/bin/sh\n")
    plain.chmod(0o644)
    tools = ws.root / "tools"
    tools.mkdir()
    mine = tools / "mine"
    mine.write_text("#!/bin/sh\n")
    mine.chmod(0o755)
    body = (
        table("[[backup_hooks]]", name="typo", pre=["umuont", "/mnt"], post=["true"])
        + table("[[snapshot_hooks]]", name="plain", post=[str(plain)])
        + table("[[snapshot_hooks]]", name="gone", pre=[str(ws.root / "gone")])
        + table("[[snapshot_hooks]]", name="shell", pre="no-such-program-xyz --stop")
        + table("[[snapshot_hooks]]", name="own-path", pre=["mine"])
        + f'env = {{ PATH = "{tools}" }}\n'
        + table("[[snapshot_hooks]]", name="remote", pre=["no-such-program-xyz"], host="nas")
        + "[hosts.nas]\naddress = \"127.0.0.1\"\n"
        + rsync_source("data", ws.make_source("data"))
    )
    write(ws, body)

    result = check(ws)

    assert_ok_with_warning(
        result,
        "backup_hooks[0].pre: program 'umuont' is not found",
        f"snapshot_hooks[0].post: {plain} is not executable",
        f"snapshot_hooks[1].pre: {ws.root / 'gone'} does not exist",
    )
    # `true` is found; a string goes to /bin/sh; the hook's own PATH is searched;
    # a remote hook's program is on the host.
    for quiet in ("backup_hooks[0].post", "snapshot_hooks[2]", "snapshot_hooks[3]",
                  "snapshot_hooks[4]"):
        assert quiet not in result.stderr, result.stderr


@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_warns_when_not_running_as_root(ws: Workspace) -> None:
    write(ws)
    ws.state.mkdir()
    os.chown(ws.state, NOBODY, NOBODY)
    # A real other user; it keeps only the right to read what the test
    # left under root's private folders (the interpreter, the workspace).
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                 "--inh-caps=+dac_override", "--ambient-caps=+dac_override"]
    result = subprocess.run([*as_nobody, *CLI, "check", "-c", str(ws.config_path)],
                            capture_output=True, text=True, timeout=60, env=ws.env())

    assert "Traceback" not in result.stderr, result.stderr
    assert_ok_with_warning(result, "running as nobody (uid 65534), not root")
    assert "not root" not in check(ws).stderr


# --- state_dir and lock_file -------------------------------------------------------------


def test_missing_state_dir_and_lock_are_fine_and_not_created(ws: Workspace) -> None:
    write(ws, header=f'lock_file = "{ws.root}/run/lock/pibackup.lock"')
    result = check(ws)
    assert result.returncode == 0, result.stderr
    assert not ws.state.exists()
    assert not (ws.root / "run").exists()


def test_state_dir_that_is_a_file_fails(ws: Workspace) -> None:
    ws.state.write_text("oops\n")
    write(ws)
    assert_unusable(check(ws), f"state_dir {ws.state} is a file, not a folder")


def test_state_dir_that_links_to_a_file_fails(ws: Workspace) -> None:
    target = ws.root / "a-file"
    target.write_text("")
    ws.state.symlink_to(target)
    write(ws)
    assert_unusable(check(ws), f"state_dir {ws.state} is a symbolic link to a file")


def test_state_dir_that_links_to_nothing_fails(ws: Workspace) -> None:
    ws.state.symlink_to(ws.root / "nowhere")
    write(ws)
    assert_unusable(check(ws), f"state_dir {ws.state} is a symbolic link to nothing")


def test_state_dir_under_a_file_fails(ws: Workspace) -> None:
    blocker = ws.root / "var"
    blocker.write_text("")
    state = blocker / "lib" / "pibackup"
    ws.config_path.write_text(f'destination = "{ws.dest}"\nstate_dir = "{state}"\n'
                              + rsync_source("data", ws.make_source("data")))
    assert_unusable(check(ws), f"state_dir {state} cannot be created: {blocker} is a file")


def test_state_dir_whose_reports_is_a_file_fails(ws: Workspace) -> None:
    ws.state.mkdir()
    (ws.state / "reports").write_text("")
    write(ws)
    assert_unusable(check(ws), f"state_dir {ws.state / 'reports'} is a file, not a folder")


@needs_root
def test_state_dir_owned_by_another_user_fails(ws: Workspace) -> None:
    ws.state.mkdir(mode=0o700)
    os.chown(ws.state, NOBODY, NOBODY)
    write(ws)
    assert_unusable(check(ws), f"state_dir {ws.state} is owned by nobody (uid {NOBODY})")


def test_state_dir_without_write_permission_fails(ws: Workspace) -> None:
    ws.state.mkdir()
    ws.state.chmod(0o500)
    write(ws)
    assert_unusable(check(ws), f"state_dir {ws.state} is not writable and searchable by its "
                    "owner (mode 0500)")


def test_lock_file_that_is_a_folder_fails(ws: Workspace) -> None:
    ws.state.mkdir()
    (ws.state / "lock").mkdir()
    write(ws)
    assert_unusable(check(ws), f"lock_file {ws.state / 'lock'} is a folder, not a regular file")


def test_lock_file_that_is_a_symbolic_link_fails(ws: Workspace) -> None:
    target = ws.root / "elsewhere.lock"
    target.write_text("")
    lock = ws.root / "pibackup.lock"
    lock.symlink_to(target)
    write(ws, header=f'lock_file = "{lock}"')
    assert_unusable(check(ws), f"lock_file {lock} is a symbolic link to a file, "
                    "not a regular file")


def test_lock_file_that_is_a_named_pipe_fails(ws: Workspace) -> None:
    lock = ws.root / "pibackup.lock"
    os.mkfifo(lock)
    write(ws, header=f'lock_file = "{lock}"')
    assert_unusable(check(ws), f"lock_file {lock} is a named pipe, not a regular file")


@needs_root
def test_lock_file_owned_by_another_user_fails(ws: Workspace) -> None:
    lock = ws.root / "pibackup.lock"
    lock.write_text("")
    os.chown(lock, NOBODY, NOBODY)
    write(ws, header=f'lock_file = "{lock}"')
    assert_unusable(check(ws), f"lock_file {lock} is owned by nobody (uid {NOBODY})")


def test_lock_file_under_a_file_fails(ws: Workspace) -> None:
    blocker = ws.root / "run"
    blocker.write_text("")
    lock = blocker / "pibackup.lock"
    write(ws, header=f'lock_file = "{lock}"')
    assert_unusable(check(ws), f"lock_file {lock} cannot be created: {blocker} is a file")


def test_every_state_problem_is_listed(ws: Workspace) -> None:
    ws.state.write_text("")
    lock = ws.root / "lock-dir"
    lock.mkdir()
    write(ws, header=f'lock_file = "{lock}"\nrequire_mountpoint = true')
    result = check(ws)
    assert_unusable(result, f"state_dir {ws.state} is a file",
                    f"lock_file {lock} is a folder")
    assert "require_mountpoint" in result.stderr, "warnings still show"


@needs_root
def test_a_full_disk_does_not_make_state_dir_unusable(ws: Workspace, tmpfs: Path) -> None:
    state = tmpfs / "state"
    state.mkdir(mode=0o700)
    (state / "reports").mkdir()
    (state / "lock").write_text("")
    with pytest.raises(OSError), open(tmpfs / "filler", "wb") as f:
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    ws.config_path.write_text(f'destination = "{ws.dest}"\nstate_dir = "{state}"\n'
                              + rsync_source("data", ws.make_source("data")))

    result = check(ws)

    assert result.returncode == 0, result.stderr
    assert os.statvfs(state).f_bavail == 0, "the disk must be full for this test"


def test_state_problems_is_empty_for_a_usable_state(ws: Workspace) -> None:
    from pibackup_async.engine.preflight import state_problems

    ws.state.mkdir(mode=0o700)
    (ws.state / "reports").mkdir()
    (ws.state / "lock").write_text("")
    (ws.state / "lock").chmod(stat.S_IRUSR | stat.S_IWUSR)
    write(ws)
    assert state_problems(load_config(str(ws.config_path))) == []


# --- folders on the way to state_dir, lock_file and snapshot_dir that others can write -----


def shared_folder(ws: Workspace, mode: int) -> Path:
    """A folder any local user could write (as /tmp, /run/lock), under the test's own one."""
    shared = ws.root / "shared"
    shared.mkdir()
    shared.chmod(mode)
    return shared


OTHERS_CAN_WRITE = "can be written by users other than root"


@pytest.mark.parametrize("mode", [0o777, 0o1777], ids=["world-writable", "sticky like /tmp"])
def test_state_dir_under_a_folder_others_can_write_fails(ws: Workspace, mode: int) -> None:
    shared = shared_folder(ws, mode)
    state = shared / "pibackup"
    ws.config_path.write_text(f'destination = "{ws.dest}"\nstate_dir = "{state}"\n'
                              + rsync_source("data", ws.make_source("data")))
    result = check(ws)
    assert_unusable(result, f"state_dir {state}", f"{shared} {OTHERS_CAN_WRITE}")
    assert not state.exists(), "check creates nothing"


def test_a_state_dir_others_can_write_fails(ws: Workspace) -> None:
    ws.state.mkdir()
    ws.state.chmod(0o777)
    write(ws)
    assert_unusable(check(ws), f"{ws.state} {OTHERS_CAN_WRITE}")


def test_lock_file_in_a_folder_others_can_write_fails(ws: Workspace) -> None:
    lock = shared_folder(ws, 0o1777) / "pibackup.lock"
    write(ws, header=f'lock_file = "{lock}"')
    result = check(ws)
    assert_unusable(result, f"lock_file {lock}")
    assert "state_dir" not in result.stderr, "state_dir itself is private"


@needs_root
def test_a_folder_writable_by_another_group_fails_and_by_root_s_group_does_not(
        ws: Workspace) -> None:
    shared = shared_folder(ws, 0o775)
    state = shared / "pibackup"
    ws.config_path.write_text(f'destination = "{ws.dest}"\nstate_dir = "{state}"\n'
                              + rsync_source("data", ws.make_source("data")))
    os.chown(shared, 0, 0)
    assert check(ws).returncode == 0, "only root is in root's group"
    os.chown(shared, 0, NOBODY)
    assert_unusable(check(ws), f"{shared} {OTHERS_CAN_WRITE}", "group-writable")


@needs_root
def test_a_folder_owned_by_another_user_on_the_way_fails(ws: Workspace) -> None:
    theirs = ws.root / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, NOBODY)
    state = theirs / "pibackup"
    ws.config_path.write_text(f'destination = "{ws.dest}"\nstate_dir = "{state}"\n'
                              + rsync_source("data", ws.make_source("data")))
    assert_unusable(check(ws), f"{theirs} {OTHERS_CAN_WRITE}", "owned by nobody")


def test_a_link_on_the_way_is_judged_where_it_leads(ws: Workspace) -> None:
    shared = shared_folder(ws, 0o1777)
    (shared / "real").mkdir(mode=0o700)
    (ws.root / "private").symlink_to(shared / "real")
    state = ws.root / "private" / "pibackup"
    ws.config_path.write_text(f'destination = "{ws.dest}"\nstate_dir = "{state}"\n'
                              + rsync_source("data", ws.make_source("data")))
    assert_unusable(check(ws), f"{shared} {OTHERS_CAN_WRITE}")


@needs_btrfs
@pytest.mark.root
def test_snapshot_dir_under_a_folder_others_can_write_fails(
        ws: Workspace, btrfs_fs: Callable[..., Btrfs]) -> None:
    fs = btrfs_fs(ws.src / "vol")
    db = fs.subvolume("db")
    shared = fs.mount / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    write(ws, btrfs_source("db", db, snapshot_dir=str(shared / "snapshots")))
    assert_unusable(check(ws), "sources[0].snapshot_dir", f"{shared} {OTHERS_CAN_WRITE}")
    write(ws, btrfs_source("db", db))
    assert check(ws).returncode == 0, "the default snapshot_dir is beside the subvolume"


# --- check --connect: the mail server, saying what was tried -----------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize(("security", "login", "said"), [
    ("none", False, "connected (no TLS, no login)"),
    ("none", True, "connected (no TLS), login ok"),
    ("starttls", False, "connected, STARTTLS ok, no login"),
    ("starttls", True, "connected, STARTTLS and login ok"),
    ("tls", False, "connected, TLS ok, no login"),
    ("tls", True, "connected, TLS and login ok"),
])
def test_check_connect_says_what_it_tried_with_the_mail_server(
        ws: Workspace, pki: Pki, tmp_path: Path, security: Security, login: bool,
        said: str) -> None:
    smtp: dict[str, str] = {}
    if security != "none":
        smtp["ca_file"] = toml_value(str(pki.ca_file))
    if login:
        password = tmp_path / "smtp-password"
        password.write_text(PASSWORD + "\n")
        smtp.update(username=toml_value(USER), password_file=toml_value(str(password)))
    with MailServer(None if security == "none" else pki, security=security,
                    require_auth=login) as server:
        write(ws, rsync_source("data", ws.make_source("data"))
              + table("[report]", **{"from": "pibackup@test.local"}, to=["admin@test.local"])
              + server.smtp_table(**smtp))
        result = ws.run("check", "--connect")
        logins = list(server.logins)
    assert result.returncode == 0, result.stderr
    assert f"mail server 127.0.0.1: {said}\n" in result.stderr, result.stderr
    assert logins == ([(USER, True)] if login else [])


# --- on_mounted_filesystem, as require_mountpoint judges --------------------------------------


@needs_root
def test_on_mounted_filesystem(ws: Workspace, tmpfs: Path) -> None:
    # Imported here, so the rest of the module runs against engines without it.
    from pibackup_async.engine.preflight import on_mounted_filesystem

    inside = tmpfs / "backups"
    inside.mkdir()
    to_disk = ws.root / "to-disk"
    to_disk.symlink_to(inside)
    to_root = tmpfs / "to-root"
    to_root.symlink_to(ws.dest)

    assert on_mounted_filesystem(str(tmpfs))
    assert on_mounted_filesystem(str(inside))
    assert on_mounted_filesystem(str(to_disk)), "a link to the disk leads onto the disk"
    assert not on_mounted_filesystem(str(ws.dest))
    assert not on_mounted_filesystem(str(to_root)), "a link on the disk may lead off it"
    assert not on_mounted_filesystem("/")
