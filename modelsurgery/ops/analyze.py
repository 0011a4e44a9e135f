"""`surgery analyze`: why a merge works or not (Ito et al. 2024, "Analysis of Linear Mode
Connectivity via Permutation-Based Weight Matching", Sec. 4): per layer, the L2 distance between
the two models' weights and the alignment of their top singular vectors, before and after matching.

Alignment of the i-th singular pair: |<u_i^A, u_i^B>| * |<v_i^A, v_i^B>|, the cosine between the
rank-one components u_i v_i^T of the two matrices (1 = the same direction, 0 = orthogonal).
Weight matching is expected to raise it for the largest singular values first. A quantized input
is analysed as the float weights it stands for (``ops.float_input``).

Only the top-k singular pairs are used, so each matrix's are computed once, from the eigenvectors
of its smaller Gram matrix W^T W (or W W^T) in float64 (``top_singular``): to float64 rounding for
the top pairs, several times faster than a full SVD (``benchmarks/bench_analyze.py``). The matched
B = P_out B P_in^T has B's singular values and B's singular vectors permuted, so its factors are
B's, permuted: no decomposition after matching.

A singular pair is only defined up to rotation within a group of equal singular values, and a pair
whose value is within a small gap of a neighbour turns with any change of the weights of that size;
its alignment then says little. Each pair is reported ``separated`` when its value, in A and in B,
is at least ``GAP_TOL`` times the largest away from its neighbours (and from zero).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.families import detect_family
from modelsurgery.memory import row_blocks
from modelsurgery.ops.float_input import float_view
from modelsurgery.ops.match.derive import permutation_spec
from modelsurgery.ops.match.spec import permute_tensor
from modelsurgery.ops.match.weight_matching import weight_matching
from modelsurgery.ops.merge.merge import check_compatible

#: a singular pair is ``separated`` when its value is at least this fraction of the largest away from its neighbours
#: and from zero. bf16, the storage of most LLM checkpoints, rounds each weight by up to 2^-9 (2e-3) of itself: a
#: gap below 1e-3 of the largest value is within what that rounding can move on a matrix without a dominant direction
GAP_TOL = 1e-3
#: elements of a float64 working block (64 MiB): the Gram matrix and distances are summed a block of rows at a time
CHUNK_ELEMENTS = 2**23


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
    singular_values: list[float]  # A's
    singular_values_b: list[float]  # B's (matching permutes B: the same before and after)
    separated: list[bool]  # per pair: its value is apart from its neighbours in A and in B (GAP_TOL)


@dataclass
class AnalyzeResult:
    a: str
    b: str
    family: str
    objective_before: float
    objective_after: float
    layers: list[LayerAnalysis] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # quantized inputs, analysed as their dequantized weights
    gap_tolerance: float = GAP_TOL

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Singular:
    """Top singular triplets of a matrix, float64: ``u`` (m, k), ``s`` (k + 1 when there is one more: the gap of
    the k-th pair below), ``vh`` (k, n)."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor


