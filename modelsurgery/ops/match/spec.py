"""Permutation specs as data (Ainsworth et al. 2023, Git Re-Basin, Sec. 3): which tensor axes each
permutation group acts on, and applying permutations to a state dict.

A group is either ``free`` (any permutation of ``size`` hidden units: MLP units, conv channels,
the residual stream) or ``heads`` (attention: an order of the ``size`` key/value heads, the query
heads that share a key/value head moving with it, plus a permutation of units within each head
for Q/K together and for V/O together; ``rotary`` keeps Q/K units in place because RoPE rotates
fixed pairs of units). An axis of a tensor is a concatenation of segments, so GPT-2's fused
``c_attn`` (q|k|v column blocks) is three segments of one axis. Conventions: the permuted tensor
is ``T.index_select(axis, idx)``, i.e. unit ``j`` of the permuted model is unit ``p[j]`` of the
original.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from modelsurgery.errors import SurgeryError


@dataclass(frozen=True)
class PermGroup:
    name: str
    size: int
    kind: str = "free"  # free | heads
    head_dim: int = 1
    q_per_kv: int = 1
    rotary: bool = False


@dataclass(frozen=True)
class Segment:
    """A stretch of one axis driven by ``group``. ``view``: unit (free group; ``expand``
    consecutive entries per unit, e.g. a conv channel flattened over H*W), or q, k, v, o (heads)."""

    group: str
    view: str = "unit"
    expand: int = 1


@dataclass
class PermutationSpec:
    groups: dict[str, PermGroup] = field(default_factory=dict)
    #: tensor name -> {axis: [segments]}
    axes: dict[str, dict[int, list[Segment]]] = field(default_factory=dict)
    #: tensors permuted along but left out of the matching objective (BatchNorm running statistics)
    statistics: set[str] = field(default_factory=set)

    def matched(self) -> PermutationSpec:
        """The spec restricted to the tensors weight matching compares."""
        return PermutationSpec(self.groups, {k: v for k, v in self.axes.items() if k not in self.statistics})

    def add_group(self, group: PermGroup) -> str:
        self.groups[group.name] = group
        return group.name

    def add_axis(self, tensor: str, axis: int, *segments: Segment) -> None:
        """Register the groups driving ``axis`` of ``tensor``. An axis has one description: a second,
        different one (a shared layer registered twice with separate groups) is refused instead of
        overwriting the first, which would permute the tensor inconsistently with half its uses;
        groups meeting at one axis must be joined into one group before the spec is built."""
        axes = self.axes.setdefault(tensor, {})
        if axis in axes and axes[axis] != list(segments):
            raise SurgeryError(
                f"tensor '{tensor}': axis {axis} is driven by {', '.join(s.group for s in axes[axis])} and "
                f"{', '.join(s.group for s in segments)}; a shared layer needs one permutation group per axis"
            )
        axes[axis] = list(segments)

    def tensors_of(self, group: str) -> list[tuple[str, int]]:
        return [(t, ax) for t, axes in self.axes.items() for ax, segs in axes.items()
                if any(s.group == group for s in segs)]

    def segment_length(self, seg: Segment) -> int:
        g = self.groups[seg.group]
        if seg.view == "unit":
            return g.size * seg.expand
        per_head = g.head_dim * (g.q_per_kv if seg.view in ("q", "o") else 1)
        return g.size * per_head

    def validate(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Every axis covered by the spec has the length its segments say; names the first that does not."""
        for name, axes in self.axes.items():
            if name not in shapes:
                raise SurgeryError(f"tensor '{name}': named by the permutation spec but missing")
            for ax, segs in axes.items():
                want = sum(self.segment_length(s) for s in segs)
                if ax >= len(shapes[name]) or shapes[name][ax] != want:
                    raise SurgeryError(
                        f"tensor '{name}': axis {ax} of shape {tuple(shapes[name])} does not hold {want} "
                        "permutable units; the model is not permutable as described"
                    )

    def identity(self, device: torch.device | str = "cpu") -> dict[str, dict[str, torch.Tensor]]:
        """Identity permutations: free -> {"p"}, heads -> {"heads", "qk", "vo"}."""
        out = {}
        for name, g in self.groups.items():
            if g.kind == "free":
                out[name] = {"p": torch.arange(g.size, device=device)}
            else:
                units = torch.arange(g.head_dim, device=device).repeat(g.size, 1)
                out[name] = {"heads": torch.arange(g.size, device=device), "qk": units.clone(), "vo": units}
        return out


Perms = dict[str, dict[str, torch.Tensor]]


def segment_index(spec: PermutationSpec, seg: Segment, perms: Perms) -> torch.Tensor:
    """Source positions along the segment for each destination position."""
    g = spec.groups[seg.group]
    p = perms[seg.group]
    if seg.view == "unit":
        e = seg.expand
        return (p["p"][:, None] * e + torch.arange(e, device=p["p"].device)).flatten()
    h, d, G = p["heads"], g.head_dim, g.q_per_kv
    u = p["qk"] if seg.view in ("q", "k") else p["vo"]
    if seg.view in ("k", "v"):
        return (h[:, None] * d + u).flatten()
    r = torch.arange(G, device=h.device)
    return ((h[:, None, None] * G + r[None, :, None]) * d + u[:, None, :]).flatten()


def axis_index(spec: PermutationSpec, segs: list[Segment], perms: Perms) -> torch.Tensor:
    parts, offset = [], 0
    for seg in segs:
        parts.append(segment_index(spec, seg, perms) + offset)
        offset += spec.segment_length(seg)
    return torch.cat(parts)


def permute_tensor(spec: PermutationSpec, name: str, tensor: torch.Tensor, perms: Perms,
                   skip_axis: int | None = None) -> torch.Tensor:
    """``tensor`` with every spec'd axis permuted (except ``skip_axis``)."""
    for ax, segs in spec.axes.get(name, {}).items():
        if ax == skip_axis:
            continue
        idx = axis_index(spec, segs, perms).to(tensor.device)
        tensor = tensor.index_select(ax, idx)
    return tensor


def apply_permutation(state: dict[str, torch.Tensor], spec: PermutationSpec, perms: Perms
                      ) -> dict[str, torch.Tensor]:
    """A new state dict with the spec'd tensors permuted; other tensors are shared, not copied."""
    return {k: permute_tensor(spec, k, v, perms) if k in spec.axes else v for k, v in state.items()}
