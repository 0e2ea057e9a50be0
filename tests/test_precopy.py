"""The precopy (SPEC §2 steps 2 and 3, §4 ``precopy``, §6): rsync sources copied once
before the snapshot hooks' ``pre``, so the window holds only step 3's second pass.

Everything runs the real CLI on real rsync. What happens "during the precopy"
is made deterministic by doing it in a snapshot hook's ``pre``: that runs
after the precopy and before step 3, which is exactly the interval the
hazards live in. No assertion depends on timing.
"""

from __future__ import annotations

import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import pytest
from conftest import needs_rsync, processes_mentioning, wait_for
from hookkit import (
    EXIT_FOR,
    Running,
    assert_no_processes,
    complete_backups,
    make_slow_source,
    order,
    standard_hooks,
    start,
    started_marker,
    write_config,
)
from hookkit import source_toml as hook_source_toml

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Workspace
    from sshkit import Sshd

pytestmark = needs_rsync


def _q(text: str | Path) -> str:
    return shlex.quote(str(text))


def _toml(text: str | Path) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _config(ws: Workspace, *, pre: str | None, sources: dict[str, Path],
            extra: str = "", source_keys: str = "", post: str = "true") -> None:
    """One snapshot hook (``pre`` a shell script, or no pre at all) and rsync sources."""
    body = ""
    if pre is not None:
        body += f'[[snapshot_hooks]]\nname = "db"\npre = {_toml(pre)}\npost = {_toml(post)}\n'
    else:
        body += f'[[snapshot_hooks]]\nname = "db"\npost = {_toml(post)}\n'
    for name, path in sources.items():
        body += (f'[[sources]]\nname = "{name}"\ntype = "rsync"\npath = {_toml(path)}\n'
                 f"{source_keys}\n")
    ws.write_config(body + extra)


