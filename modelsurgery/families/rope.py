"""Rotary position embeddings (Su et al. 2021, RoFormer eq. 34) and the scalings that shipped checkpoints
use, with the frequency definitions of transformers' ``modeling_rope_utils``:

- ``linear``: position interpolation (Chen et al. 2023), every frequency divided by ``factor``;
- ``dynamic``: NTK-aware base growth once the sequence exceeds ``max_position_embeddings``;
- ``yarn``: YaRN (Peng et al. 2023, eqs. 17-23), a ramp between interpolated and extrapolated
  frequencies plus an attention temperature that scales cos and sin;
- ``longrope`` (Phi-3's early name ``su``): LongRoPE (Ding et al. 2024), per-frequency factors, short
  ones up to ``original_max_position_embeddings`` and long ones beyond, plus an attention factor;
- ``llama3``: LLaMA 3.1's band scaling (low frequencies divided by ``factor``, high ones kept, a smooth
  blend in between).

Tables are computed from the sequence length through torch ops, so the length-dependent kinds
(``dynamic``, ``longrope``) keep their switch inside an exported ONNX graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from modelsurgery.errors import SurgeryError

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
#: older names found in shipped config.json files
ROPE_ALIASES = {"su": "longrope"}


@dataclass(frozen=True)
class Rope:
    """One rotary embedding: ``kind`` (a ROPE_TYPES entry), base ``theta``, ``dim`` rotated dimensions of
    each head (partial rotary: fewer than head_dim), and the scaling parameters of its kind."""

    kind: str
    theta: float
    dim: int
    max_positions: int
    params: dict = field(default_factory=dict, compare=False)

    def describe(self) -> str:
        if self.kind == "default":
            return f"rope theta={self.theta:g}"
        factor = self.params.get("factor")
        return f"rope {self.kind}" + (f" x{factor:g}" if factor else "") + f" theta={self.theta:g}"

    # ----- frequencies --------------------------------------------------------------------------
    def _base_exponents(self) -> torch.Tensor:
        return torch.arange(0, self.dim, 2, dtype=torch.int64).to(torch.float32) / self.dim

    def static_frequencies(self) -> tuple[torch.Tensor, float]:
        """Inverse frequencies [dim/2] and the cos/sin scale, for the kinds that do not depend on the
        sequence length."""
        inv = 1.0 / (self.theta ** self._base_exponents())
        p = self.params
        if self.kind in ("default", "dynamic"):
            return inv, 1.0
        if self.kind == "linear":
            return inv / p["factor"], 1.0
        if self.kind == "llama3":
            return _llama3_band_scaling(inv, p), 1.0
        if self.kind == "yarn":
            return _yarn(self, p)
        raise AssertionError(self.kind)

    def frequencies(self, seq_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        """Inverse frequencies [dim/2] for a sequence of ``seq_len`` tokens (a 1-element float tensor
        derived from the input's shape) and the cos/sin scale."""
        p = self.params
        if self.kind == "dynamic":
            # the base grows with the length beyond max_position_embeddings, and equals theta below it
            length = torch.clamp(seq_len, min=float(self.max_positions))
            growth = (p["factor"] * length / self.max_positions) - (p["factor"] - 1)
            base = self.theta * growth ** (self.dim / (self.dim - 2))
            return 1.0 / (base ** self._base_exponents()), 1.0
        if self.kind == "longrope":
            original = p["original_max_position_embeddings"]
            exponents = self._base_exponents()
            short = 1.0 / (torch.tensor(p["short_factor"], dtype=torch.float32) * self.theta ** exponents)
            long = 1.0 / (torch.tensor(p["long_factor"], dtype=torch.float32) * self.theta ** exponents)
            return torch.where(seq_len > original, long, short), _longrope_attention_factor(self, p)
        return self.static_frequencies()

    def tables(self, input_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [1, 1, T, dim] for positions 0..T-1."""
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).to(torch.float32)
        inv, scale = self.frequencies(pos[-1:] + 1)
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


# ----- reading config.json ----------------------------------------------------------------------
_REQUIRED = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
             "longrope": ("short_factor", "long_factor"),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor")}


def rope_section(config: dict, layer_type: str | None = None) -> tuple[dict, str]:
    """The rope dict for ``layer_type`` (nested ``rope_parameters`` of Gemma 3) and its config key."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and params:
        nested = {k: v for k, v in params.items() if k.endswith("_attention")}
        if nested:
            key = layer_type if layer_type in nested else "full_attention"
            return dict(nested.get(key) or {}), f"rope_parameters.{key}"
        return dict(params), "rope_parameters"
    scaling = config.get("rope_scaling")
    if isinstance(scaling, dict) and scaling and layer_type != "sliding_attention":
        return dict(scaling), "rope_scaling"
    return {}, "rope_scaling"


def parse_rope(config: dict, head_dim: int, where: str, layer_type: str | None = None,
               default_theta: float = 10000.0) -> Rope:
    """The rotary embedding config.json asks for (transformers 5 ``rope_parameters`` or 4.x
    ``rope_scaling`` + top-level ``rope_theta``/``partial_rotary_factor``/``rotary_pct``); an unknown
    kind is refused naming the key and value."""
    section, key = rope_section(config, layer_type)
    type_key = "rope_type" if "rope_type" in section else "type"
    kind = section.get(type_key) or "default"
    kind = ROPE_ALIASES.get(kind, kind)
    if kind not in ROPE_TYPES:
        raise SurgeryError(f"{where}: config.json {key}.{type_key}='{section.get(type_key)}' is not supported "
                           f"(known: {', '.join(ROPE_TYPES)}, su)")
    missing = [k for k in _REQUIRED.get(kind, ()) if section.get(k) is None]
    if missing:
        raise SurgeryError(f"{where}: config.json {key} of type '{kind}' lacks '{missing[0]}'")
    theta = section.get("rope_theta")
    if theta is None:
        top = "rope_local_base_freq" if layer_type == "sliding_attention" else "rope_theta"
        theta = config.get(top) or config.get("rotary_emb_base") or default_theta
    fraction = section.get("partial_rotary_factor") or config.get("partial_rotary_factor") \
        or config.get("rotary_pct") or 1.0
    dim = int(head_dim * fraction)
    max_positions = int(config.get("max_position_embeddings") or 2048)
    params = dict(section)
    if kind in ("llama3", "yarn", "longrope"):
        # Phi-3 keeps the pretraining length at the top level, which then wins (as in transformers)
        original = config.get("original_max_position_embeddings") or section.get(
            "original_max_position_embeddings") or max_positions
        params["original_max_position_embeddings"] = int(original)
        if params.get("factor") is None:
            params["factor"] = max_positions / int(original)
    if dim % 2 or (dim <= 2 and kind == "dynamic"):
        raise SurgeryError(f"{where}: rotary dimension {dim} (head_dim {head_dim} x {fraction}) is not usable")
    return Rope(kind, float(theta), dim, max_positions, params)
