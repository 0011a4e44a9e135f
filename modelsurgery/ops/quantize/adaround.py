"""AdaRound (Nagel et al., ICML 2020, eq. 21-24): W_q = s * clamp(floor(W / s) + h(V) + z, 0, 2^b - 1),
h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1) a rectified sigmoid, with the regulariser
lambda * sum(1 - |2 h(V) - 1|^beta) pushing h to 0 or 1 while beta is annealed linearly from 20 to 2
after a warm-up without regulariser.

V starts where h(V) equals the fractional part of W / s (so training starts from the float
weight); after training h is made hard: up where V >= 0. The grid stays fixed.

Defaults (``params``) are AIMET's ``AdaroundParameters`` (10,000 iterations, reg_param 0.01,
beta_range (20, 2), warm_start 0.2), which are the paper's; BRECQ's ``block_reconstruction`` uses the
same regulariser weight, beta range and warm-up with 20,000 iterations. Both train V with Adam at its
default learning rate 1e-3 and no schedule, on batches of 32 (BRECQ).

The fake-quantized weight and the regulariser are each one autograd node (``AdaRoundFakeQuant``,
``AdaRoundRegularizer``) that saves only the tensors it was given and recomputes floor(W / s) and
h(V) in backward: the composed ops would keep several weight-sized intermediates per weight alive
until backward, and floor(W / s) is not stored.
"""

from __future__ import annotations

import torch
from torch import nn

from modelsurgery.ops.quantize.base import WeightQuantizer, register
from modelsurgery.ops.quantize.params import BATCH_SIZE, LR, STEPS, MethodParam

ZETA, GAMMA = 1.1, -0.1
AIMET = "AIMET AdaroundParameters default (the paper's value)"


def _stretched(v: torch.Tensor) -> torch.Tensor:
    """sigmoid(V) * (zeta - gamma) + gamma, the rectified sigmoid before its clip, in one fresh tensor."""
    return torch.sigmoid(v).mul_(ZETA - GAMMA).add_(GAMMA)


