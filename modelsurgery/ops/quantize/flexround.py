"""FlexRound (Lee et al., ICML 2023, eq. 2-3): W_q = s1 * round(W / (s1 * S2 * s3 [* s4])).

s1 is the grid size (per tensor, channel or group), S2 an element-wise scale of W's shape, s3 one
per output channel and, for convolutions, s4 one per input channel. All are positive and learned
in log space (initialised to S2 = s3 = s4 = 1 and s1 from the grid search); rounding passes its
gradient straight through. Division lets each weight's effective grid move in proportion to its
magnitude. As in the official code, the integer zero point of an asymmetric grid is fixed at
initialisation: q = clamp(round(W / div) + z, 0, 2^b - 1) and W_q = (q - z) * s1.

Defaults (``params``): 5,000 iterations at learning rate 3e-3 with cosine decay to 0, as the
official FlexRound/LRQ code's LLaMA-2 scripts (``iters_w=5000``, ``w_lr=3e-3``, Adam with
``CosineAnnealingLR``); batches of 32 calibration samples as BRECQ, on which its image-model code
builds (the LLaMA scripts use 1 sequence a step).

The fake-quantized weight is one autograd node (``FlexRoundFakeQuant``) that saves nothing but the
tensors it was given and recomputes W / div in backward: the composed ops would keep four
weight-sized intermediates per weight alive until backward, which is most of a block's training
memory.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from modelsurgery.ops.quantize.base import WeightQuantizer, register
from modelsurgery.ops.quantize.grids import Grid, rows_per_chunk, stored_grid
from modelsurgery.ops.quantize.params import BATCH_SIZE, LR, STEPS

#: elements (whole rows) of a weight whose backward intermediates exist at a time: 1 MB of float32
BACKWARD_CHUNK_ELEMENTS = 1 << 18


def _scaled(w, log_s1, log_s2, log_s3, log_s4) -> torch.Tensor:
    """W / (s1 * S2 * s3 [* s4]) in one fresh weight-sized tensor."""
    t = log_s1 + log_s2
    t.add_(log_s3)
    if log_s4 is not None:
        t.add_(log_s4)
    return torch.div(w, t.exp_(), out=t)


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``t`` summed down to ``shape``, always a new tensor (sum_to_size returns ``t`` itself when
    the shapes agree, and a gradient must not share storage with another)."""
    return t.sum_to_size(shape) if t.shape != shape else t.clone()


class FlexRoundFakeQuant(torch.autograd.Function):
    """(q - z) * s with q = clamp(round(x) + z, 0, qmax), x = W / exp(log s1 + log S2 + log s3 [+ log s4]),
    where s is s1 as stored (``stored_s1``: s1 itself, or for a deployment format with fp16 scales
    the nearest scale it stores exactly, so that what is learned is what is written).

    Gradients (round is straight-through, clamp passes where round(x) + z lies in [0, qmax], and the
    storage rounding of s1 is straight-through too, ds/dlog s1 = s1): dL/dx = g * s * inside; every
    log-scale enters x as x = W * exp(-log_div), so its gradient is -dL/dx * x summed over the
    dimensions it is broadcast along; s1 also scales the output directly, adding g * (q - z) * s1.
    """

    @staticmethod
    def forward(ctx, w, log_s1, log_s2, log_s3, log_s4, zero, qmax, stored_s1):
        ctx.save_for_backward(w, log_s1, log_s2, log_s3, log_s4, zero, stored_s1)
        ctx.qmax = qmax
        x = _scaled(w, log_s1, log_s2, log_s3, log_s4)
        return x.round_().add_(zero).clamp_(0, qmax).sub_(zero).mul_(stored_s1)

    @staticmethod
    def backward(ctx, g):
        w, log_s1, log_s2, log_s3, log_s4, zero, s = ctx.saved_tensors
        s1 = log_s1.exp()
        rows = w.shape[0]
        # per channel or group the grids are per row, and every intermediate is elementwise or summed
        # within a row: a few rows at a time give the same gradients with weight-sized temporaries of
        # those rows only (a per-tensor grid's sum needs them all: one piece)
        step = rows_per_chunk(w[0].numel(), BACKWARD_CHUNK_ELEMENTS) if log_s1.shape[0] == rows else rows
        grad = torch.empty_like(log_s2, memory_format=torch.contiguous_format)  # becomes S2's gradient
        direct = torch.empty_like(log_s1, memory_format=torch.contiguous_format)
        for a in range(0, rows, step):
            n = min(step, rows - a)

            def part(t, a=a, n=n):
                return t if t is None or t.shape[0] != rows else t.narrow(0, a, n)

            x = _scaled(part(w), part(log_s1), part(log_s2), part(log_s3), log_s4)
            v = torch.round(x).add_(part(zero))
            inside = (v >= 0).logical_and_(v <= ctx.qmax)
            part(direct).copy_(_sum_to(v.clamp_(0, ctx.qmax).sub_(part(zero)).mul_(part(g)), part(log_s1).shape))
            # dL/d(log_div), reusing v
            part(grad).copy_(torch.mul(part(g), part(s), out=v).mul_(inside).mul_(x).neg_())
            del x, v, inside
        direct.mul_(s1)
        g_s1 = _sum_to(grad, log_s1.shape).add_(direct)
        g_s3 = _sum_to(grad, log_s3.shape)
        g_s4 = _sum_to(grad, log_s4.shape) if log_s4 is not None else None
        return None, g_s1, grad, g_s3, g_s4, None, None, None


