"""A manifest that reads every file may be written in a process of its own (issue 19).

A first backup's manifest is CPU: the Python around each file's system
calls, which threads of one process do not share out. So while the
engine's thread writes one, the destination hands the next to
``manifest_child``, one a CPU. What must not change:
the manifest itself (byte for byte), the errors (an OSError naming the
file), and what the destination promises of every operation: a cancel or
a disk that stops answering ends it within its bound, and leaves no
process behind.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from conftest import needs_rsync, wait_for
from datakit import cli_ok, complete_backups, rsync_source
from hangkit import hanging, needs_fuse
from pibackup_async.engine.destination import DestinationLost, LocalDestination, _cpus
from pibackup_async.engine.manifest import write_manifest
from pibackup_async.engine.manifest_process import write_manifest_in_child
from pibackup_async.engine.threads import Progress

if TYPE_CHECKING:
    from conftest import Workspace

CHILD = "pibackup_async.engine.manifest_child"
needs_two_cpus = pytest.mark.skipif(_cpus() < 2, reason="one CPU: manifests stay in-process")


def children_reading(folder: Path) -> list[int]:
    """Our manifest children that were started on ``folder`` and still exist."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if CHILD.encode() in argv and os.fsencode(folder) in argv:
            found.append(int(entry))
    return found


def odd_copy(root: Path) -> Path:
    """A backup folder holding a copy ``data`` with odd names, links and a big-ish file."""
    copy = root / "backup" / "data"
    (copy / "sub" / "deeper").mkdir(parents=True)
    for name in (b"plain", b"new\nline", b"back\\slash", b"caf\xe9", b"two  spaces "):
        with open(os.path.join(os.fsencode(copy), name), "wb") as f:
            f.write(b"contents of " + name)
    (copy / "sub" / "deeper" / "leaf").write_bytes(os.urandom(3 * (1 << 20) + 5))
    os.link(copy / "plain", copy / "sub" / "plain-again")
    (copy / "empty").write_bytes(b"")
    (copy / "to-plain").symlink_to("plain")
    return copy.parent


def sparse_copy(root: Path, gib: int = 4, *, name: str = "data", backup: str = "backup"
                ) -> Path:
    """A backup folder whose copy ``name`` is one big sparse file: seconds of hashing,
    no disk written."""
    copy = root / backup / name
    copy.mkdir(parents=True)
    with open(copy / "zeros", "wb") as f:
        f.truncate(gib << 30)
    return copy.parent


async def test_the_childs_manifest_and_counts_are_the_walks_own(tmp_path: Path) -> None:
    backup = odd_copy(tmp_path)
    here = write_manifest(str(backup), "data", None, into=str(tmp_path / "here.sha256"))
    seen: list[int] = []
    there = await write_manifest_in_child(str(backup), "data", Progress(30), seen.append)
    assert there == here
    assert (backup / ".pibackup" / "data.sha256").read_bytes() == \
        (tmp_path / "here.sha256").read_bytes()
    assert there.files == 8 and there.hashed_bytes > 3 << 20 and there.unused_earlier, there


