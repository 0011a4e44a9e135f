"""flexround-signsgd: FlexRound's parametrisation trained as SignRound trains (each step moves a parameter by
lr * sign(gradient), lr = 2^(2 - bits) / sqrt(50 x steps) decayed linearly to 0). Checked against AutoRound's own
``SignSGD`` optimiser and its ``LinearLR(1 -> 0)`` schedule when ``auto-round`` is installed, else against the update
written out by hand."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from modelsurgery.ops.quantize import QuantScheme, method_by_name
from modelsurgery.ops.quantize.reconstruct import train_block

STEPS = 4


def _problem():
    g = torch.Generator().manual_seed(0)
    block = nn.Sequential(nn.Linear(12, 6, bias=False)).requires_grad_(False)
    block[0].weight.data = torch.randn(6, 12, generator=g)
    x = torch.randn(16, 12, generator=g)
    with torch.no_grad():
        y = block(x)
    return block, x, y


def _reference_optimizer(params, lr):
    try:
        from auto_round.algorithms.quantization.sign_round.sign_sgd import SignSGD
    except ImportError:
        return None
    return SignSGD(params, lr=lr, weight_decay=0)


def test_defaults_are_autorounds():
    method = method_by_name("flexround-signsgd")
    s = method.resolve()
    assert (s["steps"], s["batch_size"], s["lr"]) == (200, 8, 0.0)  # lr 0: signed_step
    assert (s["s1_step"], s["s3_step"], s["round_offset"]) == (1.0, 1.0, 0.0)  # ablation switches, off
    assert (method.optimizer, method.lr_schedule) == ("signsgd", "linear")
    # at 50 steps AutoRound's 1 / iters at 2 bits, halved per extra bit; at 200 steps half that (1 / sqrt(steps))
    assert [method.signed_step(b, 50) for b in (2, 3, 4)] == [0.02, 0.01, 0.005]
    assert [method.signed_step(b, 200) for b in (2, 3, 4)] == [0.01, 0.005, 0.0025]


def test_each_step_moves_every_parameter_by_lr_times_the_sign_of_its_gradient():
    method = method_by_name("flexround-signsgd")
    block, x, y = _problem()
    scheme = QuantScheme(3)
    settings = method.resolve({"steps": STEPS})  # the quantizers are built with the settings they train with
    ours = method(block[0].weight, scheme, settings=settings)
    train_block(block, {"0.weight": ours}, [x], [{}], [y], [None], settings,
                method.lr_schedule, False, torch.Generator().manual_seed(0), lambda *a: None,
                optimizer=method.optimizer)

    ref = method(block[0].weight, scheme, settings=settings)
    params = list(ref.parameters())
    lr = 0.5 / math.sqrt(50 * STEPS)  # 2^(2 - 3) / sqrt(50 x steps) at 3 bits
    opt = _reference_optimizer(params, lr)
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, STEPS) if opt is not None else None
    for step in range(STEPS):
        out = functional_call(block, {"0.weight": ref()}, (x,))
        loss = (out - y).pow(2).sum(-1).mean()  # BRECQ's lp_loss, the reconstruction loss
        grads = torch.autograd.grad(loss, params)
        if opt is None:  # by hand: lr_t = lr * (1 - t / steps)
            with torch.no_grad():
                for p, gr in zip(params, grads):
                    p.sub_(lr * (1 - step / STEPS) * torch.sign(gr))
        else:
            for p, gr in zip(params, grads):
                p.grad = gr
            opt.step()
            sched.step()
    moved = 0
    for (name, p), q in zip(ours.named_parameters(), params):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
        moved += int((p != 0).sum())  # every learned tensor starts at 0 (log S2, the s1 and s3 offsets)
    assert moved > 0  # the scales did move (the step is not a no-op)
    assert not torch.equal(ours.hard_codes(), method(block[0].weight, scheme).hard_codes())


def test_an_explicit_lr_is_used_as_given():
    method = method_by_name("flexround-signsgd")
    block, x, y = _problem()
    settings = method.resolve({"steps": 1, "lr": 0.125})
    q = method(block[0].weight, QuantScheme(3), settings=settings)
    before = q.log_s3.detach().clone()
    train_block(block, {"0.weight": q}, [x], [{}], [y], [None], settings,
                method.lr_schedule, False, torch.Generator().manual_seed(0), lambda *a: None,
                optimizer=method.optimizer)
    step = (q.log_s3.detach() - before).abs()
    assert torch.all((step == 0.125) | (step == 0))
    assert step.max() == pytest.approx(0.125)


def _one_step(settings, scheme=QuantScheme(3)):
    method = method_by_name("flexround-signsgd")
    block, x, y = _problem()
    q = method(block[0].weight, scheme, settings=settings)
    before = {n: getattr(q, n).detach().clone() for n in ("log_s1", "log_s2", "log_s3")}
    train_block(block, {"0.weight": q}, [x], [{}], [y], [None], method.resolve(settings), method.lr_schedule, False,
                torch.Generator().manual_seed(0), lambda *a: None, optimizer=method.optimizer)
    return q, {n: (getattr(q, n).detach() - b).abs() for n, b in before.items()}


@pytest.mark.parametrize("s1_step,s3_step", [(0.5, 1.0), (0.0, 2.0), (1.0, 0.0)])
def test_s1_and_s3_move_by_their_factor_times_the_step(s1_step, s3_step):
    _, moved = _one_step({"steps": 1, "lr": 0.125, "s1_step": s1_step, "s3_step": s3_step})
    for name, factor in (("log_s2", 1.0), ("log_s1", s1_step), ("log_s3", s3_step)):
        step = moved[name]
        assert torch.allclose(step[step > 0], torch.full_like(step[step > 0], 0.125 * factor)), name
        assert (step.max() > 0) == (factor > 0), name  # a factor 0 freezes the scale, others move


def test_the_rounding_offset_is_added_before_rounding_and_moves_by_its_own_step():
    w = torch.randn(6, 12, generator=torch.Generator().manual_seed(3))
    method = method_by_name("flexround-signsgd")
    scheme = QuantScheme(3)
    q = method(w, scheme, settings={"steps": 4, "round_offset": 1.0})
    assert method(w, scheme).v is None  # off by default: FlexRound's parameters only
    with torch.no_grad():
        q.v.copy_(torch.rand(q.v.shape, generator=torch.Generator().manual_seed(4)) - 0.5)
    div = (q.log_s1 + q.log_s2 + q.log_s3).exp()
    offset = q.v_factor * q.v
    # by hand: codes round(W / div + v) clamped to the 3-bit grid, times s1 (the fixed zero point 4)
    codes = torch.clamp(torch.round(q.w / div + offset) + 4, 0, 7)
    torch.testing.assert_close(q().detach(), ((codes - 4) * q.log_s1.exp()).reshape(6, 12))
    assert torch.equal(q.export().codes, codes.reshape(6, 12).to(torch.uint8))

    # one step moves the offset by round_offset / steps = 0.5 / 1, whatever the log-scales' lr (3 bits: 0.5 / sqrt(50))
    q, moved = _one_step({"steps": 1, "round_offset": 0.5})
    offset = (q.v_factor * q.v).detach().abs()
    assert torch.allclose(offset[offset > 0], torch.full_like(offset[offset > 0], 0.5)) and offset.max() > 0
    assert torch.allclose(moved["log_s2"].max(), torch.tensor(0.5 / math.sqrt(50)))  # 2^(2 - 3) / sqrt(50 x 1)


def test_batches_go_once_per_epoch_for_signsgd_and_at_random_for_flexround():
    """flexround-signsgd goes through the batches as AutoRound does (each once per epoch, reshuffled); FlexRound and
    AdaRound draw one at random every step, the draws of torch.randint itself."""
    from modelsurgery.ops.quantize.reconstruct import batch_indices

    assert method_by_name("flexround-signsgd").batch_order == "epochs"
    assert method_by_name("flexround").batch_order == method_by_name("adaround").batch_order == "random"
    order = list(batch_indices(5, 13, "epochs", torch.Generator().manual_seed(0)))
    assert sorted(order[:5]) == sorted(order[5:10]) == list(range(5)) and len(set(order[10:])) == 3
    epochs = list(batch_indices(5, 20, "epochs", torch.Generator().manual_seed(0)))
    assert len({tuple(epochs[i:i + 5]) for i in range(0, 20, 5)}) > 1  # reshuffled each epoch, not one cycle
    gen = torch.Generator().manual_seed(0)
    expected = [int(torch.randint(5, (1,), generator=gen)) for _ in range(13)]
    assert list(batch_indices(5, 13, "random", torch.Generator().manual_seed(0))) == expected
    with pytest.raises(ValueError, match="batch order 'cyclic'"):
        list(batch_indices(5, 1, "cyclic", torch.Generator()))
