"""``serve --read-only PATH``: what a mirror's restricted key lets through (SPEC §10).

First the validator alone on many command lines, then the real thing: the
test sshd with the client key restricted to ``serve`` as the README's
``authorized_keys`` line does, a pull that works and every way of writing,
removing or reading outside PATH refused, the origin unchanged byte for byte
and inode for inode.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import pytest
from conftest import CLI, needs_rsync
from datakit import describe_tree
from pibackup_async.cli.serve import Refused, allowed
from sshkit import needs_sshd

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Workspace
    from sshkit import Sshd

NAME = "2024-05-01t03-00-00+0000"
PULL = "rsync --server --sender -lHogDtpAXrSe.iLsfxCIvu --numeric-ids . "


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    """A destination with one backup; beside it a secret, and links inside leading to it."""
    root = tmp_path / "origin"
    data = root / NAME / "data"
    data.mkdir(parents=True)
    (data / "file.txt").write_text("backed up\n")
    (root / NAME / ".pibackup").mkdir()
    (root / NAME / ".pibackup" / "data.sha256").write_text("0" * 64 + "  file.txt\n")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "shadow").write_text("the secret\n")
    # A source's own symbolic links, kept in the backup as links.
    os.symlink(tmp_path / "secret", data / "out")
    os.symlink("../../../secret", data / "relative-out")
    os.symlink(tmp_path / "secret", root / "linked-backup")
    return root


def argv(command: str, root: Path) -> list[str]:
    return allowed(command, str(root))


def refused(command: str | None, root: Path) -> str:
    with pytest.raises(Refused) as caught:
        allowed(command, str(root))
    return str(caught.value)


# --- the validator ------------------------------------------------------------------


@pytest.mark.parametrize("paths", [
    f"{NAME}/",                       # relative to PATH
    "{root}/" + NAME + "/",           # absolute under PATH
    "{root}//" + NAME + "/./data",    # doubled slashes, a "." component
    "{root}/",                        # PATH itself (the listing)
    "{root}",
    ".",
    "",                               # no path: PATH itself
    f"{NAME}/.pibackup/data.sha256",  # one file
    f"{NAME}/ {NAME}/.pibackup",      # several
])
def test_a_pull_under_path_is_let_through(origin: Path, paths: str) -> None:
    spelled = paths.format(root=origin)
    got = argv(PULL + spelled, origin)
    assert got[:3] == ["rsync", "--server", "--sender"]
    assert f"--confine-root={origin}" in got
    assert got[-len(spelled.split() or ["."]):] == (spelled.split() or ["."])
    assert got[got.index("--") + 1] == "."


@pytest.mark.parametrize("options", [
    "-logDtpre.iLsfxCIvu",
    "-vlogDtpre.iLsfxCIvu",
    "-de.LsfxCIvu --list-only",
    "-logDtprze.iLsfxCIvu --compress-choice=zstd",
    "-logDtpre.iLsfxCIvu --bwlimit=512",
    "-logDtpre.iLsfxCIvu --bwlimit 512",
    "-logDtpre.iLsfxCIvu --timeout=30 --open-noatime --ignore-missing-args",
    "-logDtpRe.LsfxCIvu --files-from=- --from0",
    "-logDtpRe.LsfxCIvu --files-from - --from0",
    "-nlogDtpre.iLsfxCIvu",
    "-B1024 -logDtpre.iLsfxCIvu",
])
def test_the_options_of_a_pull_are_let_through(origin: Path, options: str) -> None:
    got = argv(f"rsync --server --sender {options} . {NAME}/", origin)
    assert got[-1] == f"{NAME}/"


@pytest.mark.parametrize(("command", "why"), [
    # Not a pull: a push writes here.
    ("rsync --server -logDtpre.iLsfxCIvu . {name}/", "must be the sender"),
    ("rsync --server -logDtpre.iLsfxCIvu --delete . {name}/", "must be the sender"),
    ("rsync --sender --server -logDtpre.iLsfxCIvu . {name}/", "--server first"),
    ("rsync --daemon", "--server first"),
    # Options that write, remove or follow links out.
    ("rsync --server --sender -logDtpre.iLsfxCIvu --remove-source-files . {name}/",
     "removes files"),
    ("rsync --server --sender -logDtpre.iLsfxCIvu --remove-sent-files . {name}/",
     "removes files"),
    ("rsync --server --sender -lLogDtpre.iLsfxCIvu . {name}/", "--copy-links"),
    ("rsync --server --sender -L . {name}/", "--copy-links"),
    ("rsync --server --sender -logDtpre.iLsfxCIvu --copy-links . {name}/", "--copy-links"),
    ("rsync --server --sender -logDtpre.iLsfxCIvu --copy-unsafe-links . {name}/",
     "--copy-unsafe-links"),
    ("rsync --server --sender -lkogDtpre.iLsfxCIvu . {name}/", "--copy-dirlinks"),
    ("rsync --server --sender -Klogtpre.iLsfxCIvu . {name}/", "--keep-dirlinks"),
    ("rsync --server --sender -logDtpre.iLsfxCIvu --copy-devices . {name}/", "reads devices"),
    ("rsync --server --sender -logDtpre.iLsfxCIvu --log-file=/tmp/x . {name}/", "writes a file"),
    ("rsync --server --sender -logDtpre.iLsfxCIvu --only-write-batch=x . {name}/",
     "writes a file"),
    ("rsync --server --sender -logDtpre.iLsfxCIvu --delete . {name}/", "--delete"),
    ("rsync --server --sender -logDtpre.iLsfxCIvu --delete-missing-args . {name}/", "--delete"),
    ("rsync --server --sender -logDtpre.iLsfxCIvu --link-dest=/x . {name}/", "--link-dest"),
    ("rsync --server --sender -logDtpre.iLsfxCIvu --temp-dir=/x . {name}/", "--temp-dir"),
    ("rsync --server --sender -logDtpre.iLsfxCIvu --rsync-path=sh . {name}/", "--rsync-path"),
    ("rsync --server --sender -logDtpre.iLsfxCIvu --files-from=/etc/shadow . {name}/",
     "--files-from"),
    # Arguments that travel inside the protocol, past the check.
    ("rsync --server --sender -slogDtpre.iLsfxCIvu", "--secluded-args"),
    ("rsync --server --sender -logDtpre.iLsfxCIvu --secluded-args . {name}/",
     "--secluded-args"),
    ("rsync --server --sender -logDtpre.iLsfxCIvu", "no '.'"),
    ("rsync --server --sender -logDtpre.iLsfxCIvu /etc . {name}/", "before the '.'"),
    # Paths out of PATH.
    ("rsync --server --sender -logDtpre.iLsfxCIvu . ../secret", "'..'"),
    ("rsync --server --sender -logDtpre.iLsfxCIvu . {name}/../../secret", "'..'"),
    ("rsync --server --sender -logDtpre.iLsfxCIvu . {root}/../secret", "'..'"),
    ("rsync --server --sender -logDtpre.iLsfxCIvu . /etc/shadow", "outside"),
    ("rsync --server --sender -logDtpre.iLsfxCIvu . {root}-other/x", "outside"),
    ("rsync --server --sender -logDtpre.iLsfxCIvu . {name}/ /etc/", "outside"),
    ("rsync --server --sender -logDtpre.iLsfxCIvu . {name}/data/out/", "symbolic link"),
    ("rsync --server --sender -logDtpre.iLsfxCIvu . {name}/data/out/shadow", "symbolic link"),
    ("rsync --server --sender -logDtpre.iLsfxCIvu . {name}/data/relative-out/shadow",
     "symbolic link"),
    ("rsync --server --sender -logDtpre.iLsfxCIvu . linked-backup/", "symbolic link"),
    # Anything else.
    ("cat /etc/shadow", "only serves"),
    ("sh -c 'cat /etc/shadow'", "only serves"),
    ("/usr/bin/rsync --server --sender -logDtpre.iLsfxCIvu . {name}/", "only serves"),
    ("rsync --server --sender -logDtpre.iLsfxCIvu . {name}/; rm -rf /", "outside"),
    ("true; rm -rf /", "only serves"),
    ("", "only serves"),
    ("rsync 'unbalanced", "cannot read"),
    # btrfs: only send, of subvolumes under PATH, to stdout.
    ("btrfs receive {name}", "only `btrfs send`"),
    ("btrfs subvolume delete {name}", "only `btrfs send`"),
    ("btrfs send -f /tmp/stream {name}", "writes a file"),
    ("btrfs send -f/tmp/stream {name}", "writes a file"),
    ("btrfs send /etc", "outside"),
    ("btrfs send -p /etc {name}", "outside"),
    ("btrfs send -p ../secret {name}", "'..'"),
    ("btrfs send linked-backup", "symbolic link"),
    ("btrfs send {name}/.pibackup/data.sha256", "not a subvolume"),
    ("btrfs send --proto=x {name}", "protocol number"),
    ("btrfs send --no-data {name}", "not one a mirror needs"),
    ("btrfs send", "needs a subvolume"),
    ("btrfs send -p", "needs a subvolume"),
])
def test_everything_else_is_refused_with_the_reason(origin: Path, command: str, why: str
                                                    ) -> None:
    spelled = command.format(root=origin, name=NAME)
    assert why in refused(spelled, origin)


def test_no_command_at_all_is_refused(origin: Path) -> None:
    assert "no command" in refused(None, origin)


def test_true_is_let_through_for_a_login_check(origin: Path) -> None:
    assert argv("true", origin) == ["true"]


def test_btrfs_send_of_subvolumes_under_path(origin: Path) -> None:
    (origin / "prev").mkdir()
    assert argv(f"btrfs send -p {origin}/prev {NAME}", origin) == [
        "btrfs", "send", "-p", f"{origin}/prev", "--", NAME]
    assert argv(f"btrfs send -q --proto 2 -c prev -- {origin}/{NAME}", origin) == [
        "btrfs", "send", "-q", "--proto=2", "-c", "prev", "--", f"{origin}/{NAME}"]


def test_a_path_reached_through_a_linked_root_is_under_it(tmp_path: Path, origin: Path
                                                          ) -> None:
    """PATH written through a link (/mnt/backup -> /srv/disk): both spellings are PATH."""
    via = tmp_path / "via"
    os.symlink(origin, via)
    assert argv(PULL + f"{origin}/{NAME}/", via)[-1] == f"{origin}/{NAME}/"
    assert argv(PULL + f"{via}/{NAME}/", via)[-1] == f"{via}/{NAME}/"


def test_a_backup_gone_meanwhile_passes_for_rsync_to_say_so(origin: Path) -> None:
    assert argv(PULL + "2020-01-01t00-00-00+0000/", origin)[-1] == "2020-01-01t00-00-00+0000/"


def test_a_missing_or_relative_path_is_refused(tmp_path: Path) -> None:
    assert "not a folder" in refused("true", tmp_path / "missing")
    assert "absolute" in refused("true", "relative")  # type: ignore[arg-type]


# --- the command, without sshd ------------------------------------------------------


def serve(root: Path, command: str | None, **env: str) -> subprocess.CompletedProcess[bytes]:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("SSH_ORIGINAL_COMMAND", "SUDO_USER")}
    if command is not None:
        environ["SSH_ORIGINAL_COMMAND"] = command
    environ.update(env)
    return subprocess.run([*CLI, "serve", "--read-only", str(root)], capture_output=True,
                          env=environ, timeout=30, stdin=subprocess.DEVNULL)


def test_a_refusal_is_one_line_on_stderr_and_exit_1(origin: Path) -> None:
    done = serve(origin, "cat /etc/shadow")
    assert done.returncode == 1
    assert done.stdout == b""
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pibackup-async serve: refused: "), lines


def test_it_refuses_to_run_through_sudo(origin: Path) -> None:
    done = serve(origin, "true", SUDO_USER="pi")
    assert done.returncode == 1
    assert b"sudo" in done.stderr


def test_read_only_is_required_and_no_configuration_is_read(origin: Path) -> None:
    done = subprocess.run([*CLI, "serve", str(origin)], capture_output=True, timeout=30)
    assert done.returncode == 2 and b"--read-only" in done.stderr
    done = serve(origin, "true", PIBACKUP_CONFIG="/nonexistent/config.toml")
    assert (done.returncode, done.stderr) == (0, b"")


@needs_rsync
def test_the_allowed_program_streams_on_stdout(origin: Path) -> None:
    """The btrfs/rsync program is exec'd: its output is serve's (here rsync's version
    handshake, the first bytes an rsync server writes)."""
    done = serve(origin, PULL + f"{NAME}/")
    # No client answers: rsync gives up, but it ran and spoke first.
    assert len(done.stdout) >= 4, done.stderr


# --- through sshd -------------------------------------------------------------------


def state(root: Path) -> dict[bytes, dict[str, Any]]:
    """Everything of the origin that a write, a removal or a link would change: content,
    metadata, and per entry its inode, link count and change time."""
    tree = describe_tree(root)
    for rel, entry in tree.items():
        st = os.lstat(os.path.join(os.fsencode(root), rel))
        entry.update(ino=st.st_ino, nlink=st.st_nlink, ctime_ns=st.st_ctime_ns)
    return tree


def rsync(server: Sshd, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    shell = shlex.join(server.ssh_argv())
    return subprocess.run(["rsync", "-e", shell, *args], capture_output=True, text=True,
                          timeout=timeout)


def remote(server: Sshd, path: Path | str) -> str:
    return f"root@{server.address}:{path}"


def ssh(server: Sshd, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*server.ssh_argv(), f"root@{server.address}", command],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.fixture
def served(sshd: Sshd, origin: Path) -> Sshd:
    sshd.serve_only(origin)
    return sshd


@needs_rsync
@needs_sshd
def test_a_pull_through_the_restricted_key_copies_and_changes_nothing(
    ws: Workspace, served: Sshd, origin: Path
) -> None:
    before = state(origin)
    copy = ws.root / "copy"
    pulled = rsync(served, "-aHAX", "--numeric-ids", remote(served, f"{origin}/{NAME}/"),
                   f"{copy}/")
    assert pulled.returncode == 0, pulled.stderr
    assert (copy / "data" / "file.txt").read_text() == "backed up\n"
    assert os.readlink(copy / "data" / "out") == str(origin.parent / "secret")
    # The listing a mirror reads the origin's backups with.
    listed = rsync(served, "--list-only", remote(served, f"{origin}/"))
    assert listed.returncode == 0, listed.stderr
    assert NAME in listed.stdout
    # Relative to PATH, as rrsync takes it.
    again = rsync(served, "-a", remote(served, f"{NAME}/.pibackup/"), f"{ws.root}/manifests/")
    assert again.returncode == 0, again.stderr
    assert (ws.root / "manifests" / "data.sha256").exists()
    assert ssh(served, "true").returncode == 0
    assert state(origin) == before


def refusals(origin: Path, local: Path) -> list[tuple[str, list[str] | str]]:
    """Every way the restricted key might write, remove or read out of PATH."""
    backup = f"{origin}/{NAME}"
    return [
        ("a push", ["-a", f"{local}/", "REMOTE" + f"{backup}/data/"]),
        ("a push with --delete", ["-a", "--delete", f"{local}/", "REMOTE" + f"{backup}/data/"]),
        ("a push as a dry run", ["-an", f"{local}/", "REMOTE" + f"{backup}/probe/"]),
        ("a pull removing the sent files",
         ["-a", "--remove-source-files", "REMOTE" + f"{backup}/", f"{local}/got/"]),
        ("a pull through ..", ["-a", "REMOTE" + f"{origin}/../secret/", f"{local}/got/"]),
        ("a pull of an absolute path elsewhere",
         ["-a", "REMOTE" + f"{origin.parent}/secret/", f"{local}/got/"]),
        ("a pull through a link inside PATH",
         ["-a", "REMOTE" + f"{backup}/data/out/", f"{local}/got/"]),
        ("a pull following links (-L)", ["-aL", "REMOTE" + f"{backup}/", f"{local}/got/"]),
        ("a pull copying unsafe links",
         ["-a", "--copy-unsafe-links", "REMOTE" + f"{backup}/", f"{local}/got/"]),
        ("a pull with secluded arguments", ["-as", "REMOTE" + f"{backup}/", f"{local}/got/"]),
        ("a shell command", "cat /etc/shadow"),
        ("a shell", f"sh -c 'touch {backup}/planted'"),
        ("a removal", f"rm -rf {backup}"),
        ("a btrfs receive", f"btrfs receive {origin}"),
    ]


@needs_rsync
@needs_sshd
def test_writes_removals_and_reads_out_of_path_are_refused_and_change_nothing(
    ws: Workspace, served: Sshd, origin: Path
) -> None:
    local = ws.root / "local"
    local.mkdir()
    (local / "file.txt").write_text("overwritten\n")
    (local / "planted").write_text("pushed\n")
    before = state(origin)
    for what, how in refusals(origin, local):
        if isinstance(how, str):
            done = ssh(served, how)
        else:
            done = rsync(served, *[a.replace("REMOTE", remote(served, "")) for a in how])
        assert done.returncode != 0, f"{what} went through:\n{done.stdout}{done.stderr}"
        assert "pibackup-async serve: refused: " in done.stderr, f"{what}: {done.stderr}"
        assert not (local / "got" / "shadow").exists(), what
        assert not any(p.name == "shadow" for p in (local / "got").rglob("*")), what
        assert state(origin) == before, f"{what} changed the origin"


@needs_rsync
@needs_sshd
def test_a_file_list_cannot_name_anything_out_of_path(ws: Workspace, served: Sshd,
                                                      origin: Path) -> None:
    """Names that travel inside rsync's protocol (--files-from) stay under PATH too."""
    names = ws.root / "names"
    names.write_text(f"{NAME}/data/file.txt\n{NAME}/data/out/shadow\n../secret/shadow\n")
    before = state(origin)
    got = ws.root / "got"
    done = rsync(served, "-a", f"--files-from={names}", remote(served, f"{origin}/"), f"{got}/")
    assert (got / NAME / "data" / "file.txt").read_text() == "backed up\n"
    assert not any(p.name == "shadow" for p in got.rglob("*")), done.stderr
    assert done.returncode != 0
    assert state(origin) == before


def test_the_serve_command_imports_nothing_of_the_engine(origin: Path) -> None:
    """sshd starts it for every rsync of a mirror: the engine's import is not paid there."""
    probe = ("import sys, os; os.environ['SSH_ORIGINAL_COMMAND'] = 'true'; "
             "from pibackup_async.cli.main import main; "
             f"code = main(['serve', '--read-only', {str(origin)!r}]); "
             "print(sorted(m for m in sys.modules if m.startswith('pibackup_async.engine')"
             " or m in ('anyio', 'structlog', 'msgspec')), code)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=30)
    assert done.stdout.split() == ["[]", "0"], done.stderr
