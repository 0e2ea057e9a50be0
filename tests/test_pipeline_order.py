"""The pipeline's order and cancellation, in-process and in seconds (issue 18 item 7).

A scripted source kind (``ScriptedKind``) and an in-memory destination
(``MemoryDestination``) stand in for rsync, btrfs and the disk, as
httpcore's mock backend stands in for the network: each records its calls
as an event line in the hooks' log (hookkit's format), so one list holds the
hooks, the sources' steps and the destination's changes in the order they
happened. A test tells a source's step to fail, to hang until cancelled, to
trigger the run's Interruption (what the CLI's signal handler calls), or to
wait for another's event. The hooks stay real ``/bin/sh`` processes (they
take milliseconds); the backup runs through ``load_config`` and
``run_backup``. The real-component tests (test_hook_order, test_failures,
test_signals…) stay: these pin the order, not the processes.

The destination records each change as it is asked, then yields once
before making it, as a worker thread would: a cancel that reaches it there
leaves the change unmade, so a clean-up that is not shielded shows. The
order of events is the order of the pipeline's calls.
Synchronisation is by events and a FIFO, never by sleeping; the one wait on
the clock is the source timeout's own second.
"""

from __future__ import annotations

import contextlib
import os
import signal
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import pytest
from conftest import processes_mentioning
from datakit import table
from hookkit import HookSpec, hook_script, hook_toml, order, statuses
from pibackup_async.cli.exit_codes import exit_for_signal
from pibackup_async.cli.running import under_signals
from pibackup_async.cli.signals import HANDLED
from pibackup_async.engine import Interruption, RunOptions, load_config, run_backup
from pibackup_async.engine.destination import Destination, Entry, State
from pibackup_async.engine.names import DELETING, IN_PROGRESS, format_name, parse_name
from pibackup_async.engine.report import StepResult, started
from pibackup_async.engine.sources.errors import SourceError
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
    from collections.abc import Awaitable, Callable, Iterator
    from pathlib import Path

    from conftest import Workspace
    from pibackup_async.engine import Report


def record(ws: Workspace, label: str) -> None:
    # hookkit's event line: eight fields, the label first.
    with ws.events.open("a") as f:
        f.write(f"{label}|-|-||-|-|-|-\n")


# --- the scripted kind -------------------------------------------------------------------

class ScriptedSource(SourceConfig, frozen=True, kw_only=True, tag="scripted"):
    pass


async def _done() -> None:
    return None


class ScriptedWork(SourceWork[ScriptedSource]):
    def __init__(self, run: Run, source: ScriptedSource, kind: ScriptedKind) -> None:
        super().__init__(run, source)
        self.kind = kind

    async def _step(self, what: str) -> StepResult:
        label = f"{self.source.name}.{what}"
        self.kind.event(label)
        started(["scripted", label])
        try:
            await self.kind.script.get(label, _done)()
        except anyio.get_cancelled_exc_class():
            self.kind.event(f"{label}.cancelled")
            raise
        return StepResult(bytes=1)

    async def clean_stale(self) -> None:
        self.kind.event(f"{self.source.name}.clean_stale")

    async def snapshot(self) -> StepResult:
        return await self._step("snapshot")

    async def save(self) -> StepResult:
        return await self._step("save")

    async def finish(self, *, failed: bool) -> None:
        self.kind.event(f"{self.source.name}.finish{' failed' if failed else ''}")

    async def discard(self) -> None:
        self.kind.event(f"{self.source.name}.discard")

    async def plan(self, dry: DryRun) -> SourcePlan:
        return SourcePlan("scripted snapshot", "scripted save")


class ScriptedKind(SourceKind[ScriptedSource]):
    config = ScriptedSource

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        # What a step does once it has started, by "<source>.<step>"; default: succeed.
        self.script: dict[str, Callable[[], Awaitable[None]]] = {}

    def event(self, label: str) -> None:
        record(self.ws, label)

    def work(self, run: Run, source: ScriptedSource) -> ScriptedWork:
        return ScriptedWork(run, source, self)


def fail(message: str) -> Callable[[], Awaitable[None]]:
    async def act() -> None:
        raise SourceError(message)
    return act


async def hang() -> None:
    await anyio.sleep_forever()


