"""Task arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic", Eq. 1):
theta = base + lambda * sum_i w_i (theta_i - base)."""

from __future__ import annotations

import torch

from modelsurgery.ops.merge import Method, register_method


def task_arithmetic(tensors: list[torch.Tensor], weights: list[float], base: torch.Tensor, options=None
                    ) -> torch.Tensor:
    scale = getattr(options, "scale", 1.0)
    b = base.to(torch.float32)
    delta = torch.zeros_like(b)
    for t, w in zip(tensors, weights):
        delta.add_(t.to(torch.float32) - b, alpha=w)
    return b + scale * delta


register_method(Method("task-arithmetic", task_arithmetic, needs_base=True, paper="Ilharco et al. 2023"))
