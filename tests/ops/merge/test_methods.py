"""Every classic merge method against hand computations of mergekit's documented definitions
(mergekit/merge_methods: linear, slerp, task_arithmetic, ties = magnitude sparsification +
"sum" sign consensus + normalise). The expected values are worked out in the comments."""

import math

import pytest
import torch

from modelsurgery.errors import SurgeryError
from modelsurgery.ops.merge import all_methods, get_method
from modelsurgery.ops.merge.ties import trim


def t(*v):
    return torch.tensor(v, dtype=torch.float32)


def run(name, tensors, weights, base=None, **params):
    method = get_method(name)
    return method.fn(tensors, weights, base, method.resolve(params))


def test_linear_weighted_and_normalised():
    torch.testing.assert_close(run("linear", [t(1, 2), t(3, 6)], [1.0, 3.0]), t(2.5, 5.0))  # (1+9)/4, (2+18)/4
    # mergekit's normalize: false is the plain weighted sum
    torch.testing.assert_close(run("linear", [t(1, 2), t(3, 6)], [1.0, 3.0], normalize=False), t(10, 20))


def test_slerp_quarter_circle():
    a, b = t(1, 0), t(0, 1)
    torch.testing.assert_close(run("slerp", [a, b], [0.5, 0.5]), t(math.sqrt(0.5), math.sqrt(0.5)))
    out = run("slerp", [a, b], [0.5, 0.5], t=1 / 3)  # 30 degrees from a
    torch.testing.assert_close(out, t(math.cos(math.pi / 6), math.sin(math.pi / 6)))


def test_slerp_keeps_the_norms_as_mergekit():
    # mergekit interpolates the un-normalised tensors with the angle's coefficients:
    # a = (2, 0), b = (0, 1), W = pi/2, t = 1/2: sin(pi/4) * a + sin(pi/4) * b
    s = math.sin(math.pi / 4)
    torch.testing.assert_close(run("slerp", [t(2, 0), t(0, 1)], [0.5, 0.5]), t(2 * s, s))


def test_slerp_colinear_threshold_is_mergekits():
    a = t(1, 0)
    # cos W = 0.9997 > 0.9995: lerp, (1-t) a + t b
    b = t(0.9997, math.sqrt(1 - 0.9997 ** 2))
    torch.testing.assert_close(run("slerp", [a, b], [0.5, 0.5], t=0.3), 0.7 * a + 0.3 * b)
    # cos W = 0.999 < 0.9995: the spherical formula (a plain lerp would differ in the 4th digit)
    b = t(0.999, math.sqrt(1 - 0.999 ** 2))
    w = math.acos(0.999)
    want = a * math.sin(0.7 * w) / math.sin(w) + b * math.sin(0.3 * w) / math.sin(w)
    torch.testing.assert_close(run("slerp", [a, b], [0.5, 0.5], t=0.3), want, rtol=0, atol=1e-6)
    assert not torch.allclose(want, 0.7 * a + 0.3 * b, rtol=0, atol=1e-6)


def test_slerp_zero_tensor_as_mergekit():
    # mergekit leaves a tensor of norm <= 1e-8 un-normalised, so its cosine with anything is 0 and
    # the angle pi/2: t = 1/4 gives sin(pi/8) * b (a plain lerp would give b/4)
    out = run("slerp", [t(0, 0), t(1, 2)], [0.5, 0.5], t=0.25)
    torch.testing.assert_close(out, math.sin(math.pi / 8) * t(1, 2))


def test_task_arithmetic():
    base, m1, m2 = t(1, 1, 1), t(2, 1, 0), t(1, 3, 1)
    out = run("task-arithmetic", [m1, m2], [1.0, 0.5], base, scale=2.0)
    # deltas (1,0,-1) and (0,2,0); sum 1*(1,0,-1) + 0.5*(0,2,0) = (1,1,-1); base + 2*that
    torch.testing.assert_close(out, t(3, 3, -1))


