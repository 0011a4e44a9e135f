"""Every command accepts every shared option (--json, --force, --quiet/-q, --debug; --max-shard-size and
--no-input-hash where a command has them), defined once in ``cli/options.py``; Typer's help does not print
``--json <bool>`` as if the flag took a value."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelsurgery.cli.app import COMMANDS, app
from tests.hf_tiny import save_tiny_llama

ROOT = Path(__file__).resolve().parents[2]
MLP0 = ROOT / "fixtures" / "digits" / "mlp_seed0.safetensors"
MLP1 = ROOT / "fixtures" / "digits" / "mlp_seed1.safetensors"
INCREMENTAL = ROOT / "fixtures" / "digits" / "incremental_clipped.safetensors"
UNIVERSAL = ["--json", "--force", "--quiet", "--debug"]
runner = CliRunner()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shared")
    base = save_tiny_llama(root / "base")
    tuned = save_tiny_llama(root / "tuned", seed=1)
    r = runner.invoke(app, ["extract", str(base), str(tuned), "-o", str(root / "lora"), "--rank", "4", "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["quantize", str(MLP0), "-o", str(root / "packed.safetensors"), "--method", "rtn",
                            "--format", "packed", "-q"])
    assert r.exit_code == 0, r.output
    (root / "recipe.yml").write_text(f"steps:\n  - name: q\n    run: quantize\n    inputs: [{MLP0}]\n"
                                     "    options: {method: rtn, bits: 4}\n")
    return root


def invocations(w: Path) -> dict[str, list[str]]:
    """A small valid run of each command (output names under ``w``)."""
    return {
        "inspect": ["inspect", str(MLP0)],
        "merge": ["merge", str(MLP0), str(MLP1), "-o", str(w / "merged.safetensors")],
        "analyze": ["analyze", str(MLP0), str(MLP1)],
        "grow": ["grow", str(MLP0), "-o", str(w / "grown.safetensors"), "--method", "width"],
        "align": ["align", str(INCREMENTAL), "-o", str(w / "aligned.safetensors"), "--old-classes", "5"],
        "quantize": ["quantize", str(MLP0), "-o", str(w / "q.safetensors"), "--method", "rtn"],
        "dequantize": ["dequantize", str(w / "packed.safetensors"), "-o", str(w / "deq.safetensors")],
        "export": ["export", str(MLP0), "-o", str(w / "m.onnx")],
        "fold": ["fold", str(w / "base"), str(w / "lora"), "-o", str(w / "folded")],
        "extract": ["extract", str(w / "base"), str(w / "tuned"), "-o", str(w / "lora2"), "--rank", "2"],
        "run": ["run", str(w / "recipe.yml"), "-o", str(w / "recipe-out")],
    }


def _option_names(name: str) -> set[str]:
    r = runner.invoke(app, [name, "--help"], terminal_width=200)
    assert r.exit_code == 0
    return set(re.findall(r"(--[a-z][a-z-]*|-[a-z])\b", r.output))


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_lists_the_shared_flags_without_a_value(name):
    r = runner.invoke(app, [name, "--help"], terminal_width=200)
    assert set(UNIVERSAL) | {"-q"} <= _option_names(name)
    for flag in UNIVERSAL:
        line = next(line for line in r.output.splitlines() if f" {flag} " in line)
        assert "<bool>" not in line, line


@pytest.mark.parametrize("name", [n for n in COMMANDS if n != "demo"])  # demo: its own test, minutes long
def test_every_command_runs_with_every_shared_option(work, name):
    args = invocations(work)[name]
    extra = [o for o in ("--max-shard-size", "--no-input-hash") if o in _option_names(name)]
    values = {"--max-shard-size": ["1GB"], "--no-input-hash": []}
    for round_ in range(2):  # the second run replaces the first output: --force
        r = runner.invoke(app, [*args, *UNIVERSAL, *[x for o in extra for x in [o, *values[o]]]])
        assert r.exit_code == 0, (round_, r.output)
        json.loads(r.stdout)  # --json: one object on stdout, --quiet: no progress text in it
    r = runner.invoke(app, [*args, "-q"])  # without --force an existing output is refused
    written = name not in ("inspect", "analyze", "run")  # run: a rerun is answered from its cache
    assert (r.exit_code == 1) == written, r.output
    if written:
        assert "--force" in r.output


def test_no_input_hash_recorded(work):
    r = runner.invoke(app, ["grow", str(MLP0), "-o", str(work / "nohash.safetensors"), "--method", "width",
                            "--no-input-hash", "-q"])
    assert r.exit_code == 0, r.output
    from safetensors import safe_open

    with safe_open(work / "nohash.safetensors", "pt") as f:
        record = json.loads(f.metadata()["modelsurgery"])
    assert record["sources"] == [] and record["parameters"]["inputs_unhashed"] == [str(MLP0)]
