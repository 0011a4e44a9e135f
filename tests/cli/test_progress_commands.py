"""Progress of grow, align, dequantize and recipe steps as a CI log sees it (stderr a pipe, not a terminal):
plain lines on stderr, ending at 100 % of the tensors the output holds (read back with safetensors); stdout
holds the result only; --json stdout is one JSON object (progress still on stderr); --quiet leaves stderr empty but for
errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modelsurgery.ops.quantize.operation import QuantizeOptions, quantize_checkpoint
from tests.hf_tiny import save_tiny_llama
from tests.progress_record import tensors_in

ROOT = Path(__file__).resolve().parents[2]
MLP = ROOT / "fixtures" / "digits" / "mlp_seed0.safetensors"
CODE = "import sys; from modelsurgery.cli.app import main; sys.argv = ['surgery', *sys.argv[1:]]; main()"
PROGRESS_LINE = re.compile(r"^[\w /.:-]+: \d+/\d+ \(\d+%\)")


def surgery(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CODE, *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)



@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    llama = save_tiny_llama(root / "llama")
    quantize_checkpoint(MLP, root / "packed.safetensors", QuantizeOptions(method="rtn", bits=4, format="packed"))
    g = torch.Generator().manual_seed(0)
    save_file({"0.weight": torch.randn(8, 4, generator=g), "0.bias": torch.randn(8, generator=g),
               "2.weight": torch.randn(6, 8, generator=g) * torch.tensor([1.0] * 4 + [3.0] * 2)[:, None],
               "2.bias": torch.randn(6, generator=g)}, root / "head.safetensors")
    return {"llama": llama, "packed": root / "packed.safetensors", "head": root / "head.safetensors"}


COMMANDS = {
    "grow": lambda i, out: ["grow", i["llama"], "-o", out, "--method", "stack", "--factor", "2"],
    "align": lambda i, out: ["align", i["head"], "-o", out, "--old-classes", "4"],
    "dequantize": lambda i, out: ["dequantize", i["packed"], "-o", out],
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_plain_lines_on_stderr_json_and_quiet(inputs, tmp_path, name):
    args = COMMANDS[name]
    r = surgery(*args(inputs, tmp_path / "plain"))
    assert r.returncode == 0, r.stderr
    n = tensors_in(tmp_path / "plain")
    lines = r.stderr.splitlines()
    assert f"write: {n}/{n} (100%)" in [x.split(",")[0] for x in lines], r.stderr
    assert all(PROGRESS_LINE.match(x) for x in lines), r.stderr  # nothing but progress lines there
    assert not any(PROGRESS_LINE.match(x) for x in r.stdout.splitlines()) and r.stdout.strip(), r.stdout

    r = surgery(*args(inputs, tmp_path / "json"), "--json")
    assert r.returncode == 0, r.stderr
    assert isinstance(json.loads(r.stdout), dict)  # progress stays on stderr, as the README says of --json
    assert f"write: {n}/{n} (100%)" in [x.split(",")[0] for x in r.stderr.splitlines()], r.stderr
    assert all(PROGRESS_LINE.match(x) for x in r.stderr.splitlines()), r.stderr

    r = surgery(*args(inputs, tmp_path / "quiet"), "-q")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert tensors_in(tmp_path / "quiet") == n

    r = surgery(*args(inputs, tmp_path / "quiet"), "-q")  # exists, no --force: the refusal still shows
    assert r.returncode == 1 and r.stderr.startswith("error:") and len(r.stderr.splitlines()) == 1, r.stderr


RECIPE = """
steps:
  - name: stacked
    run: grow
    inputs: [{llama}]
    options: {{method: stack, factor: 2}}
  - name: deeper
    run: grow
    inputs: [stacked]
    options: {{method: interleave, every: 3}}
"""


def test_recipe_steps_report_their_progress_with_a_step_counter(inputs, tmp_path):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(RECIPE.format(llama=inputs["llama"]))
    r = surgery("run", recipe, "-o", tmp_path / "build")
    assert r.returncode == 0, r.stderr
    first, second = tensors_in(tmp_path / "build" / "stacked"), tensors_in(tmp_path / "build" / "deeper")
    lines = [x.split(",")[0] for x in r.stderr.splitlines()]
    assert f"step 1/2 stacked: write: {first}/{first} (100%)" in lines, r.stderr
    assert f"step 2/2 deeper: write: {second}/{second} (100%)" in lines, r.stderr
    assert lines.index(f"step 1/2 stacked: write: {first}/{first} (100%)") < lines.index("recipe: 1/2 (50%)")
    assert "recipe: 2/2 (100%)" in lines
    assert all(PROGRESS_LINE.match(x) for x in r.stderr.splitlines()), r.stderr

    r = surgery("run", recipe, "-o", tmp_path / "quiet", "-q")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    r = surgery("run", recipe, "-o", tmp_path / "json", "--json")
    assert r.returncode == 0 and [s["status"] for s in json.loads(r.stdout)["steps"]] == ["ran", "ran"]
    assert "recipe: 2/2 (100%)" in [x.split(",")[0] for x in r.stderr.splitlines()], r.stderr  # on stderr
    assert all(PROGRESS_LINE.match(x) for x in r.stderr.splitlines()), r.stderr
