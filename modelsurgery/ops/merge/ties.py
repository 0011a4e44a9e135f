"""TIES-merging (Yadav et al. 2023, "Resolving interference when merging models", Algorithm 1),
with mergekit's definitions (``ties``: magnitude sparsification, "sum" sign consensus, normalise):

1. trim: each task vector delta_i = theta_i - base keeps exactly int(density * n) entries of
   largest magnitude (mergekit's ``magnitude``), the rest set to 0;
2. elect: the sign of sum_i w_i * delta_i per entry, where a zero sum counts as + (mergekit:
   ``sum >= 0`` gives +1, so no entry is left without a sign);
3. disjoint mean: sum of the weighted deltas whose sign equals the elected one, divided by the sum
   of their weights (1 where none agrees); theta = base + lambda * that. With ``normalize`` false
   (mergekit's ``normalize: false``) the agreeing weighted deltas are summed, not averaged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from modelsurgery.ops.merge import Method, Param, register_method


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep exactly int(density * n) largest magnitudes (ties at the threshold broken by position: the first ones
    are kept), zero the rest."""
    if density >= 1:
        return delta
    return trim_(delta.clone(), density)


def trim_(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``trim`` in place: the entries of ``delta`` that are not kept set to +0.0."""
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    if k <= 0:
        return delta.zero_()
    return delta.masked_fill_(smallest_magnitudes(delta.view(-1), delta.numel() - k).view_as(delta), 0.0)


def smallest_magnitudes(flat: torch.Tensor, m: int) -> torch.Tensor:
    """Boolean mask of the m = n - k entries of the 1-D ``flat`` that the k largest magnitudes leave: ties at the
    threshold are kept in order of position, so the last of them are in the mask (a NaN counts as larger than
    any number, as in ``torch.topk``).

    A radix select, not ``torch.topk``: a float32 magnitude's bits read as an int32 order as the magnitudes
    do, so two histograms of 16 bits find the k-th largest; the mask is then two comparisons. On one
    thread it is about twice as fast as ``topk`` (one sequential selection of a 65M-entry tensor), holds no
    int64 indices, and its choice among equal magnitudes is defined (``topk``'s depends on its algorithm).
    """
    k = flat.numel() - m
    mags = flat.abs()
    if mags.dtype in (torch.float16, torch.bfloat16):
        mags = mags.float()  # exact
    if mags.dtype != torch.float32:  # float64: no 16-bit radix split; the threshold by selection
        keys = mags
        threshold = torch.kthvalue(keys, keys.numel() - k + 1).values
    else:
        keys = mags.view(torch.int32)  # >= 0: the sign bit is clear
        threshold = _kth_largest_key(keys, k)
    drop = keys < threshold
    ties = keys == threshold
    del keys, mags
    need = k - (flat.numel() - int(drop.count_nonzero()) - int(ties.count_nonzero()))  # ties to keep
    ties[:_position_of_nth(ties, need)] = False
    return drop.logical_or_(ties)


def _kth_largest_key(keys: torch.Tensor, k: int) -> int:
    """The k-th largest of non-negative int32 ``keys`` (1 <= k <= n): its top 16 bits from a histogram of
    every key's, then its low 16 bits from a histogram of the keys in that bin."""
    high = keys >> 16
    above = torch.bincount(high, minlength=1 << 15).flip(0).cumsum(0)  # keys with top bits >= 32767 - i
    i = int(torch.searchsorted(above, k))
    top = (1 << 15) - 1 - i
    rank = k - (int(above[i - 1]) if i else 0)  # the key's rank among those of its bin
    low = keys[high == top] & 0xFFFF
    del high
    above = torch.bincount(low, minlength=1 << 16).flip(0).cumsum(0)
    return (top << 16) | ((1 << 16) - 1 - int(torch.searchsorted(above, rank)))


def _position_of_nth(mask: torch.Tensor, n: int, block: int = 1 << 20) -> int:
    """The position just after the n-th True of the 1-D ``mask`` (0 when n is 0), counted a block at a time."""
    if n <= 0:
        return 0
    seen = 0
    for start in range(0, mask.numel(), block):
        part = mask[start:start + block]
        count = int(part.count_nonzero())
        if seen + count >= n:
            return start + int(part.nonzero()[n - seen - 1]) + 1
        seen += count
    return mask.numel()


#: entries of the tensor elected and averaged at a time (per model): the election is elementwise, so a slice at
#: a time gives the same values with its temporaries (sums, signs, agreement) a slice's size, not the tensor's
CHUNK = 1 << 18


def ties(tensors: list[torch.Tensor], weights: list[float], base: torch.Tensor,
         params: Mapping[str, Any]) -> torch.Tensor:
    # the peak is the n trimmed deltas in float32, the output and the trim's temporaries of one delta; each delta
    # is widened into its slot and the base subtracted there (float32 - float32 of a 16-bit base: the same bits)
    w = torch.tensor(weights, dtype=torch.float32).view(-1, 1)
    deltas = torch.empty((len(tensors), *base.shape), dtype=torch.float32)
    b = base if base.dtype in (torch.float16, torch.bfloat16, torch.float32) else base.to(torch.float32)
    for i, t in enumerate(tensors):
        trim_(deltas[i].copy_(t).sub_(b), float(params["density"]))
    flat, base_flat = deltas.view(len(tensors), -1), b.reshape(-1)
    out = torch.empty(base_flat.shape, dtype=torch.float32)
    normalize, scale = params.get("normalize", True), float(params["scale"])
    for s in range(0, out.numel(), CHUNK):
        part = flat[:, s:s + CHUNK].mul(w)
        elected = torch.where(part.sum(0) >= 0, 1.0, -1.0)
        agree = torch.sign(part).eq_(elected)  # 1 or 0; a trimmed (zero) entry has sign 0 and never agrees
        merged = part.mul_(agree).sum(0)
        if normalize:
            divisor = agree.mul_(w).sum(0)
            merged.div_(divisor.masked_fill_(divisor == 0, 1.0))
        torch.add(merged.mul_(scale), base_flat[s:s + CHUNK], out=out[s:s + CHUNK])
    return out.view(base.shape)


PARAMS = (
    Param("density", float, 0.2, "fraction of each task vector kept (by magnitude)",
          paper="Yadav et al. 2023: top-k 20%", low=0.0, high=1.0),
    Param("scale", float, 1.0, "lambda: scale of the merged task vector",
          paper="Yadav et al. 2023: lambda = 1 without validation data; mergekit: 1"),
    Param("normalize", bool, True, "divide the agreeing deltas by their summed weights (disjoint mean)",
          paper="Yadav et al. 2023 Alg. 1: disjoint mean; mergekit ties: normalize true"),
)

register_method(Method("ties", ties, PARAMS, needs_base=True, paper="Yadav et al. 2023"))
