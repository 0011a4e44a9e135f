"""Bugs a command-by-family audit found between the per-issue tests: each case runs the command through the
CLI on a tiny model written by transformers' save_pretrained and checks its output against an independent
reference (PEFT's merge_and_unload, transformers' own model)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from typer.testing import CliRunner

from modelsurgery.cli.app import app
from tests.hf_tiny import load_hf, save_tiny_gpt_neox
from tests.ops.adapters.peft_helpers import make_adapter, outputs, peft_merged

runner = CliRunner()


@pytest.fixture(scope="module")
def pythia(tmp_path_factory):
    return save_tiny_gpt_neox(tmp_path_factory.mktemp("neox") / "base")


@pytest.mark.parametrize("config", [
    # transformers 5 names GPT-NeoX's head module lm_head while its checkpoints keep 'embed_out.weight', so a
    # PEFT adapter on the head says 'lm_head' (and saves the embedding layers it touches under the same names)
    pytest.param(lambda: LoraConfig(r=4, target_modules=["lm_head", "query_key_value", "embed_in"]), id="lora-head"),
    pytest.param(lambda: LoraConfig(r=4, target_modules=["dense_h_to_4h"], modules_to_save=["lm_head"]),
                 id="modules_to_save-head"),
])
def test_gpt_neox_head_adapter_folds_as_peft_merges_it(pythia, tmp_path, config):
    adapter = make_adapter(pythia, config(), tmp_path / "adapter")
    result = runner.invoke(app, ["fold", str(pythia), str(adapter), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    ours, reference = outputs(load_hf(tmp_path / "out")), outputs(peft_merged(pythia, adapter))
    assert (reference - outputs(load_hf(pythia))).abs().max() > 1e-2  # the adapter changes the model
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0), (ours - reference).abs().max()
