"""Tiny models for the growth tests: transformers' own folders and small torch nets."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.families import detect_family
from tests.hf_tiny import save_tiny_bert, save_tiny_gpt2, save_tiny_llama

HF_MAKERS = {"gpt2": save_tiny_gpt2, "llama": save_tiny_llama, "bert": save_tiny_bert}


def hf_folder(tmp_path: Path, kind: str, **overrides) -> Path:
    """A tiny transformers folder with a tokenizer file to carry along; skips while its family is missing."""
    folder = HF_MAKERS[kind](tmp_path / f"src-{kind}", **overrides)
    (folder / "tokenizer.json").write_text('{"model": {"vocab": {}}}')
    fam = detect_family(Checkpoint.open(folder))
    if fam.name != kind:
        pytest.skip(f"the {kind} family is not in the registry yet")
    return folder


def weights(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.is_dir():
        out = {}
        for f in sorted(path.glob("*.safetensors")):
            out.update(load_file(f))
        return out
    return load_file(path)


def save_mlp(path: Path, sizes=(6, 10, 12, 3), seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, (a, b) in enumerate(pairwise(sizes)):
        state[f"{2 * i}.weight"] = torch.randn(b, a, generator=g)
        state[f"{2 * i}.bias"] = torch.randn(b, generator=g)
    save_file(state, path)
    return path


def save_flat_cnn(path: Path, seed: int = 0) -> Path:
    """conv(1->4) + BN + ReLU + conv(4->6) + ReLU + flatten + linear(6*8*8 -> 5): the flatten keeps spatial
    positions, so channel growth must move whole channel-major column groups of the linear."""
    g = torch.Generator().manual_seed(seed)
    state = {
        "0.weight": torch.randn(4, 1, 3, 3, generator=g), "0.bias": torch.randn(4, generator=g),
        "1.weight": torch.rand(4, generator=g) + 0.5, "1.bias": torch.randn(4, generator=g),
        "1.running_mean": torch.randn(4, generator=g), "1.running_var": torch.rand(4, generator=g) + 0.5,
        "1.num_batches_tracked": torch.tensor(100),
        "3.weight": torch.randn(6, 4, 3, 3, generator=g), "3.bias": torch.randn(6, generator=g),
        "6.weight": torch.randn(5, 6 * 64, generator=g) * 0.05, "6.bias": torch.randn(5, generator=g),
    }
    save_file(state, path, metadata={"modelsurgery.input_shape": "[1, 8, 8]"})
    return path


def run_family(path: Path, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    fam = detect_family(Checkpoint.open(path))
    with torch.no_grad():
        return fam.build_module()(**inputs)
