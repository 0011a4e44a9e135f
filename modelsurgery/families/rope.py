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

This file reads config.json into a ``Rope`` (no torch); the tables are computed in
``modules/rope.py`` from the sequence length through torch ops, so the length-dependent kinds
(``dynamic``, ``longrope``) keep their switch inside an exported ONNX graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

    # ----- tables (torch, in ``modules/rope.py``) -------------------------------------------------
    def static_frequencies(self):
        """Inverse frequencies [dim/2] and the cos/sin scale, for the kinds that do not depend on the
        sequence length."""
        from modelsurgery.families.modules.rope import static_frequencies

        return static_frequencies(self)

    def frequencies(self, seq_len):
        """Inverse frequencies [dim/2] for a sequence of ``seq_len`` tokens (a 1-element float tensor
        derived from the input's shape) and the cos/sin scale."""
        from modelsurgery.families.modules.rope import frequencies

        return frequencies(self, seq_len)

    def tables(self, input_ids, dtype):
        """cos and sin [1, 1, T, dim] for positions 0..T-1."""
        from modelsurgery.families.modules.rope import tables

        return tables(self, input_ids, dtype)


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
