"""`surgery analyze`: why a merge works or not (Ito et al. 2024, "Analysis of Linear Mode
Connectivity via Permutation-Based Weight Matching", Sec. 4): per layer, the L2 distance between
the two models' weights and the alignment of their top singular vectors, before and after matching.

Alignment of the i-th singular pair: |<u_i^A, u_i^B>| * |<v_i^A, v_i^B>|, the cosine between the
rank-one components u_i v_i^T of the two matrices (1 = the same direction, 0 = orthogonal).
Weight matching is expected to raise it for the largest singular values first. A quantized input
is analysed as the float weights it stands for (``ops.float_input``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.families import detect_family
from modelsurgery.ops.float_input import float_view
from modelsurgery.ops.match.derive import permutation_spec
from modelsurgery.ops.match.spec import permute_tensor
from modelsurgery.ops.match.weight_matching import weight_matching
from modelsurgery.ops.merge.merge import check_compatible


@dataclass
class AnalyzeOptions:
    top_k: int = 5
    backend: str = "auto"
    device: str = "cpu"
    seed: int = 0
    model: str | None = None


@dataclass
class LayerAnalysis:
    name: str
    shape: list[int]
    distance_before: float
    distance_after: float
    alignment_before: list[float]
    alignment_after: list[float]
    singular_values: list[float]


@dataclass
class AnalyzeResult:
    a: str
    b: str
    family: str
    objective_before: float
    objective_after: float
    layers: list[LayerAnalysis] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # quantized inputs, analysed as their dequantized weights

    def to_dict(self) -> dict:
        return asdict(self)


def top_alignment(wa: torch.Tensor, wb: torch.Tensor, k: int) -> tuple[list[float], list[float]]:
    """Per top-k singular pair, |<u_A,u_B>|*|<v_A,v_B>|; and A's top-k singular values."""
    ua, sa, vha = torch.linalg.svd(wa.flatten(1).float(), full_matrices=False)
    ub, _, vhb = torch.linalg.svd(wb.flatten(1).float(), full_matrices=False)
    k = min(k, sa.numel())
    u = (ua[:, :k] * ub[:, :k]).sum(0).abs()
    v = (vha[:k] * vhb[:k]).sum(1).abs()
    return (u * v).tolist(), sa[:k].tolist()


def analyze_pair(a: Path, b: Path, options: AnalyzeOptions,
                 progress: Callable[[str, int, int, dict], None] | None = None) -> AnalyzeResult:
    (ca, note_a), (cb, note_b) = (float_view(Checkpoint.open(p), "analyze") for p in (a, b))
    check_compatible([ca, cb])
    family = detect_family(ca, options.model)
    spec = permutation_spec(family, complete=False)  # only the spec's tensors are compared; nothing is written
    # the tensors are read when matching or a layer's SVD needs them: no float copy of either model
    A, B = ca.lazy_state(), cb.lazy_state()
    match = weight_matching(A, B, spec, backend=options.backend, device=options.device, seed=options.seed,
                            progress=progress, streaming=True)
    perms = {g: {k: v.cpu() for k, v in p.items()} for g, p in match.perms.items()}
    names = [n for n in spec.axes if len(ca.shape(n)) >= 2 and ca.info(n).dtype.is_floating_point]
    result = AnalyzeResult(str(a), str(b), family.name, match.objective_before, match.objective_after,
                           notes=[n for n in (note_a, note_b) if n])
    dev = torch.device(options.device)
    for i, n in enumerate(names):
        wb = B[n]
        wa, wb, wp = (x.to(dev, torch.float32) for x in (A[n], wb, permute_tensor(spec, n, wb, perms)))
        before, sv = top_alignment(wa, wb, options.top_k)
        after, _ = top_alignment(wa, wp, options.top_k)
        result.layers.append(LayerAnalysis(
            n, list(wa.shape), float((wa - wb).norm()), float((wa - wp).norm()), before, after, sv))
        if progress:
            progress("singular vectors", i + 1, len(names), {})
    return result
