"""`surgery align` (being built: see its issue)."""

from __future__ import annotations

from modelsurgery.cli.common import fail


def align_command() -> None:
    """Not available yet."""
    fail("surgery align is not available yet")
