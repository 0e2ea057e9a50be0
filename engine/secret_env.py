"""The SMTP password's environment variable, taken out of the environment that children inherit.

``password_env`` names a variable that holds a secret: hooks and rsync
must not inherit it (a hook's ``env`` dump in a report or a log would
show it). It is removed from ``os.environ`` when a command starts and kept
here for the mailer alone.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config

_withheld: dict[str, str] = {}


def withhold_secrets(config: Config) -> None:
    """Remove the variable named by ``report.smtp.password_env`` from our environment."""
    if config.report is None or config.report.smtp.password_env is None:
        return
    name = config.report.smtp.password_env
    value = os.environ.pop(name, None)
    if value is not None:
        _withheld[name] = value


def secret(name: str) -> str | None:
    """The value of a withheld variable (or, if it was never withheld, of the environment)."""
    return _withheld.get(name, os.environ.get(name))
