"""Rotary tables for a ``Rope`` read from config.json (``families/rope.py``), with the frequency
definitions of transformers' ``modeling_rope_utils`` (see there for the kinds and their papers).

Tables are computed from the sequence length through torch ops, so the length-dependent kinds
(``dynamic``, ``longrope``) keep their switch inside an exported ONNX graph.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from modelsurgery.families.rope import Rope


def _base_exponents(rope: Rope) -> torch.Tensor:
    return torch.arange(0, rope.dim, 2, dtype=torch.int64).to(torch.float32) / rope.dim


def static_frequencies(rope: Rope) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin scale, for the kinds that do not depend on the
    sequence length."""
    inv = 1.0 / (rope.theta ** _base_exponents(rope))
    p = rope.params
    if rope.kind in ("default", "dynamic"):
        return inv, 1.0
    if rope.kind == "linear":
        return inv / p["factor"], 1.0
    if rope.kind == "llama3":
        return _llama3_band_scaling(inv, p), 1.0
    if rope.kind == "yarn":
        return _yarn(rope, p)
    raise AssertionError(rope.kind)


def frequencies(rope: Rope, seq_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
    """Inverse frequencies [dim/2] for a sequence of ``seq_len`` tokens (a 1-element float tensor
    derived from the input's shape) and the cos/sin scale."""
    p = rope.params
    if rope.kind == "dynamic":
        # the base grows with the length beyond max_position_embeddings, and equals theta below it
        length = torch.clamp(seq_len, min=float(rope.max_positions))
        growth = (p["factor"] * length / rope.max_positions) - (p["factor"] - 1)
        base = rope.theta * growth ** (rope.dim / (rope.dim - 2))
        return 1.0 / (base ** _base_exponents(rope)), 1.0
    if rope.kind == "longrope":
        original = p["original_max_position_embeddings"]
        exponents = _base_exponents(rope)
        short = 1.0 / (torch.tensor(p["short_factor"], dtype=torch.float32) * rope.theta ** exponents)
        long = 1.0 / (torch.tensor(p["long_factor"], dtype=torch.float32) * rope.theta ** exponents)
        return torch.where(seq_len > original, long, short), _longrope_attention_factor(rope, p)
    return static_frequencies(rope)


def tables(rope: Rope, input_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [1, 1, T, dim] for positions 0..T-1."""
    pos = torch.arange(input_ids.shape[1], device=input_ids.device).to(torch.float32)
    inv, scale = frequencies(rope, pos[-1:] + 1)
    freqs = pos.unsqueeze(-1) * inv.to(input_ids.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos() * scale, emb.sin() * scale
    return cos.to(dtype)[None, None], sin.to(dtype)[None, None]


def _llama3_band_scaling(inv: torch.Tensor, p: dict) -> torch.Tensor:
    """LLaMA 3.1: wavelengths longer than original/low_freq_factor are interpolated by ``factor``,
    shorter than original/high_freq_factor kept, and blended linearly in 1/wavelength between."""
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    original = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > original / low, inv / factor, inv)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    middle = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(middle, blended, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rope: Rope, p: dict) -> tuple[torch.Tensor, float]:
    """YaRN: dimensions rotating fewer than ``beta_slow`` times over the original context are
    interpolated, more than ``beta_fast`` times extrapolated, with a linear ramp between."""
    factor = p["factor"]
    attention = p.get("attention_factor")
    if attention is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention = _yarn_mscale(factor, p["mscale"]) / _yarn_mscale(factor, p["mscale_all_dim"])
        else:
            attention = _yarn_mscale(factor)
    fast, slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1
    original = p["original_max_position_embeddings"]

    def dim_for(rotations: float) -> float:  # the dimension that turns ``rotations`` times in ``original``
        return rope.dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = dim_for(fast), dim_for(slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rope.dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(rope.dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    powers = rope.theta ** (torch.arange(0, rope.dim, 2).to(torch.float32) / rope.dim)
    keep = 1 - ramp  # weight of the extrapolated (unscaled) frequency
    inv = (1.0 / (factor * powers)) * (1 - keep) + (1.0 / powers) * keep
    return inv, float(attention)


def _longrope_attention_factor(rope: Rope, p: dict) -> float:
    if p.get("attention_factor") is not None:
        return float(p["attention_factor"])
    factor = p["factor"]
    original = p["original_max_position_embeddings"]
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
