"""Startup: `surgery --help` and `--version` import no subcommand module (so neither torch nor onnx),
and the summary `--help` lists for each command is the start of that command's own docstring."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from modelsurgery.cli.app import COMMANDS, app


@pytest.mark.parametrize("args", [["--help"], ["--version"], []])
def test_root_imports_nothing_heavy(args):
    roots, prefixes = ("torch", "onnx", "onnxruntime", "transformers", "numpy"), ("modelsurgery.ops",
                                                                                   "modelsurgery.checkpoint")
    code = (f"import sys\nfrom modelsurgery.cli.app import main\nsys.argv = ['surgery', *{args!r}]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {roots!r} or m.startswith({prefixes!r})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]", f"imported at startup: {r.stdout[-500:]}"


def test_listing_matches_each_command_docstring():
    for name, (module, function, summary) in COMMANDS.items():
        doc = " ".join((getattr(importlib.import_module(f"modelsurgery.cli.{module}"), function).__doc__ or "").split())
        assert doc.startswith(summary), name


def test_every_command_runs_its_own_help():
    runner = CliRunner()
    listing = runner.invoke(app, ["--help"]).output
    for name in COMMANDS:
        assert name in listing
        r = runner.invoke(app, [name, "--help"])
        assert r.exit_code == 0 and "Usage" in r.output, name
