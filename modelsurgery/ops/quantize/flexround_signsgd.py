"""FlexRound's parametrisation (Lee et al., ICML 2023, eq. 2-3) trained with SignRound's optimiser
(Cheng et al. 2023, "Optimize Weight Rounding via Signed Gradient Descent", the AutoRound method):
W_q = s1 * round(W / (s1 * S2 * s3 [* s4])), exactly as ``flexround``, but each step moves every
learned log-scale by lr * sign(dL/dparam) instead of an Adam step, with the learning rate decayed
linearly to 0 over the steps.

Why a separate method: FlexRound's published schedule (Adam at 3e-3, cosine, 5,000 iterations)
changes too little at a small step budget: at 50 steps per block its log-scales cannot move far
enough to flip the rounding of most weights at 2 bits. SignRound's recipe ties the step size to
the budget (lr = 1 / steps, linear decay, so the largest total move of a parameter is 0.5 whatever
the budget). On ``benchmarks/bench_quantize_peers.py`` (128 samples x 50 steps, batch 8) this
beats AutoRound at the same budget where ``flexround`` lost (char GPT-2 W2/W3; see the README).

Defaults (``params``): 200 steps and batches of 8 (AutoRound's ``iters=200``, ``batch_size=8``), the
learning rate decayed linearly to 0 as AutoRound's. Its initial value (lr 0 = this rule) is
2^(2 - bits) / sqrt(50 x steps). At 50 steps that is AutoRound's 1 / iters at 2 bits, halved per
extra bit, because a step of the log-scales moves a code by about lr times the code, and codes reach
2^(bits - 1); with more steps it shrinks as 1 / sqrt(steps) (``signed_step``), so a longer run can
move further where the gradient's sign agrees from step to step. Both scalings are ours, tuned on
``bench_quantize_peers.py`` (50 and 200 steps; README).
As AutoRound, it goes through the calibration batches once per epoch in a fresh random order
(``batch_order = "epochs"``; FlexRound and AdaRound draw a batch at random every step, as their
reference code). AutoRound keeps the iterate with the lowest batch loss; that rule did not help here
(README), so the last iterate is kept.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from modelsurgery.ops.quantize.base import register
from modelsurgery.ops.quantize.flexround import FlexRoundQuantizer
from modelsurgery.ops.quantize.params import BATCH_SIZE, LR, STEPS, MethodParam

#: the budget at which the initial signed step is 2^(2 - bits) / steps (``signed_step``): the step budget of the
#: bench_quantize_peers.py rows the rule was tuned on
REFERENCE_STEPS = 50

S1_STEP = MethodParam("s1_step", float, 1.0, "flexround-signsgd: the grid size s1's signed step relative to "
                      "S2's (0: s1 stays at its initial grid).", minimum=0.0)
S3_STEP = MethodParam("s3_step", float, 1.0, "flexround-signsgd: the per-output-channel s3's signed step relative "
                      "to S2's (0: s3 stays 1).", minimum=0.0)
ROUND_OFFSET = MethodParam("round_offset", float, 0.0, "flexround-signsgd: an additive rounding offset v "
                           "(round(W / div + v), SignRound's V) with signed step round_offset / steps; 0: none.",
                           minimum=0.0)


@register
class FlexRoundSignSGDQuantizer(FlexRoundQuantizer):
    name = "flexround-signsgd"
    lr_schedule = "linear"
    optimizer = "signsgd"
    batch_order = "epochs"  # AutoRound's: every sample once per epoch, reshuffled
    params = (
        STEPS.with_default(200, "AutoRound/SignRound default iters"),
        LR.with_default(0.0, "0 means 2^(2 - bits) / sqrt(50 x steps): at 50 steps AutoRound/SignRound's 1 / iters "
                        "at 2 bits, halved per extra bit, shrinking as 1 / sqrt(steps) beyond (tuned on "
                        "bench_quantize_peers.py rows); linear decay to 0"),
        BATCH_SIZE.with_default(8, "AutoRound/SignRound default batch_size"),
        S1_STEP.with_default(1.0, "this project's: s1 moves as S2"),
        S3_STEP.with_default(1.0, "this project's: s3 moves as S2"),
        ROUND_OFFSET.with_default(0.0, "this project's: no offset (FlexRound's parametrisation only)"),
    )

    def __init__(self, weight, scheme, transposed=False, grid=None, tensor_name="weight", settings=None):
        super().__init__(weight, scheme, transposed, grid, tensor_name, settings)
        # log s1 and log s3 become their initial value + factor * a learned offset: the signed step moves the
        # offset by lr, so the scale moves by factor * lr while S2 moves by lr (a factor 0 freezes it)
        self.factors = {"log_s1": self.settings["s1_step"], "log_s3": self.settings["s3_step"]}
        for name, factor in self.factors.items():
            start = self._parameters.pop(name).detach()
            self.register_buffer(f"{name}_start", start)
            self.register_parameter(f"{name}_offset", nn.Parameter(torch.zeros_like(start), requires_grad=factor > 0))
        self.v_factor = self.settings["round_offset"] / max(1, self.settings["steps"]) / self.initial_step()
        self.v = nn.Parameter(torch.zeros_like(self.w)) if self.v_factor else None

    def _moved(self, name: str) -> torch.Tensor:
        # read by FlexRoundQuantizer's grid, divisor and forward through the properties below; while its
        # __init__ registers the plain parameters, this raises AttributeError (``factors`` is not set yet)
        return getattr(self, f"{name}_start") + self.factors[name] * getattr(self, f"{name}_offset")

    log_s1 = property(lambda self: self._moved("log_s1"))
    log_s3 = property(lambda self: self._moved("log_s3"))

    def _offset_scaled(self) -> torch.Tensor:
        """W / div + v, what the offset form rounds."""
        return self.w / self.divisor() + self.v_factor * self.v

    def hard_codes(self) -> torch.Tensor:
        if self.v is None:
            return super().hard_codes()
        return torch.clamp(torch.round(self._offset_scaled()) + self.zero, 0, self.scheme.qmax)

    def forward(self) -> torch.Tensor:
        if self.v is None:
            return super().forward()
        # the offset's form written out (autograd through round's straight-through estimate): an ablation,
        # without FlexRoundFakeQuant's memory savings
        s1 = self.log_s1.exp()
        x = self._offset_scaled()
        q = torch.clamp(x + (torch.round(x) - x).detach() + self.zero, 0, self.scheme.qmax)
        return self.to_stored((q - self.zero) * (s1 + (self.stored_s1() - s1).detach()))

    @classmethod
    def signed_step(cls, bits: int, steps: int) -> float:
        """The initial step size when no lr is given: 2^(2 - bits) / sqrt(REFERENCE_STEPS x steps), which is
        2^(2 - bits) / steps at 50 steps. Beyond 50 it shrinks as 1 / sqrt(steps), not 1 / steps: a parameter
        whose gradient sign is noise moves as a random walk, about lr x sqrt(steps), and that is what stays
        fixed, while a parameter with a consistent sign can go further in a longer run."""
        return 2.0 ** (2 - bits) / math.sqrt(REFERENCE_STEPS * steps)
