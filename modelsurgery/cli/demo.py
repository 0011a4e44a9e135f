"""`surgery demo`: every capability once, on the bundled fixtures, in a temporary folder.

Each command module may define ``demo_step(fixtures: Path, workdir: Path) -> dict``; the demo
runs them in order and prints what each did.
"""

from __future__ import annotations

import importlib
import tempfile
from pathlib import Path

import typer

from modelsurgery.cli.common import emit_json, out_console, user_errors
from modelsurgery.cli.options import debug_option, force_option, json_option, quiet_option
from modelsurgery.errors import SurgeryError

STEPS = ("inspect", "merge", "grow", "align", "quantize", "export", "fold")


def find_fixtures(explicit: Path | None = None) -> Path:
    candidates = [explicit] if explicit else [Path.cwd() / "fixtures", Path(__file__).resolve().parents[2] / "fixtures"]
    for c in candidates:
        if c is not None and (c / "digits").is_dir():
            return c
    raise SurgeryError(
        f"{candidates[0]}: bundled fixtures not found (run from the repository root, or pass --fixtures; "
        "regenerate them with python fixtures/make_fixtures.py)"
    )


def demo_command(
    fixtures: Path = typer.Option(None, "--fixtures", help="Fixtures folder (default: ./fixtures)."),
    keep: Path = typer.Option(None, "--keep", help="Write outputs here instead of a temporary folder."),
    json_out: bool = json_option(),
    force: bool = force_option(help="Replace outputs in the --keep folder (the demo always replaces its own)."),
    quiet: bool = quiet_option(),
    debug: bool = debug_option(),
) -> None:
    """Run every capability once on the bundled fixtures and print what it did."""
    with user_errors(debug):
        root = find_fixtures(fixtures)
        results = {}
        with tempfile.TemporaryDirectory(prefix="surgery-demo-") as tmp:
            workdir = keep or Path(tmp)
            workdir.mkdir(parents=True, exist_ok=True)
            for step in STEPS:
                module = importlib.import_module(f"modelsurgery.cli.{step}")
                fn = getattr(module, "demo_step", None)
                if fn is None:
                    continue
                if not (json_out or quiet):
                    out_console.rule(f"[bold]{step}")
                results[step] = fn(root, workdir, quiet=json_out or quiet)
    if json_out:
        emit_json(results)
