"""`surgery grow` (being built: see its issue)."""

from __future__ import annotations

from modelsurgery.cli.common import fail


def grow_command() -> None:
    """Not available yet."""
    fail("surgery grow is not available yet")
