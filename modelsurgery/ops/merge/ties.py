"""TIES-merging (Yadav et al. 2023, "Resolving interference when merging models", Algorithm 1):
trim each task vector to its top-k magnitudes, elect a sign per entry by the summed trimmed
vectors, average only the entries that agree with it (disjoint mean), add to the base."""

from __future__ import annotations

import math

import torch

from modelsurgery.ops.merge import Method, register_method


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ceil(density * n) largest magnitudes (ties at the threshold kept), zero the rest."""
    k = math.ceil(density * delta.numel())
    if k >= delta.numel():
        return delta
    if k <= 0:
        return torch.zeros_like(delta)
    threshold = delta.abs().flatten().kthvalue(delta.numel() - k + 1).values
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def ties(tensors: list[torch.Tensor], weights: list[float], base: torch.Tensor, options=None) -> torch.Tensor:
    density = getattr(options, "density", 0.2)
    scale = getattr(options, "scale", 1.0)
    b = base.to(torch.float32)
    deltas = torch.stack([w * trim(t.to(torch.float32) - b, density) for t, w in zip(tensors, weights)])
    sign = torch.sign(deltas.sum(0))
    agree = (torch.sign(deltas) == sign) & (deltas != 0)
    w = torch.tensor(weights, dtype=torch.float32).view(-1, *[1] * b.ndim).expand_as(deltas)
    count = (agree * w).sum(0)
    merged = (deltas * agree).sum(0) / count.clamp_min(1e-12)
    return b + scale * torch.where(count > 0, merged, torch.zeros_like(merged))


register_method(Method("ties", ties, needs_base=True, paper="Yadav et al. 2023"))
