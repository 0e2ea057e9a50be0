"""Hooks: running one phase of a hook, and the stage that owns every started pre's post."""

from __future__ import annotations

import shlex
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import anyio
import structlog
from structlog.contextvars import bound_contextvars

from .context import CriticalStop, HookCutShort, RunContext, StepFailed
from .errors import CannotStart
from .failure_text import telling_line
from .heartbeat import beating
from .processes import ENDING_BOUND_S, describe_exit, run_process
from .remote import RemoteError
from .report import HookStep, StepResult, record, recording, started

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from .config import Hook

log = structlog.get_logger("pibackup.hooks")

Kind = Literal["backup", "snapshot"]
Phase = Literal["pre", "post"]

# Posts run after the body failed or was cancelled, shielded: their shield
# needs a deadline too, longer than the posts' own worst cases together
# (ENDING_BOUND_S each: a post past its timeout may ignore SIGTERM), plus a
# margin for the work between them.
_POST_MARGIN_S = 30.0


def hook_argv(command: str | list[str]) -> list[str]:
    """A string runs under ``/bin/sh -c``; a list runs as argv."""
    return ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)


@dataclass(frozen=True)
class HookRun:
    """How one phase of a hook went: ``problem`` None when it succeeded."""

    result: StepResult = field(default_factory=StepResult)
    problem: str | None = None
    # Ended from outside (its timeout, a signal, a lost connection, an
    # unexpected error): it may have done half its work.
    cut_short: bool = False


async def run_hook(ctx: RunContext, kind: Kind, hook: Hook, phase: Phase) -> HookRun:
    """Run one phase of ``hook`` and return how it went; the hook stage records it.

    Raises only the cancellation exception, when the run is cancelled under it.
    """
    command = hook.pre if phase == "pre" else hook.post
    assert command is not None
    argv = hook_argv(command)
    # Inside the try: building the environment is part of the hook's work.
    try:
        # A remote hook gets only its own variables, set on its command line.
        env = ctx.hook_env(kind, phase, hook.env, inherit=hook.host is None)
        if phase == "post":
            log.info("hook started", kind=kind, status=env["PIBACKUP_STATUS"])
        else:
            log.info("hook started", kind=kind)
        started(argv)
        with anyio.fail_after(hook.timeout_s), beating("hook", hook=hook.name, phase=phase):
            if hook.host is None:
                finished = await run_process(argv, env=env, leave_background=True)
            else:
                remote = ctx.remotes[hook.host]
                async with remote.limiter:
                    finished = await remote.run(
                        command if isinstance(command, str) else shlex.join(command), env,
                        leave_background=True)
    except TimeoutError:
        return HookRun(problem=f"timed out after {hook.timeout}", cut_short=True)
    except RemoteError as e:
        return HookRun(problem=str(e), cut_short=True)
    except CannotStart as e:
        return HookRun(problem=str(e))
    except OSError as e:
        return HookRun(problem=f"cannot start {argv[0]!r}: {e.strerror or e}")
    except Exception as e:
        # A bug, or something no one foresaw: the hook's step fails, the
        # run goes on to its clean-up (SPEC §2), and -v shows the traceback.
        log.debug("unexpected error in a hook", exc_info=True)
        return HookRun(problem=f"unexpected error: {e!r}", cut_short=True)
    result = StepResult(exit_code=finished.exit_code,
                        stderr_tail=finished.stderr.text() or finished.stdout.text())
    if finished.exit_code == 0:
        return HookRun(result)
    said = telling_line(list(finished.stderr.lines) or list(finished.stdout.lines))
    # Killed by a signal from outside: it did not end on its own.
    return HookRun(result, describe_exit(finished.exit_code) + (f": {said}" if said else ""),
                   cut_short=finished.exit_code < 0)


async def _hook_step(ctx: RunContext, kind: Kind, hook: Hook, phase: Phase) -> None:
    """Run one phase of ``hook`` and record it in the report.

    Raises StepFailed when the hook failed on its own (it exited non-zero,
    or could not start), HookCutShort when a pre was ended from outside,
    CriticalStop when a critical hook failed, and the cancellation exception
    when the run is cancelled under it.
    """
    command = hook.pre if phase == "pre" else hook.post
    assert command is not None
    step = HookStep(hook=hook.name, kind=kind, phase=phase)
    ctx.report.hooks.append(step)
    with bound_contextvars(hook=hook.name, phase=phase):
        try:
            with recording(step):
                ran = await run_hook(ctx, kind, hook, phase)
        except anyio.get_cancelled_exc_class():
            record(step, "cancelled", command=hook_argv(command))
            log.warning("hook cancelled", duration_s=step.duration_s)
            raise
        if ran.problem is None:
            record(step, "ok", ran.result, command=hook_argv(command))
            log.info("hook finished", duration_s=step.duration_s)
            return
        record(step, "failed", ran.result, command=hook_argv(command))
        ctx.fail(f'hook "{hook.name}" {phase} failed: {ran.problem}')
        log.error("hook failed", problem=ran.problem, critical=hook.critical,
                  duration_s=step.duration_s)
        if ran.cut_short and phase == "pre":
            # Never a critical stop: its post must undo the half it did.
            raise HookCutShort(hook.name)
        if hook.critical:
            ctx.halted = True
            raise CriticalStop(hook.name)
        raise StepFailed(hook.name)


@asynccontextmanager
async def hook_stage(ctx: RunContext, kind: Kind, hooks: Sequence[Hook]) -> AsyncIterator[None]:
    """Run every ``pre`` in order; on leaving, the ``post`` of each that ran, reversed.

    A hook owns its post once its pre succeeded or was cut short (timeout,
    signal, cancel, lost connection: it may have stopped the database and
    then hung); a pre that failed on its own owns none, nor do the hooks
    after it. A hook without ``pre`` owns its post when its turn comes.
    The posts run on every exit path, shielded from the cancel, each bounded
    by its own timeout. A failing post does not stop the other posts; only a
    critical one stops everything. An unexpected error in the body is
    recorded as the run's failure before the posts run, so they see
    ``PIBACKUP_STATUS=failed``, and leaves as StepFailed.
    """
    owned: list[Hook] = []
    try:
        for hook in hooks:
            if hook.pre is not None:
                try:
                    await _hook_step(ctx, kind, hook, "pre")
                except (HookCutShort, anyio.get_cancelled_exc_class()):
                    owned.append(hook)
                    raise
            owned.append(hook)
        yield
    except (StepFailed, CriticalStop):
        raise
    except Exception as e:
        ctx.fail_unexpected(e)
        raise StepFailed("unexpected error") from e
    finally:
        await _run_posts(ctx, kind, owned)


def post_order(owned: Sequence[Hook]) -> list[Hook]:
    """The hooks whose ``post`` runs, in the order it runs (the dry-run lists them so)."""
    return [h for h in reversed(owned) if h.post is not None]


async def _run_posts(ctx: RunContext, kind: Kind, owned: list[Hook]) -> None:
    posts = post_order(owned)
    bound = sum(h.timeout_s + ENDING_BOUND_S for h in posts) + _POST_MARGIN_S
    with anyio.move_on_after(bound, shield=True):
        for hook in posts:
            if ctx.halted:
                break
            try:
                await _hook_step(ctx, kind, hook, "post")
            except StepFailed:
                continue
