"""What a kind of source is, and the registry that finds one by its ``type`` tag.

A kind is one module of this package (``rsync.py``, ``btrfs.py``): its
configuration, a subclass of ``SourceConfig`` tagged by ``type``, and a
``SourceKind`` that tells the engine everything else about it — the work of
one source in a run (``SourceWork``: stale clean-up, precopy, snapshot, save,
finish, discard, and the dry-run's lines, drawn from the same code), what
``check`` finds, the folders of its own that copies leave out, what a
restore's ``--delete`` keeps, and when ``init`` chooses it. A kind module
registers its kind when imported, and ``kinds()`` imports every module of
this package once: a new kind is a new module here, found as borgmatic's
data source hooks are found by its dispatcher. The pipeline, the plan,
``check``, restore and ``init`` ask a source's kind (``kind_of``) and name
none.
"""

from __future__ import annotations

import functools
import importlib
import os
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from msgspec import Struct

from ..destination import LocalDestination
from ..durations import parse_duration
from ..remote import Remotes

if TYPE_CHECKING:
    from ..config import Config
    from ..destination import Destination, Entry, Identity
    from ..remote import Transport
    from ..report import StepResult


class SourceConfig(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True,
                   tag_field="type"):
    """The keys every source has; a kind's own struct adds its keys and its ``type`` tag."""

    name: str
    path: str
    host: str | None = None
    timeout: str | None = None
    optional: bool = False

    @property
    def timeout_s(self) -> float | None:
        return None if self.timeout is None else parse_duration(self.timeout)

    @property
    def kind(self) -> str:
        """The ``type`` tag: the kind's name in the file and in the report."""
        return str(self.__struct_config__.tag)


S = TypeVar("S", bound=SourceConfig)

# One copy of a source: it returns what it did (exit code, stderr tail, the bytes
# it wrote into the backup).
Copy = Callable[[], Awaitable["StepResult"]]


class Run(Protocol):
    """What a source's work may read of its run: the pipeline's RunContext, or a DryRun."""

    @property
    def config(self) -> Config: ...

    @property
    def name(self) -> str:
        """The backup's name."""

    @property
    def destination(self) -> str: ...

    @property
    def in_progress_dir(self) -> str: ...

    @property
    def previous(self) -> list[Entry]:
        """The complete backups found in step 1, newest first."""

    @property
    def dest_is_btrfs(self) -> bool: ...

    @property
    def remotes(self) -> Remotes: ...

    @property
    def dest(self) -> Destination:
        """The destination's operations, off the event loop (which destination it is, say)."""


@dataclass
class DryRun:
    """The run as ``--dry-run`` sees it: the destination as it is now, no host contacted."""

    config: Config
    name: str
    destination: str
    in_progress_dir: str
    previous: list[Entry]
    dest_is_btrfs: bool
    # The destination exists now. If not (a backup hook may mount it), what
    # depends on its contents (link-dest, a parent, how a save goes) is
    # decided at run time, and the plan says so.
    known: bool
    # The way to a host as the run would name it, without contacting it.
    transport: Callable[[str | None], Transport | None]
    remotes: Remotes = field(default_factory=lambda: Remotes({}))

    @property
    def dest(self) -> Destination:
        # The folder as it is now, as the plan reads it.
        return LocalDestination(self.destination)


@dataclass(frozen=True)
class SourcePlan:
    """A source's lines in the dry-run: what its snapshot and its save would run."""

    snapshot: str
    save: str | None = None
    # Its precopy's command, when one is due (SPEC §2 step 3).
    precopy: str | None = None


class SourceWork(ABC, Generic[S]):
    """One source's work in one run: built for every source when the run starts.

    Holds what the run learns about the source on the way (a snapshot taken,
    say) for the steps after it. Each copy tells when its command starts
    (``report.started``) and returns a StepResult: its exit code, stderr
    tail and the bytes it wrote into the backup (the report's ``bytes``;
    what they count is the kind's to say); the pipeline records it. It
    never touches the report. It raises SourceError (carrying its command's
    result, when one ended), or RemoteError, OSError, when it fails.
    """

    def __init__(self, run: Run, source: S) -> None:
        self.run = run
        self.source = source

    @property
    def target(self) -> str:
        """The source's folder in the in-progress backup."""
        return os.path.join(self.run.in_progress_dir, self.source.name)

    async def clean_stale(self) -> None:
        """Step 1: remove what crashed runs left outside the destination (default: nothing).

        Only logs what it cannot do: the source then fails in its own step.
        """

    def precopy(self) -> Copy | None:
        """The copy made before the snapshot hooks' ``pre`` (SPEC §2 step 2), or None: none due.

        Its failure is no failure of the run: the snapshot copies the rest.
        """
        return None

    @abstractmethod
    async def snapshot(self) -> StepResult:
        """Step 3, in the snapshot hooks' window: as short as the kind can make it."""

    async def after_window(self) -> None:
        """Once the window closed (after step 4), before step 5: remove what only the window
        needed (default: nothing). Raises OSError if that cannot be removed."""

    async def save(self) -> StepResult:
        """Step 5, after the window; called only for a kind that ``has_save``."""
        raise NotImplementedError(f"{self.source.kind} sources have no save step")

    async def finish(self, *, failed: bool) -> None:
        """Step 6, once the backup has its final name (``failed``: this optional source failed).

        Only logs what it cannot do: the backup is saved.
        """

    async def discard(self) -> None:
        """The backup was not saved: remove what this run made outside the in-progress folder.

        Runs under the run's bound on the clean-up; only logs what it cannot do.
        """

    @abstractmethod
    async def plan(self, dry: DryRun) -> SourcePlan:
        """The dry-run's lines, from the decisions the run itself would take.

        Changes nothing and contacts no host.
        """


