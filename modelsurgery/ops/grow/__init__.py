"""Growth operators, registered by name: stack (G_stack and layer slices; Du et al. 2024), interleave
(identity blocks), width (Net2Net; Chen et al. 2016) and mixture (MixtureGrowth; Pham et al. 2024).
A new method is one new file plus one line in ``METHODS``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.ops.float_input import require_float
from modelsurgery.ops.grow.common import GrowOptions, GrowReport, Progress, no_progress
from modelsurgery.ops.grow.interleave import grow_interleave, interleave_layout
from modelsurgery.ops.grow.mixture import grow_mixture
from modelsurgery.ops.grow.plan import GrowthPlan, plan_growth
from modelsurgery.ops.grow.stack import grow_stack, slices_layout, stack_layout
from modelsurgery.ops.grow.width import grow_width

GrowMethod = Callable[[list[Checkpoint], Path, GrowOptions, Progress], GrowReport]

METHODS: dict[str, GrowMethod] = {
    "stack": grow_stack,
    "interleave": grow_interleave,
    "width": grow_width,
    "mixture": grow_mixture,
}

#: the method-specific options each method reads, with their flags; one set for another method would be
#: ignored (``--method interleave --factor 4`` still doubles the depth), so it is refused
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "stack": ("factor", "layers"),
    "interleave": ("every",),
    "width": ("factor", "split", "init_scale"),
    "mixture": ("coef_scale", "num_templates"),
}
FLAGS = {"factor": "--factor", "layers": "--layers", "every": "--every", "split": "--split",
         "init_scale": "--init-scale", "coef_scale": "--coef-scale", "num_templates": "--templates"}


def check_method_options(options: GrowOptions) -> None:
    """Refuse a method-specific option (changed from its default) that ``options.method`` does not read."""
    defaults = {f.name: f.default for f in fields(GrowOptions) if f.name in FLAGS}
    for name, default in defaults.items():
        if getattr(options, name) != default and name not in METHOD_OPTIONS[options.method]:
            readers = " or ".join(m for m, keys in METHOD_OPTIONS.items() if name in keys)
            raise SurgeryError(f"{FLAGS[name]} applies to --method {readers}, not to --method {options.method}")


def grow(inputs: Sequence[str | Path | Checkpoint], out: str | Path, options: GrowOptions,
         progress: Progress = no_progress) -> GrowReport:
    """Grow ``inputs`` into ``out`` with ``options.method``; returns the report. Nothing is written on error."""
    if options.method not in METHODS:
        raise SurgeryError(f"unknown growth method '{options.method}' (known: {', '.join(METHODS)})")
    check_method_options(options)
    if not inputs:
        raise SurgeryError("no input checkpoint given")
    options.check_write_options()
    ckpts = [c if isinstance(c, Checkpoint) else Checkpoint.open(c) for c in inputs]
    require_float(ckpts, "grow")
    return METHODS[options.method](ckpts, Path(out), options, progress)


__all__ = [
    "METHODS", "GrowOptions", "GrowReport", "GrowthPlan", "grow", "interleave_layout", "plan_growth",
    "slices_layout", "stack_layout",
]
