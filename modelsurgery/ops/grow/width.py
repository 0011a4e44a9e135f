"""Function-preserving width growth (Chen et al. 2016, "Net2Net: Accelerating Learning via Knowledge
Transfer", Sec. 2.1 Net2WiderNet): hidden units of MLPs, channels of sequential CNNs, the inner width of
residual blocks (conv1 -> bn1 -> conv2; the residual stream keeps its width) and the MLP intermediate size
of transformer blocks grow by ``factor``. Which units grow is the family's answer to ``width_groups()``
(producers whose outputs grow, each part of a fused gate|up included; norms; consumers whose inputs grow).

Default: new units get small random fan-in weights (std = init_scale x the layer's std) and zero
fan-out weights, so they add nothing until trained. ``split``: Net2WiderNet; a new unit copies the
fan-in of a unit j (each unit split in turn, in a random order) and j's fan-out is shared between j and
its copies, with a small zero-sum perturbation so the copies can drift apart (the sum is unchanged,
so the function is too). BatchNorm channels are carried along (copied, or identity statistics).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from modelsurgery.checkpoint import Checkpoint, PlannedTensor, check_output, plan_copy
from modelsurgery.errors import SurgeryError
from modelsurgery.families import Family, Linear, Norm, detect_family
from modelsurgery.ops.grow.common import (
    GrowOptions,
    GrowReport,
    Progress,
    new_report,
    no_progress,
    write_grown,
)
from modelsurgery.ops.grow.stack import single_input


@dataclass
class UnitGrowth:
    """How one group of units grows: ``old`` -> ``new`` units; ``src[k]``: the unit new unit old+k copies
    (split), or None for zero fan-out growth."""

    old: int
    new: int
    src: list[int] | None

    def counts(self) -> torch.Tensor:
        c = torch.ones(self.old)
        if self.src:
            c += torch.bincount(torch.tensor(self.src), minlength=self.old).float()
        return c


def plan_units(old: int, factor: float, split: bool, gen: torch.Generator) -> UnitGrowth:
    new = round(old * factor)
    if not split:
        return UnitGrowth(old, new, None)
    src: list[int] = []
    while len(src) < new - old:
        src += torch.randperm(old, generator=gen).tolist()
    return UnitGrowth(old, new, src[: new - old])


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """Randomness per tensor, independent of the order tensors are written in."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def grow_fan_in(w: torch.Tensor, g: UnitGrowth, std: float, gen: torch.Generator) -> torch.Tensor:
    """Rows (dim 0) for the new units: copies (split) or N(0, std^2)."""
    if g.src is not None:
        extra = w[torch.tensor(g.src, dtype=torch.long)]
    else:
        extra = torch.randn((g.new - g.old, *w.shape[1:]), generator=gen, dtype=torch.float32).to(w.dtype) * std
    return torch.cat([w, extra], 0)


def grow_bias(b: torch.Tensor, g: UnitGrowth, fill: float = 0.0) -> torch.Tensor:
    extra = b[torch.tensor(g.src, dtype=torch.long)] if g.src is not None else torch.full(
        (g.new - g.old,), fill, dtype=b.dtype)
    return torch.cat([b, extra], 0)


def grow_fan_out(w: torch.Tensor, g: UnitGrowth, noise: float, gen: torch.Generator) -> torch.Tensor:
    """Columns (dim 1, any trailing dims: conv kernels or spatial positions) for the new units: zero, or
    j's columns shared between j and its copies with a zero-sum perturbation."""
    if g.src is None:
        return torch.cat([w, torch.zeros((w.shape[0], g.new - g.old, *w.shape[2:]), dtype=w.dtype)], 1)
    w64 = w.double()
    shape = [1, g.old] + [1] * (w.dim() - 2)
    shared = w64 / g.counts().double().view(shape)
    src = torch.tensor(g.src, dtype=torch.long)
    eps = torch.randn((w.shape[0], len(g.src), *w.shape[2:]), generator=gen, dtype=torch.float64) * noise
    extra = shared[:, src] + eps
    shared = shared.index_add(1, src, -eps)  # the copies' perturbations are taken from their source unit
    return torch.cat([shared, extra], 1).to(w.dtype)