def signal_then_hang(interruption: Interruption) -> Callable[[], Awaitable[None]]:
    # What the CLI's signal handler does on SIGTERM, then a step that only a cancel ends.
    async def act() -> None:
        interruption.trigger(signal.SIGTERM)
        await anyio.sleep_forever()
    return act


# --- the in-memory destination -----------------------------------------------------------


class MemoryDestination(Destination):
    """Folders as a set of relative paths; each change recorded as an event."""

    def __init__(self, ws: Workspace, folders: list[str] | None = None) -> None:
        super().__init__(str(ws.dest))
        self.ws = ws
        self.folders: set[str] = set(folders or [])

    def _below(self, folder: str) -> set[str]:
        return {f for f in self.folders if f == folder or f.startswith(folder + "/")}

    async def problem(self, require_mountpoint: bool) -> str | None:
        return None

    async def remember(self) -> None:
        self.identity = (0, 0)

    async def gone(self) -> str | None:
        return self.lost

    def gone_now(self) -> str | None:
        return self.lost

    async def scan(self) -> list[Entry]:
        entries = []
        for folder in self.folders:
            if "/" in folder:
                continue
            state: State = "complete"
            name = folder
            if folder.endswith(IN_PROGRESS):
                name, state = folder.removesuffix(IN_PROGRESS), "in-progress"
            elif folder.endswith(DELETING):
                name, state = folder.removesuffix(DELETING), "deleting"
            moment = parse_name(name)
            if moment is not None:
                entries.append(Entry(name, state, moment))
        return sorted(entries, key=lambda e: (e.time, e.name), reverse=True)

    async def name_is_free(self, name: str) -> bool:
        return not {name, name + IN_PROGRESS, name + DELETING} & self.folders

    async def holding(self, backups: list[str], source: str | None,
                      inner: bytes | None) -> list[str]:
        return []

    async def is_btrfs(self) -> bool:
        return False

    async def newest_holding(self, entries: list[Entry], source: str) -> str | None:
        return None

    async def is_subvolume(self, path: str) -> bool:
        return False

    async def create(self, folder: str) -> None:
        record(self.ws, f"dest.create {folder}")
        await anyio.lowlevel.checkpoint()
        self.folders.add(folder)

    async def rename(self, folder: str, new: str) -> None:
        record(self.ws, f"dest.rename {folder} {new}")
        await anyio.lowlevel.checkpoint()
        for old in self._below(folder):
            self.folders.remove(old)
            self.folders.add(new + old[len(folder):])

    async def remove(self, folder: str) -> None:
        record(self.ws, f"dest.remove {folder}")
        await anyio.lowlevel.checkpoint()
        self.folders -= self._below(folder)

    async def flush(self) -> None:
        return None

    async def space(self) -> tuple[int, int] | None:
        return (1, 2)


# Two complete backups of the days before: retention (keep_last = 1) deletes them after
# a successful save. Recent, since backups more than 30 days older than the new one are
# a clock jump, which pauses retention (SPEC §3).
_NOW = datetime.now(timezone(timedelta(hours=1))).replace(microsecond=0)
OLD = [format_name(_NOW - timedelta(days=days)) for days in (2, 1)]


# --- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
def kind(ws: Workspace) -> Iterator[ScriptedKind]:
    scripted = register(ScriptedKind(ws))
    yield scripted
    unregister(scripted)


def sources(ws: Workspace, *names: str, **keys: object) -> str:
    return "".join(table("[[sources]]", name=n, type="scripted",
                         path=str(ws.make_source(n)), **keys) for n in names)


def configure(ws: Workspace, hooks: list[HookSpec], body: str, *,
              concurrency: int | None = None, extra_hooks: str = "") -> None:
    header = "" if concurrency is None else f"concurrency = {concurrency}\n"
    ws.write_config("".join(hook_toml(ws, h) for h in hooks) + extra_hooks + body,
                    header=header + "[retention]\nkeep_last = 1\n")


async def run(ws: Workspace, interruption: Interruption | None = None,
              dest: MemoryDestination | None = None) -> tuple[Report, list[str]]:
    """A backup in-process; the report and the events, the new name read as NEW."""
    report = await run_backup(load_config(str(ws.config_path)), RunOptions(),
                              interruption or Interruption("run"),
                              destination=dest or MemoryDestination(ws, OLD))
    assert processes_mentioning(str(ws.root)) == [], "a hook outlived the run"
    return report, [label.replace(report.name, "NEW") for label in order(ws)]


