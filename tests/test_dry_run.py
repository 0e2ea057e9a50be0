"""``run --dry-run`` prints the plan, with the exact commands, and changes nothing."""

from __future__ import annotations

import fcntl
import os
import shlex
from datetime import UTC, datetime, timedelta
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
        # One copy per source, in the window: the precopy's plan is test_precopy's.
        text += rsync_source(name, ws.src / name, precopy=False)
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


def configure_deliveries(ws: Workspace, *, when: str, metrics: Path) -> None:
    """A run that mails its report, pings a dead man's switch and writes metrics."""
    configure(ws, ws.dest, "alpha")
    text = ws.config_path.read_text()
    text += table("[report]", **{"from": "pi@example.com", "to": ["admin@example.com",
                                                                   "oncall@example.com"],
                                 "when": when})
    text += table("[report.smtp]", host="smtp.example.com", port=2525, security="starttls")
    text += table("[monitor]", ping_url="https://hc.example:8443/ping/s3cret-uuid",
                  metrics_file=str(metrics))
    write_raw_config(ws, text)


def test_plan_lists_the_deliveries_in_order_after_the_steps(ws: Workspace) -> None:
    ws.make_source("alpha")
    metrics = ws.root / "textfile" / "pibackup.prom"
    metrics.parent.mkdir()
    configure_deliveries(ws, when="failure", metrics=metrics)

    plan = cli_ok(ws, "run", "--dry-run").stdout

    # SPEC §2: /start once the lock is taken; after step 7 the report, the
    # mail, the final ping, the report again, the metrics file.
    assert_in_order(
        plan, "0. take the lock", "ping https://hc.example:8443/…/start", "1. backup hooks",
        "7. backup hooks", "bh.post", "write the report ",
        "mail the report to admin@example.com, oncall@example.com through "
        "smtp.example.com:2525 (STARTTLS)", "if the run fails or is interrupted",
        "ping https://hc.example:8443/… if the run is ok, else "
        "https://hc.example:8443/…/fail", "write the report again",
        f"replace the metrics file {metrics}")
    assert "s3cret" not in plan  # a ping URL is a secret of sorts
    assert not ws.state.exists() and list(metrics.parent.iterdir()) == []
    assert not ws.events.exists()


def test_plan_says_when_no_mail_would_go(ws: Workspace) -> None:
    ws.make_source("alpha")
    metrics = ws.root / "pibackup.prom"
    configure_deliveries(ws, when="always", metrics=metrics)
    plan = cli_ok(ws, "run", "--dry-run").stdout
    assert "smtp.example.com:2525 (STARTTLS), whatever the outcome" in plan
    plan = cli_ok(ws, "run", "--dry-run", "--no-report").stdout
    assert "mail the report" not in plan
    assert "no mail (--no-report)" in plan
    assert_in_order(plan, "write the report ", "no mail", "ping ", "write the report again")
    configure_deliveries(ws, when="never", metrics=metrics)
    plan = cli_ok(ws, "run", "--dry-run").stdout
    assert "mail the report" not in plan and 'no mail (report.when = "never")' in plan


def planned_deletions(plan: str) -> list[str]:
    """The backups that the plan's step 6 says retention deletes, by name."""
    return [line.split("retention: delete ", 1)[1].split(" ", 1)[0].rsplit("/", 1)[1]
            for line in plan.splitlines() if "retention: delete " in line]


def test_plan_deletes_what_the_run_then_deletes(ws: Workspace) -> None:
    """The plan's retention is the run's: the same decision on the same backups, so what
    the plan lists is what a run straight after it deletes (and leaves stale folders to
    the run's clean-up, which the plan lists as the run removes them)."""
    ws.make_source("alpha")
    configure(ws, ws.dest, "alpha")
    with ws.config_path.open("a") as config:
        config.write("\n[retention]\nkeep_last = 2\nkeep_monthly = 2\n")
    # Two weeks apart up to 10 days ago: the run is no clock jump after them (SPEC §3).
    today = datetime.now(UTC).replace(hour=3, minute=0, second=0, microsecond=0)
    old = [f"{today - timedelta(days=days):%Y-%m-%dt%H-%M-%S%z}"
           for days in (80, 66, 52, 38, 24, 10)]
    for name in old:
        (ws.dest / name / "alpha").mkdir(parents=True)
    stale = ["2024-03-20t03-00-00+0000.in-progress", "2024-01-01t03-00-00+0000.deleting"]
    for folder in stale:
        (ws.dest / folder).mkdir()

    plan = cli_ok(ws, "run", "--dry-run").stdout
    deletions = planned_deletions(plan)
    for folder in stale:
        assert f"{ws.dest / folder} (left by a crashed run)" in plan, plan

    cli_ok(ws, "run")
    report = ws.report()
    assert deletions, plan
    assert report["retention"]["deleted"] == deletions, (report["retention"], plan)
    assert not set(deletions) & set(complete_backups(ws.dest))
    assert not any((ws.dest / folder).exists() for folder in stale)


def planned_hooks(plan: str) -> list[str]:
    """The hooks the plan lists, in its order, each as ``<name>.<phase>``."""
    order, phase = [], ""
    for line in plan.splitlines():
        if "hooks, pre" in line or "hooks, post" in line:
            phase = "pre" if "hooks, pre" in line else "post"
        elif line.startswith("   - ") and " (timeout " in line and phase:
            order.append(f"{line[5:].split(' ', 1)[0]}.{phase}")
        elif not line.startswith("   "):
            phase = ""
    return order


def test_plan_lists_the_hooks_in_the_order_the_run_runs_them(ws: Workspace) -> None:
    """Hooks with only a pre or only a post, in both stages: the plan's order is the run's."""
    ws.make_source("alpha")

    def hook(header: str, name: str, *phases: str) -> str:
        return table(header, name=name,
                     **{p: f'echo "{name}.{p}" >> "$EVENTS"' for p in phases})

    text = f'destination = "{ws.dest}"\nstate_dir = "{ws.state}"\n'
    text += (hook("[[backup_hooks]]", "mount", "pre", "post")
             + hook("[[backup_hooks]]", "wake", "pre")
             + hook("[[backup_hooks]]", "notify", "post")
             + hook("[[snapshot_hooks]]", "freeze", "pre", "post")
             + hook("[[snapshot_hooks]]", "thaw-only", "post")
             + hook("[[snapshot_hooks]]", "sync", "pre"))
    text += rsync_source("alpha", ws.src / "alpha")
    write_raw_config(ws, text)

    planned = planned_hooks(cli_ok(ws, "run", "--dry-run").stdout)
    cli_ok(ws, "run")
    assert planned == ws.event_lines(), planned
