"""LoKr (Kronecker-product updates, LyCORIS; the PHM layers of Compacter, Karimi Mahabadi et al. 2021,
are sums of such products): dW = (alpha / r) * (W1 kron W2) reshaped to the (out, in) weight, as
PEFT's ``peft/tuners/lokr/layer.py`` folds it. Each factor is stored whole (``lokr_w1``, ``lokr_w2``)
or as a low-rank product (``lokr_w1_a @ lokr_w1_b``, ``lokr_w2_a @ lokr_w2_b``); ``r`` and ``alpha``
per module from ``rank_pattern`` / ``alpha_pattern``, else the config's (PEFT defaults 8 and 8).
PEFT's LoKr wraps nn.Linear and convolutions only: Conv1D targets and the convolution-only CP form
(``lokr_t2``) are refused.
"""

from __future__ import annotations

import torch

from modelsurgery.ops.adapters.peft_format import pattern_value
from modelsurgery.ops.adapters.variants import Site, Variant, config_value, register_variant

PEFT_DEFAULT_R = 8  # LoKrConfig.r
PEFT_DEFAULT_ALPHA = 8  # LoKrConfig.alpha


def factor(site: Site, whole: str, a: str, b: str) -> torch.Tensor:
    if whole in site.parts:
        return site.parts[whole]
    site.require(a, b)
    return site.parts[a] @ site.parts[b]


def fold_weight(site: Site) -> torch.Tensor:
    if "lokr_t2" in site.parts or site.weight.dim() != 2:
        raise site.fail("only linear layers are supported (convolution LoKr is not)")
    if site.transposed:
        raise site.fail("LoKr is defined by PEFT for nn.Linear layers only, not fan-in-fan-out (Conv1D) weights")
    cfg = site.config
    r = float(pattern_value(cfg.get("rank_pattern"), site.module, config_value(cfg, "r", PEFT_DEFAULT_R)))
    alpha = float(pattern_value(cfg.get("alpha_pattern"), site.module, config_value(cfg, "alpha", PEFT_DEFAULT_ALPHA)))
    w1 = factor(site, "lokr_w1", "lokr_w1_a", "lokr_w1_b")
    w2 = factor(site, "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    delta = torch.kron(w1, w2) * (alpha / r)
    if delta.shape != site.weight.shape:
        raise site.fail(f"the update W1 kron W2 has shape {tuple(delta.shape)}, the base weight "
                        f"{tuple(site.weight.shape)}")
    return site.weight + delta


def factor_shape(shapes: dict, whole: str, a: str, b: str) -> tuple[int, int] | None:
    if whole in shapes:
        return tuple(shapes[whole][:2])
    if a in shapes and b in shapes:
        return shapes[a][0], shapes[b][-1]
    return None


def weight_shape(shapes: dict[str, tuple[int, ...]]) -> tuple[int | None, int | None]:
    """W1 kron W2 is (a1 a2, b1 b2)."""
    f1 = factor_shape(shapes, "lokr_w1", "lokr_w1_a", "lokr_w1_b")
    f2 = factor_shape(shapes, "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    if f1 is None or f2 is None or "lokr_t2" in shapes:
        return None, None
    return f1[0] * f2[0], f1[1] * f2[1]


PARAMETERS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

register_variant(Variant("LOKR", PARAMETERS, fold_weight, weight_shape, source="peft/tuners/lokr/layer.py"))