def test_ties_trim_keeps_exactly_int_density_n():
    # mergekit's magnitude(): k = int(density * n); 5 entries at density 0.5 keep 2 (not ceil = 3)
    kept = trim(t(5, -4, 3, 2, 1), 0.5)
    torch.testing.assert_close(kept, t(5, -4, 0, 0, 0))
    # ties at the threshold are not all kept: |1| three times, k = 2 keeps 3 and one of the ones
    kept = trim(t(3, 1, -1, 1), 0.5)
    assert int((kept != 0).sum()) == 2 and kept[0] == 3
    assert int((trim(torch.randn(1000), 0.2) != 0).sum()) == 200
    torch.testing.assert_close(trim(t(1, 2), 1.0), t(1, 2))


def test_ties_trim_elect_disjoint_mean():
    base = torch.zeros(4)
    m1 = t(4, -1, 2, 0.5)    # density 0.5 keeps 4 and 2
    m2 = t(2, 3, -3, 0.1)    # keeps 3 and -3
    m3 = t(-1, 0.2, 1.5, 0)  # keeps 1.5 and -1
    out = run("ties", [m1, m2, m3], [1.0, 1.0, 1.0], base, density=0.5)
    # trimmed: (4,0,2,0), (0,3,-3,0), (-1,0,1.5,0); sums (3,3,0.5,0) -> elected (+,+,+,+) (0 counts as +)
    # entry 0: 4 agrees -> 4; entry 1: 3; entry 2: 2 and 1.5 agree -> 3.5/2; entry 3: no nonzero entry -> 0
    torch.testing.assert_close(out, t(4, 3, 1.75, 0))


def test_ties_zero_summed_sign_counts_as_positive():
    # mergekit get_mask(method="sum"): majority sign = +1 where the weighted sum is >= 0
    base = torch.zeros(2)
    out = run("ties", [t(2, 1), t(-2, -3)], [1.0, 1.0], base, density=1.0)
    # sums (0, -2): elected (+, -); entry 0: only +2 agrees -> 2/1; entry 1: 1 disagrees, -3 -> -3/1
    torch.testing.assert_close(out, t(2, -3))
    # the sign is elected on the weighted deltas: 2*(+1) + 1*(-2) = 0 -> +, mean of the agreeing
    # weighted delta over its weight: 2*1/2 = 1
    torch.testing.assert_close(run("ties", [t(1.0), t(-2.0)], [2.0, 1.0], torch.zeros(1), density=1.0), t(1.0))


def test_ties_weights_and_scale():
    base = t(1, 1)
    out = run("ties", [t(3, 1), t(2, 0)], [1.0, 3.0], base, density=1.0, scale=0.5)
    # deltas (2,0)*1 and (1,-1)*3 = (3,-3); sums (5,-3): signs (+,-); entry 0: (2+3)/(1+3) = 1.25
    # entry 1: only model 2 agrees: -3/3 = -1; base + 0.5 * (1.25, -1)
    torch.testing.assert_close(out, t(1.625, 0.5))


def test_every_method_declares_its_parameters():
    for method in all_methods().values():
        for p in method.params:
            assert p.name and p.help and p.type in (float, int, bool)
            assert p.check(p.default, method.name) == p.default  # the default passes its own validation
        assert method.resolve({}) == method.defaults()
    # TIES paper: top-20%, lambda = 1, disjoint mean
    assert get_method("ties").defaults() == {"density": 0.2, "scale": 1.0, "normalize": True}


@pytest.mark.parametrize("name,params,message", [
    ("ties", {"alpha": 1.0},
     "merge method 'ties' has no parameter 'alpha' \\(its parameters: density, scale, normalize\\)"),
    ("ties", {"density": 1.5}, "parameter 'density' = 1.5: expected a value in \\[0.0, 1.0\\]"),
    ("ties", {"density": "dense"}, "parameter 'density' is a number"),
    ("linear", {"normalize": 1}, "parameter 'normalize' is true or false"),
])
def test_resolve_refuses_in_one_line(name, params, message):
    with pytest.raises(SurgeryError, match=message):
        get_method(name).resolve(params)


def test_unknown_method():
    with pytest.raises(SurgeryError, match="merge method 'nope'"):
        get_method("nope")


