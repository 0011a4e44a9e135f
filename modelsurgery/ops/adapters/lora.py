"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", Eq. 3: W + (alpha/r) B A),
rsLoRA (Kalajdzievski 2023: scaling alpha / sqrt(r)) and DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed
Low-Rank Adaptation", Eq. 5: m * (W + dW) / ||W + dW||), as PEFT's ``peft/tuners/lora`` folds them:

- ``r`` and ``lora_alpha`` per module from ``rank_pattern`` / ``alpha_pattern`` (PEFT's
  ``get_pattern_key``), else the config's (PEFT defaults 8 and 8);
- the delta is ``B @ A * scaling`` as (out, in), transposed for fan-in-fan-out (Conv1D) layers;
  PEFT decides that by the layer type, not the flag, and so does this (the family says which
  weights are stored (in, out));
- DoRA's norm is taken per output unit (PEFT's ``get_weight_norm``: rows of the (out, in) weight);
- ``lora_bias``: the bias gains ``lora_B.bias * scaling``;
- embeddings (``lora_embedding_A`` (r, num), ``lora_embedding_B`` (dim, r)): delta ``(B A)^T * scaling``;
- VeLoRA (``velora_config``) and MonteCLoRA (``monteclora_config``) change training only; PEFT merges them
  as plain LoRA, and so does this (their extra tensors are not folded).
"""

from __future__ import annotations

import math

import torch

from modelsurgery.ops.adapters.peft_format import pattern_value
from modelsurgery.ops.adapters.variants import Site, Variant, config_value, register_variant

PEFT_DEFAULT_R = 8  # LoraConfig.r
PEFT_DEFAULT_ALPHA = 8  # LoraConfig.lora_alpha


def scaling(site: Site) -> tuple[int, float]:
    cfg = site.config
    r = int(pattern_value(cfg.get("rank_pattern"), site.module, config_value(cfg, "r", PEFT_DEFAULT_R)))
    alpha = float(pattern_value(cfg.get("alpha_pattern"), site.module,
                                config_value(cfg, "lora_alpha", PEFT_DEFAULT_ALPHA)))
    if r <= 0:
        raise site.fail(f"rank r={r} must be positive")
    return r, (alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r)


def check_rank(site: Site, name: str, tensor: torch.Tensor, dim: int, r: int) -> None:
    if tensor.shape[dim] != r:
        raise site.fail(f"adapter tensor '{site.module}.{name}' has shape {tuple(tensor.shape)}, "
                        f"but the config gives this module rank r={r}")


def fold_weight(site: Site) -> torch.Tensor:
    r, s = scaling(site)
    if "lora_embedding_A" in site.parts:
        site.require("lora_embedding_B")
        a, b = site.parts["lora_embedding_A"], site.parts["lora_embedding_B"]
        check_rank(site, "lora_embedding_A", a, 0, r)
        delta = (b @ a).t() * s
        if "lora_magnitude_vector" in site.parts:
            raise site.fail("DoRA on an embedding is not supported by fold (LoRA on embeddings is)")
        if delta.shape != site.weight.shape:
            raise site.fail(f"the update has shape {tuple(delta.shape)}, the base tensor {tuple(site.weight.shape)}")
        return site.weight + delta
    site.require("lora_A.weight", "lora_B.weight")
    a, b = site.parts["lora_A.weight"], site.parts["lora_B.weight"]
    if a.dim() != 2 or b.dim() != 2 or site.weight.dim() != 2:
        raise site.fail("only linear layers (2-D weights) are supported; convolution LoRA is not")
    check_rank(site, "lora_A.weight", a, 0, r)
    w = site.out_in()
    delta = (b @ a) * s
    if delta.shape != w.shape:
        raise site.fail(f"the update B @ A has shape {tuple(delta.shape)} (out, in), the base weight "
                        f"{tuple(w.shape)} (out, in)")
    merged = w + delta
    if "lora_magnitude_vector" in site.parts:
        m = site.parts["lora_magnitude_vector"].reshape(-1)
        if m.numel() != w.shape[0]:
            raise site.fail(f"DoRA magnitude has {m.numel()} entries, the layer {w.shape[0]} outputs")
        merged = (m / torch.linalg.norm(merged, dim=1))[:, None] * merged
    elif site.config.get("use_dora"):
        raise site.fail("use_dora is set but the adapter has no 'lora_magnitude_vector'")
    return site.stored(merged)


def fold_bias(site: Site, bias: torch.Tensor) -> torch.Tensor:
    extra = site.parts.get("lora_B.bias")
    if extra is None:
        return bias
    _, s = scaling(site)
    return bias + extra * s


def weight_shape(shapes: dict[str, tuple[int, ...]]) -> tuple[int | None, int | None]:
    if "lora_embedding_A" in shapes and "lora_embedding_B" in shapes:  # nn.Embedding: (num, dim)
        return shapes["lora_embedding_A"][-1], shapes["lora_embedding_B"][0]
    a, b = shapes.get("lora_A.weight"), shapes.get("lora_B.weight")
    return (b[0] if b else None), (a[1] if a and len(a) > 1 else None)


#: training-time state of LoRA variants whose merge is plain LoRA's (PEFT's VeloraLinearVariant and
#: MontecloraLinearVariant merge ``get_delta_weight``, B A times the scaling): read with the module, not folded
TRAINING_ONLY = ("lora_velora_embed", "lora_monteclora_sampler.expert_weights",
                 "lora_monteclora_sampler.expert_weights_prior", "lora_monteclora_sampler.gaussian_var_prior",
                 "lora_monteclora_sampler.std_prior")
PARAMETERS = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector", "lora_embedding_A",
              "lora_embedding_B", *TRAINING_ONLY)

register_variant(Variant("LORA", PARAMETERS, fold_weight, weight_shape, fold_bias,
                         source="peft/tuners/lora/layer.py, dora.py"))
