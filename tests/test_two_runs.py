"""Two backups in one process keep their own state (issue 18 item 4).

Two configurations, each with its own destination, hooks and source, run
concurrently in one anyio task group through the public API. A toy kind
(registered for the test) meets the other run in its save: while both saves
run, each looks at the heartbeat's running steps from inside its own run;
the first run's save leaves a process behind that SIGKILL cannot end (a
writer on a frozen filesystem, ended as any kind's child is, with short
bounds) and finishes only after the other run has closed its report. Each
report must hold its own hooks, sources, warnings and abandoned processes,
and each run must see only its own steps.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from conftest import Workspace
from datakit import table
from hookkit import HookSpec, hook_toml, order
from pibackup_async.engine import Interruption, RunOptions, heartbeat, load_config, run_backup
from pibackup_async.engine.processes import end_session, managed_process
from pibackup_async.engine.report import StepResult, started
from pibackup_async.engine.sources.kind import (
    DryRun,
    Run,
    SourceConfig,
    SourceKind,
    SourcePlan,
    SourceWork,
    register,
    unregister,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from anyio.abc import Process
    from pibackup_async.engine.report import Report


class TwinSource(SourceConfig, frozen=True, kw_only=True, tag="twin"):
    pass


class TwinWork(SourceWork[TwinSource]):
    def __init__(self, run: Run, source: TwinSource, kind: TwinKind) -> None:
        super().__init__(run, source)
        self.kind = kind

    async def snapshot(self) -> StepResult:
        started(["twin", "snapshot", self.source.name])
        return StepResult()

    async def save(self) -> StepResult:
        started(["twin", "save", self.source.name])
        await self.kind.meet(self.source.name)
        target = anyio.Path(self.target)
        await target.mkdir()
        await (target / "copy.txt").write_text(f"copy of {self.source.name}\n")
        return StepResult()

    async def plan(self, dry: DryRun) -> SourcePlan:
        return SourcePlan("twin snapshot", "twin save")


class TwinKind(SourceKind[TwinSource]):
    config = TwinSource

    def __init__(self, frozen: Path) -> None:
        self.frozen = frozen
        self.in_save = {"alpha": anyio.Event(), "beta": anyio.Event()}
        self.abandoned = anyio.Event()
        self.beta_done = anyio.Event()
        # What each save saw of the running steps: (what, source) pairs.
        self.seen: dict[str, list[tuple[str, Any]]] = {}
        self.stuck: Process | None = None

    def work(self, run: Run, source: TwinSource) -> TwinWork:
        return TwinWork(run, source, self)

    async def meet(self, name: str) -> None:
        other = "beta" if name == "alpha" else "alpha"
        self.in_save[name].set()
        with anyio.fail_after(30):
            await self.in_save[other].wait()
        # Both saves run now: what does this run see of the running steps?
        self.seen[name] = sorted((b.what, b.fields.get("source")) for b in heartbeat.running())
        if name == "alpha":
            await self._leave_one_behind()
            with anyio.fail_after(30):
                await self.beta_done.wait()
        else:
            with anyio.fail_after(30):
                await self.abandoned.wait()

    async def _leave_one_behind(self) -> None:
        """A child stuck in the kernel (D): SIGKILL cannot end it, so it is abandoned."""
        target = shlex.quote(str(self.frozen / "file"))
        async with managed_process(["/bin/sh", "-c", f"echo x > {target}"]) as process:
            self.stuck = process
            with anyio.fail_after(10):
                # Polling: the kernel tells no one when a process enters D.
                while _state(process.pid) != "D":  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            await end_session(process, grace=0.2, kill_bound=0.5)
        self.abandoned.set()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


@pytest.fixture
def twin(frozen: Path) -> Iterator[TwinKind]:
    kind = register(TwinKind(frozen))
    yield kind
    unregister(kind)


def _workspace(root: Path, source: str) -> tuple[Workspace, Path]:
    root.mkdir()
    ws = Workspace(root)
    path = ws.make_source(source)
    hooks = [HookSpec(f"{source}-backup"), HookSpec(f"{source}-snapshot", kind="snapshot")]
    body = "".join(hook_toml(ws, h) for h in hooks)
    body += table("[[sources]]", name=source, type="twin", path=str(path))
    return ws, ws.write_config(body)


@pytest.mark.root
async def test_two_backups_in_one_process_keep_their_own_state(
        tmp_path: Path, twin: TwinKind, frozen: Path) -> None:
    ws_a, config_a = _workspace(tmp_path / "a", "alpha")
    ws_b, config_b = _workspace(tmp_path / "b", "beta")
    # A warning for the first run alone: its state_dir lies in a folder anyone can write.
    ws_a.root.chmod(0o777)
    reports: dict[str, Report] = {}

    async def alpha() -> None:
        reports["alpha"] = await run_backup(load_config(str(config_a)), RunOptions(),
                                            Interruption("run"))

    async def beta() -> None:
        reports["beta"] = await run_backup(load_config(str(config_b)), RunOptions(),
                                           Interruption("run"))
        twin.beta_done.set()

    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(alpha)
                tg.start_soon(beta)
    finally:
        await anyio.run_process(["fsfreeze", "--unfreeze", str(frozen)], check=False)
        if twin.stuck is not None:
            with anyio.fail_after(10):
                await twin.stuck.wait()  # thawed, it ends: reaped here, not by the GC

    a, b = reports["alpha"], reports["beta"]
    assert (a.status, a.saved, b.status, b.saved) == ("ok", True, "ok", True), (a, b)
    # Each run saw its own save only, never the other's.
    assert twin.seen == {"alpha": [("save", "alpha")], "beta": [("save", "beta")]}
    # The process left behind is the first run's, in its report alone.
    assert twin.stuck is not None
    assert a.abandoned == [f"pid {twin.stuck.pid} (/bin/sh -c echo x > {frozen / 'file'}) "
                           "did not die after SIGKILL; abandoned"], a.abandoned
    assert b.abandoned == [], b.abandoned
    assert [w.split(":")[0] for w in a.warnings] == [f"state_dir {ws_a.state}"], a.warnings
    assert b.warnings == []
    for name, report, ws in (("alpha", a, ws_a), ("beta", b, ws_b)):
        assert list(report.sources) == [name]
        assert sorted((h.hook, h.phase, h.status) for h in report.hooks) == [
            (f"{name}-backup", "post", "ok"), (f"{name}-backup", "pre", "ok"),
            (f"{name}-snapshot", "post", "ok"), (f"{name}-snapshot", "pre", "ok")]
        assert order(ws) == [f"{name}-backup.pre", f"{name}-snapshot.pre",
                             f"{name}-snapshot.post", f"{name}-backup.post"]
        assert ws.backups() == [report.name]
        assert (ws.dest / report.name / name / "copy.txt").read_text() == f"copy of {name}\n"
        assert ws.report()["abandoned"] == report.abandoned
