"""``run --dry-run`` prints the plan, with the exact commands, and changes nothing."""

from __future__ import annotations

import fcntl
import os
import shlex
from typing import TYPE_CHECKING

from conftest import needs_rsync
from datakit import cli_ok, complete_backups, listing, rsync_source, table, write_raw_config

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Workspace

pytestmark = needs_rsync


def hooks() -> str:
    """Hooks that would leave a trace in $EVENTS if they ever ran."""
    return (
        table("[[backup_hooks]]", name="mount-disk",
              pre='echo "bh.pre" >> "$EVENTS"', post='echo "bh.post" >> "$EVENTS"')
        + table("[[snapshot_hooks]]", name="stop-db",
                pre='echo "sh.pre" >> "$EVENTS"', post='echo "sh.post" >> "$EVENTS"')
    )


def configure(ws: Workspace, dest: Path, *sources: str, lock_file: Path | None = None) -> None:
    text = f'destination = "{dest}"\nstate_dir = "{ws.state}"\n'
    if lock_file is not None:
        text += f'lock_file = "{lock_file}"\n'
    text += hooks()
    for name in sources:
        text += rsync_source(name, ws.src / name)
    write_raw_config(ws, text)


def rsync_command(plan: str, source: str, path: Path) -> list[str]:
    """The argv of the rsync line in the plan that copies ``path``."""
    found = []
    for line in plan.splitlines():
        at = line.find("rsync ")
        if at >= 0 and str(path) in line:
            found.append(shlex.split(line[at:]))
    assert len(found) == 1, f"expected one rsync command for {source} in the plan:\n{plan}"
    return found[0]


def assert_in_order(plan: str, *needles: str) -> None:
    positions = []
    for needle in needles:
        at = plan.find(needle, positions[-1] if positions else 0)
        assert at >= 0, f"{needle!r} missing (or out of order) in the plan:\n{plan}"
        positions.append(at)


def snapshot_state(ws: Workspace, dest: Path) -> dict[str, object]:
    return {
        "dest": listing(dest),
        "state_exists": ws.state.exists(),
        "root": sorted(p.name for p in ws.root.iterdir()),
    }


def test_plan_without_previous_backup(ws: Workspace) -> None:
    for name in ("alpha", "beta"):
        ws.make_source(name)
    lock = ws.root / "pibackup.lock"
    lock.write_text("")
    os.utime(lock, (1_600_000_000, 1_600_000_000))
    configure(ws, ws.dest, "alpha", "beta", lock_file=lock)
    (ws.dest / "lost+found").mkdir()
    before = snapshot_state(ws, ws.dest)
    lock_before = os.stat(lock)

    result = cli_ok(ws, "run", "--dry-run")

    plan = result.stdout
    # The steps in the order they would run, each with its command.
    assert_in_order(plan, "bh.pre", ".in-progress", "sh.pre", "rsync ", "sh.post", "bh.post")
    assert "mount-disk" in plan and "stop-db" in plan
    for name in ("alpha", "beta"):
        argv = rsync_command(plan, name, ws.src / name)
        assert argv[0].endswith("rsync")
        assert "--numeric-ids" in argv
        assert any(a.startswith(str(ws.dest)) and a.rstrip("/").endswith(
            f".in-progress/{name}") for a in argv), argv
        assert not any(a.startswith("--link-dest") for a in argv), argv
    # Nothing ran, nothing was created.
    assert not ws.events.exists()
    assert snapshot_state(ws, ws.dest) == before
    assert not ws.state.exists()
    after = os.stat(lock)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        lock_before.st_ino, lock_before.st_size, lock_before.st_mtime_ns)


def test_plan_links_against_the_previous_backup(ws: Workspace) -> None:
    for name in ("alpha", "beta"):
        ws.make_source(name)
    configure(ws, ws.dest, "alpha")
    cli_ok(ws, "run")
    [previous] = complete_backups(ws.dest)
    events_before = ws.events.read_text()
    configure(ws, ws.dest, "alpha", "beta")
    before = snapshot_state(ws, ws.dest)
    reports_before = ws.reports()

    result = cli_ok(ws, "run", "--dry-run")

    plan = result.stdout
    alpha = rsync_command(plan, "alpha", ws.src / "alpha")
    link = [a for a in alpha if "--link-dest" in a]
    joined = " ".join(alpha)
    assert link, f"no --link-dest for alpha: {alpha}"
    assert f"{previous}/alpha" in joined, joined
    # beta is new: there is nothing to link against.
    beta = rsync_command(plan, "beta", ws.src / "beta")
    assert not any("--link-dest" in a for a in beta), beta
    assert ws.events.read_text() == events_before
    assert snapshot_state(ws, ws.dest) == before
    assert ws.reports() == reports_before


def test_plan_takes_no_lock(ws: Workspace) -> None:
    ws.make_source("alpha")
    lock = ws.root / "held.lock"
    configure(ws, ws.dest, "alpha", lock_file=lock)
    with open(lock, "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = ws.run("run", "--dry-run")
        real = ws.run("run")
    assert result.returncode == 0, result.stderr
    assert "rsync " in result.stdout
    # The real run, by contrast, is refused by the held lock: the lock file is the right one.
    assert real.returncode == 3, real.stderr
    assert not ws.events.exists()


def test_plan_when_the_destination_is_not_there_yet(ws: Workspace) -> None:
    ws.make_source("alpha")
    missing = ws.root / "not-mounted"
    configure(ws, missing, "alpha")

    result = cli_ok(ws, "run", "--dry-run")

    plan = result.stdout
    assert "rsync " in plan
    argv = rsync_command(plan, "alpha", ws.src / "alpha")
    assert not any(a.startswith("--link-dest=/") for a in argv), argv
    lowered = plan.lower()
    assert "link-dest" in lowered
    assert any(word in lowered for word in ("run time", "runtime", "decided", "when the")), plan
    assert not missing.exists()
    assert not ws.state.exists()
    assert not ws.events.exists()
