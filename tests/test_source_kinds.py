"""A source kind is one module: a toy kind defined here runs through the whole engine.

``ToyKind`` is what a new kind's module holds and nothing else: its config
struct (tagged ``type = "toy"``), its work in a run (the snapshot copies the
folder aside with shutil, the save copies that into the backup, finish and
discard remove the copy aside), its dry-run lines, its ``check`` findings and
the folder it writes. It is registered for one test and loaded from TOML
like any source: nothing else in the engine learns about it. The backups
run in-process through the public API (``load_config``, ``run_backup``,
``plan_run``, ``preflight``) with real hooks and real rsync.

Also here, issue 18 bug 3: a source whose save never started (the run was
cut while it waited for a slot, or stopped by a critical hook after its
snapshot) is ``cancelled``, never ``ok``: with the toy kind in-process, and
with a real btrfs source through the CLI.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from btrfskit import SNAPSHOTS, btrfs_source, needs_btrfs, snapshot_names
from conftest import needs_rsync
from datakit import table
from hookkit import HookSpec, hook_toml, order
from pibackup_async.engine import (
    ConfigError,
    Interruption,
    RunOptions,
    load_config,
    plan_run,
    preflight,
    run_backup,
)
from pibackup_async.engine.report import StepResult, started
from pibackup_async.engine.restore import protect_rules
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
from pibackup_async.engine.sources.rsync import auto_excludes

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

    from conftest import Workspace


# --- the toy kind: what a new kind's module holds --------------------------------------


class ToySource(SourceConfig, frozen=True, kw_only=True, tag="toy"):
    stash: str  # where its snapshots go: <stash>/<backup name>


class ToyWork(SourceWork[ToySource]):
    def __init__(self, run: Run, source: ToySource, kind: ToyKind) -> None:
        super().__init__(run, source)
        self.kind = kind
        self.taken: Path | None = None

    def _aside(self, name: str) -> Path:
        return Path(self.source.stash) / name / self.source.name

    def _drop(self) -> None:
        if self.taken is not None:
            shutil.rmtree(self.taken)
            with contextlib.suppress(OSError):  # another source's copy is there too
                self.taken.parent.rmdir()

    async def clean_stale(self) -> None:
        self.kind.event(f"{self.source.name}.clean_stale")

    async def snapshot(self) -> StepResult:
        self.kind.event(f"{self.source.name}.snapshot")
        aside = self._aside(self.run.name)
        started(["copytree", self.source.path, str(aside)])
        await anyio.to_thread.run_sync(shutil.copytree, self.source.path, aside)
        self.taken = aside
        return StepResult()

    async def save(self) -> StepResult:
        self.kind.event(f"{self.source.name}.save")
        assert self.taken is not None
        await self.kind.before_save(self)
        started(["copytree", str(self.taken), self.target])
        await anyio.to_thread.run_sync(shutil.copytree, self.taken, self.target)
        size = sum(f.stat().st_size for f in Path(self.target).rglob("*")  # noqa: ASYNC240
                   if f.is_file())
        return StepResult(bytes=size)

    async def finish(self, *, failed: bool) -> None:
        self.kind.event(f"{self.source.name}.finish")
        self._drop()

    async def discard(self) -> None:
        self.kind.event(f"{self.source.name}.discard")
        self._drop()

    async def plan(self, dry: DryRun) -> SourcePlan:
        aside = self._aside(dry.name)
        return SourcePlan(f"toy copy of {self.source.path} to {aside}",
                          f"toy copy of {aside} into {self.target}")


async def _no_wait(work: ToyWork) -> None:
    return None


class ToyKind(SourceKind[ToySource]):
    config = ToySource
    path_keys = ("stash",)

    def __init__(self, events: Path) -> None:
        self.events = events
        # What a save does before it copies (a test cuts the run there).
        self.before_save: Callable[[ToyWork], Awaitable[None]] = _no_wait

    def event(self, label: str) -> None:
        # The hooks' event line (hookkit): eight fields, the label first.
        with self.events.open("a") as f:
            f.write(f"{label}|-|-||-|-|-|-\n")

    def work(self, run: Run, source: ToySource) -> ToyWork:
        return ToyWork(run, source, self)

    def check(self, source: ToySource) -> tuple[list[str], list[str]]:
        return [], [f"path: {source.path} is copied by a toy"]

    def own_folders(self, source: ToySource) -> list[tuple[str, str]]:
        return [("stash", source.stash)]


@pytest.fixture
def toy(ws: Workspace) -> Iterator[ToyKind]:
    kind = register(ToyKind(ws.events))
    yield kind
    unregister(kind)


def toy_source(ws: Workspace, name: str, **keys: Any) -> str:
    path = ws.make_source(name, {"a.txt": f"alpha of {name}\n", "sub/b.txt": "beta\n"})
    return table("[[sources]]", name=name, type="toy", path=str(path),
                 stash=str(ws.root / "stash"), **keys)


def configure(ws: Workspace, body: str, header: str = "") -> Path:
    hooks = [HookSpec("b1"), HookSpec("s1", kind="snapshot")]
    return ws.write_config("".join(hook_toml(ws, h) for h in hooks) + body, header=header)


# --- a whole backup with a kind the engine has never heard of --------------------------


async def test_a_toy_kind_makes_a_whole_backup_in_process(ws: Workspace, toy: ToyKind) -> None:
    config = load_config(str(configure(ws, toy_source(ws, "notes"))))
    [source] = config.sources
    assert isinstance(source, ToySource) and source.kind == "toy"

    report = await run_backup(config, RunOptions(), Interruption("run"))

    assert (report.status, report.saved, report.failure) == ("ok", True, None)
    record = report.sources["notes"]
    assert record.type == "toy" and record.status == "ok"
    assert record.snapshot.status == "ok" and record.save is not None
    assert record.save.status == "ok"
    assert record.save.command == ["copytree", str(ws.root / "stash" / report.name / "notes"),
                                   str(ws.dest / f"{report.name}.in-progress" / "notes")]
    copy = ws.dest / report.name / "notes"
    assert (copy / "a.txt").read_text() == "alpha of notes\n"
    assert (copy / "sub" / "b.txt").read_text() == "beta\n"
    assert record.bytes == len("alpha of notes\n") + len("beta\n")
    assert sorted(p.name for p in ws.dest.iterdir()) == [report.name]
    assert list((ws.root / "stash").iterdir()) == [], "finish removed the copy aside"
    # The kind's steps in SPEC §2's places among the hooks.
    assert order(ws) == ["b1.pre", "notes.clean_stale", "s1.pre", "notes.snapshot", "s1.post",
                         "notes.save", "notes.finish", "b1.post"]
    assert ws.report()["sources"]["notes"]["type"] == "toy"


async def test_a_toy_kind_in_the_plan_check_exclusions_and_restore(
        ws: Workspace, toy: ToyKind) -> None:
    # An rsync source that holds the toy's stash: its copy leaves the stash out.
    config = load_config(str(configure(
        ws, toy_source(ws, "notes") + table("[[sources]]", name="all", type="rsync",
                                            path=str(ws.root)))))

    plan = "\n".join(await plan_run(config))
    problems, warnings = preflight(config)

    stash = ws.root / "stash"
    assert f"   - notes: toy copy of {ws.src / 'notes'} to {stash}/" in plan, plan
    assert f"toy copy of {stash}/" in plan.split("5. save snapshots")[1], plan
    assert problems == []
    assert f"sources[0].path: {ws.src / 'notes'} is copied by a toy" in warnings
    assert "--exclude=/stash" in auto_excludes(config, str(ws.root))
    assert "/stash" in [r.text() for r in protect_rules(config, "all", b"")], "restore keeps it"
    assert protect_rules(config, "notes", b"") == []
    assert not stash.exists() and list(ws.dest.iterdir()) == [] and not ws.events.exists()


def test_the_config_validator_knows_the_toy_kind_from_the_registry(
        ws: Workspace, toy: ToyKind) -> None:
    body = (toy_source(ws, "notes", exclude=["*.tmp"], colour="blue")
            + table("[[sources]]", name="rel", type="toy", path=str(ws.src), stash="rel")
            + table("[[sources]]", name="odd", type="nope", path=str(ws.src)))
    with pytest.raises(ConfigError) as refused:
        load_config(str(ws.write_config(body)))

    problems = refused.value.problems
    assert problems[:2] == ["sources[0].exclude: exclude is only for rsync sources",
                            "sources[0].colour: unknown key"], problems
    assert problems[2].startswith("sources[2].type: expected ") and '"toy"' in problems[2]
    assert problems[3:] == ["sources[1].stash: expected an absolute path, got 'rel'"]


# --- issue 18 bug 3: a save that never started is not ok -------------------------------


async def test_a_source_cut_while_it_waits_for_a_slot_is_cancelled_not_ok(
        ws: Workspace, toy: ToyKind) -> None:
    interruption = Interruption("run")

    async def signal_then_hang(work: ToyWork) -> None:
        # The first save to start stands for a SIGTERM; the other waits for the one slot.
        interruption.trigger(signal.SIGTERM)
        await anyio.sleep_forever()

    toy.before_save = signal_then_hang
    config = load_config(str(configure(ws, toy_source(ws, "one") + toy_source(ws, "two"),
                                       header="concurrency = 1")))

    report = await run_backup(config, RunOptions(), interruption)

    assert (report.status, report.saved) == ("interrupted", False)
    steps = sorted((r.status, r.snapshot.status, r.save.status if r.save else None)
                   for r in report.sources.values())
    assert steps == [("cancelled", "ok", "cancelled"), ("cancelled", "ok", "skipped")], steps
    assert list((ws.root / "stash").iterdir()) == [], "discard removed both copies aside"
    assert list(ws.dest.iterdir()) == []


@needs_btrfs
@needs_rsync
@pytest.mark.root
def test_a_btrfs_source_stopped_after_its_snapshot_is_cancelled_not_ok(
        ws: Workspace, btrfs_fs: Callable[..., Any]) -> None:
    src_fs = btrfs_fs(ws.src / "vol")
    source = src_fs.subvolume("data")
    (source / "file.txt").write_text("kept\n")
    # A critical post stops the run as a crash would: the save never starts.
    stop = HookSpec("s1", kind="snapshot", critical=True, fail={"post": 1})
    ws.write_config(hook_toml(ws, stop) + btrfs_source("data", source))

    result = ws.run("run")

    assert result.returncode == 1, result.stderr
    report = ws.report()
    data = report["sources"]["data"]
    assert (data["snapshot"]["status"], data["save"]["status"]) == ("ok", "skipped"), data
    assert data["status"] == "cancelled", data
    assert report["status"] == "failed" and not report["saved"]
    # Left as after a crash (SPEC §2): the next run removes it.
    assert len(snapshot_names(src_fs.mount / SNAPSHOTS)) == 1