def source_steps(report: Report) -> dict[str, tuple[str, str, str | None]]:
    """Each source's status, snapshot status and save status."""
    return {name: (r.status, r.snapshot.status, r.save.status if r.save else None)
            for name, r in report.sources.items()}


def hook_steps(report: Report) -> list[tuple[str, str, str]]:
    return [(h.hook, h.phase, h.status) for h in report.hooks]


B1_S1 = [HookSpec("b1"), HookSpec("s1", kind="snapshot")]


# --- success -----------------------------------------------------------------------------


async def test_a_backup_runs_its_hooks_steps_and_retention_in_spec_order(
        ws: Workspace, kind: ScriptedKind) -> None:
    hooks = [HookSpec("b1"), HookSpec("b2"),
             HookSpec("s1", kind="snapshot"), HookSpec("s2", kind="snapshot")]
    configure(ws, hooks, sources(ws, "one", "two"), concurrency=1)
    dest = MemoryDestination(ws, OLD)

    report, events = await run(ws, dest=dest)

    assert events == [
        "b1.pre", "b2.pre",
        "one.clean_stale", "two.clean_stale", "dest.create NEW.in-progress",
        "s1.pre", "s2.pre", "one.snapshot", "two.snapshot", "s2.post", "s1.post",
        "one.save", "two.save",
        "dest.rename NEW.in-progress NEW", "one.finish", "two.finish",
        f"dest.rename {OLD[1]} {OLD[1]}.deleting", f"dest.remove {OLD[1]}.deleting",
        f"dest.rename {OLD[0]} {OLD[0]}.deleting", f"dest.remove {OLD[0]}.deleting",
        "b2.post", "b1.post",
    ]
    assert (report.status, report.saved, report.failure) == ("ok", True, None)
    assert source_steps(report) == {"one": ("ok", "ok", "ok"), "two": ("ok", "ok", "ok")}
    assert report.retention.deleted == [OLD[1], OLD[0]]
    assert dest.folders == {report.name}
    assert set(statuses(ws).values()) == {"-", "ok"}, "every post saw ok"


# --- failures ----------------------------------------------------------------------------


async def test_a_failing_snapshot_cancels_the_others_and_the_posts_unwind_in_reverse(
        ws: Workspace, kind: ScriptedKind) -> None:
    started = anyio.Event()

    async def two_started() -> None:
        started.set()
        await anyio.sleep_forever()

    async def fail_once_two_runs() -> None:
        await started.wait()
        raise SourceError("the toy's snapshot broke")

    kind.script = {"one.snapshot": fail_once_two_runs, "two.snapshot": two_started}
    hooks = [HookSpec("b1"), HookSpec("b2"),
             HookSpec("s1", kind="snapshot"), HookSpec("s2", kind="snapshot")]
    configure(ws, hooks, sources(ws, "one", "two"))
    dest = MemoryDestination(ws, OLD)

    report, events = await run(ws, dest=dest)

    assert events == [
        "b1.pre", "b2.pre",
        "one.clean_stale", "two.clean_stale", "dest.create NEW.in-progress",
        "s1.pre", "s2.pre", "one.snapshot", "two.snapshot", "two.snapshot.cancelled",
        "s2.post", "s1.post",
        "one.discard", "two.discard", "dest.remove NEW.in-progress",
        "b2.post", "b1.post",
    ]
    assert (report.status, report.saved) == ("failed", False)
    assert report.failure == 'source "one" snapshot failed: the toy\'s snapshot broke'
    assert source_steps(report) == {"one": ("failed", "failed", "skipped"),
                                    "two": ("cancelled", "cancelled", "skipped")}
    assert {label: s for label, s in statuses(ws).items() if s != "-"} == {
        "s2.post": "failed", "s1.post": "failed", "b2.post": "failed", "b1.post": "failed"}
    assert dest.folders == set(OLD), "nothing added, nothing deleted"