def test_ties_without_normalize_sums_the_agreeing_deltas():
    # mergekit's ties with normalize: false: deltas (2, -1) and (1, 3), weights 1 and 1, density 1:
    # sums (3, 2) elect (+, +); entry 0: 2 + 1 = 3; entry 1: only 3 agrees -> 3 (not divided by 1 or 2)
    base = torch.zeros(2)
    torch.testing.assert_close(run("ties", [t(2, -1), t(1, 3)], [1.0, 1.0], base, density=1.0, normalize=False),
                               t(3, 3))
    # normalize: true averages over the agreeing models: entry 0 -> 3/2, entry 1 -> 3/1
    torch.testing.assert_close(run("ties", [t(2, -1), t(1, 3)], [1.0, 1.0], base, density=1.0), t(1.5, 3))


def _slerp_whole(a, b, t):
    """mergekit's slerp as its documentation states it, on whole tensors: both normalised, their float64 dot."""
    ua, ub = a / a.norm(), b / b.norm()
    dot = float(ua.flatten().double() @ ub.flatten().double())
    omega = math.acos(dot)
    return a * (math.sin((1 - t) * omega) / math.sin(omega)) + b * (math.sin(t * omega) / math.sin(omega))


@pytest.mark.parametrize("shape", [(3000, 1000), (7, 5)])
def test_slerp_in_pieces_equals_the_whole_tensor_formula(shape):
    """The dot product is taken a piece at a time (several pieces at 3M elements): the merged tensor is the
    whole-tensor formula's, bit for bit."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    b = b + 0.5 * a  # not orthogonal: omega away from pi/2
    for tt in (0.3, 0.5):
        assert torch.equal(run("slerp", [a, b], [0.5, 0.5], t=tt), _slerp_whole(a, b, tt))


PEAK = """
import json, resource, sys, torch
from modelsurgery.ops.merge import get_method
m = get_method(sys.argv[1])
gen = torch.Generator().manual_seed(0)
base, a, b = (torch.randn(1 << 24, generator=gen) for _ in range(3))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = m.fn([a, b], [0.5, 0.7], base, m.resolve(json.loads(sys.argv[2])))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def _peak_growth(method: str, params: dict) -> float:
    """How far merging two float32 tensors of 64 MB (and a base) raises the peak resident memory of a fresh
    process, in units of one such tensor."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-c", PEAK, method, json.dumps(params)], capture_output=True, text=True,
                          check=False, cwd=Path(__file__).resolve().parents[3])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split()[-1]) / (64 * 2**20)


@pytest.mark.parametrize(("method", "params", "bound"), [
    # the output and one product, not the normalised copies and their float64 copies (6 more)
    ("slerp", {"t": 0.3}, 3),
    # the sum and one task vector, not also the task vector's float32 copy and the scaled sum
    ("task-arithmetic", {}, 2.5),
    # the weighted deltas and their agreement in place, not a dozen temporaries (8.6 before)
    ("ties", {"density": 1.0}, 7),
])
def test_merge_methods_hold_few_copies_of_a_tensor(method, params, bound):
    grown = _peak_growth(method, params)
    assert grown < bound, f"{method}: peak grew by {grown:.1f} x the tensor"


def _ties_plain(tensors, weights, base, density, normalize, scale):
    """TIES as Yadav et al.'s Algorithm 1 and mergekit state it, whole tensors, no tensor reused."""
    b = base.float()
    w = torch.tensor(weights).view(-1, *[1] * b.ndim)
    deltas = torch.stack([trim(t.float() - b, density) for t in tensors]) * w
    elected = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(deltas) == elected
    merged = (deltas * agree).sum(0)
    if normalize:
        divisor = (w * agree).sum(0)
        merged = merged / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return b + scale * merged


