"""Quantizers: every learned scale receives gradient, exports lie on their grid, Conv1D rows are
output channels, and every method shares the same test matrix (a new method inherits it)."""

import dataclasses

import pytest
import torch

from modelsurgery.ops.quantize.adaround import AdaRoundQuantizer
from modelsurgery.ops.quantize.base import METHODS, method_by_name
from modelsurgery.ops.quantize.flexround import FlexRoundQuantizer
from modelsurgery.ops.quantize.grids import QuantScheme
from modelsurgery.ops.quantize.rtn import RTNQuantizer
from tests.ops.quantize.composed import flexround_soft_codes

method_by_name("rtn")  # registers every method
SCHEMES = [QuantScheme(4, "channel"), QuantScheme(3, "group", 4, False), QuantScheme(2, "tensor")]


@pytest.mark.parametrize("shape,transposed", [((6, 8), False), ((5, 4, 3, 3), False), ((8, 6), True)])
def test_flexround_gradients_reach_every_scale(shape, transposed):
    torch.manual_seed(0)
    w = torch.randn(shape)
    q = FlexRoundQuantizer(w, QuantScheme(3, "channel", None, False), transposed)
    expected = {"log_s1", "log_s2", "log_s3"} | ({"log_s4"} if len(shape) == 4 else set())
    assert {n for n, _ in q.named_parameters()} == expected
    target = torch.randn(shape)
    (q() - target).pow(2).sum().backward()
    for name, p in q.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("shape,transposed,scheme", [
    ((6, 8), False, QuantScheme(3, "channel", None, False)),
    ((5, 4, 3, 3), False, QuantScheme(4, "channel")),
    ((8, 6), True, QuantScheme(2, "tensor", None, False)),
    ((4, 12), False, QuantScheme(3, "group", 4, False)),
    ((4, 12), False, QuantScheme(4, "group", 1)),  # one weight per group: s1 has W's shape
    ((3, 1), False, QuantScheme(2, "channel", None, False)),  # one weight per row: s3 has W's shape
])
def test_flexround_fused_node_matches_the_composed_formula(shape, transposed, scheme):
    """The one-node fake quantizer gives the output and every gradient that autograd computes
    through the written-out formula clamp(round_ste(W / (s1 S2 s3 s4)) + z, 0, qmax) - z) * s1."""
    torch.manual_seed(1)
    w = torch.randn(shape)
    q = FlexRoundQuantizer(w, scheme, transposed)
    with torch.no_grad():  # move every scale off its initial value, some weights out of range
        for p in q.parameters():
            p.add_(0.3 * torch.randn_like(p))
    target = torch.randn(shape)
    (q() - target).pow(2).sum().backward()
    fused = {n: p.grad.clone() for n, p in q.named_parameters()}
    out = q().detach()
    q.zero_grad()
    composed = q.to_stored((flexround_soft_codes(q) - q.zero) * q.log_s1.exp())
    assert torch.allclose(out, composed.detach(), atol=1e-6)
    (composed - target).pow(2).sum().backward()
    for n, p in q.named_parameters():
        assert torch.allclose(fused[n], p.grad, rtol=1e-4, atol=1e-5), n
        assert fused[n].data_ptr() not in {o.data_ptr() for m, o in fused.items() if m != n}


def test_flexround_starts_as_rtn_on_its_grid():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    s = QuantScheme(4, "channel")
    # equal up to exp(log(s1)) rounding in float32
    assert torch.allclose(FlexRoundQuantizer(w, s, grid="search")(), RTNQuantizer(w, s, grid="search")(), atol=1e-5)