async def test_a_failing_optional_source_leaves_its_folder_out_and_the_rest_saved(
        ws: Workspace, kind: ScriptedKind) -> None:
    kind.script = {"one.snapshot": fail("laptop switched off")}
    configure(ws, B1_S1, sources(ws, "one", optional=True) + sources(ws, "two"),
              concurrency=1)
    dest = MemoryDestination(ws, OLD)

    report, events = await run(ws, dest=dest)

    assert events == [
        "b1.pre", "one.clean_stale", "two.clean_stale", "dest.create NEW.in-progress",
        "s1.pre", "one.snapshot", "dest.remove NEW.in-progress/one", "two.snapshot",
        "s1.post", "two.save",
        "dest.rename NEW.in-progress NEW", "one.finish failed", "two.finish",
        f"dest.rename {OLD[1]} {OLD[1]}.deleting", f"dest.remove {OLD[1]}.deleting",
        f"dest.rename {OLD[0]} {OLD[0]}.deleting", f"dest.remove {OLD[0]}.deleting",
        "b1.post",
    ]
    assert (report.status, report.saved) == ("failed", True)
    assert report.failure == 'source "one" snapshot failed: laptop switched off'
    assert source_steps(report) == {"one": ("failed", "failed", "skipped"),
                                    "two": ("ok", "ok", "ok")}
    assert statuses(ws)["b1.post"] == "failed"


@pytest.mark.parametrize("stage", ["backup", "snapshot"])
async def test_a_pre_that_fails_runs_no_later_pre_and_gets_no_post(
        ws: Workspace, kind: ScriptedKind, stage: str) -> None:
    hooks = [HookSpec("x1", kind=stage), HookSpec("x2", kind=stage, fail={"pre": 3}),
             HookSpec("x3", kind=stage)]
    outer = [HookSpec("b0")] if stage == "snapshot" else []
    configure(ws, outer + hooks, sources(ws, "one"))

    report, events = await run(ws)

    if stage == "backup":
        assert events == ["x1.pre", "x2.pre", "x1.post"], "the destination is never opened"
    else:
        assert events == ["b0.pre", "one.clean_stale", "dest.create NEW.in-progress",
                          "x1.pre", "x2.pre", "x1.post",
                          "one.discard", "dest.remove NEW.in-progress", "b0.post"]
    assert (report.status, report.saved) == ("failed", False)
    assert report.failure == 'hook "x2" pre failed: exit code 3'
    assert source_steps(report) == {"one": ("skipped", "skipped", "skipped")}
    assert [s for s in hook_steps(report) if s[0] != "b0"] == [
        ("x1", "pre", "ok"), ("x2", "pre", "failed"), ("x1", "post", "ok"),
        ("x2", "post", "skipped"), ("x3", "pre", "skipped"), ("x3", "post", "skipped")]


@pytest.mark.parametrize("phase", ["pre", "post"])
async def test_a_critical_hook_that_fails_stops_everything_as_a_crash_would(
        ws: Workspace, kind: ScriptedKind, phase: str) -> None:
    hooks = [HookSpec("b1"), HookSpec("s1", kind="snapshot"),
             HookSpec("s2", kind="snapshot", critical=True, fail={phase: 1})]
    configure(ws, hooks, sources(ws, "one"))
    dest = MemoryDestination(ws, OLD)

    report, events = await run(ws, dest=dest)

    # No later hook, step, post, discard or removal: the next run cleans up, as after a crash.
    ran = ["s2.pre"] if phase == "pre" else ["s2.pre", "one.snapshot", "s2.post"]
    assert events == ["b1.pre", "one.clean_stale", "dest.create NEW.in-progress",
                      "s1.pre", *ran]
    assert (report.status, report.saved) == ("failed", False)
    assert report.failure == f'hook "s2" {phase} failed: exit code 1'
    steps = ("skipped", "skipped", "skipped") if phase == "pre" else ("cancelled", "ok", "skipped")
    assert source_steps(report) == {"one": steps}
    assert [s[2] for s in hook_steps(report) if s[:2] in (("s1", "post"), ("b1", "post"))] == [
        "skipped", "skipped"]
    assert dest.folders == {*OLD, f"{report.name}.in-progress"}


