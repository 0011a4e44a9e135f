"""A bitsandbytes 8-bit checkpoint (int8 codes under the float names, row scales in '.SCB', as transformers'
Bnb8BitHfQuantizer serializes it) through every command that reads weights: one line naming the file and the
format, exit 1, nothing written. Before, quantize, fold, extract and `run` read the codes as float weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from modelsurgery.cli.app import app
from tests.hf_tiny import save_tiny_llama

runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bnb")
    float_model = save_tiny_llama(root / "float")
    bnb = save_tiny_llama(root / "bnb")
    state = load_file(bnb / "model.safetensors")
    for name in [n for n in state if n.endswith("proj.weight")]:
        scale = state[name].abs().amax(1)  # LLM.int8() row-wise absmax
        state[name] = torch.round(state[name] / scale[:, None] * 127).to(torch.int8)
        state[name.removesuffix("weight") + "SCB"] = scale
    save_file(state, str(bnb / "model.safetensors"), metadata={"format": "pt"})
    from peft import LoraConfig

    from tests.ops.adapters.peft_helpers import make_adapter

    adapter = make_adapter(float_model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]), root / "lora")
    return {"float": float_model, "bnb": bnb, "lora": adapter}


def commands(m, out, tmp_path):
    recipe = tmp_path / "merge.yml"
    recipe.write_text(f"models: [{{model: {m['bnb']}}}, {{model: {m['float']}}}]\nmerge_method: linear\n"
                      "parameters: {weight: 0.5}\n")
    return {
        "merge": ["merge", str(m["bnb"]), str(m["float"]), "-o", str(out), "--method", "linear"],
        "grow": ["grow", str(m["bnb"]), "-o", str(out)],
        "quantize": ["quantize", str(m["bnb"]), "-o", str(out), "--method", "rtn", "--bits", "4"],
        "fold": ["fold", str(m["bnb"]), str(m["lora"]), "-o", str(out)],
        "extract": ["extract", str(m["bnb"]), str(m["bnb"]), "-o", str(out), "--rank", "2"],
        "run": ["run", str(recipe), "-o", str(out)],
        "analyze": ["analyze", str(m["bnb"]), str(m["float"])],
    }


@pytest.mark.parametrize("command", ["merge", "grow", "quantize", "fold", "extract", "run", "analyze"])
def test_every_command_refuses_a_bitsandbytes_checkpoint(tmp_path, models, command):
    out = tmp_path / "out"
    r = runner.invoke(app, commands(models, out, tmp_path)[command])
    assert r.exit_code == 1, r.output
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.output
    assert str(models["bnb"]) in lines[0] and "bitsandbytes" in lines[0] and "SCB" in lines[0], lines[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["merge.yml"])
