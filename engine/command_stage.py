"""Commands that work on the destination under the lock, inside the backup hooks: restore,
verify, prune.

They take the lock and run the backup hooks around their work as ``prune``
does (so the disk gets mounted and no run deletes a backup under them), with
``PIBACKUP_COMMAND`` set to the command. In the ``pre``, ``PIBACKUP_NAME`` is
the BACKUP argument as given (``latest`` unresolved) and
``PIBACKUP_BACKUP_DIR`` is empty; in the ``post`` both name the backup used
(empty if none). They write no report file and send no mail: their outcome
is their log and their exit code (SPEC §7).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import anyio

from .context import CriticalStop, RunContext, RunOptions, StepFailed
from .destination import DestinationLost
from .errors import Interrupted
from .hooks import hook_stage
from .lock import private_state
from .lookup import NotHeld, find
from .remote import open_remotes
from .report import Report, stamp

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from .config import Config
    from .context import Interruption


async def under_hooks(config: Config, interruption: Interruption, command: str,
                      backup_arg: str,
                      work: Callable[[RunContext], Awaitable[None]]) -> Report:
    """Run ``work`` under the lock, inside the backup hooks; return how it went.

    ``work`` calls ``use_backup(ctx, name)`` once it knows the backup it
    reads, and ``ctx.fail_step(message)`` to fail. The returned report (never
    written) carries ``status`` and ``failure``. Raises LockHeld,
    StateUnusable or Interrupted as ``run_backup`` does.
    """
    report = Report(name="", start=stamp(), concurrency=1)
    ctx = RunContext(config, RunOptions(command=command), "", interruption, report)
    ctx.hook_environment.view = (backup_arg, "")
    with ctx.scope(), private_state(config):
        if interruption.happened:
            raise Interrupted(interruption.signum)
        with anyio.CancelScope() as scope:
            interruption.attach(scope)
            # Only the remote backup hooks' hosts: a restore's HOST:TARGET has its own.
            hook_hosts = {hook.host for hook in config.backup_hooks if hook.host}
            try:
                async with (open_remotes(config, hook_hosts) as ctx.remotes,
                            hook_stage(ctx, "backup", config.backup_hooks)):
                    # The pres have run: the posts name the backup used, none so far.
                    ctx.hook_environment.view = ("", "")
                    problem = await ctx.dest.problem(config.require_mountpoint)
                    if problem is not None:
                        ctx.fail_step(problem)
                    await ctx.dest.remember()
                    await work(ctx)
            except (StepFailed, CriticalStop):
                pass
            except Exception as e:
                ctx.fail_unexpected(e)
    ctx.close()
    return report


async def find_and_use(ctx: RunContext, arg: str, source: str | None = None,
                       inner: bytes | None = None) -> str:
    """The backup ``arg`` names (``latest`` resolved, off the event loop), now the one the
    posts see; fails the step with one line when the destination does not hold it."""
    try:
        name = await find(ctx.dest, arg, source, inner)
    except NotHeld as e:
        ctx.fail_step(str(e))
    except DestinationLost as e:
        ctx.fail_step(str(e))
    except OSError as e:
        ctx.fail_step(f"cannot read the destination {ctx.destination}: {e.strerror}")
    use_backup(ctx, name)
    return name


def use_backup(ctx: RunContext, name: str) -> None:
    """From now on the post hooks see ``name`` as the backup used."""
    ctx.hook_environment.view = (name, os.path.join(ctx.layout.destination, name))
