"""TIES-merging (Yadav et al. 2023, "Resolving interference when merging models", Algorithm 1),
with mergekit's definitions (``ties``: magnitude sparsification, "sum" sign consensus, normalise):

1. trim: each task vector delta_i = theta_i - base keeps exactly int(density * n) entries of
   largest magnitude (mergekit's ``magnitude``), the rest set to 0;
2. elect: the sign of sum_i w_i * delta_i per entry, where a zero sum counts as + (mergekit:
   ``sum >= 0`` gives +1, so no entry is left without a sign);
3. disjoint mean: sum of the weighted deltas whose sign equals the elected one, divided by the sum
   of their weights (1 where none agrees); theta = base + lambda * that. With ``normalize`` false
   (mergekit's ``normalize: false``) the agreeing weighted deltas are summed, not averaged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from modelsurgery.ops.merge import Method, Param, register_method


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep exactly int(density * n) largest magnitudes (ties at the threshold broken by position), zero the rest."""
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    if k <= 0:
        return torch.zeros_like(delta)
    flat = delta.flatten()
    keep = torch.topk(flat.abs(), k, sorted=False).indices
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.view_as(delta)


def ties(tensors: list[torch.Tensor], weights: list[float], base: torch.Tensor,
         params: Mapping[str, Any]) -> torch.Tensor:
    # in place where a tensor is not needed again: the peak is the base, the weighted deltas and their
    # agreement (2n + 1 copies of the tensor in float32), not the dozen temporaries of the plain formula
    b = base.to(torch.float32)
    w = torch.tensor(weights, dtype=torch.float32).view(-1, *[1] * b.ndim)
    deltas = torch.empty((len(tensors), *b.shape), dtype=torch.float32)
    for i, t in enumerate(tensors):
        deltas[i] = trim(t.to(torch.float32, copy=True).sub_(b), float(params["density"]))
    deltas.mul_(w)
    elected = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(deltas).eq_(elected)  # 1 or 0; a trimmed (zero) entry has sign 0 and never agrees
    merged = deltas.mul_(agree).sum(0)
    del deltas, elected
    if params.get("normalize", True):
        divisor = agree.mul_(w).sum(0)
        merged.div_(divisor.masked_fill_(divisor == 0, 1.0))
    return merged.mul_(float(params["scale"])).add_(b)


PARAMS = (
    Param("density", float, 0.2, "fraction of each task vector kept (by magnitude)",
          paper="Yadav et al. 2023: top-k 20%", low=0.0, high=1.0),
    Param("scale", float, 1.0, "lambda: scale of the merged task vector",
          paper="Yadav et al. 2023: lambda = 1 without validation data; mergekit: 1"),
    Param("normalize", bool, True, "divide the agreeing deltas by their summed weights (disjoint mean)",
          paper="Yadav et al. 2023 Alg. 1: disjoint mean; mergekit ties: normalize true"),
)

register_method(Method("ties", ties, PARAMS, needs_base=True, paper="Yadav et al. 2023"))