def test_flexround_division_moves_the_rounding():
    w = torch.tensor([[0.1, 0.3, -0.5, 1.0]])
    q = FlexRoundQuantizer(w, QuantScheme(2, "channel", symmetric=True), grid="minmax")
    scale = q.log_s1.exp().item()
    before = q.export().codes.tolist()
    with torch.no_grad():  # shrink the element-wise divisor of the first weight: it rounds up a step
        q.log_s2[0, 0, 0] = -2.0
    after = q.export()
    assert after.codes[0, 0] > before[0][0]
    assert after.codes[0, 1:].tolist() == before[0][1:]
    # s1 stays the grid: exported values are integers times s1
    steps = after.dequantized / scale
    assert torch.allclose(steps, steps.round(), atol=1e-5)


def test_adaround_soft_start_and_hard_end():
    torch.manual_seed(0)
    w = torch.randn(4, 8) * 0.5
    q = AdaRoundQuantizer(w, QuantScheme(4, "channel", symmetric=False), grid="minmax")
    # h(V) starts at the fractional part, so inside the grid's range the soft weight is the float
    # weight (within 1% of a step; the integer zero point clips up to half a step at the ends)
    steps = (q.w / q.scale0 + q.zero).reshape(4, 8)
    inside = (steps >= 0) & (steps <= 15)
    assert torch.allclose(q()[inside], w[inside], atol=0.011 * q.scale0.max().item())
    hard = q.export().codes.float().reshape(q.floor.shape)
    up = hard - q.floor - q.zero
    assert set(up.unique().tolist()) <= {0.0, 1.0}
    reg = q.regularizer(0.5)
    reg.backward()
    assert q.v.grad is not None and q.v.grad.abs().sum() > 0
    assert q.regularizer(0.1).item() == 0.0  # warm-up: no regulariser


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.bits}b-{s.granularity}")
def test_export_is_consistent(method, scheme):
    torch.manual_seed(1)
    w = torch.randn(6, 8)
    qw = METHODS[method](w, scheme).export()
    rows = 1 if scheme.granularity == "tensor" else 6
    groups = 2 if scheme.granularity == "group" else 1
    assert qw.scale.shape == (rows, groups) and qw.zero_point.shape == (rows, groups)
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= 2**scheme.bits - 1
    g = 8 // groups
    by_hand = (qw.codes.float().reshape(6, groups, g) - qw.zero_point.float()[..., None]) * qw.scale[..., None]
    assert torch.equal(qw.dequantized, by_hand.reshape(6, 8))
    if scheme.symmetric:
        assert torch.all(qw.zero_point == 2 ** (scheme.bits - 1))


def test_conv1d_rows_are_output_channels():
    # GPT-2 Conv1D stores (in, out): output channel j is column j; columns of very different size
    w = torch.randn(16, 3) * torch.tensor([1000.0, 1.0, 0.001])
    qw = RTNQuantizer(w, QuantScheme(4, "channel"), transposed=True).export()
    assert qw.scale.shape == (3, 1) and qw.codes.shape == (3, 16)
    rel = (qw.dequantized - w).abs().amax(0) / w.abs().amax(0)
    assert torch.all(rel < 0.1)  # the small column is not flattened to zero by the large one's grid


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("shape,transposed,scheme", [
    ((6, 8), False, QuantScheme(8, "channel", None, False)),
    ((8, 6), True, QuantScheme(4, "channel")),
    ((5, 4, 3, 3), False, QuantScheme(3, "group", 9, False)),
    ((6, 8), False, QuantScheme(2, "tensor")),
])
def test_codes_are_recovered_from_the_dequantized_weight(method, shape, transposed, scheme):
    """Reconstruction drops the stored codes once the model holds W_q; the codes recomputed from
    the float32 W_q must be the exported ones, bit for bit, whatever the scale's magnitude."""
    torch.manual_seed(2)
    for magnitude in (1e-4, 1.0, 300.0):
        w = torch.randn(shape) * magnitude
        qw = METHODS[method](w, scheme, transposed).export()
        assert qw.stored_codes is not None and qw.stored_dequantized is None  # the floats when asked
        held = dataclasses.replace(qw, stored_dequantized=qw.dequantized, stored_codes=None)
        assert torch.equal(held.codes, qw.stored_codes)
