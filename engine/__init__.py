"""pibackup-async's engine: configuration, the backup pipeline, and its report."""

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
