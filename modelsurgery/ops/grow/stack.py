"""Depth growth by stacking: G_stack (Du et al. 2024, "Stacking Your Transformers", Sec. 3: the L-block
stack repeated g times, target block i = source block i mod L) and explicit layer slices (depth
up-scaling, Kim et al. 2023, "SOLAR 10.7B": layers 0:24 and 8:32 of a 32-layer model concatenated).

Tensors are streamed: block tensors are copied byte for byte from the source file under their new
names (no tensor is materialised), everything outside the block stack (embeddings, final norm, head)
is copied once, so tied embeddings stay tied and nothing is stored twice under one name.
"""

from __future__ import annotations

from pathlib import Path

import torch

from modelsurgery.checkpoint import Checkpoint, PlannedTensor, check_output, plan_copy
from modelsurgery.errors import SurgeryError
from modelsurgery.families import Family, detect_family
from modelsurgery.ops.grow.common import (
    GrowOptions,
    GrowReport,
    Progress,
    new_report,
    no_progress,
    write_grown,
)


def stack_layout(num_layers: int, factor: int) -> list[int]:
    """G_stack: output block i is input block i mod L, for g*L output blocks."""
    return [i % num_layers for i in range(factor * num_layers)]


def slices_layout(num_layers: int, spec: str, where: str = "--layers") -> list[int]:
    """'0:24,8:32' -> [0..23, 8..31]: half-open slices of the input's blocks, concatenated in order."""
    layout: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            a, b = (int(x) for x in part.split(":"))
        except ValueError:
            raise SurgeryError(f"{where} '{spec}': slice '{part}' is not of the form start:end") from None
        if not (0 <= a < b <= num_layers):
            raise SurgeryError(
                f"{where} '{spec}': slice '{part}' is out of range for a model with {num_layers} blocks "
                f"(use start:end with 0 <= start < end <= {num_layers})"
            )
        layout.extend(range(a, b))
    return layout


def require_blocks(family: Family, ckpt: Checkpoint, method: str) -> int:
    n = family.num_layers
    if n == 0:
        raise SurgeryError(
            f"{ckpt.path}: family '{family.name}' has no repeated blocks, so --method {method} cannot "
            "change its depth (use --method width for MLPs and CNNs)"
        )
    found = [b.index for b in family.blocks()]
    if found != list(range(n)):  # layouts address blocks by position 0..n-1
        gap = next(i for i in range(n) if i not in found)
        raise SurgeryError(f"{ckpt.path}: block {gap} is missing (blocks found: {', '.join(map(str, found))}); "
                           f"--method {method} needs blocks numbered 0..{n - 1}")
    return n


def plan_depth(family: Family, layout: list[int], identity: set[int] | None = None
               ) -> tuple[list[PlannedTensor], list[int]]:
    """Planned tensors for output blocks ``layout`` (source index per output block). Output blocks in
    ``identity`` get zeroed output projections (see interleave). Non-block tensors are copied once."""
    ckpt = family.ckpt
    identity = identity or set()
    blocks = {b.index: b for b in family.blocks()}
    template = family.blocks()[0].prefix
    position = {n: i for i, n in enumerate(ckpt.keys())}
    outside = [n for n in ckpt if family.block_of(n) is None]
    first_block_pos = min(position[b.names[0]] for b in blocks.values())
    before = [n for n in outside if position[n] < first_block_pos]
    after = [n for n in outside if position[n] >= first_block_pos]
    plans = [plan_copy(ckpt, n, raw=True) for n in before]
    zeroed_sources: list[int] = []
    for j, src in enumerate(layout):
        zero: set[str] = set()
        if j in identity:
            zeroed_sources.append(src)
            for lin in family.output_projections(src):
                zero.update(x for x in (lin.weight, lin.bias) if x)
            if not zero:
                raise SurgeryError(
                    f"{ckpt.path}: family '{family.name}' names no output projections for block {src}, "
                    "so an identity copy of it cannot be made"
                )
        for name in blocks[src].names:
            suffix = family.block_of(name)[1]
            new = block_rename(family, template, j, suffix)
            if name in zero:
                info = ckpt.info(name)
                plans.append(PlannedTensor(new, info.shape, info.dtype,
                                           lambda s=info.shape, d=info.dtype: torch.zeros(s, dtype=d)))
            else:
                plans.append(plan_copy(ckpt, name, new, raw=True))
    plans += [plan_copy(ckpt, n, raw=True) for n in after]
    return plans, zeroed_sources


def block_rename(family: Family, template: str, index: int, suffix: str) -> str:
    """``family.block_name`` without rescanning the checkpoint for every tensor when the family keeps
    the base implementation (which derives names from the first block's prefix)."""
    if type(family).block_name is Family.block_name:
        import re

        return re.sub(r"\d+(\.)$", f"{index}\\1", template) + suffix
    return family.block_name(index, suffix)


def config_for_depth(family: Family, layout: list[int]) -> dict | None:
    """config.json for output blocks ``layout``: each block's per-layer entries (attention type, window)
    go with it to its new position."""
    cfg = family.config_for_layout(layout)
    if cfg is None and family.ckpt.config is not None:
        raise SurgeryError(
            f"{family.ckpt.path}: family '{family.name}' cannot update config.json for {len(layout)} layers"
        )
    return cfg


def grow_depth(ckpt: Checkpoint, out: Path, options: GrowOptions, layout: list[int], identity: set[int],
               family: Family, method: str, progress: Progress = no_progress) -> GrowReport:
    family.check_layout(layout)
    report = new_report(method, [ckpt], out, family)
    report.layers_before = family.num_layers
    report.layers_after = len(layout)
    report.layout = layout
    report.identity_blocks = sorted(identity)
    plans, _ = plan_depth(family, layout, identity)
    report.function_preserving = bool(identity) and len(layout) - len(identity) == family.num_layers
    return write_grown(out, [ckpt], plans, options, report, config_for_depth(family, layout), progress)


def grow_stack(ckpts: list[Checkpoint], out: Path, options: GrowOptions, progress: Progress = no_progress
               ) -> GrowReport:
    """``--method stack --factor G`` (G_stack) or ``--method stack --layers 'a:b,c:d'``."""
    ckpt = single_input(ckpts, "stack")
    family = detect_family(ckpt, options.model)
    n = require_blocks(family, ckpt, "stack")
    if options.layers and options.factor is not None:
        raise SurgeryError("--method stack takes --factor or --layers, not both")
    if options.layers:
        layout = slices_layout(n, options.layers)
    else:
        factor = 2 if options.factor is None else options.factor
        if factor < 1 or factor != int(factor):
            raise SurgeryError(f"--factor {factor}: stacking repeats the block stack a whole number of times >= 1")
        layout = stack_layout(n, int(factor))
    check_output(out, options.force, [ckpt.path])
    return grow_depth(ckpt, out, options, layout, set(), family, "stack", progress)


def single_input(ckpts: list[Checkpoint], method: str) -> Checkpoint:
    if len(ckpts) != 1:
        raise SurgeryError(f"--method {method} takes one input checkpoint, got {len(ckpts)}")
    return ckpts[0]
