"""Weight matching (Ainsworth et al. 2023, Git Re-Basin, Algorithm 1): coordinate descent over
permutation groups, each step a linear assignment on summed weight similarities, until no
group improves the objective sum_t <W_A[t], P(W_B)[t]>.

Faster than the plain algorithm without changing its fixed points: B is kept fully permuted and
only the tensors of a changed group are re-gathered; a group whose neighbours (groups sharing a
tensor with it) did not change since it was last solved is skipped, because its assignment
problem is the same; the similarity of the current assignment is read off the same matrix, so
no step is accepted unless it strictly improves. Attention head groups are solved in two
levels: per pair of heads the best unit assignment (Q/K together, V/O together), then the head
order (Verma & Elbayad 2024).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from modelsurgery.ops.match.assignment import solve_assignment
from modelsurgery.ops.match.spec import Perms, PermutationSpec, axis_index, permute_tensor


@dataclass
class MatchResult:
    perms: Perms
    iterations: int
    objective_before: float
    objective_after: float
    solves: int
    history: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"iterations": self.iterations, "objective_before": self.objective_before,
                "objective_after": self.objective_after, "assignment_solves": self.solves}


def _float(state: dict[str, torch.Tensor], spec: PermutationSpec, device) -> dict[str, torch.Tensor]:
    return {k: state[k].to(device=device, dtype=torch.float32) for k in spec.axes}


def objective(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum((a[k] * b[k]).sum() for k in a))


def weight_matching(
    state_a: dict[str, torch.Tensor],
    state_b: dict[str, torch.Tensor],
    spec: PermutationSpec,
    *,
    max_iter: int = 100,
    seed: int = 0,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    progress: Callable[[str, int, int, dict], None] | None = None,
    init: Perms | None = None,
) -> MatchResult:
    """Permutations taking B into A's basis (apply them to B with ``apply_permutation``)."""
    device = torch.device(device)
    rng = random.Random(seed)
    A = _float(state_a, spec, device)
    B = _float(state_b, spec, device)
    perms = init or spec.identity(device)
    perms = {g: {k: v.to(device) for k, v in p.items()} for g, p in perms.items()}
    Bp = {k: permute_tensor(spec, k, B[k], perms) for k in B}
    before = objective(A, Bp)
    members = {g: spec.tensors_of(g) for g in spec.groups}
    neighbours = {g: {s.group for t, _ in members[g] for segs in spec.axes[t].values() for s in segs} - {g}
                  for g in spec.groups}
    stale = set(spec.groups)  # groups whose assignment problem may have changed since last solved
    history = [before]
    solves = 0
    it = 0
    while stale and it < max_iter:
        it += 1
        order = [g for g in spec.groups if g in stale]
        rng.shuffle(order)
        for g in order:
            stale.discard(g)
            new, gain = _solve_group(spec, g, A, Bp, perms[g], members[g], backend)
            solves += 1
            if new is None or gain <= 1e-9 * max(1.0, abs(history[-1])):
                continue
            perms[g] = new
            for t, _ in members[g]:
                Bp[t] = permute_tensor(spec, t, B[t], perms)
            stale |= neighbours[g]
            history.append(history[-1] + gain)
        if progress:
            progress("weight matching", it, max_iter, {"objective": history[-1]})
    after = objective(A, Bp)
    return MatchResult(perms, it, before, after, solves, history)


def _blocks(spec, g, A, Bp, t, ax):
    """(view, A block, B block) per segment of group ``g`` on axis ``ax`` of tensor ``t``."""
    out, offset = [], 0
    for seg in spec.axes[t][ax]:
        n = spec.segment_length(seg)
        if seg.group == g:
            a = A[t].movedim(ax, 0).narrow(0, offset, n).reshape(n, -1)
            b = Bp[t].movedim(ax, 0).narrow(0, offset, n).reshape(n, -1)
            out.append((seg, a, b))
        offset += n
    return out


def _solve_group(spec, g, A, Bp, current, tensors, backend):
    """A better assignment for group ``g`` (or None) and its gain, with the other groups fixed.

    Bp is B with all groups applied, so similarity columns are in the current order: S_cur[j, k]
    compares A's unit j with B's unit p[k]; the new p is p[q] for q solving S_cur."""
    grp = spec.groups[g]
    if grp.kind == "free":
        S = None
        for t, ax in tensors:
            for seg, a, b in _blocks(spec, g, A, Bp, t, ax):
                sim = a.reshape(grp.size, -1) @ b.reshape(grp.size, -1).T
                S = sim if S is None else S + sim
        q = solve_assignment(S, backend)
        gain = float(S[torch.arange(grp.size, device=S.device), q].sum() - S.diagonal().sum())
        return {"p": current["p"][q]}, gain
    return _solve_heads(spec, g, grp, A, Bp, current, tensors, backend)


def _solve_heads(spec, g, grp, A, Bp, current, tensors, backend):
    H, G, d = grp.size, grp.q_per_kv, grp.head_dim
    S = {"qk": torch.zeros(H, H, d, d, device=current["heads"].device),
         "vo": torch.zeros(H, H, d, d, device=current["heads"].device)}
    for t, ax in tensors:
        for seg, a, b in _blocks(spec, g, A, Bp, t, ax):
            groups_per = G if seg.view in ("q", "o") else 1
            a = a.reshape(H, groups_per, d, -1)
            b = b.reshape(H, groups_per, d, -1)
            S["qk" if seg.view in ("q", "k") else "vo"] += torch.einsum("agtr,bgsr->abts", a, b)
    value = torch.zeros(H, H, device=S["qk"].device)
    units = {}
    for part in ("qk", "vo"):
        if part == "qk" and grp.rotary:
            value += S[part].diagonal(dim1=2, dim2=3).sum(-1)
            units[part] = torch.arange(d, device=value.device).repeat(H, H, 1)
            continue
        u = torch.empty(H, H, d, dtype=torch.int64, device=value.device)
        for i in range(H):
            for j in range(H):
                u[i, j] = solve_assignment(S[part][i, j], backend)
                value[i, j] += S[part][i, j][torch.arange(d), u[i, j]].sum()
        units[part] = u
    heads = solve_assignment(value, backend)
    rows = torch.arange(H, device=value.device)
    cur_value = S["qk"][rows, rows].diagonal(dim1=1, dim2=2).sum() + S["vo"][rows, rows].diagonal(dim1=1, dim2=2).sum()
    gain = float(value[rows, heads].sum() - cur_value)
    # compose: new head j = current head heads[j]; its units are current units reindexed
    new = {"heads": current["heads"][heads]}
    for part in ("qk", "vo"):
        q = units[part][rows, heads]  # (H, d)
        new[part] = torch.gather(current[part][heads], 1, q)
    return new, gain


def index_of(spec: PermutationSpec, tensor: str, axis: int, perms: Perms) -> torch.Tensor:
    return axis_index(spec, spec.axes[tensor][axis], perms)
