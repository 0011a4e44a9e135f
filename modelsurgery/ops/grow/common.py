"""Shared pieces of the growth operators (Du et al. 2024, "Stacking Your Transformers"; Pham et al. 2024,
"MixtureGrowth"): options, the report, and the streaming writer call every method ends with."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelsurgery.checkpoint import Checkpoint, PlannedTensor, Provenance, write_checkpoint
from modelsurgery.checkpoint.output import output_is_folder
from modelsurgery.checkpoint.writer import WriteOptions
from modelsurgery.families import Family

Progress = Callable[[str, int, int, dict], None]


def no_progress(task: str, done: int, total: int, info: dict | None = None) -> None:
    return None


@dataclass
class GrowOptions(WriteOptions):
    """What to grow and how. ``factor``: depth multiple (stack) or width multiple (width); how the output
    is written (dtype, max_shard_size, hash_inputs) as ``WriteOptions``."""

    method: str = "stack"
    factor: float | None = None
    layers: str | None = None  # stack: "0:24,8:32" (half-open slices, in order)
    every: int | None = None  # interleave: insert an identity block after every K blocks
    split: bool = False  # width: Net2Net splitting instead of zero fan-out
    init_scale: float = 0.1  # width: new fan-in weights ~ N(0, (init_scale * std of the layer)^2)
    coef_scale: float = 1.0  # mixture: norm of new coefficients, relative to the trained ones
    num_templates: int | None = None  # mixture, plain inputs: templates per layer (default K*K - K + 1)
    seed: int = 0
    model: str | None = None  # custom family factory 'package.module:function'
    force: bool = False

    def parameters(self) -> dict:
        keys = ("factor", "layers", "every", "split", "init_scale", "coef_scale", "num_templates", "seed")
        return {k: getattr(self, k) for k in keys if getattr(self, k) not in (None, False)}


@dataclass
class GrowReport:
    method: str
    inputs: list[str]
    output: str
    family: str
    layers_before: int | None = None
    layers_after: int | None = None
    layout: list[int] | None = None  # output block i is input block layout[i]
    identity_blocks: list[int] = field(default_factory=list)
    width_before: dict[str, int] = field(default_factory=dict)
    width_after: dict[str, int] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    bytes_written: int = 0
    files: list[str] = field(default_factory=list)
    function_preserving: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def count_params(tensors: Sequence[PlannedTensor]) -> int:
    total = 0
    for t in tensors:
        n = 1
        for d in t.shape:
            n *= d
        total += n
    return total


def write_grown(
    out: Path,
    ckpts: Sequence[Checkpoint],
    tensors: list[PlannedTensor],
    options: GrowOptions,
    report: GrowReport,
    config: dict | None,
    progress: Progress = no_progress,
) -> GrowReport:
    """Write the planned tensors (config and the first input's extra files carried along) and finish the
    report; ``progress`` hears the writer's "write" task (tensors written of the planned ones)."""
    sources = [f for c in ckpts for f in c.source_files]
    provenance = Provenance(f"grow.{options.method}", options.parameters(), sources)
    # descriptive metadata (activation, CNN arch, input shape) still holds; quantization and provenance don't
    metadata = {k: v for k, v in ckpts[0].metadata.items()
                if k.startswith("modelsurgery.") and k != "modelsurgery.quantization"}
    written = write_checkpoint(
        out, tensors, provenance=provenance, config=config, metadata=metadata, extra_files=ckpts[0].extra_files(),
        force=options.force, progress=progress, **options.write_kwargs(),
    )
    if config is not None and not output_is_folder(out):
        report.notes.append(f"config.json (with the grown sizes) was not written: {out.name} is one file; "
                            "write to a folder to keep it")
    report.params_after = count_params(tensors)
    report.bytes_written = written.total_bytes
    report.files = [str(f) for f in written.files]
    return report


def new_report(method: str, ckpts: Sequence[Checkpoint], out: Path, family: Family) -> GrowReport:
    return GrowReport(
        method=method, inputs=[str(c.path) for c in ckpts], output=str(out), family=family.name,
        params_before=sum(c.num_parameters for c in ckpts),
    )


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
