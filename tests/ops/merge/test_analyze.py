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
