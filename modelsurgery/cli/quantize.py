"""`surgery quantize` (being built: see its issue)."""

from __future__ import annotations

from modelsurgery.cli.common import fail


def quantize_command() -> None:
    """Not available yet."""
    fail("surgery quantize is not available yet")