async def test_a_source_past_its_timeout_fails_and_cancels_the_others(
        ws: Workspace, kind: ScriptedKind) -> None:
    kind.script = {"one.snapshot": hang, "two.snapshot": hang}
    configure(ws, B1_S1, sources(ws, "one", timeout="1s") + sources(ws, "two"))

    report, events = await run(ws)

    assert events == [
        "b1.pre", "one.clean_stale", "two.clean_stale", "dest.create NEW.in-progress",
        "s1.pre", "one.snapshot", "two.snapshot",
        # The kind sees its step cancelled; the pipeline reads it as the timeout.
        "one.snapshot.cancelled", "two.snapshot.cancelled", "s1.post",
        "one.discard", "two.discard", "dest.remove NEW.in-progress", "b1.post",
    ]
    assert (report.status, report.failure) == (
        "failed", 'source "one" snapshot failed: timed out after 1s')
    assert source_steps(report) == {"one": ("failed", "failed", "skipped"),
                                    "two": ("cancelled", "cancelled", "skipped")}


async def test_retention_is_not_applied_after_a_failed_save(
        ws: Workspace, kind: ScriptedKind) -> None:
    kind.script = {"two.save": fail("disk full")}
    configure(ws, B1_S1, sources(ws, "one", "two"), concurrency=1)
    dest = MemoryDestination(ws, OLD)

    report, events = await run(ws, dest=dest)

    assert events == [
        "b1.pre", "one.clean_stale", "two.clean_stale", "dest.create NEW.in-progress",
        "s1.pre", "one.snapshot", "two.snapshot", "s1.post", "one.save", "two.save",
        "one.discard", "two.discard", "dest.remove NEW.in-progress", "b1.post",
    ]
    assert (report.status, report.saved) == ("failed", False)
    assert source_steps(report) == {"one": ("ok", "ok", "ok"),
                                    "two": ("failed", "ok", "failed")}
    assert (report.retention.deleted, report.retention.kept) == ([], {})
    assert dest.folders == set(OLD)


# --- signals -----------------------------------------------------------------------------


@pytest.mark.parametrize("step", ["snapshot", "save"])
async def test_a_signal_during_a_step_cancels_it_and_the_posts_still_run(
        ws: Workspace, kind: ScriptedKind, step: str) -> None:
    interruption = Interruption("run")
    kind.script = {f"one.{step}": signal_then_hang(interruption)}
    configure(ws, B1_S1, sources(ws, "one"))
    dest = MemoryDestination(ws, OLD)

    report, events = await run(ws, interruption, dest)

    window = (["one.snapshot", "one.snapshot.cancelled", "s1.post"] if step == "snapshot"
              else ["one.snapshot", "s1.post", "one.save", "one.save.cancelled"])
    assert events == ["b1.pre", "one.clean_stale", "dest.create NEW.in-progress", "s1.pre",
                      *window, "one.discard", "dest.remove NEW.in-progress", "b1.post"]
    assert (report.status, report.saved, report.failure) == ("interrupted", False, None)
    expected = ("cancelled", "cancelled", "skipped") if step == "snapshot" else (
        "cancelled", "ok", "cancelled")
    assert source_steps(report) == {"one": expected}
    assert hook_steps(report) == [("b1", "pre", "ok"), ("s1", "pre", "ok"),
                                  ("s1", "post", "ok"), ("b1", "post", "ok")]
    assert statuses(ws)["b1.post"] == "interrupted"
    assert statuses(ws)["s1.post"] == ("interrupted" if step == "snapshot" else "ok")
    assert exit_for_signal(interruption.signum) == 143
    assert dest.folders == set(OLD)


def post_reading(ws: Workspace, spec: HookSpec, fifo: Path) -> str:
    """``spec``'s hook whose post, once it has logged, waits for a line from ``fifo``."""
    table_name = "backup_hooks" if spec.kind == "backup" else "snapshot_hooks"
    released = f"echo '{spec.name}.post.released|-|-||-|-|-|-' >> '{ws.events}'"
    return table(f"[[{table_name}]]", name=spec.name, pre=hook_script(ws, spec, "pre"),
                 post=f"{hook_script(ws, spec, 'post')}\nread line < '{fifo}'\n{released}")


