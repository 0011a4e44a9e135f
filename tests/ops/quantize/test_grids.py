"""Quantizer math: grids by hand, clamping, granularity shapes, the clipping search, bad schemes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelsurgery.errors import SurgeryError
from modelsurgery.ops.quantize.grids import (
    QuantScheme,
    codes,
    fake_quantize,
    group_size_for,
    grouped,
    lp_error,
    minmax_grid,
    round_ste,
    search_grid,
)


def test_symmetric_grid_by_hand():
    w = torch.tensor([[-0.9, 0.5, 0.3, 1.0]])
    s = QuantScheme(bits=4, symmetric=True)
    grid = minmax_grid(w, s, 4)
    # absmax 1 spread over the 16 levels: scale 2/15, zero 8
    assert grid.scale.item() == pytest.approx(2 / 15)
    assert grid.zero.item() == 8
    q = codes(grouped(w, 4), grid, s).flatten().tolist()
    # w / scale = -6.75, 3.75, 2.25, 7.5 -> rounded -7, 4, 2, 8 (+ 8: 1, 12, 10, 16 clamped to 15)
    assert q == [1, 12, 10, 15]


def test_asymmetric_grid_by_hand():
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 3.0]])
    s = QuantScheme(bits=2, symmetric=False)
    grid = minmax_grid(w, s, 4)
    assert grid.scale.flatten().tolist() == [1.0, 1.0]  # ranges widened to contain 0: [0, 3]
    assert grid.zero.flatten().tolist() == [0.0, 0.0]
    assert torch.equal(fake_quantize(grouped(w, 4), grid, s).reshape(2, 4), w)

    neg = torch.tensor([[-2.0, -1.0, 0.0, 1.0]])
    g = minmax_grid(neg, s, 4)
    assert g.scale.item() == pytest.approx(1.0) and g.zero.item() == 2  # -2 -> code 0


def test_granularity_shapes_and_group_size():
    w = torch.randn(6, 8)
    for gran, gs, shape in (("tensor", None, (1, 1, 1)), ("channel", None, (6, 1, 1)), ("group", 4, (6, 2, 1))):
        s = QuantScheme(3, gran, gs)
        g = group_size_for(s, 8)
        assert minmax_grid(w, s, g).scale.shape == shape
    with pytest.raises(SurgeryError, match="'layer.weight'.*--group-size 3 does not divide.*8"):
        group_size_for(QuantScheme(4, "group", 3), 8, "layer.weight")


@pytest.mark.parametrize("bits", [1, 9, 0])
def test_bits_out_of_range(bits):
    with pytest.raises(SurgeryError, match=f"--bits {bits}"):
        QuantScheme(bits).validate()


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), symmetric=st.booleans(), gran=st.sampled_from(["tensor", "channel", "group"]),
       seed=st.integers(0, 10_000))
def test_codes_in_range_error_bounded_and_idempotent(bits, symmetric, gran, seed):
    torch.manual_seed(seed)
    w = torch.randn(5, 12) * torch.rand(5, 1) * 3
    s = QuantScheme(bits, gran, 4 if gran == "group" else None, symmetric)
    g = grouped(w, group_size_for(s, 12))
    grid = minmax_grid(w, s, group_size_for(s, 12))
    q = codes(g, grid, s)
    assert q.min() >= 0 and q.max() <= 2**bits - 1 and torch.equal(q, q.round())
    deq = fake_quantize(g, grid, s)
    # inside the representable range the error is at most half a step
    lo = (0 - grid.zero) * grid.scale
    hi = (2**bits - 1 - grid.zero) * grid.scale
    inside = (g >= lo) & (g <= hi)
    err = (deq - g).abs()
    assert torch.all(err[inside] <= (grid.scale / 2 + 1e-6).expand_as(g)[inside])
    # values beyond the range clamp to its ends
    assert torch.all(deq >= lo - 1e-6) and torch.all(deq <= hi + 1e-6)
    # quantizing a quantized weight on the same grid changes nothing
    assert torch.allclose(fake_quantize(deq, grid, s), deq, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(bits=st.integers(2, 6), symmetric=st.booleans(), seed=st.integers(0, 1000))
def test_clipping_search_never_worse_than_minmax(bits, symmetric, seed):
    torch.manual_seed(seed)
    w = torch.randn(4, 32)
    s = QuantScheme(bits, "channel", None, symmetric)
    g = grouped(w, 32)
    e_mm = lp_error(g, minmax_grid(w, s, 32), s, 2.4).sum(-1)
    e_search = lp_error(g, search_grid(w, s, 32), s, 2.4).sum(-1)
    assert torch.all(e_search <= e_mm + 1e-5)


def test_clipping_search_helps_heavy_tails():
    torch.manual_seed(0)
    w = torch.distributions.Laplace(0.0, 1.0).sample((4, 512))
    s = QuantScheme(3, "channel")
    g = grouped(w, 512)
    assert torch.all(lp_error(g, search_grid(w, s, 512), s, 2.4).sum(-1)
                     < 0.9 * lp_error(g, minmax_grid(w, s, 512), s, 2.4).sum(-1))


def test_round_ste_passes_gradient_straight_through():
    x = torch.tensor([0.2, 1.7, -2.4], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 2.0, -2.0]
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad.tolist() == [1.0, 2.0, 3.0]
