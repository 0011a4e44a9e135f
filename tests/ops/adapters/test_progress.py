"""fold and extract report progress through the operations' callback: fold's folded tensors and the
writer's "write" task (every tensor of the output, read back with safetensors); extract's SVD per targeted
layer and its comparison of every other tensor (a full read of both models outside the targets)."""

from __future__ import annotations

import torch
from peft import LoraConfig

from modelsurgery.ops.adapters import FoldOptions, fold_adapters
from modelsurgery.ops.adapters.extract import ExtractOptions, extract_lora
from tests.hf_tiny import load_hf
from tests.ops.adapters.peft_helpers import build, make_adapter
from tests.progress_record import Recorder, tensors_in


def test_fold_reports_folded_tensors_and_writing(tmp_path):
    base = build("llama", tmp_path / "base")
    adapter = make_adapter(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), tmp_path / "adapter")
    rec = Recorder()
    report = fold_adapters(base, [adapter], tmp_path / "folded", FoldOptions(), rec)
    rec.finished("fold", 6)  # q_proj and v_proj in each of the 3 blocks
    assert report.tensors_updated == 6
    rec.finished("write", tensors_in(tmp_path / "folded"))
    assert tensors_in(tmp_path / "folded") == tensors_in(base)


def test_extract_reports_layers_and_the_comparison_of_the_rest(tmp_path):
    base = build("llama", tmp_path / "base")
    model = load_hf(base)
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight.add_(0.1)
        model.model.norm.weight.add_(0.1)  # outside the targets: a LoRA cannot carry it
    model.save_pretrained(tmp_path / "tuned")
    rec = Recorder()
    report = extract_lora(base, tmp_path / "tuned", tmp_path / "adapter", ExtractOptions(rank=2), rec)
    targets = len(report.layers) + len(report.unchanged)
    rec.finished("extract", targets)
    rec.finished("compare", tensors_in(base) - targets)
    assert report.other_changed == ["model.norm.weight"]
