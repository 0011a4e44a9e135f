"""`analyze`: distances and singular-vector alignment, checked on a model against its own shuffle."""

import pytest
import torch
from safetensors.torch import save_file

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.families import detect_family
from modelsurgery.ops.analyze import AnalyzeOptions, analyze_pair, top_alignment
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
    for layer in r.layers:
        wa, wb, wp = (x[layer.name].float() for x in (A, B, Bp))
        assert layer.distance_before == float((wa - wb).norm())
        assert layer.distance_after == float((wa - wp).norm())
        assert (layer.alignment_before, layer.singular_values) == top_alignment(wa, wb, 3)
        assert layer.alignment_after == top_alignment(wa, wp, 3)[0]
    assert any(x.distance_after < x.distance_before for x in r.layers)  # a real matching moved B
