"""Linear assignment (maximise sum of S[i, p(i)]): Jonker-Volgenant (lap), scipy, or a torch auction.

Backends: ``lap.lapjv`` (Jonker & Volgenant 1987, shortest augmenting paths), scipy's
``linear_sum_assignment`` (Crouse 2016, a JV variant), and a Jacobi auction with epsilon scaling
(Bertsekas 1988) written in torch so it runs on the same device as the similarity matrices.
The auction stops at ``eps < scale * 1e-9 / n``: its value is within ``n * eps`` of the optimum.
"""

from __future__ import annotations

import numpy as np
import torch

from modelsurgery.errors import SurgeryError

BACKENDS = ("auto", "lap", "scipy", "torch")


def solve_assignment(similarity: torch.Tensor | np.ndarray, backend: str = "auto") -> torch.Tensor:
    """The permutation ``p`` (int64 tensor, on the input's device) maximising ``sum_i S[i, p[i]]``.

    ``auto``: the torch auction for tensors on an accelerator, else lap, else scipy.
    """
    if backend not in BACKENDS:
        raise SurgeryError(f"assignment backend '{backend}': expected one of {', '.join(BACKENDS)}")
    S = similarity if isinstance(similarity, torch.Tensor) else torch.as_tensor(similarity)
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise SurgeryError(f"assignment needs a square matrix, got shape {tuple(S.shape)}")
    device = S.device
    if backend == "auto":
        backend = "torch" if device.type != "cpu" else ("lap" if _has_lap() else "scipy")
    if backend == "torch":
        return auction(S)
    cost = S.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(cost).all():
        raise SurgeryError("assignment: similarity matrix has non-finite values")
    if backend == "lap":
        import lap

        _, x, _ = lap.lapjv(-cost, extend_cost=False)
        perm = np.asarray(x, dtype=np.int64)
    else:
        from scipy.optimize import linear_sum_assignment

        _, perm = linear_sum_assignment(cost, maximize=True)
    return torch.as_tensor(perm, dtype=torch.int64, device=device)


def _has_lap() -> bool:
    try:
        import lap  # noqa: F401  (availability check)
    except ImportError:
        return False
    return True


def auction(S: torch.Tensor, rel_eps: float = 1e-9, factor: float = 6.0) -> torch.Tensor:
    """Jacobi auction with epsilon scaling: every unassigned row bids at once (vectorised)."""
    n = S.shape[0]
    A = S.to(torch.float64)
    if n == 1:
        return torch.zeros(1, dtype=torch.int64, device=S.device)
    scale = float(A.max() - A.min())
    if not np.isfinite(scale):
        raise SurgeryError("assignment: similarity matrix has non-finite values")
    if scale == 0.0:
        return torch.arange(n, device=S.device)
    final_eps = scale * rel_eps / n
    eps = scale / 4
    prices = torch.zeros(n, dtype=torch.float64, device=S.device)
    while True:
        owner = torch.full((n,), -1, dtype=torch.int64, device=S.device)  # object -> row
        assigned = torch.full((n,), -1, dtype=torch.int64, device=S.device)  # row -> object
        while True:
            free = (assigned < 0).nonzero().flatten()
            if free.numel() == 0:
                break
            values = A[free] - prices
            top, idx = values.topk(2, dim=1)
            bids = prices[idx[:, 0]] + (top[:, 0] - top[:, 1]) + eps
            best = torch.full((n,), -float("inf"), dtype=torch.float64, device=S.device)
            best.scatter_reduce_(0, idx[:, 0], bids, reduce="amax")
            won = bids >= best[idx[:, 0]]
            # one winner per object: the first of the highest bidders
            cand_obj, cand_row = idx[won, 0], free[won]
            winner = torch.full((n,), n, dtype=torch.int64, device=S.device)
            winner.scatter_reduce_(0, cand_obj, cand_row, reduce="amin")
            objs = (winner < n).nonzero().flatten()
            new_rows = winner[objs]
            old_rows = owner[objs]
            assigned[old_rows[old_rows >= 0]] = -1
            owner[objs] = new_rows
            assigned[new_rows] = objs
            prices[objs] = best[objs]
        if eps <= final_eps:
            break
        eps = max(eps / factor, final_eps)
    return assigned