@pytest.mark.parametrize("blocked", ["s1", "b2"])
async def test_a_signal_during_a_post_lets_it_and_the_later_posts_finish(
        ws: Workspace, kind: ScriptedKind, blocked: str) -> None:
    # The post blocks reading a FIFO: the test's open for writing returns once
    # the post is there, the "signal" comes, and the post goes on.
    fifo = ws.root / "post.fifo"
    os.mkfifo(fifo)
    hooks = [HookSpec("b1"), HookSpec("b2"), HookSpec("s1", kind="snapshot")]
    configure(ws, [], sources(ws, "one"), extra_hooks="".join(
        post_reading(ws, h, fifo) if h.name == blocked else hook_toml(ws, h) for h in hooks))
    interruption = Interruption("run")
    dest = MemoryDestination(ws, OLD)

    async def signal_during_the_post() -> None:
        writer = await anyio.to_thread.run_sync(open, fifo, "w", abandon_on_cancel=True)
        with writer:
            interruption.trigger(signal.SIGTERM)
            writer.write("go\n")

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(signal_during_the_post)
            report, events = await run(ws, interruption, dest)
    finally:
        # If the post never came, let the writer's open return.
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))

    start = ["b1.pre", "b2.pre", "one.clean_stale", "dest.create NEW.in-progress", "s1.pre",
             "one.snapshot", "s1.post"]
    if blocked == "s1":
        # The saves never start; the unfinished backup is removed.
        assert events == [*start, "s1.post.released", "one.discard",
                          "dest.remove NEW.in-progress", "b2.post", "b1.post"]
        assert (report.status, report.saved, report.failure) == ("interrupted", False, None)
        assert source_steps(report) == {"one": ("cancelled", "ok", "skipped")}
        assert dest.folders == set(OLD)
    else:
        # Saved before the signal: the backup and retention stand.
        assert events == [
            *start, "one.save", "dest.rename NEW.in-progress NEW", "one.finish",
            f"dest.rename {OLD[1]} {OLD[1]}.deleting", f"dest.remove {OLD[1]}.deleting",
            f"dest.rename {OLD[0]} {OLD[0]}.deleting", f"dest.remove {OLD[0]}.deleting",
            "b2.post", "b2.post.released", "b1.post"]
        assert (report.status, report.saved, report.failure) == ("interrupted", True, None)
        assert source_steps(report) == {"one": ("ok", "ok", "ok")}
        assert dest.folders == {report.name}
    assert [(h, p, s) for h, p, s in hook_steps(report)] == [
        ("b1", "pre", "ok"), ("b2", "pre", "ok"), ("s1", "pre", "ok"), ("s1", "post", "ok"),
        ("b2", "post", "ok"), ("b1", "post", "ok")]
    assert {label: s for label, s in statuses(ws).items() if s != "-"} == {
        "s1.post": "ok",
        "b2.post": "interrupted" if blocked == "s1" else "ok", "b1.post": "interrupted"}


async def test_a_source_cut_while_it_waits_for_a_slot_never_starts(
        ws: Workspace, kind: ScriptedKind) -> None:
    interruption = Interruption("run")
    kind.script = {"one.snapshot": signal_then_hang(interruption)}
    configure(ws, B1_S1, sources(ws, "one", "two"), concurrency=1)

    report, events = await run(ws, interruption)

    assert events == ["b1.pre", "one.clean_stale", "two.clean_stale",
                      "dest.create NEW.in-progress", "s1.pre",
                      "one.snapshot", "one.snapshot.cancelled", "s1.post",
                      "one.discard", "two.discard", "dest.remove NEW.in-progress", "b1.post"]
    assert report.status == "interrupted"
    assert source_steps(report) == {"one": ("cancelled", "cancelled", "skipped"),
                                    "two": ("skipped", "skipped", "skipped")}


# --- the exit code, through the CLI's own runner ---------------------------------------------


@pytest.fixture
def own_signal_handlers() -> Iterator[None]:
    # under_signals installs the CLI's handlers for the process's life: give pytest its own back.
    saved = {signum: signal.getsignal(signum) for signum in HANDLED}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_a_signal_during_the_save_exits_128_plus_its_number(
        ws: Workspace, kind: ScriptedKind, own_signal_handlers: None) -> None:
    configure(ws, B1_S1, sources(ws, "one"))
    config = load_config(str(ws.config_path))
    dest = MemoryDestination(ws, OLD)
    reports: list[Report] = []

    async def work(interruption: Interruption) -> Report:
        kind.script = {"one.save": signal_then_hang(interruption)}
        return await run_backup(config, RunOptions(), interruption, destination=dest)

    code = under_signals("run", work, after=reports.append)

    assert code == 143
    [report] = reports
    assert (report.status, report.saved) == ("interrupted", False)
    assert order(ws)[-3:] == ["one.discard", f"dest.remove {report.name}.in-progress",
                              "b1.post"]
