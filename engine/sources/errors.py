"""The error a source's own work raises."""

from __future__ import annotations

from ..errors import StepError


class SourceError(StepError):
    """The snapshot or save of a source failed; the message says how."""
