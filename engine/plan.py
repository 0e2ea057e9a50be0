"""The ``--dry-run`` plan: every step a run would take, in order, with the exact commands.

It reads the destination as it is now and changes nothing: no lock, no
hook, no folder, no report.
"""

from __future__ import annotations

import functools
import os
import shlex
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import anyio.to_thread

from .destination import complete, name_is_free, scan, stale
from .filesystems import is_btrfs
from .hooks import hook_argv, post_order
from .mail import DEFAULT_PORTS
from .mail_body import should_send
from .monitor import redact
from .names import DELETING, IN_PROGRESS, format_name
from .pruning import decide
from .remote import Transport, transport
from .sources.kind import DryRun, kind_of
from .sources.precopy import SAFE_AGE_S

if TYPE_CHECKING:
    from .config import Config, Hook
    from .destination import Entry


def _transport(config: Config, host: str | None) -> Transport | None:
    # The run makes its private control folder when it starts.
    if host is None:
        return None
    return transport(config.hosts[host], f"/tmp/pibackup-ssh-XXXXXXXX/{host}")


def _hooks(lines: list[str], hooks: list[Hook], phase: str) -> None:
    # The pres run in the configured order; the posts as the run orders them once
    # every pre has succeeded.
    commands = ([(h, h.pre) for h in hooks] if phase == "pre"
                else [(h, h.post) for h in post_order(hooks)])
    commands = [(h, c) for h, c in commands if c is not None]
    if not commands:
        lines.append("   (no hook)")
    for hook, command in commands:
        assert command is not None
        where = f" on {hook.host}" if hook.host else ""
        lines.append(f"   - {hook.name}{where} (timeout {hook.timeout}"
                     f"{', critical' if hook.critical else ''}): {shlex.join(hook_argv(command))}")


def _destination_now(dest: str) -> tuple[bool, datetime, list[Entry], bool]:
    """What the plan reads of the destination (it reads the disk: a worker thread): whether
    it is there, the backup name's time, its entries, whether it is btrfs."""
    visible = os.path.isdir(dest)
    moment = datetime.now().astimezone()
    # The run would wait for a free second; the plan only shows which.
    while visible and not name_is_free(dest, format_name(moment)):
        moment += timedelta(seconds=1)
    return visible, moment, scan(dest) if visible else [], visible and is_btrfs(dest)


