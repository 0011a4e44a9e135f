"""Linear (weighted) averaging of weights (Wortsman et al. 2022, "Model soups", Eq. 1);
after weight matching this is Git Re-Basin's merge (Ainsworth et al. 2023, Sec. 4)."""

from __future__ import annotations

import torch

from modelsurgery.ops.merge import Method, register_method


def linear(tensors: list[torch.Tensor], weights: list[float], base=None, options=None) -> torch.Tensor:
    """sum_i w_i * theta_i / sum_i w_i."""
    total = sum(weights)
    out = torch.zeros_like(tensors[0], dtype=torch.float32)
    for t, w in zip(tensors, weights):
        out.add_(t.to(torch.float32), alpha=w / total)
    return out


register_method(Method("linear", linear, paper="Wortsman et al. 2022"))