def _sigmoid_grad(grad: torch.Tensor, s: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``grad`` (dL/d h before the clip, already masked by it) carried back to V in place:
    times (zeta - gamma) and sigmoid's derivative (1 - s) * s; ``scratch`` is overwritten."""
    return grad.mul_(ZETA - GAMMA).mul_(torch.mul(s, -1, out=scratch).add_(1)).mul_(s)


class AdaRoundFakeQuant(torch.autograd.Function):
    """(q - z) * s with q = clamp(floor(W / s) + h(V) + z, 0, qmax) and h(V) = clamp(sigmoid(V) * (zeta - gamma)
    + gamma, 0, 1). W, s and z are constants (the grid is fixed); only V receives a gradient:
    dL/dV = g * s * [0 <= floor(W / s) + h + z <= qmax] * [0 <= sigmoid(V) * (zeta - gamma) + gamma <= 1]
    * (zeta - gamma) * sigmoid(V) * (1 - sigmoid(V)), both brackets inclusive as torch.clamp's backward.
    """

    @staticmethod
    def forward(ctx, w, v, scale0, zero, qmax):
        ctx.save_for_backward(w, v, scale0, zero)
        ctx.qmax = qmax
        h = _stretched(v).clamp_(0, 1)
        return torch.div(w, scale0).floor_().add_(h).add_(zero).clamp_(0, qmax).sub_(zero).mul_(scale0)

    @staticmethod
    def backward(ctx, g):
        w, v, scale0, zero = ctx.saved_tensors
        s = torch.sigmoid(v)
        a = s.mul(ZETA - GAMMA).add_(GAMMA)
        in_h = (a >= 0).logical_and_(a <= 1)
        c = torch.div(w, scale0).floor_().add_(a.clamp_(0, 1)).add_(zero)  # the codes before their clamp
        in_q = (c >= 0).logical_and_(c <= ctx.qmax)
        grad = torch.mul(g, scale0, out=a).mul_(in_q).mul_(in_h)  # dL/dh, reusing a
        del in_q, in_h
        return None, _sigmoid_grad(grad, s, c), None, None, None


class AdaRoundRegularizer(torch.autograd.Function):
    """weight * sum(1 - |2 h(V) - 1|^beta), saving only V. With x = 2h - 1:
    dR/dh = -2 * weight * beta * |x|^(beta - 1) * sign(x), then through the clip and the sigmoid as above."""

    @staticmethod
    def forward(ctx, v, beta, weight):
        ctx.save_for_backward(v)
        ctx.beta, ctx.weight = beta, weight
        x = _stretched(v).clamp_(0, 1).mul_(2).sub_(1)
        return weight * x.abs_().pow_(beta).neg_().add_(1).sum()

    @staticmethod
    def backward(ctx, g):
        (v,) = ctx.saved_tensors
        beta, weight = ctx.beta, ctx.weight
        s = torch.sigmoid(v)
        x = s.mul(ZETA - GAMMA).add_(GAMMA)
        in_h = (x >= 0).logical_and_(x <= 1)
        x.clamp_(0, 1).mul_(2).sub_(1)
        grad = x.sign().mul_(in_h)
        del in_h
        grad.mul_(x.abs_().pow_(beta - 1).mul_(beta)).mul_(g * weight * -2)
        return _sigmoid_grad(grad, s, x), None, None


@register
class AdaRoundQuantizer(WeightQuantizer):
    name = "adaround"
    learned = True
    default_grid = "search"
    lr_schedule = "constant"  # BRECQ and AIMET: Adam on V without a schedule
    params = (
        STEPS.with_default(10_000, AIMET + "; BRECQ: 20,000"),
        LR.with_default(1e-3, "Adam's default, used by AIMET and BRECQ"),
        BATCH_SIZE.with_default(32, "BRECQ block_reconstruction"),
        MethodParam("reg_weight", float, 0.01, "AdaRound: weight lambda of the rounding regulariser.", AIMET,
                    minimum=0.0),
        MethodParam("beta_start", float, 20.0, "AdaRound: regulariser exponent beta at the end of the warm-up.",
                    AIMET, minimum=0.0),
        MethodParam("beta_end", float, 2.0, "AdaRound: regulariser exponent beta at the last step.", AIMET,
                    minimum=0.0),
        MethodParam("warmup", float, 0.2, "AdaRound: fraction of the steps trained without the regulariser.",
                    AIMET, minimum=0.0, maximum=1.0),
    )

    def __init__(self, weight, scheme, transposed=False, grid=None, tensor_name="weight", settings=None):
        super().__init__(weight, scheme, transposed, grid, tensor_name, settings)
        scaled = self.w / self.scale0
        rest = (scaled - torch.floor(scaled)).clamp(0.01, 0.99)
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    @property
    def floor(self) -> torch.Tensor:
        """floor(W / s) on the fixed grid, recomputed (a fresh weight-sized tensor) rather than stored."""
        return torch.floor(self.w / self.scale0)

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def hard_codes(self) -> torch.Tensor:
        return torch.clamp(self.floor + (self.v >= 0).float() + self.zero, 0, self.scheme.qmax)

    def forward(self) -> torch.Tensor:
        return self.to_stored(AdaRoundFakeQuant.apply(self.w, self.v, self.scale0, self.zero, self.scheme.qmax))

    def beta(self, progress: float) -> float | None:
        """The annealed exponent at ``progress`` (0 to 1) of training; None during the warm-up."""
        warmup, start, end = self.settings["warmup"], self.settings["beta_start"], self.settings["beta_end"]
        if progress < warmup:
            return None
        t = (progress - warmup) / (1 - warmup)
        return end + (start - end) * (1 - t)

    def regularizer(self, progress: float) -> torch.Tensor:
        beta = self.beta(progress)
        if beta is None:
            return self.w.new_zeros(())
        return AdaRoundRegularizer.apply(self.v, beta, self.settings["reg_weight"])