class WidthPlan:
    """Collects, per tensor, which groups grow its outputs and its inputs; ``planned()`` streams the
    result (one weight can be a consumer of one group and the producer of the next)."""

    def __init__(self, ckpt: Checkpoint, options: GrowOptions):
        self.ckpt, self.options = ckpt, options
        self.grows: dict[str, dict] = {}
        self.changed: dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]] = {}

    def set(self, name: str, shape: tuple[int, ...], fn: Callable[[], torch.Tensor]) -> None:
        self.changed[name] = (tuple(shape), fn)

    def linear(self, lin: Linear, fan_in: UnitGrowth | None, fan_out: UnitGrowth | None, positions: int = 1
               ) -> None:
        """``fan_in`` grows the weight's outputs (rows; each part of a fused weight), ``fan_out`` its inputs."""
        entry = self.grows.setdefault(lin.weight, {"lin": lin, "fan_in": None, "fan_out": None, "positions": 1})
        if fan_in is not None:
            entry["fan_in"] = fan_in
        if fan_out is not None:
            entry["fan_out"], entry["positions"] = fan_out, positions

    def _weight(self, lin: Linear, fan_in: UnitGrowth | None, fan_out: UnitGrowth | None, positions: int
                ) -> torch.Tensor:
        opts = self.options
        w = self.ckpt.get(lin.weight)
        w = w.t() if lin.transposed else w
        std = float(w.float().std())
        if fan_out is not None:
            rows = w.shape[0]
            v = w.reshape(rows, fan_out.old, -1) if positions > 1 or w.dim() == 2 else w
            if v.dim() == 2:
                v = v.unsqueeze(-1)
            v = grow_fan_out(v, fan_out, opts.init_scale * std * 0.1, tensor_generator(opts.seed, lin.weight))
            w = v.reshape(rows, -1, *w.shape[2:]) if w.dim() > 2 else v.reshape(rows, -1)
        if fan_in is not None:
            parts = w.chunk(max(1, len(lin.fused)), 0)
            w = torch.cat([grow_fan_in(part, fan_in, opts.init_scale * std,
                                       tensor_generator(opts.seed + 1 + k, lin.weight))
                           for k, part in enumerate(parts)], 0)
        return (w.t() if lin.transposed else w).contiguous()

    def _bias(self, lin: Linear, g: UnitGrowth) -> torch.Tensor:
        parts = self.ckpt.get(lin.bias).chunk(max(1, len(lin.fused)), 0)
        return torch.cat([grow_bias(b, g) for b in parts], 0)

    def norm(self, norm: Norm, g: UnitGrowth) -> None:
        fills = {norm.weight: 1.0, norm.bias: 0.0, norm.running_mean: 0.0, norm.running_var: 1.0}
        for name, fill in fills.items():
            if name:
                self.set(name, (g.new,), lambda n=name, f=fill: grow_bias(self.ckpt.get(n), g, f))

    def planned(self) -> list[PlannedTensor]:
        for e in self.grows.values():
            lin, fan_in, fan_out, positions = e["lin"], e["fan_in"], e["fan_out"], e["positions"]
            shape = list(self.ckpt.shape(lin.weight))
            out_dim, in_dim = (1, 0) if lin.transposed else (0, 1)
            parts = max(1, len(lin.fused))
            if fan_out is not None:
                shape[in_dim] = shape[in_dim] // fan_out.old * fan_out.new
            if fan_in is not None:
                shape[out_dim] = fan_in.new * parts
                if lin.bias:
                    self.set(lin.bias, (fan_in.new * parts,), lambda lin=lin, g=fan_in: self._bias(lin, g))
            self.set(lin.weight, tuple(shape),
                     lambda lin=lin, a=fan_in, b=fan_out, p=positions: self._weight(lin, a, b, p))
        out = []
        for name in self.ckpt:
            if name in self.changed:
                shape, fn = self.changed[name]
                out.append(PlannedTensor(name, shape, self.ckpt.info(name).dtype, fn))
            else:
                out.append(plan_copy(self.ckpt, name, raw=True))
        return out


def plan_groups(family: Family, plan: WidthPlan, factor: float, split: bool, gen: torch.Generator,
                report: GrowReport) -> dict | None:
    """Grow every group the family names (``width_groups()``); returns the new config.json."""
    groups = family.width_groups()
    if not groups:
        raise SurgeryError(
            f"{family.ckpt.path}: family '{family.name}' has no hidden units that width growth knows how to grow "
            "(supported: MLPs, sequential CNNs, ResNets (block inner width), transformer blocks with up/down MLP "
            "projections)"
        )
    sizes: dict[str, int] = {}
    for group in groups:
        g = plan_units(group.size, factor, split, gen)
        for lin in group.producers:
            plan.linear(lin, g, None)
        for norm in group.norms:
            plan.norm(norm, g)
        for lin in group.consumers:
            plan.linear(lin, None, g, group.positions)
        report.width_before[group.name] = g.old
        report.width_after[group.name] = g.new
        if group.config_key and sizes.setdefault(group.config_key, g.new) != g.new:
            raise SurgeryError(f"{family.ckpt.path}: config.json '{group.config_key}' holds one size, but the "
                               "grown blocks differ in width")
    cfg = family.ckpt.config
    return None if cfg is None else {**cfg, **sizes}


def grow_width(ckpts: list[Checkpoint], out: Path, options: GrowOptions, progress: Progress = no_progress
               ) -> GrowReport:
    ckpt = single_input(ckpts, "width")
    family = detect_family(ckpt, options.model)
    factor = 2.0 if options.factor is None else float(options.factor)
    if factor < 1:
        raise SurgeryError(f"--factor {factor}: width growth needs a factor >= 1")
    if options.init_scale < 0:
        raise SurgeryError(f"--init-scale {options.init_scale}: must be >= 0")
    gen = torch.Generator().manual_seed(options.seed)
    report = new_report("width", [ckpt], out, family)
    plan = WidthPlan(ckpt, options)
    config = plan_groups(family, plan, factor, options.split, gen, report)
    check_output(out, options.force, [ckpt.path])
    report.function_preserving = True
    return write_grown(out, [ckpt], plan.planned(), options, report, config, progress)