@pytest.mark.parametrize("seed", range(6))
def test_in_place_ties_and_task_arithmetic_give_the_plain_formulas_bits(seed):
    """Zero deltas, bf16 and float32 inputs, negative weights: the same bits (-0.0 included) as the formulas
    written without reusing a tensor, and the inputs left as they were."""
    gen = torch.Generator().manual_seed(seed)
    n, shape = 2 + seed % 3, [(64, 33), (1000,), (7, 5, 3)][seed % 3]
    base = torch.randn(shape, generator=gen)
    tensors = [base + torch.randn(shape, generator=gen) * (torch.rand(shape, generator=gen) > 0.3) for _ in range(n)]
    tensors[0] = base.clone()  # a model that did not move: its task vector is all zeros
    if seed % 2:
        base, tensors = base.bfloat16(), [x.bfloat16() for x in tensors]
    copies = [x.clone() for x in tensors]
    weights = (torch.rand(n, generator=gen) * 2 - 0.5).tolist()
    for density in (1.0, 0.5, 0.2):
        for normalize in (True, False):
            got = run("ties", tensors, weights, base, density=density, normalize=normalize, scale=0.7)
            want = _ties_plain(tensors, weights, base, density, normalize, 0.7)
            assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    want = base.float() + 0.8 * sum(w * (x.float() - base.float()) for w, x in zip(weights, tensors))
    got = run("task-arithmetic", tensors, weights, base, scale=0.8)
    torch.testing.assert_close(got, want)
    assert all(torch.equal(x, c) for x, c in zip(tensors, copies))


def _trim_by_stable_sort(delta, density):
    """The documented rule written plainly: the int(density * n) largest magnitudes, equal magnitudes in order of
    position (a stable descending sort), the rest +0.0."""
    k = int(density * delta.numel())
    flat = delta.flatten()
    keep = torch.sort(flat.abs(), descending=True, stable=True).indices[:k]
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.view_as(delta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_ties_trim_breaks_ties_at_the_threshold_by_position(dtype):
    """bf16 fine-tunes give float32 deltas with few distinct magnitudes (and many exact zeros): thousands of
    entries share the threshold, and the kept ones are the first by position, as a stable sort keeps them."""
    gen = torch.Generator().manual_seed(0)
    base = (1 + torch.rand(300_000, generator=gen)).bfloat16()  # in [1, 2]: one bf16 step, 2^-7
    moved = (base.float() + 0.01 * torch.randn(300_000, generator=gen) * (torch.rand(300_000, generator=gen) > 0.4))
    delta = (moved.bfloat16().float() - base.float()).to(dtype).view(600, 500)
    cut = 0
    for density in (0.01, 0.2, 0.5, 0.7, 0.9):
        want = _trim_by_stable_sort(delta, density)
        k = int(density * delta.numel())
        threshold = delta.abs().flatten().sort(descending=True).values[k - 1]
        cut += int((delta.abs() == threshold).sum()) > k - int((delta.abs() > threshold).sum()) > 0
        got = trim(delta, density)
        assert got.dtype == dtype and torch.equal(got, want) and int(got.count_nonzero()) <= k
        assert torch.equal(got.view(-1).signbit(), want.view(-1).signbit())  # +0.0 where dropped, as zeros_like
    assert cut >= 4  # the threshold's equal magnitudes were split between kept and dropped
    small = t(3, 1, -1, 1, 0, -1)
    torch.testing.assert_close(trim(small, 0.5), t(3, 1, -1, 0, 0, 0))  # the first two of the four |1|


def test_ties_merge_of_bf16_models_keeps_the_first_tied_entries():
    """The whole method on bf16 models (ties everywhere at the threshold) against the plain formula with the
    stable-sort trim: the same bits."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(256, 384, generator=gen).bfloat16()
    tensors = [(base.float() + 0.02 * torch.randn(256, 384, generator=gen)).bfloat16() for _ in range(3)]
    for density in (0.2, 0.5):
        got = run("ties", tensors, [1.0, 0.5, 0.8], base, density=density)
        b = base.float()
        w = torch.tensor([1.0, 0.5, 0.8]).view(-1, 1, 1)
        deltas = torch.stack([_trim_by_stable_sort(x.float() - b, density) for x in tensors]) * w
        agree = torch.sign(deltas) == torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
        divisor = (w * agree).sum(0)
        want = b + (deltas * agree).sum(0) / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
