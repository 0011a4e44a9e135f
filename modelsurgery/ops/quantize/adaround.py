"""AdaRound (Nagel et al., ICML 2020, eq. 21-24): W_q = s * clamp(floor(W / s) + h(V) + z, 0, 2^b - 1),
h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1) a rectified sigmoid, with the regulariser
sum(1 - |2 h(V) - 1|^beta) pushing h to 0 or 1 while beta is annealed from 20 to 2 after a warm-up.

V starts where h(V) equals the fractional part of W / s (so training starts from the float
weight); after training h is made hard: up where V >= 0. The grid stays fixed.
"""

from __future__ import annotations

import torch
from torch import nn

from modelsurgery.ops.quantize.base import WeightQuantizer, register

ZETA, GAMMA = 1.1, -0.1
REG_WEIGHT = 0.01
WARMUP = 0.2
BETA_START, BETA_END = 20.0, 2.0


@register
class AdaRoundQuantizer(WeightQuantizer):
    name = "adaround"
    learned = True
    default_grid = "search"

    def __init__(self, weight, scheme, transposed=False, grid=None, tensor_name="weight"):
        super().__init__(weight, scheme, transposed, grid, tensor_name)
        scaled = self.w / self.scale0
        self.register_buffer("floor", torch.floor(scaled))
        rest = (scaled - self.floor).clamp(0.01, 0.99)
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def soft_codes(self) -> torch.Tensor:
        return torch.clamp(self.floor + self.h() + self.zero, 0, self.scheme.qmax)

    def hard_codes(self) -> torch.Tensor:
        return torch.clamp(self.floor + (self.v >= 0).float() + self.zero, 0, self.scheme.qmax)

    def regularizer(self, progress: float) -> torch.Tensor:
        if progress < WARMUP:
            return self.w.new_zeros(())
        t = (progress - WARMUP) / (1 - WARMUP)
        beta = BETA_END + (BETA_START - BETA_END) * (1 - t)
        return REG_WEIGHT * (1 - (2 * self.h() - 1).abs().pow(beta)).sum()
