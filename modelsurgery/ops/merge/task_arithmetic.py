"""Task arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic", Eq. 1):
theta = base + lambda * sum_i w_i (theta_i - base). mergekit's ``task_arithmetic`` is the
case lambda = 1 (its weights play the role of lambda)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from modelsurgery.ops.merge import Method, Param, register_method


def task_arithmetic(tensors: list[torch.Tensor], weights: list[float], base: torch.Tensor,
                    params: Mapping[str, Any]) -> torch.Tensor:
    scale = float(params["scale"])
    b = base.to(torch.float32)
    delta = torch.zeros_like(b)
    for t, w in zip(tensors, weights):  # in place: the base, the sum and one task vector at a time
        delta.add_(t.to(torch.float32, copy=True).sub_(b), alpha=w)
    return delta.mul_(scale).add_(b)


PARAMS = (
    Param("scale", float, 1.0, "lambda: scale of the summed task vectors",
          paper="Ilharco et al. 2023: lambda chosen on validation data in [0, 1]; mergekit: 1"),
)

register_method(Method("task-arithmetic", task_arithmetic, PARAMS, needs_base=True, paper="Ilharco et al. 2023"))
