"""The error a source's own work raises."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import StepError

if TYPE_CHECKING:
    from ..report import StepResult


class SourceError(StepError):
    """The snapshot or save of a source failed; the message says how.

    ``result``: what its command told before the step failed (exit code,
    stderr tail), which the report shows; None when no command ended.
    """

    def __init__(self, message: str, *, result: StepResult | None = None) -> None:
        super().__init__(message)
        self.result = result
