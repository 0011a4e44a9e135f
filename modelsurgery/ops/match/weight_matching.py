"""Weight matching (Ainsworth et al. 2023, Git Re-Basin, Algorithm 1): coordinate descent over
permutation groups, each step a linear assignment on summed weight similarities, until no
group improves the objective sum_t <W_A[t], P(W_B)[t]>.

Faster than the plain algorithm, with the same fixed points:
- B is kept fully permuted; only the tensors of a changed group are re-gathered;
- a group is re-solved only when a neighbour (a group sharing a tensor) changed since its last
  solve: otherwise its assignment problem is the same;
- each tensor's similarity term is cached, and when a neighbour moved only some units, updated
  with the moved columns only (a rank-|moved| correction instead of a full product);
- the Jonker-Volgenant solver (lap) by default;
- a step is accepted only if it strictly improves (gains summed in float64).
Attention head groups are solved in two levels: per pair of heads the best unit assignment (Q/K
together, V/O together), then the head order (Verma & Elbayad 2024).

``streaming=True`` keeps neither model in float32: A's tensors and B's permuted tensors are made
from the (memory-mapped) inputs each time a similarity term is computed, and dropped after; only
the permutations and the cached similarity matrices (at most CACHE_MIN_BYTES) stay. The steps are
the same, so are the permutations (as long as the same terms fit in the cache).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping
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


class _OnDemand(Mapping):
    """Tensors made by ``make(name)`` each time they are asked for, never kept."""

    def __init__(self, names, make: Callable[[str], torch.Tensor]):
        self.names, self.make = list(names), make

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.make(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


CACHE_MIN_BYTES = 256 * 2**20


class _Cache(dict):
    """Similarity terms, stored while they fit in ``budget`` bytes (256 MiB, or half of B's size)."""

    def __init__(self, budget: int):
        super().__init__()
        self.budget, self.used = budget, 0

    def __setitem__(self, key, value):
        size = value[0].numel() * value[0].element_size()
        old = self.get(key)
        freed = old[0].numel() * old[0].element_size() if old is not None else 0
        if self.used - freed + size > self.budget:
            if old is not None:
                del self[key]
                self.used -= freed
            return
        super().__setitem__(key, value)
        self.used += size - freed


def objective(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum((a[k] * b[k]).sum() for k in a))


def weight_matching(
    state_a: dict[str, torch.Tensor],
    state_b: dict[str, torch.Tensor],
    spec: PermutationSpec,
    *,
    max_iter: int = 100,  # in solves per group
    seed: int = 0,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    progress: Callable[[str, int, int, dict], None] | None = None,
    init: Perms | None = None,
    fast: bool = True,
    streaming: bool = False,
) -> MatchResult:
    """Permutations taking B into A's basis (apply them to B with ``apply_permutation``).

    ``fast=False`` recomputes every similarity product (no cache, no incremental updates);
    ``streaming=True`` holds no float copy of either model (module docstring)."""
    device = torch.device(device)
    rng = random.Random(seed)
    spec = spec.matched()
    perms = init or spec.identity(device)
    perms = {g: {k: v.to(device) for k, v in p.items()} for g, p in perms.items()}
    if streaming:
        A = _OnDemand(spec.axes, lambda k: state_a[k].to(device=device, dtype=torch.float32))
        B = _OnDemand(spec.axes, lambda k: state_b[k].to(device=device, dtype=torch.float32))
        Bp = _OnDemand(spec.axes, lambda k: permute_tensor(spec, k, B[k], perms))
        budget = CACHE_MIN_BYTES
    else:
        A = _float(state_a, spec, device)
        B = _float(state_b, spec, device)
        Bp = {k: permute_tensor(spec, k, B[k], perms) for k in B}
        budget = max(CACHE_MIN_BYTES, sum(t.numel() * t.element_size() for t in B.values()) // 2)
    before = objective(A, Bp)
    members = {g: spec.tensors_of(g) for g in spec.groups}
    neighbours = {g: {s.group for t, _ in members[g] for segs in spec.axes[t].values() for s in segs} - {g}
                  for g in spec.groups}
    history = [before]
    solves = 0
    it = 0
    cache = _Cache(budget)
    versions = dict.fromkeys(spec.groups, 0)
    stale = set(spec.groups)  # groups whose assignment problem may have changed since last solved
    while stale and solves < max_iter * len(spec.groups):
        it += 1
        order = [g for g in spec.groups if g in stale]
        rng.shuffle(order)
        for g in order:
            stale.discard(g)
            new, gain, q = _solve_group(spec, g, A, Bp, perms, members[g], backend, cache if fast else None, versions)
            solves += 1
            if new is None or gain <= 0:
                continue
            perms[g] = new
            versions[g] += 1
            for key in [k for k in cache if k[0] == g]:  # own cached similarities: reorder columns
                sim, stamp, idx = cache[key]
                cache[key] = (sim[:, q], stamp, idx)
            for t, _ in members[g]:
                if not streaming:  # else made from perms when next asked for
                    Bp[t] = permute_tensor(spec, t, B[t], perms)
            stale |= neighbours[g]
            history.append(history[-1] + gain)
        if progress:
            info = {"objective": history[-1]}
            if not stale:  # no group can gain any more: say so rather than leave the bar at it/max_iter
                info["state"] = "converged"
            progress("weight matching", it, max_iter, info)
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


def _solve_group(spec, g, A, Bp, perms, tensors, backend, cache=None, versions=None):
    """A better assignment for group ``g`` (or None), its gain, and the reordering ``q``.

    Bp is B with all groups applied, so similarity columns are in the current order: S[j, k]
    compares A's unit j with B's unit p[k]; the new p is p[q] for q solving S."""
    grp = spec.groups[g]
    current = perms[g]
    if grp.kind != "free":
        new, gain = _solve_heads(spec, g, grp, A, Bp, perms, tensors, backend)
        return new, gain, None
    S = None
    for t, ax in tensors:
        sim = _contribution(spec, g, t, ax, A, Bp, perms, cache, versions)
        S = sim if S is None else S + sim
    n = grp.size
    q = solve_assignment(S, backend)
    rows = torch.arange(n, device=S.device)
    current_value = S.diagonal().double().sum()
    gain = float(S[rows, q].double().sum() - current_value)
    if gain <= 1e-7 * float(current_value.abs()):  # float32 similarities: smaller gains are rounding noise
        return None, 0.0, None
    return {"p": current["p"][q]}, gain, q


def _contribution(spec, g, t, ax, A, Bp, perms, cache, versions):
    """Tensor ``t``'s term of group ``g``'s similarity, sum over the other axes of A_j * Bp_k.

    Cached until a group on another axis of ``t`` changes; then, when that is one axis and few of
    its positions moved, updated with only the moved columns: S += A[:, D] (Bp_new - Bp_old)[:, D]^T,
    where Bp_old's column is found in Bp_new through the old and new gather indices."""
    n = spec.groups[g].size
    others = [o for o in spec.axes[t] if o != ax]
    stamp = tuple(versions[s.group] for o in others for s in spec.axes[t][o]) if versions is not None else None
    hit = cache.get((g, t, ax)) if cache is not None else None
    if hit is not None and hit[1] == stamp:
        return hit[0]
    idx = axis_index(spec, spec.axes[t][others[0]], perms) if len(others) == 1 else None
    sim = None
    if hit is not None and idx is not None and hit[2] is not None and len(spec.axes[t][ax]) == 1:
        sim = _update(hit[0], hit[2], idx, A[t], Bp[t], ax, others[0], n)
    if sim is None:
        for _seg, a, b in _blocks(spec, g, A, Bp, t, ax):
            part = a.reshape(n, -1) @ b.reshape(n, -1).T
            sim = part if sim is None else sim + part
    if cache is not None:
        cache[(g, t, ax)] = (sim, stamp, idx)
    return sim


def _update(sim, idx_old, idx_new, At, Bpt, ax, o, n):
    changed = (idx_old != idx_new).nonzero().flatten()
    if changed.numel() == 0:
        return sim
    if changed.numel() > idx_new.numel() // 2:  # a full product is as cheap
        return None
    inv_new = torch.empty_like(idx_new)
    inv_new[idx_new] = torch.arange(idx_new.numel(), device=idx_new.device)
    old_pos = inv_new[idx_old[changed]]  # where each moved source column sits now
    pos = o + 1 if o < ax else o  # axis o after moving ax to the front
    a = At.movedim(ax, 0).index_select(pos, changed).reshape(n, -1)
    b = Bpt.movedim(ax, 0)
    delta = (b.index_select(pos, changed) - b.index_select(pos, old_pos)).reshape(n, -1)
    return sim + a @ delta.T


def _solve_heads(spec, g, grp, A, Bp, perms, tensors, backend):
    current = perms[g]
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
                value[i, j] += S[part][i, j][torch.arange(d, device=value.device), u[i, j]].sum()
        units[part] = u
    heads = solve_assignment(value, backend)
    rows = torch.arange(H, device=value.device)
    cur_value = S["qk"][rows, rows].diagonal(dim1=1, dim2=2).sum() + S["vo"][rows, rows].diagonal(dim1=1, dim2=2).sum()
    gain = float(value[rows, heads].double().sum() - cur_value.double())
    if gain <= 1e-7 * float(cur_value.abs()):
        return None, 0.0
    # compose: new head j = current head heads[j]; its units are current units reindexed
    new = {"heads": current["heads"][heads]}
    for part in ("qk", "vo"):
        q = units[part][rows, heads]  # (H, d)
        new[part] = torch.gather(current[part][heads], 1, q)
    return new, gain
