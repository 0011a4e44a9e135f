"""Function-preserving depth growth by identity blocks: after every K blocks a copy of the previous block
is inserted with its attention and MLP output projections zeroed, so on a pre-norm residual stream
(x + f(norm(x))) it adds nothing and the grown model computes exactly what the input did (the
zero-initialised residual branch of Chen et al. 2016, "Net2Net", and Wang et al. 2023, LiGO / LLaMA Pro).
"""

from __future__ import annotations

from pathlib import Path

from modelsurgery.checkpoint import Checkpoint, check_output
from modelsurgery.errors import SurgeryError
from modelsurgery.families import detect_family
from modelsurgery.ops.grow.common import GrowOptions, GrowReport, Progress, no_progress
from modelsurgery.ops.grow.stack import grow_depth, require_blocks, single_input


def interleave_layout(num_layers: int, every: int) -> tuple[list[int], set[int]]:
    """Output layout and the output positions that are identity copies (after blocks K-1, 2K-1, ...)."""
    layout: list[int] = []
    identity: set[int] = set()
    for i in range(num_layers):
        layout.append(i)
        if (i + 1) % every == 0:
            identity.add(len(layout))
            layout.append(i)
    return layout, identity


def grow_interleave(ckpts: list[Checkpoint], out: Path, options: GrowOptions, progress: Progress = no_progress
                    ) -> GrowReport:
    ckpt = single_input(ckpts, "interleave")
    family = detect_family(ckpt, options.model)
    n = require_blocks(family, ckpt, "interleave")
    every = options.every if options.every is not None else 1
    if every < 1 or every > n:
        raise SurgeryError(f"--every {every}: must be between 1 and the number of blocks ({n})")
    layout, identity = interleave_layout(n, every)
    for j in sorted(identity):
        if not family.output_projections(layout[j]):
            raise SurgeryError(
                f"{ckpt.path}: block {layout[j]} of family '{family.name}' cannot be copied as an identity (no "
                "zeroed output projections make it one: post-LN blocks normalise after the residual sum, "
                "projection shortcuts change the stream); use --method stack"
            )
    check_output(out, options.force, [ckpt.path])
    return grow_depth(ckpt, out, options, layout, identity, family, "interleave", progress)
