"""`surgery fold` and `surgery extract` through the CLI: --json reports, several adapters, the energy
rank, and each refusal the issue names (one line on stderr, exit 1, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig
from typer.testing import CliRunner

from modelsurgery.cli.app import app
from tests.hf_tiny import load_hf
from tests.ops.adapters.peft_helpers import build, make_adapter, outputs, peft_merged

runner = CliRunner()


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return build("llama", tmp_path_factory.mktemp("llama") / "base")


def refused(args: list[str], *expected: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]


def test_fold_two_adapters_json(llama, tmp_path):
    a1 = make_adapter(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), tmp_path / "a1", seed=1)
    a2 = make_adapter(llama, LoraConfig(r=2, target_modules=["down_proj"], use_dora=True), tmp_path / "a2", seed=2)
    result = runner.invoke(app, ["fold", str(llama), str(a1), "--adapter", str(a2), "-o", str(tmp_path / "out"),
                                 "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [a["peft_type"] for a in report["adapters"]] == ["LORA", "LORA"]
    assert report["tensors_updated"] == 9
    ours, reference = outputs(load_hf(tmp_path / "out")), outputs(peft_merged(llama, a1, a2))
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0)


def test_extract_energy_rank_json_and_table(llama, tmp_path):
    a = make_adapter(llama, LoraConfig(r=4, target_modules=["q_proj", "o_proj", "up_proj"]), tmp_path / "a")
    assert runner.invoke(app, ["fold", str(llama), str(a), "-o", str(tmp_path / "tuned")]).exit_code == 0
    result = runner.invoke(app, ["extract", str(llama), str(tmp_path / "tuned"), "-o", str(tmp_path / "x"),
                                 "--rank", "0.95", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["layers"]) == 9 and len(report["unchanged"]) == 12
    assert all(1 <= layer["rank"] <= 4 for layer in report["layers"])
    assert report["adapter_bytes"] == (tmp_path / "x" / "adapter_model.safetensors").stat().st_size - \
        _header_size(tmp_path / "x" / "adapter_model.safetensors")
    result = runner.invoke(app, ["extract", str(llama), str(tmp_path / "tuned"), "-o", str(tmp_path / "y"),
                                 "--rank", "4"])
    assert result.exit_code == 0 and "relative error" in result.stdout


def _header_size(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_fold_refuses_shape_mismatch(llama, tmp_path):
    wide = build("llama", tmp_path / "wide", intermediate_size=64)
    a = make_adapter(wide, LoraConfig(r=4, target_modules=["up_proj"]), tmp_path / "a")
    refused(["fold", str(llama), str(a), "-o", str(tmp_path / "out")], "'model.layers.0.mlp.up_proj.weight' is 56 x 32",
            "updates a 64 x 32")
    assert not (tmp_path / "out").exists()


def test_fold_refuses_unsupported_type(llama, tmp_path):
    a = make_adapter(llama, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
                     tmp_path / "ia3")
    refused(["fold", str(llama), str(a), "-o", str(tmp_path / "out")], "'IA3' is not supported",
            "BONE, LOKR, LORA, MISS")
    assert not (tmp_path / "out").exists()


def test_fold_refuses_adapter_for_a_missing_tensor(llama, tmp_path):
    gpt2 = build("gpt2", tmp_path / "gpt2")
    a = make_adapter(gpt2, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True), tmp_path / "a")
    refused(["fold", str(llama), str(a), "-o", str(tmp_path / "out")], "transformer.h.0.attn.c_attn.weight")
    assert not (tmp_path / "out").exists()


def test_extract_refuses_another_architecture(llama, tmp_path):
    gpt2 = build("gpt2", tmp_path / "gpt2")
    refused(["extract", str(llama), str(gpt2), "-o", str(tmp_path / "x")], "TUNED is a 'gpt2' model")
    refused(["extract", str(llama), str(llama), "-o", str(tmp_path / "x"), "--rank", "many"], "--rank 'many'")
    refused(["extract", str(llama), str(llama), "-o", str(tmp_path / "x")], "nothing to extract")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("use_qalora", True, "'use_qalora' is not supported"),
    ("init_lora_weights", "pissa_niter_4", "path_initial_model_for_weight_conversion"),
    # LoRA-GA subtracts its initial B A from the base weights (PEFT's lora_ga_init), as PiSSA does
    ("init_lora_weights", "lora_ga", "init_lora_weights='lora_ga' adapters are relative to a residual base"),
    ("kasa_config", {"beta": 1e-4}, "'kasa_config' is not supported"),
    ("arrow_config", {"top_k": 3}, "'arrow_config' is not supported"),
])
def test_fold_refuses_lora_options_it_cannot_fold(llama, tmp_path, field, value, expected):
    a = make_adapter(llama, LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "a")
    config = json.loads((a / "adapter_config.json").read_text())
    config[field] = value
    (a / "adapter_config.json").write_text(json.dumps(config))
    refused(["fold", str(llama), str(a), "-o", str(tmp_path / "out")], expected)
    assert not (tmp_path / "out").exists()


def test_demo_step(fixtures_dir, tmp_path):
    """The demo's adapter (written by our PEFT writer) merged by PEFT itself gives the demo's folded model."""
    from modelsurgery.cli.fold import demo_step

    summary = demo_step(fixtures_dir, tmp_path, quiet=True)
    assert summary["tensors_updated"] == 28 and summary["extracted_layers"] == 28
    assert summary["extract_max_relative_error"] < 1e-5 and summary["max_logit_change"] > 1e-3
    assert (tmp_path / "folded-llama" / "tokenizer.json").read_bytes() == \
        (fixtures_dir / "charlm" / "llama" / "tokenizer.json").read_bytes()
    base = fixtures_dir / "charlm" / "llama"
    ours = outputs(load_hf(tmp_path / "folded-llama"))
    reference = outputs(peft_merged(base, tmp_path / "demo-lora"))
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_extract_refuses_cuda_without_cuda(llama, tmp_path):
    refused(["extract", str(llama), str(llama), "-o", str(tmp_path / "x"), "--device", "cuda"],
            "--device cuda: CUDA is not available")


def test_fold_refuses_quantized_base(llama, tmp_path):
    """A checkpoint written by `surgery quantize` carries modelsurgery.quantization metadata."""
    from safetensors.torch import load_file, save_file

    quantized = tmp_path / "q"
    quantized.mkdir()
    save_file(load_file(llama / "model.safetensors"), quantized / "model.safetensors",
              metadata={"format": "pt", "modelsurgery.quantization": json.dumps({"format": "fake"})})
    a = make_adapter(llama, LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "a")
    refused(["fold", str(quantized), str(a), "-o", str(tmp_path / "out")], "quantized weights")
    assert not (tmp_path / "out").exists()


def test_extract_force_replaces_its_own_adapter(llama, tmp_path):
    a = make_adapter(llama, LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "a")
    assert runner.invoke(app, ["fold", str(llama), str(a), "-o", str(tmp_path / "tuned")]).exit_code == 0
    out = tmp_path / "x"
    args = ["extract", str(llama), str(tmp_path / "tuned"), "-o", str(out), "--json"]
    assert runner.invoke(app, [*args, "--rank", "2"]).exit_code == 0
    refused([*args, "--rank", "3"], "already exists")
    result = runner.invoke(app, [*args, "--rank", "3", "--force"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3
