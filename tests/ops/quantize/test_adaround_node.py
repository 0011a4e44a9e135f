"""AdaRound's one-node fake quantizer and regulariser: the same value and the same gradient of V as
autograd through the composed formulas, clipped ends included, and no weight-sized buffer but W."""

import pytest
import torch

from modelsurgery.ops.quantize.adaround import GAMMA, ZETA, AdaRoundQuantizer
from modelsurgery.ops.quantize.grids import QuantScheme, dequantize
from tests.ops.quantize.composed import adaround_regularizer, adaround_soft_codes

CASES = [
    pytest.param((6, 8), False, QuantScheme(3, "channel", None, False), id="2d-channel-asym-3b"),
    pytest.param((5, 4, 3, 3), False, QuantScheme(4, "channel"), id="conv-channel-sym-4b"),
    pytest.param((8, 6), True, QuantScheme(2, "tensor", None, False), id="transposed-tensor-asym-2b"),
    pytest.param((4, 12), False, QuantScheme(3, "group", 4, False), id="group4-asym-3b"),
]


def _perturbed(shape, transposed, scheme, seed=3) -> AdaRoundQuantizer:
    """A quantizer whose V has moved far enough that some h sit clipped at 0 and at 1 and some codes
    at 0 and at qmax, with the weight spread wide around its grid so that both code ends are hit."""
    torch.manual_seed(seed)
    w = torch.randn(shape)
    q = AdaRoundQuantizer(w, scheme, transposed, grid="minmax")
    with torch.no_grad():
        q.v.add_(3 * torch.randn_like(q.v))
        q.w.mul_(1.3)  # a few weights beyond the grid's range (the tensor is the test's own)
    a = torch.sigmoid(q.v) * (ZETA - GAMMA) + GAMMA
    assert (a < 0).any() and (a > 1).any() and ((a > 0) & (a < 1)).any()
    c = q.floor + q.h() + q.zero
    assert (c < 0).any() and (c > scheme.qmax).any()
    return q


def _composed_weight(q: AdaRoundQuantizer) -> torch.Tensor:
    return q.to_stored(dequantize(adaround_soft_codes(q), q.grid()))


def _v_grad(q: AdaRoundQuantizer, loss_of) -> torch.Tensor:
    q.zero_grad(set_to_none=True)
    loss_of(q).backward()
    return q.v.grad.clone()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape,transposed,scheme", CASES)
def test_fused_weight_matches_the_composed_formula(shape, transposed, scheme):
    q = _perturbed(shape, transposed, scheme)
    fused = q()
    assert fused.shape == shape
    assert torch.equal(fused.detach(), _composed_weight(q).detach())


@pytest.mark.parametrize("shape,transposed,scheme", CASES)
def test_fused_weight_gradient_matches_autograd(shape, transposed, scheme):
    q = _perturbed(shape, transposed, scheme)
    target = torch.randn(shape)
    fused = _v_grad(q, lambda m: (m() - target).pow(2).sum())
    composed = _v_grad(q, lambda m: (_composed_weight(m) - target).pow(2).sum())
    assert (composed == 0).any() and (composed != 0).any()  # clipped and unclipped entries both present
    assert _close(fused, composed)
    assert torch.equal(fused == 0, composed == 0)


@pytest.mark.parametrize("progress", [0.5, 0.9])
@pytest.mark.parametrize("shape,transposed,scheme", CASES)
def test_fused_regularizer_matches_autograd(shape, transposed, scheme, progress):
    q = _perturbed(shape, transposed, scheme)
    assert torch.allclose(q.regularizer(progress), adaround_regularizer(q, progress), rtol=1e-6, atol=0)
    fused = _v_grad(q, lambda m: m.regularizer(progress))
    composed = _v_grad(q, lambda m: adaround_regularizer(m, progress))
    assert (composed != 0).any()
    assert _close(fused, composed)
    assert torch.equal(fused == 0, composed == 0)


@pytest.mark.parametrize("shape,transposed,scheme", CASES)
def test_weight_and_regularizer_gradients_add_up(shape, transposed, scheme):
    """One training step's loss (weight term plus regulariser) through both nodes at once."""
    q = _perturbed(shape, transposed, scheme)
    target = torch.randn(shape)
    fused = _v_grad(q, lambda m: (m() - target).pow(2).sum() + m.regularizer(0.7))
    composed = _v_grad(q, lambda m: (_composed_weight(m) - target).pow(2).sum() + adaround_regularizer(m, 0.7))
    assert _close(fused, composed)