async def plan_run(config: Config, jobs: int | None = None, no_report: bool = False
                   ) -> list[str]:
    """The lines of the plan of ``run`` with this configuration (``no_report``: --no-report)."""
    dest = config.destination
    visible, moment, entries, on_btrfs = await anyio.to_thread.run_sync(
        _destination_now, dest, abandon_on_cancel=True)
    name = format_name(moment)
    previous = complete(entries)
    in_progress = os.path.join(dest, name + IN_PROGRESS)
    lines = [
        f"Plan of a run (dry run: nothing is changed). Backup name: {name} "
        "(fixed again when the run starts)",
        f"0. take the lock {config.lock_path}",
    ]
    ping_url = config.monitor.ping_url if config.monitor is not None else None
    if ping_url is not None:
        lines.append(f"   then ping {redact(ping_url, '/start')} (a failure is only logged)")
    lines.append("1. backup hooks, pre, in order:")
    _hooks(lines, config.backup_hooks, "pre")
    if not visible:
        lines.append(f"   then check that {dest} exists (it does not now: a backup hook may "
                     "mount it; stale folders, link-dest and retention are decided then)")
    else:
        for entry in stale(entries):
            path = os.path.join(dest, entry.folder)
            if entry.link:
                lines.append(f"   then remove the symbolic link {path} (never followed)")
                continue
            verb = "remove" if entry.state == "in-progress" else "finish deleting"
            lines.append(f"   then {verb} {path} (left by a crashed run)")
        if config.require_mountpoint:
            lines.append(f"   then check that {dest} is on a mounted filesystem other than /")
    lines.append(f"   then create {in_progress}/")
    concurrency = jobs or config.concurrency
    # Each source's lines come from its kind, decided by the code its run would use.
    dry = DryRun(config, name, dest, in_progress, previous, on_btrfs,
                 known=visible, transport=functools.partial(_transport, config))
    plans = [(source, await kind_of(source).work(dry, source).plan(dry))
             for source in config.sources]
    precopies = [f"   - {source.name}: {planned.precopy}" for source, planned in plans
                 if planned.precopy is not None]
    if precopies:
        lines.append("2. precopy, while the services still run (a failure is only logged), "
                     f"concurrently, at most {concurrency} at a time:")
        lines.extend(precopies)
        lines.append("   then snapshot hooks, pre, in order:")
    else:
        lines.append("2. snapshot hooks, pre, in order:")
    _hooks(lines, config.snapshot_hooks, "pre")
    lines.append(f"3. snapshots, concurrently, at most {concurrency} at a time:")
    saves: list[str] = []
    for source, planned in plans:
        lines.append(f"   - {source.name}: {planned.snapshot}")
        if planned.save is not None:
            saves.append(f"   - {source.name}: {planned.save}")
    if precopies:
        lines.append(f"   (after a precopy: what changed since it, and every file changed less "
                     f"than {SAFE_AGE_S:g} s before it began)")
    lines.append("4. snapshot hooks, post, in reverse order:")
    _hooks(lines, config.snapshot_hooks, "post")
    if saves:
        lines.append(f"5. save snapshots and write manifests, concurrently, at most {concurrency} "
                     "at a time, then delete the local snapshots but the newest with a copy in "
                     "the destination:")
        lines.extend(saves)
    else:
        lines.append("5. save snapshots: nothing to do")
    lines.append(f"6. flush the destination's filesystem (syncfs), rename {in_progress} to "
                 f"{os.path.join(dest, name)}, flush again")
    if config.retention is None:
        lines.append("   retention: none configured, every backup is kept")
    elif not visible:
        lines.append("   retention: what it deletes is decided at run time")
    else:
        # The run's own decision, on the backups it will see then: these and its new one.
        plan = decide([e.name for e in previous] + [name], config.retention, protect=name)
        for gone in plan.deleted:
            lines.append(f"   retention: delete {os.path.join(dest, gone)} "
                         f"(renamed to {gone}{DELETING} first)")
        if not plan.deleted:
            lines.append("   retention: nothing to delete")
    lines.append("7. backup hooks, post, in reverse order:")
    _hooks(lines, config.backup_hooks, "post")
    lines.append(f"then write the report {os.path.join(config.reports_dir, name + '.json')}")
    lines.extend(_deliveries(config, no_report))
    return lines


def _deliveries(config: Config, no_report: bool) -> list[str]:
    """What follows the report's first write, in SPEC §2's order: mail, ping, report, metrics."""
    lines: list[str] = []
    settings = config.report
    # The run's own test, asked for both outcomes: a failed run is mailed whenever any is.
    mailed = should_send(settings, "failed", no_report)
    if settings is not None and not mailed:
        why = "--no-report" if no_report else 'report.when = "never"'
        lines.append(f"then no mail ({why})")
    elif settings is not None:
        smtp = settings.smtp
        security = {"starttls": "STARTTLS", "tls": "TLS", "none": "unencrypted"}[smtp.security]
        when = ("whatever the outcome" if should_send(settings, "ok", no_report)
                else "if the run fails or is interrupted")
        lines.append(f"then mail the report to {', '.join(settings.to)} through "
                     f"{smtp.host}:{smtp.port or DEFAULT_PORTS[smtp.security]} ({security}), "
                     f"{when}")
    monitor = config.monitor
    url = monitor.ping_url if monitor is not None else None
    if url is not None:
        lines.append(f"then ping {redact(url)} if the run is ok, else {redact(url, '/fail')}, "
                     "with the mail's text")
    told = " and ".join(what for what, due in (("the mail", mailed), ("the ping", url is not None))
                        if due)
    if told:
        lines.append(f"then write the report again, with how {told} went")
    if monitor is not None and monitor.metrics_file is not None:
        lines.append(f"then replace the metrics file {monitor.metrics_file}")
    return lines
