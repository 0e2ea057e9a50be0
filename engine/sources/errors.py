"""The error a source's own work raises."""

from __future__ import annotations


class SourceError(Exception):
    """The snapshot or save of a source failed; the message says how."""