def _gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x in float64, ``x`` converted a block of rows at a time (no float64 copy of the whole matrix)."""
    n = x.shape[1]
    g = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    for r, stop in row_blocks(0, x.shape[0], n, CHUNK_ELEMENTS):
        c = x[r:stop].double()
        g.addmm_(c.T, c)
    return g


def top_singular(w: torch.Tensor, k: int) -> Singular:
    """The top-``k`` singular triplets of ``w.flatten(1)``, plus the (k+1)-th value when there is one.

    The right vectors are the top eigenvectors of the smaller Gram matrix, formed and decomposed in float64
    (scipy's ``eigh`` for the top eigenpairs only); u_i = W v_i / s_i. A vector's error is about
    eps64 * s_1 / gap (eps64 = 1.1e-16): about 1e-13 rad for a pair separated by GAP_TOL, where a float32 SVD
    is off by 1e-4 to 1e-3 rad. A zero singular value gets a zero vector (its pair is not separated)."""
    import scipy.linalg

    x = w.flatten(1)
    transposed = x.shape[0] < x.shape[1]
    if transposed:  # Gram matrix of the smaller side
        x = x.T
    n = x.shape[1]
    k = min(k, n)
    kv = min(k + 1, n)
    vals, vecs = scipy.linalg.eigh(_gram(x).cpu().numpy(), subset_by_index=[n - kv, n - 1])
    s = torch.from_numpy(vals[::-1].copy()).clamp_min(0).sqrt().to(x.device)
    v = torch.from_numpy(vecs[:, ::-1][:, :k].copy()).to(x.device)
    # u = x v / s, a block of rows at a time; a zero singular value leaves its column zero
    inv = torch.where(s[:k] > 0, 1 / s[:k], torch.zeros_like(s[:k]))
    u = torch.cat([x[r:stop].double() @ v for r, stop in row_blocks(0, x.shape[0], n, CHUNK_ELEMENTS)]) * inv
    return Singular(v, s, u.T) if transposed else Singular(u, s, v.T)


def separated(*values: torch.Tensor, k: int, tol: float = GAP_TOL) -> list[bool]:
    """Per pair i < k: in each of ``values`` (descending singular values), s_i is at least ``tol * s_1`` away
    from s_{i-1}, s_{i+1} (where there is one) and 0."""
    out = [True] * min(k, *(s.numel() for s in values))
    for s in values:
        vals = s.tolist()
        for i in range(len(out)):
            gaps = [vals[i]] + [abs(vals[i] - vals[j]) for j in (i - 1, i + 1) if 0 <= j < len(vals)]
            out[i] = out[i] and vals[0] > 0 and min(gaps) >= tol * vals[0]
    return out


def alignment(a: Singular, b: Singular, k: int) -> list[float]:
    """|<u_i^A, u_i^B>| * |<v_i^A, v_i^B>| for the top ``k`` pairs (signs of singular vectors do not matter)."""
    k = min(k, a.u.shape[1], b.u.shape[1])
    u = (a.u[:, :k] * b.u[:, :k]).sum(0).abs()
    v = (a.vh[:k] * b.vh[:k]).sum(1).abs()
    return (u * v).tolist()


def top_alignment(wa: torch.Tensor, wb: torch.Tensor, k: int) -> tuple[list[float], list[float]]:
    """Per top-k singular pair, |<u_A,u_B>|*|<v_A,v_B>|; and A's top-k singular values."""
    sa = top_singular(wa, k)
    return alignment(sa, top_singular(wb, k), k), sa.s[:k].tolist()


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||_F summed in float64, a block of rows at a time (no full-size difference tensor)."""
    a, b = a.flatten(1), b.flatten(1)
    return math.sqrt(sum(float((a[r:stop].double() - b[r:stop]).square().sum())
                         for r, stop in row_blocks(0, a.shape[0], a.shape[1], CHUNK_ELEMENTS)))


def permute_singular(spec, name: str, shape: torch.Size, sv: Singular, perms) -> Singular:
    """The factors of ``permute_tensor(spec, name, W, perms)`` from W's: rows of u take W's axis 0 order, the
    columns of vh (W's other axes, flattened) theirs; singular values unchanged."""
    k = sv.vh.shape[0]
    u = permute_tensor(spec, name, sv.u, perms, skip_axis=1)
    vh = permute_tensor(spec, name, sv.vh.reshape(k, *shape[1:]), perms, skip_axis=0).reshape(k, -1)
    return Singular(u, sv.s, vh)


def analyze_pair(a: Path, b: Path, options: AnalyzeOptions,
                 progress: Callable[[str, int, int, dict], None] | None = None) -> AnalyzeResult:
    (ca, note_a), (cb, note_b) = (float_view(Checkpoint.open(p), "analyze") for p in (a, b))
    check_compatible([ca, cb])
    family = detect_family(ca, options.model)
    spec = permutation_spec(family, complete=False)  # only the spec's tensors are compared; nothing is written
    # the tensors are read when matching or a layer's decomposition needs them: no float copy of either model
    A, B = ca.lazy_state(), cb.lazy_state()
    match = weight_matching(A, B, spec, backend=options.backend, device=options.device, seed=options.seed,
                            progress=progress, streaming=True)
    perms = {g: {k: v.cpu() for k, v in p.items()} for g, p in match.perms.items()}
    names = [n for n in spec.axes if len(ca.shape(n)) >= 2 and ca.info(n).dtype.is_floating_point]
    result = AnalyzeResult(str(a), str(b), family.name, match.objective_before, match.objective_after,
                           notes=[n for n in (note_a, note_b) if n])
    dev = torch.device(options.device)
    k = options.top_k
    for i, n in enumerate(names):
        wa, wb = (x[n].to(dev, torch.float32) for x in (A, B))
        sa, sb = top_singular(wa, k), top_singular(wb, k)
        sp = permute_singular(spec, n, wb.shape, sb, perms)
        distance_before = distance(wa, wb)
        wb = permute_tensor(spec, n, wb, perms)  # matched B: unmatched B is done with
        distance_after = distance(wa, wb)
        result.layers.append(LayerAnalysis(
            n, list(wa.shape), distance_before, distance_after, alignment(sa, sb, k), alignment(sa, sp, k),
            sa.s[:k].tolist(), sb.s[:k].tolist(), separated(sa.s, sb.s, k=k)))
        del wa, wb  # before the next layer's are read
        if progress:
            progress("singular vectors", i + 1, len(names), {})
    return result
