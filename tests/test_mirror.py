"""``mirror`` with a local origin (SPEC §10): what it copies, in which order, how it links,
checks, resumes and reports; the origin is never written. Real runs, real rsync."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from typing import TYPE_CHECKING

import pytest
from conftest import needs_rsync, wait_for
from datakit import table
from mirrorkit import Bench, tree_bytes, tree_stats

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Workspace

pytestmark = needs_rsync

NAME_KEYS = {"name", "status", "bytes", "received_bytes", "duration_s", "resumed"}


def ino(path: Path) -> int:
    return os.lstat(path).st_ino


def test_copies_every_backup_oldest_first_under_its_name_and_never_writes_the_origin(
        ws: Workspace) -> None:
    bench = Bench(ws)
    names = bench.backups(3)
    bench.write_mirror_config()
    stats, content = tree_stats(bench.origin), tree_bytes(bench.origin)

    result = bench.mirror()

    assert result.returncode == 0, result.stderr
    assert tree_stats(bench.origin) == stats
    assert tree_bytes(bench.origin) == content
    assert bench.mirror_backups() == names
    report = bench.mirror_report()
    assert [c["name"] for c in report["copied"]] == names
    assert all(c["status"] == "ok" and not c["resumed"] for c in report["copied"])
    assert all(set(c) == NAME_KEYS for c in report["copied"])
    for name in names:
        assert tree_bytes(ws.dest / name) == tree_bytes(bench.origin / name)
    # Unchanged files are linked to the mirror's previous copy, changed ones are not.
    first, second, third = (ws.dest / n / "data" for n in names)
    assert ino(first / "same.txt") == ino(second / "same.txt") == ino(third / "same.txt")
    assert ino(first / "only-0.txt") == ino(third / "only-0.txt")
    assert ino(first / "edit.txt") != ino(second / "edit.txt")
    # Only the first copy carried the unchanged file: later ones wrote what changed.
    assert report["copied"][1]["bytes"] < report["copied"][0]["bytes"]

    again = bench.mirror()
    assert again.returncode == 0, again.stderr
    assert bench.mirror_report()["copied"] == []
    assert tree_stats(bench.origin) == stats


def _rewrite_keeping_size_and_mtime(backup: Path, rel: str, content: bytes) -> None:
    """Give ``rel`` of an origin backup new content in a new inode, with the old size and
    mtime (a rewrite within one timestamp tick), and its manifest line the new digest."""
    path = backup / rel
    st = os.lstat(path)
    assert len(content) == st.st_size
    os.unlink(path)
    path.write_bytes(content)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    manifest = backup / ".pibackup" / "data.sha256"
    old = hashlib.sha256(b"version 0\n").hexdigest()
    new = hashlib.sha256(content).hexdigest()
    text = manifest.read_text()
    assert f"{old}  {rel}\n" in text
    manifest.write_text(text.replace(f"{old}  {rel}\n", f"{new}  {rel}\n"))


def test_a_file_rewritten_with_the_same_size_and_mtime_is_not_linked(ws: Workspace) -> None:
    bench = Bench(ws)
    first = bench.backup(lambda d: (d / "edit.txt").write_text("version 0\n"))
    second = bench.backup()
    origin_edit = bench.origin / second / "data" / "edit.txt"
    # The origin's run linked it (nothing changed); it now holds other bytes.
    _rewrite_keeping_size_and_mtime(bench.origin / second, "data/edit.txt", b"version X\n")
    assert ino(origin_edit) != ino(bench.origin / first / "data" / "edit.txt")
    bench.write_mirror_config()

    result = bench.mirror()

    assert result.returncode == 0, result.stderr
    copy = ws.dest / second / "data" / "edit.txt"
    assert copy.read_bytes() == b"version X\n"
    assert ino(copy) != ino(ws.dest / first / "data" / "edit.txt")
    assert (ws.dest / first / "data" / "edit.txt").read_bytes() == b"version 0\n"
    # Left out of the linking pass, not caught afterwards by the check.
    assert "do not match" not in result.stderr
    assert ino(ws.dest / second / "data" / "same.txt") == ino(ws.dest / first / "data" /
                                                               "same.txt")


def test_several_files_rewritten_with_the_same_size_and_mtime_are_none_linked(
        ws: Workspace) -> None:
    """rsync reads an --exclude-from file as it parses that option: a --from0 after it
    left every pattern but the first ignored (the files linked, then refetched)."""
    bench = Bench(ws)
    rels = [f"data/edit-{i}.txt" for i in range(3)]

    def first_version(data: Path) -> None:
        for rel in rels:
            (data / rel.removeprefix("data/")).write_text("version 0\n")
    first = bench.backup(first_version)
    second = bench.backup()
    for rel in rels:
        _rewrite_keeping_size_and_mtime(bench.origin / second, rel, b"version X\n")
    bench.write_mirror_config()

    result = bench.mirror()

    assert result.returncode == 0, result.stderr
    for rel in rels:
        assert (ws.dest / second / rel).read_bytes() == b"version X\n"
        assert ino(ws.dest / second / rel) != ino(ws.dest / first / rel), rel
    assert "do not match" not in result.stderr


def test_a_same_size_and_mtime_rewrite_whose_mode_changed_gets_its_new_content(
        ws: Workspace) -> None:
    """rsync's --link-dest copies a quick-check match whose attributes differ from the
    previous copy (a new inode, the old content) rather than linking it: no inode
    comparison can tell it; the size and mtime second do."""
    bench = Bench(ws)
    first = bench.backup(lambda d: (d / "edit.txt").write_text("version 0\n"))
    second = bench.backup()
    _rewrite_keeping_size_and_mtime(bench.origin / second, "data/edit.txt", b"version X\n")
    os.chmod(bench.origin / second / "data" / "edit.txt", 0o600)
    bench.write_mirror_config()

    result = bench.mirror()

    assert result.returncode == 0, result.stderr
    copy = ws.dest / second / "data" / "edit.txt"
    assert copy.read_bytes() == b"version X\n"
    assert os.lstat(copy).st_mode & 0o777 == 0o600
    assert (ws.dest / first / "data" / "edit.txt").read_bytes() == b"version 0\n"
    assert "do not match" not in result.stderr


def _passes(stderr: str, backup: str) -> list[str]:
    """The rsync passes (``-v --log-format json``) that copied ``backup``, in order."""
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [e["pass_"] for e in events if e.get("event") == "rsync" and e.get("backup") == backup]


def test_a_changed_file_of_another_size_takes_no_pass_of_its_own(ws: Workspace) -> None:
    bench = Bench(ws)
    first = bench.backup(lambda d: (d / "edit.txt").write_text("version 0\n"))
    second = bench.backup(lambda d: (d / "edit.txt").write_text("version 1, longer\n"))
    bench.write_mirror_config()

    result = bench.mirror("-v", "--log-format", "json")

    assert result.returncode == 0, result.stderr
    passes = _passes(result.stderr, second)
    # (A manifest written within the same second as the previous one may be fetched again.)
    assert passes[0] == "copy" and "changed files (not linked)" not in passes, passes
    copy = ws.dest / second / "data" / "edit.txt"
    assert copy.read_bytes() == b"version 1, longer\n"
    assert ino(copy) != ino(ws.dest / first / "data" / "edit.txt")
    assert ino(ws.dest / second / "data" / "same.txt") == ino(ws.dest / first / "data" /
                                                               "same.txt")


def test_a_manifest_with_the_size_and_mtime_second_of_the_previous_copys_is_not_linked(
        ws: Workspace) -> None:
    """The copy pass (``--link-dest`` the previous copy) left the manifests the first pass
    fetched to rsync's quick check, which compares whole seconds: a manifest of the same
    size written within the same second as the previous one was replaced by a link to
    it, and every rewritten file then failed the check (about 1 run in 4 when two
    backups were made a second apart)."""
    bench = Bench(ws)
    first = bench.backup(lambda d: (d / "edit.txt").write_text("version 0\n"))
    second = bench.backup()
    _rewrite_keeping_size_and_mtime(bench.origin / second, "data/edit.txt", b"version X\n")
    manifests = [bench.origin / name / ".pibackup" / "data.sha256" for name in (first, second)]
    old = os.lstat(manifests[0])
    # The same second, another nanosecond: what two runs a second apart can give.
    nanos = old.st_mtime_ns - old.st_mtime_ns % 10**9 + (old.st_mtime_ns + 1) % 10**9
    os.utime(manifests[1], ns=(nanos, nanos))
    assert os.lstat(manifests[1]).st_size == old.st_size
    bench.write_mirror_config()

    result = bench.mirror()

    assert result.returncode == 0, result.stderr
    assert "do not match" not in result.stderr
    copied = ws.dest / second / ".pibackup" / "data.sha256"
    assert copied.read_bytes() == manifests[1].read_bytes()
    assert ino(copied) != ino(ws.dest / first / ".pibackup" / "data.sha256")
    assert (ws.dest / second / "data" / "edit.txt").read_bytes() == b"version X\n"


def test_retention_is_the_mirrors_own_and_nothing_is_copied_only_to_be_deleted(
        ws: Workspace) -> None:
    bench = Bench(ws)
    names = bench.backups(4)
    bench.write_mirror_config(extra=table("[retention]", keep_last=2))

    result = bench.mirror()

    assert result.returncode == 0, result.stderr
    assert bench.mirror_backups() == names[2:]
    report = bench.mirror_report()
    assert [c["name"] for c in report["copied"]] == names[2:]
    assert report["retention"]["deleted"] == []
    assert bench.origin_backups() == names

    newer = bench.backups(1)
    assert bench.mirror().returncode == 0
    assert bench.mirror_backups() == [names[3], *newer]
    assert bench.mirror_report()["retention"]["deleted"] == [names[2]]


def test_a_copy_cut_by_sigterm_is_kept_and_continued(ws: Workspace) -> None:
    bench = Bench(ws)
    mib = 1 << 20

    def big(data: Path) -> None:
        for i in range(4):
            (data / f"big-{i}.bin").write_bytes(os.urandom(mib))

    [name] = [bench.backup(big)]
    bench.write_mirror_config(origin={"bwlimit": "1MiB"})
    in_progress = ws.dest / f"{name}.in-progress"
    process = ws.start("mirror")
    try:
        wait_for(lambda: (in_progress / "data" / "big-0.bin").exists(), 30,
                 "the first big file copied")
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, stderr
    assert in_progress.is_dir()
    cut = bench.mirror_report()
    assert cut["status"] == "interrupted"
    assert [(c["name"], c["status"]) for c in cut["copied"]] == [(name, "cancelled")]
    done_before = [p.name for p in (in_progress / "data").glob("big-*.bin")]
    assert done_before

    result = bench.mirror()

    assert result.returncode == 0, result.stderr
    assert bench.mirror_backups() == [name]
    assert tree_bytes(ws.dest / name) == tree_bytes(bench.origin / name)
    [again] = bench.mirror_report()["copied"]
    assert again["resumed"] is True and again["status"] == "ok"
    # What was complete was not sent again.
    assert again["received_bytes"] < (4 - len(done_before)) * mib + mib // 2


def test_an_in_progress_copy_of_a_backup_the_origin_deleted_is_removed(ws: Workspace) -> None:
    bench = Bench(ws)
    gone, kept = bench.backups(2)
    bench.write_mirror_config()
    left = ws.dest / f"{gone}.in-progress"
    (left / "data").mkdir(parents=True)
    (left / "data" / "half.txt").write_text("an interrupted copy\n")
    # The origin's retention deletes it before the mirror gets to it.
    os.system(f"rm -rf '{bench.origin / gone}'")

    result = bench.mirror()

    assert result.returncode == 0, result.stderr
    assert not left.exists()
    assert bench.mirror_backups() == [kept]
    assert [c["name"] for c in bench.mirror_report()["copied"]] == [kept]


def test_a_damaged_origin_copy_fails_is_removed_and_later_backups_are_still_copied(
        ws: Workspace) -> None:
    bench = Bench(ws)
    first, damaged, last = bench.backups(3)
    # edit.txt changed in each backup: the damaged backup's copy is its own inode.
    target = bench.origin / damaged / "data" / "edit.txt"
    data = bytearray(target.read_bytes())
    data[0] ^= 0x01
    st = os.lstat(target)
    with open(target, "r+b") as f:
        f.write(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    bench.write_mirror_config()

    result = bench.mirror()

    assert result.returncode == 1, result.stderr
    assert bench.mirror_backups() == [first, last]
    assert not (ws.dest / f"{damaged}.in-progress").exists()
    report = bench.mirror_report()
    assert report["status"] == "failed"
    assert [(c["name"], c["status"]) for c in report["copied"]] == [
        (first, "ok"), (damaged, "failed"), (last, "ok")]
    assert damaged in report["failure"] and "manifest" in report["failure"]
    # The later backup was copied against the last good copy.
    assert ino(ws.dest / first / "data" / "same.txt") == ino(ws.dest / last / "data" /
                                                             "same.txt")
    assert tree_bytes(ws.dest / last) == tree_bytes(bench.origin / last)


@pytest.mark.parametrize(("config", "command", "says"), [
    ("sources", "mirror", "sources: a configuration with [origin]"),
    ("snapshot_hooks", "mirror", "snapshot_hooks: a configuration with [origin]"),
    ("own", "mirror", "origin.path: the origin cannot be this configuration's own"),
    ("sudo", "mirror", "origin.host: host 'pi' has sudo = true"),
    ("bwlimit", "mirror", "origin.bwlimit: expected bytes per second"),
    ("plain", "run", "run: this configuration has [origin]"),
    ("no origin", "mirror", "mirror: the configuration has no [origin]"),
])
def test_refused_at_load(ws: Workspace, config: str, command: str, says: str) -> None:
    origin = {"path": str(ws.root / "origin")}
    extra = ""
    if config == "sources":
        extra = table("[[sources]]", name="data", type="rsync", path=str(ws.src))
    elif config == "snapshot_hooks":
        extra = table("[[snapshot_hooks]]", name="db", pre="true")
    elif config == "own":
        origin["path"] = str(ws.dest) + "/"
    elif config == "sudo":
        origin["host"] = "pi"
        extra = table("[hosts.pi]", address="127.0.0.1", sudo=True)
    elif config == "bwlimit":
        origin["bwlimit"] = "fast"
    if config == "no origin":
        ws.write_config(table("[[sources]]", name="data", type="rsync", path=str(ws.src)))
    else:
        ws.write_config(table("[origin]", **origin) + extra)

    result = ws.run(command)

    assert result.returncode == 2, result.stderr
    assert says in result.stderr
    assert "Traceback" not in result.stderr
    assert os.listdir(ws.dest) == []


def test_bwlimit_units_are_powers_of_1024() -> None:
    from pibackup_async.engine.config import parse_rate

    assert parse_rate("500KiB") == 500 * 1024
    assert parse_rate("2MiB") == 2 * 1024 ** 2
    assert parse_rate("1G") == 1024 ** 3
    assert parse_rate("4096") == 4096
    with pytest.raises(ValueError, match="bytes per second"):
        parse_rate("2 MB per hour")


def test_dry_run_says_what_would_be_copied_and_deleted_and_changes_nothing(
        ws: Workspace) -> None:
    bench = Bench(ws)
    names = bench.backups(3)
    bench.write_mirror_config(extra=table("[retention]", keep_last=1))
    ws.write_config(table("[origin]", path=str(bench.origin)) + table("[retention]",
                                                                       keep_last=2))

    result = bench.mirror("--dry-run")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    copies = [line for line in lines if line.startswith("would copy ")]
    assert copies == [f"would copy {names[1]}", f"would copy {names[2]} (linked against "
                                                f"{names[1]})"]
    assert any(f"--link-dest={ws.dest / names[1]}" in line for line in lines)
    assert "nothing was changed" in lines[-1]
    assert os.listdir(ws.dest) == []
    assert bench.mirror_reports() == []


def test_the_report_and_the_mirror_read_like_any_destination(ws: Workspace) -> None:
    bench = Bench(ws)
    names = bench.backups(2)
    bench.write_mirror_config()
    hook_log = ws.root / "hook.env"
    said = "$PIBACKUP_COMMAND:$PIBACKUP_NAME:$PIBACKUP_BACKUP_DIR"
    ws.write_config(
        table("[origin]", path=str(bench.origin))
        + table("[[backup_hooks]]", name="env", pre=f"echo pre:{said}: >> {hook_log}",
                post=f"echo post:{said}:$PIBACKUP_STATUS >> {hook_log}"))

    result = bench.mirror()

    assert result.returncode == 0, result.stderr
    [path] = bench.mirror_reports()
    assert path.name.startswith("mirror-") and (path.stat().st_mode & 0o777) == 0o600
    report = json.loads(path.read_text())
    assert list(report) == ["status", "start", "end", "duration_s", "failure", "origin",
                            "hooks", "copied", "destination", "retention", "warnings",
                            "delivery", "monitor", "abandoned"]
    assert report["origin"] == str(bench.origin)
    assert report["status"] == "ok" and report["failure"] is None
    assert [h["phase"] for h in report["hooks"]] == ["pre", "post"]
    assert hook_log.read_text().splitlines() == ["pre:mirror:::", "post:mirror:::ok"]
    # list and verify read the mirror as any destination.
    listed = json.loads(ws.run("list", "--json").stdout)
    assert sorted(e["name"] for e in listed if e["state"] == "complete") == names
    verified = ws.run("verify", "--all")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "0 problems" in verified.stdout


def test_metrics_file_has_the_lag_and_no_saved(ws: Workspace) -> None:
    from datetime import datetime

    bench = Bench(ws)
    older, newer = bench.backups(2)
    # The newer backup's copy fails (damaged on the origin): the mirror lags by the interval.
    with open(bench.origin / newer / "data" / "edit.txt", "r+b") as f:
        f.write(b"X")
    metrics = ws.root / "mirror.prom"
    bench.write_mirror_config(extra=table("[monitor]", metrics_file=str(metrics)))

    assert bench.mirror().returncode == 1
    text = metrics.read_text()
    label = f'{{destination="{ws.dest}"}}'
    lag = (datetime.strptime(newer, "%Y-%m-%dt%H-%M-%S%z")
           - datetime.strptime(older, "%Y-%m-%dt%H-%M-%S%z")).total_seconds()
    assert lag > 0
    assert f"pibackup_mirror_lag_seconds{label} {int(lag)}\n" in text
    assert f"pibackup_last_run_ok{label} 0\n" in text
    assert f"pibackup_backups{label} 1\n" in text
    assert "pibackup_last_run_saved" not in text and "pibackup_source_bytes" not in text


def test_mail_subject_names_the_origin() -> None:
    from pibackup_async.engine.mail_body import render_subject
    from pibackup_async.engine.report import CopiedBackup, MirrorReport

    report = MirrorReport(name="mirror-x", start="s", concurrency=1, origin="pi:/mnt/b",
                          copied=[CopiedBackup(name=n, status="ok") for n in ("a1", "a2", "a3")])
    assert render_subject(report, host="box.lan") == (
        "[pibackup] OK box: mirrored 3 backups of pi:/mnt/b (a3)")
    report.status, report.failure = "failed", "copy of a2: rsync failed"
    assert render_subject(report, host="box") == (
        "[pibackup] FAILED box: copy of a2: rsync failed (mirror of pi:/mnt/b)")