def _run_ok(ws: Workspace, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = ws.run("run", env=env)
    assert result.returncode == 0, result.stderr
    report = ws.report()
    assert report["status"] == "ok", report
    return report


def _tree(root: Path) -> dict[str, tuple[int, bytes | str | None]]:
    """Every entry below ``root``: its mode and content (a link's target)."""
    found: dict[str, tuple[int, bytes | str | None]] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISLNK(st.st_mode):
                found[rel] = (st.st_mode, os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    found[rel] = (st.st_mode, f.read())
            else:
                found[rel] = (st.st_mode, None)
    return found


def _age(root: Path, seconds: float = 3600) -> None:
    """Date every file below ``root`` back, out of reach of the same-tick rule."""
    then = time.time() - seconds
    for folder, _, files in os.walk(root):
        for name in files:
            os.utime(os.path.join(folder, name), (then, then), follow_symlinks=False)


def _backup_of(ws: Workspace, source: str, index: int = -1) -> Path:
    return ws.dest / complete_backups(ws)[index] / source


# --- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize("arg", ["--inplace", "--append", "--append-verify"])
@pytest.mark.parametrize("kind", ["rsync", "btrfs"])
def test_rsync_args_that_rewrite_shared_files_are_refused(ws: Workspace, arg: str,
                                                          kind: str) -> None:
    data = ws.make_source("data")
    ws.write_config(f'[[sources]]\nname = "data"\ntype = "{kind}"\npath = {_toml(data)}\n'
                    f'rsync_args = ["--numeric-ids", "{arg}"]\n')
    for command in ("check", "run"):
        result = ws.run(command)
        assert result.returncode == 2, result.stderr
        assert "sources[0].rsync_args" in result.stderr
        assert arg in result.stderr
        assert "Traceback" not in result.stderr
    assert ws.backups() == []


def test_precopy_true_on_a_btrfs_source_is_refused(ws: Workspace) -> None:
    data = ws.make_source("data")
    ws.write_config(f'[[sources]]\nname = "data"\ntype = "btrfs"\npath = {_toml(data)}\n'
                    "precopy = true\n")
    result = ws.run("check")
    assert result.returncode == 2, result.stderr
    assert "sources[0].precopy" in result.stderr
    assert "Traceback" not in result.stderr


def test_precopy_is_a_key_of_rsync_sources(ws: Workspace) -> None:
    from pibackup_async.engine.config import load_config
    from pibackup_async.engine.sources.rsync import RsyncSource

    data = ws.make_source("data")
    for value in ("true", "false"):
        ws.write_config(f'[[sources]]\nname = "data"\ntype = "rsync"\npath = {_toml(data)}\n'
                        f"precopy = {value}\n")
        source = load_config(str(ws.config_path)).sources[0]
        assert isinstance(source, RsyncSource)
        assert source.precopy is (value == "true")
    # Without the key a btrfs source loads (the shared options keep no precopy).
    ws.write_config(f'[[sources]]\nname = "data"\ntype = "btrfs"\npath = {_toml(data)}\n')
    load_config(str(ws.config_path))


# --- (a) the backup is what step 3 saw ---------------------------------------------------


def test_backup_is_the_source_as_step_3_saw_it(ws: Workspace) -> None:
    data = ws.make_source("data", {
        "keep.txt": "unchanged\n", "grow.txt": "short\n", "gone.txt": "deleted in pre\n",
        "dir/old.txt": "old\n", "dir/also-gone/x.txt": "x\n"})
    _age(data)  # else the same-tick rule drops them all from the precopy
    seen = ws.root / "seen-in-pre"
    # The writer: runs after the precopy, before step 3; it also records
    # that the precopy had written the in-progress folder by then.
    pre = (f"test -f \"$PIBACKUP_BACKUP_DIR/data/gone.txt\" && echo precopied > {_q(seen)}; "
           f"cd {_q(data)} && echo 'much longer than before' > grow.txt && rm gone.txt && "
           "rm -r dir/also-gone && echo new > dir/new.txt && mkdir fresh && "
           "echo fresh > fresh/f.txt && ln -s keep.txt link")
    _config(ws, pre=pre, sources={"data": data})
    report = _run_ok(ws)
    assert seen.read_text() == "precopied\n", "the precopy ran before the snapshot hook's pre"
    source = report["sources"]["data"]
    assert source["precopy"]["status"] == "ok", source
    assert source["snapshot"]["status"] == "ok", source
    assert _tree(_backup_of(ws, "data")) == _tree(data)
    # The source's duration is its precopy's, snapshot's and save's (SPEC §6).
    steps = [source[k] for k in ("precopy", "snapshot", "save") if source.get(k)]
    assert report["source_seconds_total"] == pytest.approx(
        sum(s["duration_s"] for s in steps), abs=1e-5)
    assert not any(n.endswith(".precopied") for n in os.listdir(_backup_of(ws, "data").parent))


def test_step_3_deletes_what_the_precopy_wrote_and_the_source_lost(ws: Workspace) -> None:
    data = ws.make_source("data", {"a.txt": "a\n", "b/c.txt": "c\n"})
    # A previous backup first, so that step 3 has one to link against.
    _config(ws, pre=None, sources={"data": data})
    _run_ok(ws)
    (data / "new-then-gone.txt").write_text("only the precopy sees me\n")
    pre = f"rm {_q(data / 'new-then-gone.txt')} {_q(data / 'b/c.txt')}"
    _config(ws, pre=pre, sources={"data": data})
    report = _run_ok(ws)
    assert report["sources"]["data"]["precopy"]["status"] == "ok"
    assert _tree(_backup_of(ws, "data")) == _tree(data)


def test_no_precopy_without_a_snapshot_pre_or_with_precopy_false(ws: Workspace) -> None:
    data = ws.make_source("data")
    _config(ws, pre=None, sources={"data": data})
    report = _run_ok(ws)
    assert report["sources"]["data"]["precopy"] is None
    _config(ws, pre="true", sources={"data": data}, source_keys="precopy = false")
    report = _run_ok(ws)
    assert report["sources"]["data"]["precopy"] is None


# --- (b) the same-tick rewrite -----------------------------------------------------------

SAME_SIZE_A = b"A" * 4096
SAME_SIZE_B = b"B" * 4096


def _rewrite_keeping_mtime(path: Path, content: bytes) -> str:
    """Shell: rewrite ``path`` in place with ``content`` (same size), then put its mtime back."""
    ref = f"{path}.mtime-ref"
    return (f"touch -r {_q(path)} {_q(ref)} && printf '%s' {_q(content.decode())} "
            f"| dd of={_q(path)} conv=notrunc status=none && touch -r {_q(ref)} {_q(path)} "
            f"&& rm {_q(ref)}")


def test_control_rsync_quick_check_misses_a_same_size_rewrite(tmp_path: Path) -> None:
    """Why the precopy needs a rule: plain rsync keeps the stale copy."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "db").write_bytes(SAME_SIZE_A)
    subprocess.run(["rsync", "-a", f"{src}/", f"{dst}/"], check=True)
    subprocess.run(["sh", "-c", _rewrite_keeping_mtime(src / "db", SAME_SIZE_B)], check=True)
    assert (src / "db").read_bytes() == SAME_SIZE_B
    subprocess.run(["rsync", "-a", f"{src}/", f"{dst}/"], check=True)
    assert (dst / "db").read_bytes() == SAME_SIZE_A, "rsync's quick check missed the rewrite"


@pytest.mark.parametrize("earlier", [False, True], ids=["first-backup", "with-a-previous"])
def test_a_same_tick_rewrite_is_transferred_again(ws: Workspace, earlier: bool) -> None:
    data = ws.make_source("data", {"old.txt": "old\n"})
    db = data / "db"
    db.write_bytes(SAME_SIZE_A)
    if earlier:
        _config(ws, pre=None, sources={"data": data})
        _run_ok(ws)
    # A backup hook's pre touches the file just before the precopy starts:
    # its mtime is then less than 2 s older than the precopy's start.
    backup_hook = f'[[backup_hooks]]\nname = "touch"\npre = "touch {db}"\n'
    _config(ws, pre=_rewrite_keeping_mtime(db, SAME_SIZE_B), sources={"data": data},
            extra=backup_hook)
    report = _run_ok(ws)
    assert report["sources"]["data"]["precopy"]["status"] == "ok"
    assert db.read_bytes() == SAME_SIZE_B
    assert (_backup_of(ws, "data") / "db").read_bytes() == SAME_SIZE_B


def test_a_file_older_than_the_precopy_is_left_to_the_quick_check(ws: Workspace) -> None:
    """The rule's other side: an old file unchanged since is not copied again (its
    inode is the previous backup's)."""
    data = ws.make_source("data", {"old.txt": "old\n"})
    os.utime(data / "old.txt", (time.time() - 3600, time.time() - 3600))
    _config(ws, pre=None, sources={"data": data})
    _run_ok(ws)
    _config(ws, pre="true", sources={"data": data})
    _run_ok(ws)
    first, second = (_backup_of(ws, "data", i) / "old.txt" for i in (0, 1))
    assert os.lstat(first).st_ino == os.lstat(second).st_ino


# --- (c) and (d): the previous backup is never changed; its links survive ---------------


def test_attributes_changed_between_the_passes_never_change_the_previous_backup(
        ws: Workspace) -> None:
    data = ws.make_source("data", {"f": "mode changes\n", "g": "unchanged\n",
                                   "sub/h": "unchanged too\n"})
    old = time.time() - 3600
    for rel in ("f", "g", "sub/h"):
        os.chmod(data / rel, 0o644)
        os.utime(data / rel, (old, old))
    _config(ws, pre=None, sources={"data": data})
    _run_ok(ws)
    pre = f"chmod 600 {_q(data / 'f')}"
    _config(ws, pre=pre, sources={"data": data})
    report = _run_ok(ws)
    assert report["sources"]["data"]["precopy"]["status"] == "ok"
    first, second = _backup_of(ws, "data", 0), _backup_of(ws, "data", 1)
    assert stat.S_IMODE(os.lstat(first / "f").st_mode) == 0o644, "the previous backup changed"
    assert stat.S_IMODE(os.lstat(second / "f").st_mode) == 0o600
    # (d) unchanged files share their inode with the previous backup after both passes.
    for rel in ("g", "sub/h"):
        assert os.lstat(first / rel).st_ino == os.lstat(second / rel).st_ino, rel
    assert _tree(second) == _tree(data)


# --- (e) a failing precopy ---------------------------------------------------------------


def test_a_failing_precopy_leaves_an_ok_run(ws: Workspace) -> None:
    late = ws.src / "late"  # appears only in the snapshot hook's pre
    _config(ws, pre=f"mkdir {_q(late)} && echo here > {_q(late / 'f.txt')}",
            sources={"late": late})
    result = ws.run("run")
    assert result.returncode == 0, result.stderr
    report = ws.report()
    assert report["status"] == "ok", report
    assert report["failure"] is None
    source = report["sources"]["late"]
    assert source["precopy"]["status"] == "failed", source
    assert source["status"] == "ok", source
    assert "precopy failed" in result.stderr
    assert (_backup_of(ws, "late") / "f.txt").read_text() == "here\n"


def _rsync_failing_once(ws: Workspace) -> dict[str, str]:
    """An environment whose rsync (a fake in front of the real one, a fault the real one
    cannot give) copies all but ``d2`` and fails the first time it runs, then is rsync."""
    fake = ws.root / "bin" / "rsync"
    fake.parent.mkdir()
    flag = ws.root / "failed-once"
    real = subprocess.run(["sh", "-c", "command -v rsync"], capture_output=True,
                          text=True, check=True).stdout.strip()
    fake.write_text("#!/bin/sh\n"
                    f"if [ ! -e {_q(flag)} ]; then touch {_q(flag)}; "
                    f"{_q(real)} --exclude=d2 \"$@\"; echo 'fake: disk hiccup' >&2; exit 12; fi\n"
                    f'exec {_q(real)} "$@"\n')
    fake.chmod(0o755)
    return {"PATH": f"{fake.parent}:{os.environ['PATH']}"}


def test_a_precopy_that_fails_half_way_leaves_a_whole_backup(ws: Workspace) -> None:
    """A fake rsync that fails (after copying part) only the first time it runs."""
    data = ws.make_source("data", {f"d{i}/f{j}": f"{i}{j}\n" for i in range(3) for j in range(3)})
    _config(ws, pre="true", sources={"data": data})
    result = ws.run("run", env=_rsync_failing_once(ws))
    assert result.returncode == 0, result.stderr
    report = ws.report()
    assert report["status"] == "ok", report
    assert report["sources"]["data"]["precopy"]["status"] == "failed"
    assert report["sources"]["data"]["precopy"]["exit_code"] == 12
    assert _tree(_backup_of(ws, "data")) == _tree(data)


# --- (f) a signal during the precopy -----------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_the_precopy_interrupts_the_run(ws: Workspace, sig: int) -> None:
    slow = make_slow_source(ws, "alpha")
    write_config(ws, standard_hooks(), hook_source_toml("alpha", slow,
                                                        rsync_args=["--bwlimit=500"]))
    with start(ws) as running:
        _wait_rsync(ws, running, slow)
        assert not started_marker(ws, "s1", "pre").exists()
        running.send(sig)
        rc = running.wait(30)
    assert rc == EXIT_FOR[sig], running.stderr
    assert_no_processes(ws)
    assert processes_mentioning(str(slow)) == []
    # No snapshot pre ran, so only the backup hooks' posts run.
    assert order(ws) == ["b1.pre", "b2.pre", "b2.post", "b1.post"]
    assert ws.backups() == [], "the in-progress folder is removed"
    report = ws.report()
    assert report["status"] == "interrupted"
    source = report["sources"]["alpha"]
    assert source["precopy"]["status"] == "cancelled", source
    assert source["snapshot"]["status"] == "skipped", source
    assert source["status"] == "cancelled", source


def _wait_rsync(ws: Workspace, running: Running, path: Path) -> None:
    def copying() -> bool:
        if running.proc.poll() is not None:
            raise AssertionError(f"the CLI exited early; stderr:\n{running.stderr}")
        return any("rsync" in cmd for _, cmd in processes_mentioning(str(path)))

    wait_for(copying, 15, "the precopy's rsync")


# --- the dry-run ----------------------------------------------------------------------


def test_the_dry_run_shows_the_precopy(ws: Workspace) -> None:
    data = ws.make_source("data")
    other = ws.make_source("other")
    _config(ws, pre="true", sources={"data": data})
    with ws.config_path.open("a") as f:
        f.write(f'[[sources]]\nname = "other"\ntype = "rsync"\npath = {_toml(other)}\n'
                "precopy = false\n")
    result = ws.run("run", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    pre_at = next(i for i, line in enumerate(lines) if "snapshot hooks, pre" in line)
    precopy_at = next(i for i, line in enumerate(lines) if line.startswith("2. precopy"))
    assert precopy_at < pre_at, result.stdout
    between = lines[precopy_at + 1:pre_at]
    assert any(line.startswith("   - data: rsync ") for line in between), result.stdout
    assert not any("other" in line for line in between), result.stdout


# --- step 3 after a precopy that linked against an earlier backup (--compare-dest) -------


def _previous_then_precopy(ws: Workspace, data: Path, pre: str, *, post: str = "true",
                           source_keys: str = "") -> tuple[Path, Path]:
    """A backup without precopy, then one with it (``pre`` between the passes): both copies."""
    _config(ws, pre=None, sources={"data": data}, source_keys=source_keys)
    _run_ok(ws)
    _config(ws, pre=pre, post=post, sources={"data": data}, source_keys=source_keys)
    report = _run_ok(ws)
    assert report["sources"]["data"]["precopy"]["status"] == "ok", report
    return _backup_of(ws, "data", 0), _backup_of(ws, "data", 1)


def _inode_groups(root: Path) -> set[frozenset[str]]:
    """The regular files below ``root`` grouped by inode: its hard-link structure."""
    groups: dict[int, set[str]] = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                groups.setdefault(st.st_ino, set()).add(os.path.relpath(path, root))
    return {frozenset(g) for g in groups.values()}


def test_step_3_creates_only_what_changed_since_the_precopy(ws: Workspace) -> None:
    """The window holds a scan and what changed since the precopy: no link per unchanged
    file. A snapshot hook's post (after step 3, before the unchanged files join the
    backup) lists what step 3 created."""
    files = {f"d{i}/f{j}.txt": f"{i}-{j}\n" for i in range(3) for j in range(5)}
    data = ws.make_source("data", files)
    _age(data)
    for rel in files:
        os.chmod(data / rel, 0o644)
    created = ws.root / "created-in-window"
    pre = (f"echo changed > {_q(data / 'd0/f0.txt')} && chmod 600 {_q(data / 'd1/f1.txt')} "
           f"&& echo new > {_q(data / 'd2/new.txt')}")
    post = f'cd "$PIBACKUP_BACKUP_DIR/data" && find . -type f | sort > {_q(created)}'
    first, second = _previous_then_precopy(ws, data, pre, post=post)
    assert created.read_text().split() == ["./d0/f0.txt", "./d1/f1.txt", "./d2/new.txt"]
    assert _tree(second) == _tree(data)
    for rel in files:
        if rel not in ("d0/f0.txt", "d1/f1.txt"):
            assert os.lstat(first / rel).st_ino == os.lstat(second / rel).st_ino, rel
    assert stat.S_IMODE(os.lstat(first / "d1/f1.txt").st_mode) == 0o644
    assert not [n for n in os.listdir(second.parent) if n.startswith(".data")]


def test_owner_xattr_and_link_target_changed_between_the_passes(ws: Workspace) -> None:
    """Attribute-only changes after a precopy: step 3 copies the file (rsync's
    compare-dest sees them as different), the previous backup keeps its own."""
    data = ws.make_source("data", {"owned": "owner changes\n", "tagged": "xattr changes\n",
                                   "dir/f": "in a folder whose mode changes\n"})
    os.setxattr(data / "tagged", "user.k", b"1")
    (data / "link").symlink_to("owned")
    os.chmod(data / "dir", 0o755)
    _age(data)
    py = _q(sys.executable)
    pre = (f"chown 1234:1234 {_q(data / 'owned')} && chmod 700 {_q(data / 'dir')} && "
           f"ln -sfn tagged {_q(data / 'link')} && "
           f"{py} -c 'import os,sys; os.setxattr(sys.argv[1], \"user.k\", b\"2\")' "
           f"{_q(data / 'tagged')}")
    first, second = _previous_then_precopy(ws, data, pre)
    assert os.lstat(first / "owned").st_uid == 0
    assert os.lstat(second / "owned").st_uid == 1234
    assert os.getxattr(first / "tagged", "user.k") == b"1"
    assert os.getxattr(second / "tagged", "user.k") == b"2"
    assert os.readlink(first / "link") == "owned"
    assert os.readlink(second / "link") == "tagged"
    assert stat.S_IMODE(os.lstat(first / "dir").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(second / "dir").st_mode) == 0o700
    assert os.lstat(first / "dir/f").st_ino == os.lstat(second / "dir/f").st_ino
    assert _tree(second) == _tree(data)


def test_hard_links_inside_the_source_after_a_precopy(ws: Workspace) -> None:
    data = ws.make_source("data", {"a": "pair kept\n", "c": "pair rewritten\n",
                                   "e": "alone, then linked\n", "sub/x": "x\n"})
    for one, two in (("a", "b"), ("c", "d"), ("sub/x", "y")):
        os.link(data / one, data / two)
    _age(data)
    pre = (f"echo rewritten through c >> {_q(data / 'c')} && ln {_q(data / 'e')} "
           f"{_q(data / 'f')}")
    first, second = _previous_then_precopy(ws, data, pre)
    assert _inode_groups(second) == _inode_groups(data) == {
        frozenset(g) for g in (("a", "b"), ("c", "d"), ("e", "f"), ("sub/x", "y"))}
    assert os.lstat(first / "a").st_ino == os.lstat(second / "b").st_ino
    assert os.lstat(first / "y").st_ino == os.lstat(second / "sub/x").st_ino
    assert (first / "d").read_text() == "pair rewritten\n"
    assert _tree(second) == _tree(data)


def test_vanished_and_retyped_names_after_a_precopy(ws: Workspace) -> None:
    data = ws.make_source("data", {"gone": "deleted\n", "tree/a/b": "b\n", "becomes-dir": "f\n",
                                   "dir-becomes-file/x": "x\n", "becomes-link": "l\n",
                                   "kept/k": "k\n"})
    (data / "excluded.tmp").write_text("never copied\n")
    _age(data)
    pre = (f"cd {_q(data)} && rm gone && rm -r tree && rm becomes-dir && mkdir becomes-dir && "
           "echo inside > becomes-dir/inside && rm -r dir-becomes-file && "
           "echo now a file > dir-becomes-file && rm becomes-link && "
           "ln -s kept becomes-link && echo also excluded > kept/new.tmp")
    first, second = _previous_then_precopy(ws, data, pre,
                                           source_keys='exclude = ["*.tmp"]')
    expected = {k: v for k, v in _tree(data).items() if not k.endswith(".tmp")}
    assert _tree(second) == expected
    assert os.lstat(first / "kept/k").st_ino == os.lstat(second / "kept/k").st_ino


def test_folder_times_survive_the_links_made_after_the_window(ws: Workspace) -> None:
    data = ws.make_source("data", {"d/a": "a\n", "d/e/b": "b\n", "top": "t\n"})
    _age(data)
    then = time.time() - 7200
    for folder in ("d/e", "d", "."):
        os.utime(data / folder, (then, then))
    pre = f"echo more >> {_q(data / 'top')}; touch -d @{then:.0f} {_q(data)}"
    _, second = _previous_then_precopy(ws, data, pre)
    for folder in (".", "d", "d/e"):
        assert os.lstat(second / folder).st_mtime == pytest.approx(
            os.lstat(data / folder).st_mtime, abs=1), folder


def test_a_source_whose_files_all_went_unchanged_is_not_empty(ws: Workspace) -> None:
    """Step 3 creates nothing then (every file joins after the window): the copy is
    judged on what step 3 saw, not on what it created."""
    data = ws.make_source("data", {"one": "1\n", "two": "2\n"})
    _age(data)
    first, second = _previous_then_precopy(ws, data, "true")
    assert _tree(second) == _tree(data)
    assert os.lstat(first / "one").st_ino == os.lstat(second / "one").st_ino


def test_a_precopy_cut_short_with_a_previous_backup_leaves_a_whole_backup(
        ws: Workspace) -> None:
    """The precopy did not finish: step 3 trusts nothing it left and still links
    unchanged files against the previous backup."""
    data = ws.make_source("data", {f"d{i}/f{j}": f"{i}{j}\n" for i in range(3) for j in range(3)})
    _age(data)
    _config(ws, pre=None, sources={"data": data})
    _run_ok(ws)
    _config(ws, pre=f"chmod 600 {_q(data / 'd0/f0')}", sources={"data": data})
    result = ws.run("run", env=_rsync_failing_once(ws))
    assert result.returncode == 0, result.stderr
    assert ws.report()["sources"]["data"]["precopy"]["status"] == "failed"
    first, second = _backup_of(ws, "data", 0), _backup_of(ws, "data", 1)
    assert _tree(second) == _tree(data)
    assert stat.S_IMODE(os.lstat(first / "d0/f0").st_mode) != 0o600
    assert os.lstat(first / "d2/f1").st_ino == os.lstat(second / "d2/f1").st_ino


def test_a_damaged_copy_is_not_brought_back_by_the_precopy(ws: Workspace) -> None:
    from test_relink import CONTENT, assert_copied_afresh, flip_byte, record

    data = ws.make_source("data", {"a.txt": CONTENT.decode(), "same.txt": "left alone\n"})
    _age(data)
    _config(ws, pre=None, sources={"data": data})
    _run_ok(ws)
    [first] = complete_backups(ws)
    flip_byte(ws.dest / first / "data" / "a.txt")
    bad = record(ws, first, "data", b"a.txt")
    _config(ws, pre="true", sources={"data": data})
    report = _run_ok(ws)
    assert report["sources"]["data"]["precopy"]["status"] == "ok"
    [second] = set(complete_backups(ws)) - {first}
    assert_copied_afresh(ws, "data", b"a.txt", bad, CONTENT, [first], second)
    assert report["sources"]["data"]["relinked"] == 1
    assert (os.lstat(ws.dest / first / "data" / "same.txt").st_ino
            == os.lstat(ws.dest / second / "data" / "same.txt").st_ino)


def test_a_remote_source_after_a_precopy(ws: Workspace, sshd: Sshd) -> None:
    data = ws.make_source("data", {"keep": "kept\n", "sub/change": "before\n",
                                   "mode": "mode changes\n"})
    (data / "gone").write_text("deleted between the passes\n")
    _age(data)
    os.chmod(data / "mode", 0o644)
    hook = '[[snapshot_hooks]]\nname = "db"\n{pre}post = "true"\n'
    source = (f'[[sources]]\nname = "data"\ntype = "rsync"\npath = {_toml(data)}\n'
              'host = "h1"\n')
    ws.write_config(sshd.host_toml("h1") + hook.format(pre="") + source)
    _run_ok(ws)
    pre = (f"echo after >> {_q(data / 'sub/change')} && chmod 600 {_q(data / 'mode')} && "
           f"rm {_q(data / 'gone')}")
    ws.write_config(sshd.host_toml("h1") + hook.format(pre=f"pre = {_toml(pre)}\n") + source)
    report = _run_ok(ws)
    assert report["sources"]["data"]["precopy"]["status"] == "ok"
    first, second = _backup_of(ws, "data", 0), _backup_of(ws, "data", 1)
    assert _tree(second) == _tree(data)
    assert os.lstat(first / "keep").st_ino == os.lstat(second / "keep").st_ino
    assert stat.S_IMODE(os.lstat(first / "mode").st_mode) == 0o644


def test_a_new_hard_link_to_an_unchanged_group_is_not_lost(ws: Workspace) -> None:
    """rsync's --compare-dest with -H says nothing of a new name linked to a group the
    precopied copy holds unchanged, and creates nothing for it: step 3 counts what it
    listed against its file list and copies again (in the window) when they differ."""
    data = ws.make_source("data", {"d1/f0": "0\n"})
    (data / "d3").mkdir()
    for other in ("d1/f4", "d3/f8", "d3/f19"):
        os.link(data / "d1/f0", data / other)
    _age(data)
    first, second = _previous_then_precopy(ws, data,
                                           f"ln {_q(data / 'd1/f0')} {_q(data / 'd3/f19n')}")
    assert _tree(second) == _tree(data)
    assert _inode_groups(second) == _inode_groups(data)
    assert os.lstat(first / "d1/f0").st_ino == os.lstat(second / "d3/f19n").st_ino


def test_the_dry_run_shows_step_3_comparing_with_the_precopied_copy(ws: Workspace) -> None:
    data = ws.make_source("data")
    _config(ws, pre=None, sources={"data": data})
    _run_ok(ws)
    _config(ws, pre="true", sources={"data": data})
    result = ws.run("run", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("   - data: rsync ")]
    precopy, step3 = lines[0], lines[1]
    assert "--link-dest=" in precopy and "--compare-dest=" not in precopy, result.stdout
    assert "--compare-dest=" in step3 and "--link-dest=" not in step3, result.stdout
    assert ".data.precopied" in step3, result.stdout
