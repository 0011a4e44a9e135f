"""Quantized char-LLaMA fixtures for the deployment formats, and transformers' float reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.deploy import storable_scale
from modelsurgery.deploy.common import DeploySource
from modelsurgery.ops.quantize.grids import QuantScheme
from modelsurgery.ops.quantize.packing import PackedWeight

LLAMA = Path(__file__).resolve().parents[2] / "fixtures" / "charlm" / "llama"


def llama_linears(name: str) -> bool:
    return name.endswith("_proj.weight")


def rtn_source(fmt: str, scheme: QuantScheme, skip: tuple[str, ...] = ("down_proj",),
               folder: Path = LLAMA, select=llama_linears) -> DeploySource:
    """Round-to-nearest on the grid ``fmt`` stores (scale rounded as the format keeps it, then every
    weight rounded on that grid): the representation ``surgery quantize --format FMT`` produces.
    ``select(name)`` picks the weights (default: LLaMA's ``*_proj``), ``skip`` leaves some out."""
    ckpt = Checkpoint.open(folder)
    weights = []
    for name in ckpt.keys():  # noqa: SIM118
        if not select(name) or any(s in name for s in skip):
            continue
        w = ckpt.get(name).float()
        rows, length = w.shape
        group = scheme.group_size if scheme.granularity == "group" else length
        g = w.reshape(rows, -1, group)
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        if scheme.symmetric:
            scale = 2 * torch.maximum(-lo, hi) / scheme.qmax
            zero = torch.full_like(scale, 2 ** (scheme.bits - 1))
        else:
            scale = (hi - lo) / scheme.qmax
            zero = torch.round(-lo / scale).clamp(1 if fmt == "gptq" else 0, scheme.qmax)
        scale = storable_scale(fmt, scale.clamp(min=1e-8), zero, scheme)
        codes = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, scheme.qmax)
        weights.append(PackedWeight(name, (rows, length), scheme.bits, group if group != length else None,
                                    codes.reshape(rows, length).to(torch.uint8).numpy(), scale.numpy(),
                                    zero.to(torch.uint8).numpy()))
    return DeploySource(ckpt, weights, scheme, "rtn")


def reference_model(src: DeploySource):
    """transformers' own model for the folder holding our dequantized weights (the forward we compare with)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src.folder).eval()
    state = model.state_dict()
    for w in src.weights:
        state[w.name] = w.dequantize()
    model.load_state_dict(state)
    return model


@pytest.fixture(scope="module")
def token_ids() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).integers(2, 99, size=(2, 24)))
