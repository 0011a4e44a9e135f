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
2^(2 - bits) / steps: AutoRound's 1 / iters at 2 bits, halved per extra bit, because a step of the
log-scales moves a code by about lr times the code, and codes reach 2^(bits - 1). That scaling is
ours, tuned on ``bench_quantize_peers.py`` (char GPT-2 W4/W3/W4 g32, MiniLM W4/W4 g128 at 50 steps;
README). AutoRound keeps the iterate with the lowest batch loss; that rule did not help here
(README), so the last iterate is kept.
"""

from __future__ import annotations

from modelsurgery.ops.quantize.base import register
from modelsurgery.ops.quantize.flexround import FlexRoundQuantizer
from modelsurgery.ops.quantize.params import BATCH_SIZE, LR, STEPS


@register
class FlexRoundSignSGDQuantizer(FlexRoundQuantizer):
    name = "flexround-signsgd"
    lr_schedule = "linear"
    optimizer = "signsgd"
    params = (
        STEPS.with_default(200, "AutoRound/SignRound default iters"),
        LR.with_default(0.0, "0 means 2^(2 - bits) / steps: AutoRound/SignRound's 1 / iters at 2 bits, halved per "
                        "extra bit (tuned on bench_quantize_peers.py rows); linear decay to 0"),
        BATCH_SIZE.with_default(8, "AutoRound/SignRound default batch_size"),
    )

    def signed_step(self, steps: int) -> float:
        """The initial step size when no lr is given: 2^(2 - bits) / steps."""
        return 2.0 ** (2 - self.scheme.bits) / steps
