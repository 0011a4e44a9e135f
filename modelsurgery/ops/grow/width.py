"""Function-preserving width growth (Chen et al. 2016, "Net2Net: Accelerating Learning via Knowledge
Transfer", Sec. 2.1 Net2WiderNet): hidden units of MLPs, channels of sequential CNNs, the inner width of
residual blocks (conv1 -> bn1 -> conv2; the residual stream keeps its width) and the MLP intermediate size
of transformer blocks grow by ``factor``.

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

CHAIN_FAMILIES = ("mlp", "cnn")
INTERMEDIATE_KEYS = ("intermediate_size", "n_inner", "ffn_dim")


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
    """Collects the new value (a closure) of every tensor that changes."""

    def __init__(self, ckpt: Checkpoint, options: GrowOptions):
        self.ckpt, self.options = ckpt, options
        self.changed: dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]] = {}

    def std(self, name: str) -> float:
        w = self.ckpt.get(name).float()
        return float(w.std()) if w.numel() > 1 else 1.0

    def set(self, name: str, shape: tuple[int, ...], fn: Callable[[], torch.Tensor]) -> None:
        self.changed[name] = (tuple(shape), fn)

    def linear(self, lin: Linear, fan_in: UnitGrowth | None, fan_out: UnitGrowth | None, positions: int = 1
               ) -> None:
        """Grow a linear/conv weight: ``fan_in`` grows its outputs (rows), ``fan_out`` its inputs."""
        ckpt, opts = self.ckpt, self.options
        shape = list(ckpt.shape(lin.weight))
        out_dim, in_dim = (1, 0) if lin.transposed else (0, 1)

        def weight(lin=lin, fan_in=fan_in, fan_out=fan_out, positions=positions):
            w = ckpt.get(lin.weight)
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
                w = grow_fan_in(w, fan_in, opts.init_scale * std, tensor_generator(opts.seed + 1, lin.weight))
            return (w.t() if lin.transposed else w).contiguous()

        if fan_out is not None:
            shape[in_dim] = shape[in_dim] // fan_out.old * fan_out.new
        if fan_in is not None:
            shape[out_dim] = fan_in.new
        self.set(lin.weight, tuple(shape), weight)
        if lin.bias and fan_in is not None:
            self.set(lin.bias, (fan_in.new,), lambda b=lin.bias, g=fan_in: grow_bias(ckpt.get(b), g))

    def norm(self, norm: Norm, g: UnitGrowth) -> None:
        fills = {norm.weight: 1.0, norm.bias: 0.0, norm.running_mean: 0.0, norm.running_var: 1.0}
        for name, fill in fills.items():
            if name:
                self.set(name, (g.new,), lambda n=name, f=fill: grow_bias(self.ckpt.get(n), g, f))

    def planned(self) -> list[PlannedTensor]:
        out = []
        for name in self.ckpt:
            if name in self.changed:
                shape, fn = self.changed[name]
                out.append(PlannedTensor(name, shape, self.ckpt.info(name).dtype, fn))
            else:
                out.append(plan_copy(self.ckpt, name, raw=True))
        return out


def plan_chain(family: Family, plan: WidthPlan, factor: float, split: bool, gen: torch.Generator, report) -> None:
    """MLP / sequential CNN: every conv or linear output except the last grows; BatchNorms follow."""
    items = family.layers()
    weights = [i for i, x in enumerate(items) if isinstance(x, Linear)]
    if len(weights) < 2:
        raise SurgeryError(f"{family.ckpt.path}: a single layer has no hidden units to grow")
    growth: UnitGrowth | None = None
    for pos, idx in enumerate(weights):
        lin = items[idx]
        last = pos == len(weights) - 1
        is_linear = len(family.ckpt.shape(lin.weight)) == 2
        positions = family.spatial_positions(lin.weight.rsplit(".", 1)[0]) if (
            growth is not None and is_linear and hasattr(family, "spatial_positions")) else 1
        new_growth = None if last else plan_units(family.ckpt.shape(lin.weight)[0], factor, split, gen)
        plan.linear(lin, new_growth, growth, positions)
        if new_growth is not None:
            report.width_before[lin.weight] = new_growth.old
            report.width_after[lin.weight] = new_growth.new
            stop = weights[pos + 1]
            for norm in items[idx + 1: stop]:
                if isinstance(norm, Norm):
                    plan.norm(norm, new_growth)
        growth = new_growth


def plan_transformer(family: Family, plan: WidthPlan, factor: float, split: bool, gen: torch.Generator, report
                     ) -> int:
    """Transformer blocks: the MLP's up (and gate) outputs grow, its down projection's inputs follow."""
    inner = None
    for i in range(family.num_layers):
        lin = family.block_linears(i)
        up = lin["up"]
        size = family.ckpt.shape(up.weight)[1 if up.transposed else 0]
        g = plan_units(size, factor, split, gen)
        inner = g.new
        for role in ("up", "gate"):
            if role in lin:
                plan.linear(lin[role], g, None)
        plan.linear(lin["down"], None, g)
        report.width_before[f"block {i} mlp"] = g.old
        report.width_after[f"block {i} mlp"] = g.new
    return inner


def plan_resnet(family: Family, plan: WidthPlan, factor: float, split: bool, gen: torch.Generator, report
                ) -> None:
    """Residual blocks: conv1's outputs (and bn1) grow, conv2's inputs follow. The residual stream, whose
    channels every block, shortcut and the head share, keeps its width, so shortcuts stay valid."""
    for i, block in enumerate(family.blocks()):
        lin = family.block_linears(i)
        g = plan_units(family.ckpt.shape(lin["conv1"].weight)[0], factor, split, gen)
        plan.linear(lin["conv1"], g, None)
        plan.norm(family.block_norms(i)["bn1"], g)
        plan.linear(lin["conv2"], None, g)
        report.width_before[f"{block.prefix}inner"] = g.old
        report.width_after[f"{block.prefix}inner"] = g.new


def config_for_width(family: Family, inner: int) -> dict | None:
    cfg = family.ckpt.config
    if cfg is None:
        return None
    cfg = dict(cfg)
    keys = [k for k in INTERMEDIATE_KEYS if k in cfg]
    if not keys:
        raise SurgeryError(f"{family.ckpt.path}: config.json names no MLP size ({', '.join(INTERMEDIATE_KEYS)})")
    for k in keys:
        cfg[k] = inner
    return cfg


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
    config = ckpt.config
    if family.name in CHAIN_FAMILIES:
        plan_chain(family, plan, factor, options.split, gen, report)
    elif family.name == "resnet":
        plan_resnet(family, plan, factor, options.split, gen, report)
    elif family.num_layers and {"up", "down"} <= set(family.block_linears(0)):
        config = config_for_width(family, plan_transformer(family, plan, factor, options.split, gen, report))
    else:
        raise SurgeryError(
            f"{ckpt.path}: family '{family.name}' has no hidden units that width growth knows how to grow "
            "(supported: MLPs, sequential CNNs, ResNets (block inner width), transformer blocks with up/down MLP "
            "projections)"
        )
    check_output(out, options.force, [ckpt.path])
    report.function_preserving = True
    return write_grown(out, [ckpt], plan.planned(), options, report, config)
