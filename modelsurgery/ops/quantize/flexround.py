"""FlexRound (Lee et al., ICML 2023, eq. 2-3): W_q = s1 * round(W / (s1 * S2 * s3 [* s4])).

s1 is the grid size (per tensor, channel or group), S2 an element-wise scale of W's shape, s3 one
per output channel and, for convolutions, s4 one per input channel. All are positive and learned
in log space (initialised to S2 = s3 = s4 = 1 and s1 from the grid search); rounding passes its
gradient straight through. Division lets each weight's effective grid move in proportion to its
magnitude. As in the official code, the integer zero point of an asymmetric grid is fixed at
initialisation: q = clamp(round(W / div) + z, 0, 2^b - 1) and W_q = (q - z) * s1.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from modelsurgery.ops.quantize.base import WeightQuantizer, register
from modelsurgery.ops.quantize.grids import Grid, round_ste


@register
class FlexRoundQuantizer(WeightQuantizer):
    name = "flexround"
    learned = True
    default_grid = "search"

    def __init__(self, weight, scheme, transposed=False, grid=None, tensor_name="weight"):
        super().__init__(weight, scheme, transposed, grid, tensor_name)
        self.log_s1 = nn.Parameter(self.scale0.log().clone())
        self.log_s2 = nn.Parameter(torch.zeros_like(self.w))
        self.log_s3 = nn.Parameter(torch.zeros(self.rows, 1, 1))
        # per input channel, only for kernels with spatial dims (the paper's s4 for convolutions)
        self.kernel = math.prod(self.shape[2:]) if len(self.shape) > 2 and not transposed else 0
        self.log_s4 = nn.Parameter(torch.zeros(self.shape[1])) if self.kernel else None

    def grid(self) -> Grid:
        return Grid(self.log_s1.exp(), self.zero)

    def divisor(self) -> torch.Tensor:
        log_div = self.log_s1 + self.log_s2 + self.log_s3
        if self.log_s4 is not None:
            log_div = log_div + self.log_s4.repeat_interleave(self.kernel).reshape(1, *self.w.shape[1:])
        return log_div.exp()

    def soft_codes(self) -> torch.Tensor:
        return torch.clamp(round_ste(self.w / self.divisor()) + self.zero, 0, self.scheme.qmax)

    def hard_codes(self) -> torch.Tensor:
        return torch.clamp(torch.round(self.w / self.divisor()) + self.zero, 0, self.scheme.qmax)
