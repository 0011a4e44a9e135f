"""Tolerances for two float32 evaluations of one function by different code paths (a permuted, widened or
mixed network against the original): their rounding differs with the summation order, which changes with
the CPU's vector width and thread count, so the bound scales with the values and the reductions compared."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

EPS32 = torch.finfo(torch.float32).eps


def widest_fan_in(state: Mapping[str, torch.Tensor]) -> int:
    """The most terms any one output of a layer sums: the largest row of a weight of two or more dims."""
    return max(t[0].numel() for t in state.values() if t.dim() >= 2)


def network_atol(reference: torch.Tensor, fan_in: int, ulps: float = 16) -> float:
    """A bound on |a - b| for two float32 forwards that agree in exact arithmetic: rounding in a sum of
    n terms grows like eps * sqrt(n) times its size, and ``ulps`` covers layers compounding and terms
    larger than their sum. A wrong weight, transpose or scale moves outputs by their own order, far more."""
    return ulps * EPS32 * math.sqrt(fan_in) * float(reference.abs().max())
