"""Spherical linear interpolation of two models, per tensor (Shoemake 1985; as in mergekit):
theta = sin((1-t)W)/sin(W) * a + sin(tW)/sin(W) * b, W the angle between the flattened tensors."""

from __future__ import annotations

import math

import torch

from modelsurgery.ops.merge import Method, register_method
from modelsurgery.ops.merge.linear import linear

COLINEAR = 1 - 1e-6


def slerp(tensors: list[torch.Tensor], weights: list[float], base=None, options=None) -> torch.Tensor:
    a, b = (x.to(torch.float32) for x in tensors)
    t = weights[1] / sum(weights)
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return linear(tensors, weights)
    cos = float((a.flatten() @ b.flatten()) / (na * nb))
    if abs(cos) > COLINEAR:  # nearly parallel: the formula is ill-conditioned and lerp is exact enough
        return linear(tensors, weights)
    omega = math.acos(max(-1.0, min(1.0, cos)))
    s = math.sin(omega)
    return a * (math.sin((1 - t) * omega) / s) + b * (math.sin(t * omega) / s)


register_method(Method("slerp", slerp, max_models=2, paper="Shoemake 1985"))