def test_boundaries_follow_clamp_backward():
    """h's pre-clip value exactly 0 or 1 and codes exactly 0 or qmax pass the gradient (torch.clamp's
    backward is inclusive at both ends); codes beyond them do not."""
    q = AdaRoundQuantizer(torch.zeros(1, 8), QuantScheme(2, "tensor", None, False), grid="minmax")
    v0, v1 = torch.logit(torch.tensor([-GAMMA, 1 - GAMMA], dtype=torch.float64) / (ZETA - GAMMA)).float()
    with torch.no_grad():  # a unit grid, so that floor(W / s) is W
        q.scale0.fill_(1.0)
        q.zero.fill_(0.0)
        q.w.copy_(torch.tensor([0.0, 0.0, 2.0, 2.0, 1.0, 3.0, -1.0, 3.0]).reshape(q.w.shape))
        q.v.copy_(torch.stack([v0, v1, v1, v0, torch.tensor(0.0), v0, v0, v1]).reshape(q.v.shape))
    a = (torch.sigmoid(q.v) * (ZETA - GAMMA) + GAMMA).flatten()
    assert a.tolist() == [0.0, 1.0, 1.0, 0.0, 0.5, 0.0, 0.0, 1.0]  # h's clip input exactly on its ends
    c = (q.floor + q.h() + q.zero).flatten()
    assert c.tolist() == [0.0, 1.0, 3.0, 2.0, 1.5, 3.0, -1.0, 4.0]  # codes on 0 and qmax = 3, two beyond
    target = torch.full((1, 8), -0.5)
    fused = _v_grad(q, lambda m: (m() - target).pow(2).sum())
    composed = _v_grad(q, lambda m: (_composed_weight(m) - target).pow(2).sum())
    assert (composed.flatten() != 0).tolist() == [True] * 6 + [False] * 2
    assert _close(fused, composed) and torch.equal(fused == 0, composed == 0)
    for progress in (0.3, 0.95):
        fused = _v_grad(q, lambda m, p=progress: m.regularizer(p))
        composed = _v_grad(q, lambda m, p=progress: adaround_regularizer(m, p))
        assert _close(fused, composed) and torch.equal(fused == 0, composed == 0)


def test_warmup_regularizer_is_a_zero_scalar():
    q = _perturbed((6, 8), False, QuantScheme(3, "channel", None, False))
    for progress in (0.0, q.settings["warmup"] / 2):
        reg = q.regularizer(progress)
        assert reg.shape == () and reg.item() == 0.0 and not reg.requires_grad
        assert adaround_regularizer(q, progress).item() == 0.0


@pytest.mark.parametrize("shape,transposed,scheme", CASES)
def test_no_weight_sized_buffer_but_w(shape, transposed, scheme):
    q = AdaRoundQuantizer(torch.randn(shape), scheme, transposed)
    assert {n for n, _ in q.named_buffers()} == {"w", "scale0", "zero"}
    assert {n for n, _ in q.named_parameters()} == {"v"}
    assert q.scale0.numel() < q.w.numel() and q.zero.numel() < q.w.numel()


def test_nodes_save_only_their_inputs():
    """The autograd graph of one step holds the inputs (W, V, s, z) and nothing weight-sized besides."""
    q = _perturbed((6, 8), False, QuantScheme(3, "channel", None, False))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        q()
        q.regularizer(0.5)
    owned = {q.w.data_ptr(), q.v.data_ptr(), q.scale0.data_ptr(), q.zero.data_ptr()}
    assert saved and all(t.data_ptr() in owned for t in saved)


def test_hard_codes_and_export_are_unchanged():
    """floor(W / s) recomputed gives the codes the stored buffer gave: floor + [V >= 0] + z, clipped."""
    torch.manual_seed(5)
    w = torch.randn(6, 8)
    scheme = QuantScheme(3, "channel", None, False)
    q = AdaRoundQuantizer(w, scheme, grid="minmax")
    floor = torch.floor(q.w / q.scale0)
    with torch.no_grad():
        q.v.add_(torch.randn_like(q.v))
    expected = torch.clamp(floor + (q.v >= 0).float() + q.zero, 0, scheme.qmax)
    assert torch.equal(q.hard_codes(), expected)
    qw = q.export()
    assert torch.equal(qw.codes.float(), expected.reshape(6, 8))
    assert torch.equal(qw.dequantized, ((expected - q.zero) * q.scale0).reshape(6, 8))