@dataclass(frozen=True)
class InitChoice:
    """What ``init`` makes of a folder with this kind: a fit, or why not (``note``)."""

    fits: bool
    note: str | None = None  # said above the table of the kind chosen instead


class SourceKind(ABC, Generic[S]):
    """One kind of source, registered under its config's ``type`` tag (``register``)."""

    # The configuration: ``class RsyncSource(SourceConfig, tag="rsync")``.
    config: type[S]
    # The report's ``save`` is a step; else null (the snapshot is the whole copy).
    has_save: ClassVar[bool] = True
    # Copies leave the engine's own folders out (``engine_folders``), so the
    # destination may lie inside such a source; else that is refused at load.
    leaves_out_own_folders: ClassVar[bool] = False
    # Its keys beyond ``path`` that hold absolute paths (checked at load).
    path_keys: ClassVar[tuple[str, ...]] = ()
    # A hint for an unknown key, better than "only for … sources".
    key_hints: ClassVar[Mapping[str, str]] = {}
    # init tries the kinds from the highest rank; None: init never chooses it.
    init_rank: ClassVar[int | None] = None

    @property
    def tag(self) -> str:
        return str(self.config.__struct_config__.tag)

    @abstractmethod
    def work(self, run: Run, source: S) -> SourceWork[S]:
        """The source's work in ``run``."""

    def check(self, source: S) -> tuple[list[str], list[str]]:
        """Problems (the run cannot work) and warnings about a local source whose path exists."""
        return [], []

    def details(self, source: S, destination: Identity | None) -> list[str]:
        """What ``check -v`` says of the source beyond problems (``destination``: which one
        it is, None while it is not there)."""
        return []

    def key_problems(self, table: Mapping[str, Any]) -> list[str]:
        """Problems of one raw ``[[sources]]`` table of this kind that tie its keys together
        (``key: why``), listed at load with every other problem.

        It reads the table as written: a value of the wrong type counts as
        absent (the shape check names it).
        """
        return []

    def own_folders(self, source: S) -> list[tuple[str, str]]:
        """(key, path): folders the engine writes on this machine for this source.

        Copies of any source leave them out, and ``check`` judges who can write them.
        """
        return []

    def asks_for_metadata(self, source: S) -> bool:
        """Its copy asks the destination to keep owners, ACLs and xattrs (``check`` on vfat)."""
        return False

    def kept_by_restore(self, config: Config, source: S) -> list[str]:
        """rsync patterns that a restore's ``--delete`` must keep: what its copies leave out."""
        return []

    def init_choice(self, path: str, destination: str) -> InitChoice:
        """Whether ``init`` should back up the folder at ``path`` as this kind."""
        return InitChoice(fits=False)

    def init_path(self, path: str) -> str:
        """``path`` as ``init`` writes it for this kind."""
        return path


_KINDS: dict[str, SourceKind[Any]] = {}
K = TypeVar("K", bound=SourceKind[Any])


def register(kind: K) -> K:
    """Make ``kind`` known by its ``type`` tag; a kind module calls it when imported."""
    known = _KINDS.setdefault(kind.tag, kind)
    if known is not kind:
        raise ValueError(f"source type {kind.tag!r} is registered twice")
    return kind


def unregister(kind: SourceKind[Any]) -> None:
    """Forget ``kind`` (a test's own, once the test is over)."""
    if _KINDS.get(kind.tag) is kind:
        del _KINDS[kind.tag]


@functools.cache
def _import_kind_modules() -> None:
    package = importlib.import_module(__package__ or "")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")


def kinds() -> Mapping[str, SourceKind[Any]]:
    """Every kind by its tag, in the order registered (this package's are imported first use)."""
    _import_kind_modules()
    return _KINDS


def kind_of(source: SourceConfig) -> SourceKind[Any]:
    """The kind of a configured source."""
    return kinds()[source.kind]


def engine_folders(config: Config) -> list[str]:
    """Every folder the engine writes on this machine: copies of any source leave them out."""
    own = [config.destination, config.state_dir, config.lock_path]
    for source in config.sources:
        own += [path for _, path in kind_of(source).own_folders(source)]
    return own
