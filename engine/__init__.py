"""pibackup-async's engine: configuration, the backup pipeline, and its report.

The public names load their module on first use (PEP 562): importing any one
submodule, or this package, must not load the whole engine — each command pays
at start-up, from a cold page cache, for every module it loads (issue 21).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config as Config
    from .config import load_config as load_config
    from .context import Interruption as Interruption
    from .context import RunOptions as RunOptions
    from .errors import ConfigError as ConfigError
    from .errors import DestinationUnavailable as DestinationUnavailable
    from .errors import Interrupted as Interrupted
    from .errors import LockHeld as LockHeld
    from .errors import PibackupError as PibackupError
    from .listing import Listed as Listed
    from .listing import list_backups as list_backups
    from .pipeline import run_backup as run_backup
    from .plan import plan_run as plan_run
    from .preflight import preflight as preflight
    from .pruning import prune_backups as prune_backups
    from .report import Report as Report

# Each public name, and the submodule that holds it.
_HOME = {
    "Config": "config",
    "load_config": "config",
    "Interruption": "context",
    "RunOptions": "context",
    "ConfigError": "errors",
    "DestinationUnavailable": "errors",
    "Interrupted": "errors",
    "LockHeld": "errors",
    "PibackupError": "errors",
    "Listed": "listing",
    "list_backups": "listing",
    "run_backup": "pipeline",
    "plan_run": "plan",
    "preflight": "preflight",
    "prune_backups": "pruning",
    "Report": "report",
}

__all__ = [
    "Config",
    "ConfigError",
    "DestinationUnavailable",
    "Interrupted",
    "Interruption",
    "Listed",
    "LockHeld",
    "PibackupError",
    "Report",
    "RunOptions",
    "list_backups",
    "load_config",
    "plan_run",
    "preflight",
    "prune_backups",
    "run_backup",
]


def __getattr__(name: str) -> object:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Engine(types.ModuleType):
    """The package, whose ``preflight`` stays the function.

    Importing a submodule binds it on its package: loading ``.preflight`` (the
    lock does) would hide the function ``preflight`` behind its module, which
    ``from pibackup_async.engine import preflight`` would then return.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if name in _HOME and isinstance(value, types.ModuleType):
            return  # the name stays the function, loaded by __getattr__
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Engine
