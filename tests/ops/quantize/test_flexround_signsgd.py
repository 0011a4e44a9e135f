"""flexround-signsgd: FlexRound's parametrisation trained as SignRound trains (each step moves a parameter by
lr * sign(gradient), lr = 2^(2 - bits) / steps decayed linearly to 0). Checked against AutoRound's own ``SignSGD``
optimiser and its ``LinearLR(1 -> 0)`` schedule when ``auto-round`` is installed, else against the update
written out by hand."""

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
    assert (method.optimizer, method.lr_schedule) == ("signsgd", "linear")
    w = torch.randn(4, 8)
    # AutoRound's 1 / iters at 2 bits, halved per extra bit
    assert [method(w, QuantScheme(b)).signed_step(50) for b in (2, 3, 4)] == [0.02, 0.01, 0.005]


def test_each_step_moves_every_parameter_by_lr_times_the_sign_of_its_gradient():
    method = method_by_name("flexround-signsgd")
    block, x, y = _problem()
    scheme = QuantScheme(3)
    ours = method(block[0].weight, scheme)
    train_block(block, {"0.weight": ours}, [x], [{}], [y], [None], method.resolve({"steps": STEPS}),
                method.lr_schedule, False, torch.Generator().manual_seed(0), lambda *a: None,
                optimizer=method.optimizer)

    ref = method(block[0].weight, scheme)
    params = list(ref.parameters())
    lr = 0.5 / STEPS  # 2^(2 - 3) / steps at 3 bits
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
        moved += int((p != 0).sum()) if name != "log_s1" else 0
    assert moved > 0  # the scales did move (the step is not a no-op)
    assert not torch.equal(ours.hard_codes(), method(block[0].weight, scheme).hard_codes())


def test_an_explicit_lr_is_used_as_given():
    method = method_by_name("flexround-signsgd")
    block, x, y = _problem()
    q = method(block[0].weight, QuantScheme(3))
    before = q.log_s3.detach().clone()
    train_block(block, {"0.weight": q}, [x], [{}], [y], [None], method.resolve({"steps": 1, "lr": 0.125}),
                method.lr_schedule, False, torch.Generator().manual_seed(0), lambda *a: None,
                optimizer=method.optimizer)
    step = (q.log_s3.detach() - before).abs()
    assert torch.all((step == 0.125) | (step == 0))
    assert step.max() == pytest.approx(0.125)
