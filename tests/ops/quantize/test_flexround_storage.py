"""FlexRound learns against the scale a deployment format stores (issue #15): for a format with fp16
scales the training forward is exactly the weight that is written, and the storage rounding of s1
passes its gradient straight through."""

import pytest
import torch

from modelsurgery.ops.quantize.flexround import FlexRoundQuantizer
from modelsurgery.ops.quantize.grids import QuantScheme
from tests.ops.quantize.composed import flexround_soft_codes


def _moved(scheme, shape=(6, 64), seed=0):
    torch.manual_seed(seed)
    q = FlexRoundQuantizer(torch.randn(shape), scheme)
    with torch.no_grad():  # a learned s1 is no longer an fp16 value
        for p in q.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return q


@pytest.mark.parametrize("storage,scheme", [
    ("gptq", QuantScheme(4, "group", 32, True, storage="gptq")),
    ("gptq", QuantScheme(3, "channel", None, False, storage="gptq")),
    ("gguf", QuantScheme(4, "group", 32, False, storage="gguf")),  # Q4_1: scale and -z*s both fp16
    ("gguf", QuantScheme(8, "group", 32, True, storage="gguf")),
])
def test_training_forward_is_the_written_weight(storage, scheme):
    q = _moved(scheme)
    assert not torch.equal(q.log_s1.exp().half().float(), q.log_s1.exp())
    out = q().detach()
    exported = q.export()
    assert torch.equal(out, exported.dequantized)
    # independent of the quantizer: the written scales are fp16 values, and each weight is (q - z) * s
    assert torch.equal(exported.scale.half().float(), exported.scale)
    g = exported.codes.float().reshape(6, -1, q.group) - exported.zero_point.float()[..., None]
    assert torch.equal((g * exported.scale[..., None]).reshape(6, -1), out)


def test_without_storage_the_learned_scale_is_used_as_is():
    q = _moved(QuantScheme(4, "group", 32, True))
    composed = q.to_stored((flexround_soft_codes(q) - q.zero) * q.log_s1.exp())
    assert torch.allclose(q().detach(), composed.detach(), atol=1e-6)
    assert torch.equal(q().detach(), q.export().dequantized)


def test_storage_rounding_is_straight_through():
    """Gradients equal autograd's through (soft codes - z) * (s1 + (stored(s1) - s1).detach())."""
    q = _moved(QuantScheme(4, "group", 32, True, storage="gptq"), seed=3)
    target = torch.randn(6, 64)
    out = q()
    (out - target).pow(2).sum().backward()
    fused = {n: p.grad.clone() for n, p in q.named_parameters()}
    q.zero_grad()
    s1 = q.log_s1.exp()
    stored = s1 + (s1.detach().half().float() - s1).detach()
    composed = q.to_stored((flexround_soft_codes(q) - q.zero) * stored)
    (composed - target).pow(2).sum().backward()
    # A log-scale's gradient sums per-weight terms (S2's gradient, the weight-shaped one, and for s1 the
    # direct g * (q - z) * s) that cancel: here 32 terms up to 24 sum to 0.05. Two float32 sums in orders
    # that depend on the CPU's vector width differ by ulps of the terms, not of the result (measured 7.6e-6,
    # one ulp of 64), so the bound is recursive summation's, n * eps * max|term| for each of the two sums.
    # A dropped scale or term moves a gradient by the order of the terms and still fails it.
    qw = q.export()
    g = 2 * (out.detach() - target).reshape(6, -1, q.group)
    direct = g * (qw.codes.float().reshape(g.shape) - qw.zero_point.float()[..., None]) * qw.scale[..., None]
    term = max(float(fused["log_s2"].abs().max()), float(q.log_s2.grad.abs().max()), float(direct.abs().max()))
    for n, p in q.named_parameters():
        summed = q.w.numel() // p.numel()  # weight elements summed into each element of this gradient
        atol = 2 * summed * torch.finfo(torch.float32).eps * term
        assert torch.allclose(fused[n], p.grad, rtol=1e-4, atol=atol), (n, float((fused[n] - p.grad).abs().max()), atol)
