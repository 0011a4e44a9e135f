"""Linear (weighted) averaging of weights (Wortsman et al. 2022, "Model soups", Eq. 1);
after weight matching this is Git Re-Basin's merge (Ainsworth et al. 2023, Sec. 4).
As mergekit's ``linear``: sum_i w_i * theta_i, divided by sum_i w_i when ``normalize``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from modelsurgery.ops.merge import Method, Param, register_method


def linear(tensors: list[torch.Tensor], weights: list[float], base: torch.Tensor | None,
           params: Mapping[str, Any]) -> torch.Tensor:
    total = sum(weights) if params["normalize"] else 1.0
    if total == 0:
        total = 1.0  # as mergekit: nothing to normalise by
    out = torch.zeros_like(tensors[0], dtype=torch.float32)
    for t, w in zip(tensors, weights):
        out.add_(t.to(torch.float32), alpha=w / total)
    return out


PARAMS = (
    Param("normalize", bool, True, "divide by the sum of the weights", paper="mergekit linear: normalize=true"),
)

register_method(Method("linear", linear, PARAMS, paper="Wortsman et al. 2022"))
