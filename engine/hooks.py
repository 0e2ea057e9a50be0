"""Hooks: running one phase of a hook, and the stage that owns every successful pre's post."""

from __future__ import annotations

import shlex
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Literal

import anyio
import structlog
from structlog.contextvars import bound_contextvars

from .context import CriticalStop, RunContext, StepFailed
from .processes import describe_exit, run_process
from .remote import RemoteError
from .report import HookStep

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from .config import Hook

log = structlog.get_logger("pibackup.hooks")

Kind = Literal["backup", "snapshot"]
Phase = Literal["pre", "post"]


def hook_argv(command: str | list[str]) -> list[str]:
    """A string runs under ``/bin/sh -c``; a list runs as argv."""
    return ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)


async def run_hook(ctx: RunContext, kind: Kind, hook: Hook, phase: Phase) -> None:
    """Run one phase of ``hook``; raise StepFailed, or CriticalStop for a critical hook."""
    command = hook.pre if phase == "pre" else hook.post
    assert command is not None
    argv = hook_argv(command)
    step = HookStep(hook=hook.name, kind=kind, phase=phase)
    ctx.report.hooks.append(step)
    # A remote hook gets only its own variables, set on its command line.
    env = ctx.hook_env(phase, hook.env, inherit=hook.host is None)
    with bound_contextvars(hook=hook.name, phase=phase):
        if phase == "post":
            log.info("hook started", kind=kind, status=env["PIBACKUP_STATUS"])
        else:
            log.info("hook started", kind=kind)
        step.begin(argv)
        problem: str | None = None
        try:
            with anyio.fail_after(hook.timeout_s):
                if hook.host is None:
                    finished = await run_process(argv, env=env, leave_background=True)
                else:
                    remote = ctx.remotes[hook.host]
                    async with remote.limiter:
                        finished = await remote.run(
                            command if isinstance(command, str) else shlex.join(command), env)
        except TimeoutError:
            problem = f"timed out after {hook.timeout}"
        except RemoteError as e:
            problem = str(e)
        except OSError as e:
            problem = f"cannot start {argv[0]!r}: {e.strerror}"
        except anyio.get_cancelled_exc_class():
            step.finish("cancelled")
            log.warning("hook cancelled", duration_s=step.duration_s)
            raise
        else:
            step.exit_code = finished.exit_code
            step.stderr_tail = finished.stderr.text() or finished.stdout.text()
            if finished.exit_code != 0:
                # The hook's own last words usually say what went wrong.
                lines = [ln for ln in (finished.stderr.lines or finished.stdout.lines)
                         if ln.strip()]
                problem = describe_exit(finished.exit_code) + (f": {lines[-1]}" if lines else "")
        if problem is None:
            step.finish("ok")
            log.info("hook finished", duration_s=step.duration_s)
            return
        step.finish("failed")
        ctx.fail(f'hook "{hook.name}" {phase} failed: {problem}')
        log.error("hook failed", problem=problem, critical=hook.critical,
                  duration_s=step.duration_s)
        if hook.critical:
            ctx.halted = True
            raise CriticalStop(hook.name)
        raise StepFailed(hook.name)


@asynccontextmanager
async def hook_stage(ctx: RunContext, kind: Kind, hooks: Sequence[Hook]) -> AsyncIterator[None]:
    """Run every ``pre`` in order; on leaving, the ``post`` of each that succeeded, reversed.

    The posts run on every exit path — success, failure, cancellation —
    shielded from the cancel and each bounded by its own timeout. A hook
    without ``pre`` counts as succeeded when its turn comes. A failing post
    does not stop the other posts; a critical one stops everything.
    """
    succeeded: list[Hook] = []
    try:
        for hook in hooks:
            if hook.pre is not None:
                await run_hook(ctx, kind, hook, "pre")
            succeeded.append(hook)
        yield
    finally:
        with anyio.CancelScope(shield=True):
            for hook in reversed(succeeded):
                if ctx.halted:
                    break
                if hook.post is None:
                    continue
                try:
                    await run_hook(ctx, kind, hook, "post")
                except StepFailed:
                    continue
