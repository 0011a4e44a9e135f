"""Bugs a command-by-family audit found between the per-issue tests: each case runs the command through the
CLI on a tiny model written by transformers' save_pretrained and checks its output against an independent
reference (PEFT's merge_and_unload, transformers' own model)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig
from typer.testing import CliRunner

from modelsurgery.cli.app import app
from tests.hf_tiny import load_hf, save_tiny_gpt2, save_tiny_gpt_neox, save_tiny_llama3
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


def refusal(args: list[str], out) -> str:
    result = runner.invoke(app, [*map(str, args), "-o", str(out)])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert not out.exists()
    return lines[0]


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_gpt2_deploy_formats_refusal_names_conv1d_and_what_works(tmp_path, fmt):
    """Every block weight of GPT-2 is a Conv1D stored [in, out]: the refusal says so and names the formats that
    hold it; 'keep it float with --skip' would have left nothing to quantize."""
    src = save_tiny_gpt2(tmp_path / "gpt2")
    line = refusal(["quantize", src, "--method", "rtn", "--format", fmt], tmp_path / "q")
    assert "'transformer.h.0.attn.c_attn.weight' [32, 96] is stored [in, out] (a Conv1D layer" in line, line
    assert "--format packed or fake" in line and "--skip" not in line, line
    assert runner.invoke(app, ["quantize", str(src), "-o", str(tmp_path / "p"), "--method", "rtn",
                               "--format", "packed"]).exit_code == 0


@pytest.mark.parametrize("layer", [None, "lm_head"])
def test_align_on_a_tied_head_names_the_embedding_it_reads(tmp_path, layer):
    """A tied head (LLaMA 3.2, Qwen2.5, GPT-2) is no tensor of its own: align says which tensor it is."""
    src = save_tiny_llama3(tmp_path / "llama")
    line = refusal(["align", src, "--old-classes", "50", *(["--layer", layer] if layer else [])], tmp_path / "a")
    assert "tied to the input embedding 'model.embed_tokens.weight'" in line, line


def test_align_layer_lm_head_on_gpt_neox_is_its_embed_out(pythia, tmp_path):
    """--layer lm_head, transformers' name for GPT-NeoX's head, is the checkpoint's embed_out.weight."""
    result = runner.invoke(app, ["align", str(pythia), "--old-classes", "50", "--layer", "lm_head",
                                 "--no-clamp", "-o", str(tmp_path / "a"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["layer"] == "embed_out.weight"


@pytest.mark.parametrize("head", ["lm_head", "embed_out"])
def test_gpt_neox_head_extracted_as_peft_names_it(pythia, tmp_path, head):
    """An adapter extracted from a fine-tuned Pythia head loads in PEFT on transformers' model, whose head module
    is lm_head: written as 'embed_out' (the checkpoint's name) PEFT left the head's LoRA out without an error.
    --targets takes either spelling."""
    adapter = make_adapter(pythia, LoraConfig(r=4, target_modules=["lm_head", "query_key_value"]), tmp_path / "ft")
    tuned = tmp_path / "tuned"
    assert runner.invoke(app, ["fold", str(pythia), str(adapter), "-o", str(tuned)]).exit_code == 0
    result = runner.invoke(app, ["extract", str(pythia), str(tuned), "-o", str(tmp_path / "x"), "--rank", "4",
                                 "--targets", f"{head},query_key_value"])
    assert result.exit_code == 0, result.output
    ours, reference = outputs(peft_merged(pythia, tmp_path / "x")), outputs(load_hf(tuned))
    assert torch.allclose(ours, reference, atol=1e-4, rtol=0), (ours - reference).abs().max()


@pytest.mark.parametrize("spelling", ["lm_head", "embed_out"])
def test_gpt_neox_skip_names_the_head_in_either_spelling(pythia, tmp_path, spelling):
    """--skip lm_head (the head's name in the model transformers 5 loads, and in PEFT or llm-compressor configs)
    keeps GPT-NeoX's embed_out.weight float as --skip embed_out does; it used to match nothing and warn so. The
    output's head is compared with the input's as transformers loads both."""
    out = tmp_path / "q"
    result = runner.invoke(app, ["quantize", str(pythia), "-o", str(out), "--method", "rtn", "--bits", "4",
                                 "--no-default-skips", "--skip", spelling, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["skip_unmatched"] == []
    assert {"name": "embed_out.weight", "reason": f"--skip {spelling}"} in report["kept_float"]
    before, after = load_hf(pythia), load_hf(out)
    assert torch.equal(before.get_output_embeddings().weight, after.get_output_embeddings().weight)
    # the skip named the head only: the embedding, with the default skips off, was quantized
    assert not torch.equal(before.get_input_embeddings().weight, after.get_input_embeddings().weight)
