"""`analyze`: distances and singular-vector alignment, checked on a model against its own shuffle, and the
top singular triplets against numpy's full SVD in float64."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.families import detect_family
from modelsurgery.ops import analyze
from modelsurgery.ops.analyze import AnalyzeOptions, analyze_pair, separated, top_alignment, top_singular
from modelsurgery.ops.match.derive import permutation_spec
from modelsurgery.ops.match.spec import apply_permutation
from tests.ops.match.perms import random_perms


def test_alignment_by_hand():
    a = torch.diag(torch.tensor([3.0, 1.0]))
    b = torch.tensor([[0.0, 1.0], [3.0, 0.0]])  # rows swapped: top left singular vector moves to e2
    align, sv = top_alignment(a, b, 2)
    assert sv == pytest.approx([3.0, 1.0])
    assert align == pytest.approx([0.0, 0.0], abs=1e-6)
    align, _ = top_alignment(a, -a, 2)  # signs of singular vectors do not matter
    assert align == pytest.approx([1.0, 1.0])


def test_shuffled_copy_is_fully_aligned_after_matching(fixtures_dir, tmp_path):
    src = fixtures_dir / "digits" / "mlp_seed0.safetensors"
    ckpt = Checkpoint.open(src)
    spec = permutation_spec(detect_family(ckpt))
    shuffled = tmp_path / "b.safetensors"
    save_file(apply_permutation(ckpt.state_dict(), spec, random_perms(spec, torch.Generator().manual_seed(4))),
              str(shuffled))
    r = analyze_pair(src, shuffled, AnalyzeOptions(top_k=3))
    assert [layer.name for layer in r.layers] == ["0.weight", "2.weight", "4.weight"]
    for layer in r.layers:
        assert layer.distance_before > 1.0
        assert layer.distance_after == pytest.approx(0.0, abs=1e-5)
        assert layer.alignment_after == pytest.approx([1.0] * 3, abs=1e-4)
    assert min(r.layers[0].alignment_before) < 0.5


def test_analyze_streams_and_reports_what_the_in_memory_matching_gives(tmp_path, monkeypatch):
    """Two differently seeded tiny LLaMAs written by transformers: the tensors are read when the matching or
    a layer needs them, never all at once, and the report is the one the in-memory matching and the whole
    permuted B give (the path analyze took before it streamed)."""
    from modelsurgery.ops.match.weight_matching import weight_matching
    from tests.hf_tiny import save_tiny_llama
    from tests.live_tensors import LiveTensors

    a, b = save_tiny_llama(tmp_path / "a", seed=0), save_tiny_llama(tmp_path / "b", seed=1)
    ca, cb = Checkpoint.open(a), Checkpoint.open(b)
    spec = permutation_spec(detect_family(ca))
    A, B = ca.state_dict(), cb.state_dict()
    match = weight_matching(A, B, spec)
    Bp = apply_permutation(B, spec, match.perms)

    live = LiveTensors(monkeypatch)
    r = analyze_pair(a, b, AnalyzeOptions(top_k=3))
    assert live.reads > len(ca)  # every layer read (the matching reads them again)
    assert live.peak <= 3, f"{live.peak} tensors read from the checkpoints alive at once"

    assert (r.objective_before, r.objective_after) == (match.objective_before, match.objective_after)
    names = [n for n in spec.axes if A[n].ndim >= 2]
    assert [layer.name for layer in r.layers] == names and len(names) > 10
    compared = 0
    for layer in r.layers:
        wa, wb, wp = (x[layer.name].float() for x in (A, B, Bp))
        na, nb, np_ = (w.double().numpy() for w in (wa, wb, wp))
        assert layer.distance_before == pytest.approx(np.linalg.norm(na - nb), rel=1e-12)
        assert layer.distance_after == pytest.approx(np.linalg.norm(na - np_), rel=1e-12)
        # numpy's full SVD of A, B and the whole permuted B (the report's "after" factors are B's, permuted)
        (ua, sa, va), (ub, sb, vb), (up, sp, vp) = (np.linalg.svd(w.double().numpy()) for w in (wa, wb, wp))
        assert layer.singular_values == pytest.approx(sa[:3], rel=1e-12)
        assert layer.singular_values_b == pytest.approx(sb[:3], rel=1e-12)
        assert sp[:3] == pytest.approx(sb[:3], rel=1e-12)
        def gap(s, i):  # to the neighbours, sorted descending (the last one's below is its distance to 0)
            return min([s[i] - s[i + 1]] + ([s[i - 1] - s[i]] if i else []))

        assert layer.separated == [gap(sa, i) >= 1e-3 * sa[0] and gap(sb, i) >= 1e-3 * sb[0] for i in range(3)]
        for i in range(3):
            if not layer.separated[i]:
                continue
            compared += 1
            before = abs(ua[:, i] @ ub[:, i]) * abs(va[i] @ vb[i])
            after = abs(ua[:, i] @ up[:, i]) * abs(va[i] @ vp[i])
            assert layer.alignment_before[i] == pytest.approx(before, abs=1e-9)
            assert layer.alignment_after[i] == pytest.approx(after, abs=1e-9)
    assert compared > 2 * len(names)  # most pairs of a random model are separated: the check is not vacuous
    assert any(x.distance_after < x.distance_before for x in r.layers)  # a real matching moved B


def orthonormal(rng, n, k):
    return np.linalg.qr(rng.standard_normal((n, k)))[0]


@pytest.mark.parametrize("shape", [(300, 40), (40, 300), (24, 8, 3, 3)], ids=["tall", "wide", "conv"])
def test_top_singular_is_numpys_full_svd(shape, monkeypatch):
    """Top values 10, 8, 6, 4, 2, 1.5 above a bulk below 1: the triplets are numpy's float64 SVD's to float64
    rounding, in row blocks of 7 (the Gram matrix summed block by block)."""
    monkeypatch.setattr(analyze, "CHUNK_ELEMENTS", 7 * 40)
    rng = np.random.default_rng(0)
    m, n = shape[0], int(np.prod(shape[1:]))
    r = min(m, n)
    s = np.concatenate([[10, 8, 6, 4, 2, 1.5], np.sort(rng.uniform(0, 1, r - 6))[::-1]])
    w = orthonormal(rng, m, r) * s @ orthonormal(rng, n, r).T
    U, S, Vh = np.linalg.svd(w)  # the independent reference
    top = top_singular(torch.from_numpy(w).float().reshape(shape), 5)
    w32 = torch.from_numpy(w).float().double().numpy()  # the float32 matrix the function sees
    U, S, Vh = np.linalg.svd(w32)
    assert top.s.tolist() == pytest.approx(S[:6], rel=1e-13)  # k + 1 values: the gap below the last pair
    assert top.u.shape == (m, 5) and top.vh.shape == (5, n)
    assert np.abs((top.u.numpy() * U[:, :5]).sum(0)) == pytest.approx([1.0] * 5, abs=1e-13)
    assert np.abs((top.vh.numpy() * Vh[:5]).sum(1)) == pytest.approx([1.0] * 5, abs=1e-13)
    # the triplets reproduce the matrix: W v_i = s_i u_i, u_i^T W = s_i v_i^T
    assert w32 @ top.vh.numpy().T == pytest.approx(top.u.numpy() * S[:5], abs=1e-12)
    assert top.u.numpy().T @ w32 == pytest.approx(S[:5, None] * top.vh.numpy(), abs=1e-12)


def test_close_singular_values_are_flagged_not_trusted():
    """Two equal top singular values: any rotation of their vectors is as valid, so B = A plus a change of
    1e-6 that picks another basis of that plane gives alignments far from 1 for a B that is A to 1e-6. Those
    pairs are reported not separated; the next pair, apart, aligns at 1. A zero matrix has no defined pair."""
    rng = np.random.default_rng(1)
    q = orthonormal(rng, 6, 6)
    a = np.diag([5.0, 5.0, 3.0, 1.0, 0.5, 0.2])
    c, s = np.cos(0.6), np.sin(0.6)  # B's top pair: the plane's basis turned by 0.6 rad, split by 1e-6
    turn = np.array([[c, -s], [s, c]])
    b = a.copy()
    b[:2, :2] += turn @ np.diag([1e-6, 0.0]) @ turn.T
    a, b = (torch.from_numpy(q @ x @ q.T) for x in (a, b))
    align, sv = top_alignment(a, b, 3)
    assert sv == pytest.approx([5.0, 5.0, 3.0])
    assert align[2] == pytest.approx(1.0, abs=1e-9)
    assert max(align[:2]) < 0.9  # the same plane in a turned basis: cos(0.6)^2 = 0.68, not the 1 it "should" be
    assert separated(top_singular(a, 3).s, k=3) == [False, False, True]
    assert separated(top_singular(b, 3).s, k=3) == [False, False, True]
    zero = top_singular(torch.zeros(4, 3), 2)
    assert zero.s.tolist() == [0.0, 0.0, 0.0] and separated(zero.s, k=2) == [False, False]
    assert top_alignment(torch.zeros(4, 3), torch.zeros(4, 3), 2)[0] == [0.0, 0.0]  # no NaN in the report


def test_a_pair_close_in_b_only_is_flagged(fixtures_dir, tmp_path):
    """A pair is reported separated only when it is in both models: B, a shuffled copy of A whose first layer's
    two top singular values are made equal, flags that layer's first two pairs although A's are apart."""
    src = fixtures_dir / "digits" / "mlp_seed0.safetensors"
    ckpt = Checkpoint.open(src)
    spec = permutation_spec(detect_family(ckpt))
    state = ckpt.state_dict()
    u, s, vh = torch.linalg.svd(state["0.weight"].double(), full_matrices=False)
    s[1] = s[0]
    state["0.weight"] = (u * s @ vh).float()
    b = tmp_path / "b.safetensors"
    save_file(apply_permutation(state, spec, random_perms(spec, torch.Generator().manual_seed(4))), str(b))
    r = analyze_pair(src, b, AnalyzeOptions(top_k=3))
    assert separated(top_singular(ckpt.get("0.weight").float(), 3).s, k=3) == [True] * 3
    assert r.layers[0].separated == [False, False, True]
    assert [layer.separated for layer in r.layers[1:]] == [[True] * 3] * 2
