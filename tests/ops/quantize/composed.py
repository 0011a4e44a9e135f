"""The quantizers' formulas written out as plain autograd compositions, for the tests that check the
one-node autograd Functions (``AdaRoundFakeQuant``, ``AdaRoundRegularizer``, ``FlexRoundFakeQuant``)
against them. They follow the papers' equations; the library keeps only the fused nodes."""

from __future__ import annotations

import torch

from modelsurgery.ops.quantize.adaround import AdaRoundQuantizer
from modelsurgery.ops.quantize.flexround import FlexRoundQuantizer
from modelsurgery.ops.quantize.grids import round_ste


def adaround_soft_codes(q: AdaRoundQuantizer) -> torch.Tensor:
    """clamp(floor(W / s) + h(V) + z, 0, qmax) (AdaRound eq. 22-23)."""
    return torch.clamp(q.floor + q.h() + q.zero, 0, q.scheme.qmax)


def adaround_regularizer(q: AdaRoundQuantizer, progress: float) -> torch.Tensor:
    """lambda * sum(1 - |2 h(V) - 1|^beta) (AdaRound eq. 24); zero during the warm-up."""
    beta = q.beta(progress)
    if beta is None:
        return q.w.new_zeros(())
    return q.settings["reg_weight"] * (1 - (2 * q.h() - 1).abs().pow(beta)).sum()


def flexround_soft_codes(q: FlexRoundQuantizer) -> torch.Tensor:
    """clamp(round_ste(W / (s1 S2 s3 [s4])) + z, 0, qmax) (FlexRound eq. 2-3)."""
    return torch.clamp(round_ste(q.w / q.divisor()) + q.zero, 0, q.scheme.qmax)
