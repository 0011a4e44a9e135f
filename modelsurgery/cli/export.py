"""`surgery export` (being built: see its issue)."""

from __future__ import annotations

from modelsurgery.cli.common import fail


def export_command() -> None:
    """Not available yet."""
    fail("surgery export is not available yet")
