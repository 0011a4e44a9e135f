"""`surgery merge` (being built: see its issue)."""

from __future__ import annotations

from modelsurgery.cli.common import fail


def merge_command() -> None:
    """Not available yet."""
    fail("surgery merge is not available yet")
def analyze_command() -> None:
    """Not available yet."""
    fail("surgery analyze is not available yet")