async def test_the_child_never_imports_a_package_planted_in_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # ``python -m`` puts the working folder first on sys.path: a run started (as
    # root) from a folder where someone left a ``pibackup_async`` would run their code.
    planted = tmp_path / "cwd" / "pibackup_async"
    planted.mkdir(parents=True)
    marker = tmp_path / "planted-code-ran"
    (planted / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    backup = odd_copy(tmp_path)
    monkeypatch.chdir(planted.parent)
    made = await write_manifest_in_child(str(backup), "data", Progress(30),
                                         lambda _: None)
    assert made.files == 8
    assert not marker.exists()


async def test_an_error_of_the_walk_comes_back_as_its_oserror(tmp_path: Path) -> None:
    (tmp_path / "backup").mkdir()
    with pytest.raises(OSError) as raised:
        await write_manifest_in_child(str(tmp_path / "backup"), "data", Progress(30),
                                      lambda _: None)
    assert raised.value.errno == errno.ENOENT
    assert raised.value.filename == str(tmp_path / "backup" / "data")


async def test_a_child_that_dies_is_an_error_that_says_how(tmp_path: Path) -> None:
    backup = sparse_copy(tmp_path)
    killed: list[int] = []

    def kill(_: int) -> None:
        if not killed:
            killed.extend(children_reading(backup))
            assert len(killed) == 1, killed
            os.kill(killed[0], signal.SIGKILL)

    # A stall bound of 2 s: the child says where it is every 0.5 s.
    with pytest.raises(OSError, match="manifest's process killed by SIGKILL") as raised:
        await write_manifest_in_child(str(backup), "data", Progress(2), kill)
    assert raised.value.errno == errno.EIO and killed
    assert not (backup / ".pibackup" / "data.sha256").exists()


async def test_a_cancelled_manifest_leaves_no_process(tmp_path: Path) -> None:
    backup = sparse_copy(tmp_path)
    with anyio.CancelScope() as scope:
        def cancel(_: int) -> None:
            assert children_reading(backup)
            scope.cancel()

        t0 = time.monotonic()
        await write_manifest_in_child(str(backup), "data", Progress(2), cancel)
    assert scope.cancelled_caught
    assert time.monotonic() - t0 < 5
    assert children_reading(backup) == []
    assert not (backup / ".pibackup" / "data.sha256").exists()


@needs_fuse
@needs_two_cpus
async def test_first_backups_manifests_on_a_disk_that_stops_answering_end_within_their_bound(
    tmp_path: Path,
) -> None:
    # Two at once: one in the engine's thread, the other in a child; both give up.
    dest = tmp_path / "dest"
    backup = dest / "2025-01-01t03-00-00+0100.in-progress"
    for name in ("data", "mail"):
        (backup / name / "stuck").mkdir(parents=True)
        (backup / name / "a").write_text("a\n")
    destination = LocalDestination(str(dest), answer_bound_s=0.5)
    lost: list[str] = []

    async def write(name: str) -> None:
        try:
            await destination.write_manifest(backup.name, name, None)
        except DestinationLost as e:
            lost.append(str(e))

    with hanging(backup / "data" / "stuck") as data, hanging(backup / "mail" / "stuck") as mail:
        data.start()
        mail.start()
        t0 = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(write, "data")
            tg.start_soon(write, "mail")
        # The bound, the child's SIGTERM grace and its SIGKILL: not the hang's length.
        assert time.monotonic() - t0 < 0.5 + 10
        assert len(lost) == 2 and all("does not answer" in line for line in lost), lost
        assert children_reading(backup) == []


@needs_two_cpus
async def test_a_child_killed_midway_leaves_nothing_in_the_backup(tmp_path: Path) -> None:
    # Two first-backup manifests at once: one in the engine's thread, the other in a
    # child, which is killed as the OOM killer would. Its source fails; the other's
    # manifest is written; no temporary manifest stays behind for a backup to keep.
    backup = tmp_path / "dest" / "2025-01-01t03-00-00+0100.in-progress"
    for name in ("data", "mail"):
        sparse_copy(tmp_path / "dest", 1, name=name, backup=backup.name)
    destination = LocalDestination(str(tmp_path / "dest"), answer_bound_s=20)
    failed: list[str] = []

    async def write(name: str) -> None:
        try:
            await destination.write_manifest(backup.name, name, None)
        except OSError as e:
            failed.append(f"{name}: {e}")

    def writing_child() -> int | None:
        """The child, once its temporary manifest is there (it writes)."""
        for pid in children_reading(backup):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue  # it ended meanwhile
            source = argv[argv.index(CHILD.encode()) + 2].decode()
            if (backup / ".pibackup" / f".{source}.sha256.tmp").exists():
                return pid
        return None

    async def kill_the_child() -> None:
        await anyio.to_thread.run_sync(wait_for, writing_child, 20, "the child writing")
        pid = writing_child()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)

    async with anyio.create_task_group() as tg:
        tg.start_soon(write, "data")
        tg.start_soon(write, "mail")
        tg.start_soon(kill_the_child)
    assert len(failed) == 1 and "killed by SIGKILL" in failed[0], failed
    left = sorted(p.name for p in (backup / ".pibackup").iterdir())
    survivor = "mail" if failed[0].startswith("data") else "data"
    assert left == ["SOURCES", f"{survivor}.sha256"], left
    assert children_reading(backup) == []


def started_children(stderr: str) -> list[list[str]]:
    """The argv of every manifest child the run's debug log says it started."""
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    found: list[list[str]] = []
    for event in events:
        argv: Any = event.get("argv")
        if event.get("event") == "started" and isinstance(argv, list) and CHILD in argv:
            found.append(argv)
    return found


@needs_rsync
@needs_two_cpus
def test_a_first_backups_manifests_take_another_cpu_and_a_nightly_ones_do_not(
    ws: Workspace,
) -> None:
    names = ("photos", "mail", "music")
    sources = []
    for name in names:
        src = ws.make_source(name, {f"{name}-{i}.txt": f"{name} {i}\n" * 4000
                                    for i in range(40)})
        sources.append(rsync_source(name, src))
    ws.write_config("\n".join(sources), header="concurrency = 3")
    first = cli_ok(ws, "-v", "--log-format", "json", "run")
    # The saves start together as the window closes: one manifest takes the engine's
    # thread, the next a child of its own.
    children = [argv[argv.index(CHILD) + 2] for argv in started_children(first.stderr)]
    assert 1 <= len(children) <= 2 and set(children) <= set(names), first.stderr
    backup = ws.dest / complete_backups(ws.dest)[-1]
    for name in names:
        checked = subprocess.run(["sha256sum", "--check", "--strict",
                                  f".pibackup/{name}.sha256"], cwd=backup, capture_output=True)
        assert checked.returncode == 0, checked
    nightly = cli_ok(ws, "-v", "--log-format", "json", "run")
    assert started_children(nightly.stderr) == []