@register
class FlexRoundQuantizer(WeightQuantizer):
    name = "flexround"
    learned = True
    default_grid = "search"
    lr_schedule = "cosine"
    params = (
        STEPS.with_default(5000, "FlexRound/LRQ reference scripts (iters_w)"),
        LR.with_default(3e-3, "FlexRound/LRQ reference scripts (w_lr), cosine decay to 0"),
        BATCH_SIZE.with_default(32, "BRECQ block_reconstruction"),
    )

    def __init__(self, weight, scheme, transposed=False, grid=None, tensor_name="weight", settings=None):
        super().__init__(weight, scheme, transposed, grid, tensor_name, settings)
        self.log_s1 = nn.Parameter(self.scale0.log().clone())
        self.log_s2 = nn.Parameter(torch.zeros_like(self.w))
        self.log_s3 = nn.Parameter(torch.zeros(self.rows, 1, 1))
        # per input channel, only for kernels with spatial dims (the paper's s4 for convolutions)
        self.kernel = math.prod(self.shape[2:]) if len(self.shape) > 2 and not transposed else 0
        self.log_s4 = nn.Parameter(torch.zeros(self.shape[1])) if self.kernel else None

    def grid(self) -> Grid:
        return Grid(self.log_s1.exp(), self.zero)

    def _log_s4(self) -> torch.Tensor | None:
        """s4 laid out along the grouped row [1, n_groups, G] (each input channel covers a kernel)."""
        if self.log_s4 is None:
            return None
        return self.log_s4.repeat_interleave(self.kernel).reshape(1, *self.w.shape[1:])

    def divisor(self) -> torch.Tensor:
        log_div = self.log_s1 + self.log_s2 + self.log_s3
        if self.log_s4 is not None:
            log_div = log_div + self._log_s4()
        return log_div.exp()

    def hard_codes(self) -> torch.Tensor:
        return torch.clamp(torch.round(self.w / self.divisor()) + self.zero, 0, self.scheme.qmax)

    @torch.no_grad()
    def stored_s1(self) -> torch.Tensor:
        """s1 as the output stores it (``export`` writes this grid): itself, or the nearest scale a
        deployment format with fp16 scales holds exactly."""
        return stored_grid(Grid(self.log_s1.exp(), self.zero), self.scheme).scale

    def forward(self) -> torch.Tensor:
        return self.to_stored(FlexRoundFakeQuant.apply(
            self.w, self.log_s1, self.log_s2, self.log_s3, self._log_s4(), self.zero, self.scheme.qmax,
            self.stored_s1()))
