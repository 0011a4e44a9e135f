"""Weight Aligning (Zhao et al., CVPR 2020, "Maintaining Discrimination and Fairness in Class Incremental
Learning", Sec. 3.2): gamma = mean ||w_old|| / mean ||w_new||, new-class rows of the classifier times gamma.

After class-incremental training with a small memory of old classes, the new-class weight vectors of the
last fully connected layer grow larger than the old ones, and the model predicts new classes too often.
Rescaling the new rows so that both groups have the same mean norm removes much of that bias, after
training, without data. The paper trains with the FC weights clipped to be non-negative; without that
the premise can fail (new-class norms already smaller, gamma > 1) and blind alignment hurts, so gamma
is capped at 1 by default. The official code uses L1 norms, no FC bias and the cap; PyCIL uses L2
norms, leaves the bias unscaled and does not cap. Both are options here.

Multi-step incremental learning: groups ``[(0, 50), (50, 60), (60, 70)]`` align every later group to the
first. Aligning an aligned layer finds gamma = 1 and changes nothing (idempotent).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelsurgery.checkpoint import (
    Checkpoint,
    Provenance,
    check_output,
    plan_copy,
    plan_tensor,
    write_checkpoint,
)
from modelsurgery.checkpoint.writer import WriteOptions
from modelsurgery.data import Dataset, check_fits, load_data
from modelsurgery.errors import SurgeryError
from modelsurgery.families import Family, Linear, detect_family
from modelsurgery.memory import row_blocks
from modelsurgery.ops.evaluate import evaluate
from modelsurgery.ops.float_input import require_float

#: |gamma - 1| below this counts as already aligned: the rows are left bit-for-bit unchanged
ALIGNED_TOL = 1e-6

Progress = Callable[[str, int, int, dict], None]


@dataclass
class AlignOptions(WriteOptions):
    """Which rows to align and how; how the output is written (dtype, max_shard_size, hash_inputs) as
    ``WriteOptions``."""

    old_classes: int | None = None
    #: class groups as (start, end) row ranges; the first is the reference, the others are aligned to it
    groups: list[tuple[int, int]] | None = None
    layer: str | None = None
    norm: int = 1
    bias: str = "scale"  # scale | keep
    clamp: bool = True
    eval_data: Path | None = None
    model: str | None = None
    force: bool = False

    def parameters(self) -> dict:
        return {"old_classes": self.old_classes, "groups": self.groups, "layer": self.layer, "norm": self.norm,
                "bias": self.bias, "clamp": self.clamp}


@dataclass
class GroupReport:
    start: int
    end: int
    mean_norm_before: float
    mean_norm_after: float
    gamma: float  # applied
    gamma_raw: float  # before the cap
    capped: bool

    def to_dict(self) -> dict:
        return dict(self.__dict__, classes=f"{self.start}:{self.end}")


@dataclass
class AlignReport:
    input: str
    output: str | None
    family: str
    layer: str
    bias_name: str | None
    norm: int
    bias: str
    clamp: bool
    groups: list[GroupReport]
    negative_share: float
    norms_before: list[float]
    norms_after: list[float]
    warnings: list[str] = field(default_factory=list)
    eval: dict | None = None
    files: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(g.gamma != 1.0 for g in self.groups[1:])

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["groups"] = [g.to_dict() for g in self.groups]
        d["changed"] = self.changed
        return d


# ----- options ---------------------------------------------------------------------------------
def parse_class_groups(text: str) -> list[tuple[int, int]]:
    """'0:50,50:60,60:70' -> [(0, 50), (50, 60), (60, 70)] (validated against the layer later)."""
    groups = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            a, b = (int(x) for x in part.split(":"))
        except ValueError:
            raise SurgeryError(f"--classes '{text}': expected start:end ranges such as 0:50,50:60") from None
        groups.append((a, b))
    return groups


def resolve_groups(options: AlignOptions, num_classes: int, layer: str) -> list[tuple[int, int]]:
    if (options.old_classes is None) == (options.groups is None):
        raise SurgeryError("give exactly one of --old-classes N and --classes 'a:b,b:c'")
    if num_classes < 2:
        raise SurgeryError(f"tensor '{layer}': {num_classes} class row(s); aligning needs old and new classes (2 or "
                           "more rows; name the classifier with --layer)")
    if options.old_classes is not None:
        n = options.old_classes
        if not 0 < n < num_classes:
            raise SurgeryError(f"tensor '{layer}': --old-classes {n} out of range; the layer has {num_classes} "
                               f"classes, so N must be between 1 and {num_classes - 1}")
        return [(0, n), (n, num_classes)]
    groups = list(options.groups or [])
    if len(groups) < 2:
        raise SurgeryError("--classes needs at least two groups: the old classes first, then each later step")
    taken: set[int] = set()
    for a, b in groups:
        if not 0 <= a < b <= num_classes:
            raise SurgeryError(f"tensor '{layer}': class range {a}:{b} is empty or outside 0:{num_classes}")
        if taken & set(range(a, b)):
            raise SurgeryError(f"tensor '{layer}': class range {a}:{b} overlaps an earlier group")
        taken |= set(range(a, b))
    return groups


# ----- the classifier --------------------------------------------------------------------------
def find_classifier(family: Family, layer: str | None = None) -> Linear:
    """The named layer, else the family's ``classifier()``."""
    ckpt = family.ckpt
    tied = family.tied_weights()
    if layer is not None:
        weight = layer if layer in ckpt else f"{layer}.weight"
        weight = family.renamed_weights().get(weight, weight)  # transformers' name for it (GPT-NeoX's lm_head)
        if weight in tied:
            raise SurgeryError(f"{ckpt.path}: '{layer}' is not stored: the output head is tied to the input "
                               f"embedding '{tied[weight]}'; name that with --layer to rescale both")
        if weight not in ckpt:
            raise SurgeryError(f"{ckpt.path}: no layer or tensor named '{layer}'")
        if len(ckpt.shape(weight)) != 2:
            raise SurgeryError(f"{ckpt.path}: tensor '{weight}' has shape {ckpt.shape(weight)}, not a Linear "
                               "weight [classes, features]")
        prefix = weight[: -len(".weight")] if weight.endswith(".weight") else None
        bias = f"{prefix}.bias" if prefix is not None and f"{prefix}.bias" in ckpt else None
        # the family knows how it stores the layer: GPT-2's Conv1D keeps (in, out), its classes are the columns
        described = [x for x in family.layers() if isinstance(x, Linear)]
        described += [x for i in range(family.num_layers) for x in family.block_linears(i).values()]
        known = next((x for x in described if x.weight == weight), None)
        if known is not None and known.fused:
            raise SurgeryError(f"{ckpt.path}: tensor '{weight}' fuses {', '.join(known.fused)} projections; "
                               "it is no classifier")
        return Linear(weight, bias, transposed=known is not None and known.transposed)
    found = family.classifier()
    if found is not None:
        return found
    if tied:
        head, embedding = next(iter(tied.items()))
        raise SurgeryError(f"{ckpt.path}: no Linear classifier found (family '{family.name}'): the output head "
                           f"'{head}' is tied to the input embedding '{embedding}'; --layer {embedding} rescales both")
    raise SurgeryError(f"{ckpt.path}: no Linear classifier found (family '{family.name}'); name it with --layer")


def class_rows(weight: torch.Tensor, lin: Linear) -> torch.Tensor:
    """[classes, features] view of a classifier weight (GPT-2 style Conv1D stores it transposed)."""
    return weight.t() if lin.transposed else weight


#: entries of a classifier widened to float64 at a time: 32 MB (a 32000-class LM head in float64: 500 MB)
CHUNK_ELEMENTS = 1 << 22


def row_chunks(start: int, end: int, width: int) -> list[tuple[int, int]]:
    return row_blocks(start, end, width, CHUNK_ELEMENTS)


def row_norms(rows: torch.Tensor, p: int) -> torch.Tensor:
    """Each row's p-norm, computed in float64 a slice of rows at a time (a row's norm does not depend on the
    others: the same values as the whole matrix widened at once, without its float64 copy)."""
    out = torch.empty(rows.shape[0], dtype=torch.float64)
    for a, b in row_chunks(0, rows.shape[0], rows.shape[1]):
        out[a:b] = rows[a:b].double().norm(p=p, dim=1)
    return out


@dataclass
class AlignedClassifier:
    weight: torch.Tensor  # as stored (transposed back when the layer is)
    bias: torch.Tensor | None
    groups: list[GroupReport]
    norms_before: torch.Tensor  # float64, per class
    norms_after: torch.Tensor


# ----- the operation ---------------------------------------------------------------------------
def weight_align(
    weight: torch.Tensor, bias: torch.Tensor | None, groups: list[tuple[int, int]], *, norm: int = 1,
    scale_bias: bool = True, clamp: bool = True, transposed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, list[GroupReport]]:
    """Rescale each later group of classifier rows to the first group's mean norm. Returns new tensors."""
    aligned = align_rows(weight, bias, groups, norm=norm, scale_bias=scale_bias, clamp=clamp, transposed=transposed)
    return aligned.weight, aligned.bias, aligned.groups


def align_rows(
    weight: torch.Tensor, bias: torch.Tensor | None, groups: list[tuple[int, int]], *, norm: int = 1,
    scale_bias: bool = True, clamp: bool = True, transposed: bool = False,
) -> AlignedClassifier:
    """``weight_align`` with the per-class norms before and after (the report's): each row's norm is computed
    once, and again after scaling only for the rows that were scaled."""
    if norm not in (1, 2):
        raise SurgeryError(f"--norm {norm}: expected 1 or 2")
    rows = class_rows(weight, Linear("", transposed=transposed)).clone()
    new_bias = bias.clone() if bias is not None else None
    norms = row_norms(rows, norm)
    norms_after = norms.clone()
    (r0, r1) = groups[0]
    ref = norms[r0:r1].mean().item()
    reports = [GroupReport(r0, r1, ref, ref, 1.0, 1.0, False)]
    for a, b in groups[1:]:
        mean = norms[a:b].mean().item()
        raw = ref / mean if mean > 0 else 1.0
        gamma = min(raw, 1.0) if clamp else raw
        if abs(gamma - 1.0) <= ALIGNED_TOL:
            gamma = 1.0
        if gamma != 1.0:
            for i, j in row_chunks(a, b, rows.shape[1]):  # elementwise: a slice at a time gives the same values
                rows[i:j] = (rows[i:j].double() * gamma).to(rows.dtype)
            if scale_bias and new_bias is not None:
                new_bias[a:b] = (new_bias[a:b].double() * gamma).to(new_bias.dtype)
            norms_after[a:b] = row_norms(rows[a:b], norm)
        after = norms_after[a:b].mean().item()
        reports.append(GroupReport(a, b, mean, after, gamma, raw, clamp and raw > 1.0 + ALIGNED_TOL))
    out = rows.t().contiguous() if transposed else rows
    return AlignedClassifier(out, new_bias, reports, norms, norms_after)


def align_checkpoint(path: Path, out: Path | None, options: AlignOptions, progress: Progress | None = None
                     ) -> AlignReport:
    """Weight-align the classifier of the checkpoint at ``path`` and write the result to ``out``
    (None: report only). Every other tensor is copied unchanged."""
    progress = progress or (lambda task, done, total, info=None: None)
    if options.bias not in ("scale", "keep"):
        raise SurgeryError(f"--bias {options.bias}: expected scale or keep")
    if options.norm not in (1, 2):
        raise SurgeryError(f"--norm {options.norm}: expected 1 or 2")
    options.check_write_options()
    ckpt = Checkpoint.open(path)
    require_float([ckpt], "align")
    if out is not None:
        data = [Path(options.eval_data)] if options.eval_data is not None else []
        check_output(Path(out), options.force, [*ckpt.source_files, Path(path), *data])
    family = detect_family(ckpt, options.model)
    lin = find_classifier(family, options.layer)
    weight = ckpt.get(lin.weight)
    if not weight.dtype.is_floating_point:
        raise SurgeryError(f"{ckpt.path}: tensor '{lin.weight}' is {weight.dtype}, not a floating-point weight "
                           "(align before quantizing)")
    bias = ckpt.get(lin.bias) if lin.bias else None
    rows = class_rows(weight, lin)
    groups = resolve_groups(options, rows.shape[0], lin.weight)
    if options.eval_data is not None:  # read the data before any work, so a bad file fails fast
        data = load_eval_data(Path(options.eval_data), family, lin)
    aligned = align_rows(
        weight, bias, groups, norm=options.norm, scale_bias=options.bias == "scale", clamp=options.clamp,
        transposed=lin.transposed,
    )
    new_w, new_b = aligned.weight, aligned.bias
    report = AlignReport(
        input=str(path), output=str(out) if out is not None else None, family=family.name, layer=lin.weight,
        bias_name=lin.bias, norm=options.norm, bias=options.bias, clamp=options.clamp, groups=aligned.groups,
        # a count over the size: the mean of the 0/1 float64 copy it was, the same value (its sum is exact)
        negative_share=int(torch.count_nonzero(rows < 0)) / rows.numel(),
        norms_before=aligned.norms_before.tolist(), norms_after=aligned.norms_after.tolist(),
    )
    report.warnings = premise_warnings(report)
    if options.eval_data is not None:
        replaced = {lin.weight: new_w, **({lin.bias: new_b} if lin.bias and new_b is not None else {})}
        report.eval = evaluate_alignment(family, replaced, data, groups, progress)
    if out is not None:
        report.files = write_aligned(ckpt, Path(out), lin, new_w, new_b, options, progress)
    return report


# ----- --eval ----------------------------------------------------------------------------------
def load_eval_data(path: Path, family: Family, lin: Linear) -> Dataset:
    """Evaluation data with class labels that fits the model (read before any work is done)."""
    if family.output_kind != "logits":  # an encoder's built module stops before its task head
        raise SurgeryError(f"{path}: --eval scores the model's class scores, but the {family.name} model built here "
                           f"returns hidden states, without the classifier '{lin.weight}'; align without --eval")
    data = load_data(path)
    if data.labels is None or data.labels.dim() != 1:
        raise SurgeryError(f"{path}: --eval needs class 'labels' [samples] besides the inputs")
    check_fits(family, data)
    return data


@torch.no_grad()
def group_metrics(module: torch.nn.Module, family: Family, data: Dataset, groups: list[tuple[int, int]],
                  progress: Progress) -> dict:
    """evaluate() overall (loss, accuracy), and on the old classes (the first group) and the new ones
    (the later groups); the share of predictions that fall in new classes."""
    def in_groups(y: torch.Tensor, gs: list[tuple[int, int]]) -> torch.Tensor:
        mask = torch.zeros_like(y, dtype=torch.bool)
        for a, b in gs:
            mask |= (y >= a) & (y < b)
        return mask

    result = evaluate(module, family, data, batch_size=256, progress=progress)
    for name, gs in (("old", groups[:1]), ("new", groups[1:])):
        idx = torch.nonzero(in_groups(data.labels, gs)).flatten()
        result[f"accuracy_{name}"] = evaluate(module, family, data.select(idx), 256)["accuracy"] if len(idx) else None
    pred = torch.cat([module(**batch).argmax(-1) for batch in data.batches(256, family)])
    result["new_prediction_share"] = in_groups(pred, groups[1:]).double().mean().item()
    return result


def evaluate_alignment(family: Family, replaced: dict[str, torch.Tensor], data: Dataset,
                       groups: list[tuple[int, int]], progress: Progress) -> dict:
    state = family.ckpt.state_dict()
    # two tasks, not one "evaluate" bar running twice (a plain line's 10 % steps and rate would carry over)
    before = group_metrics(family.build_module(state), family, data, groups,
                           lambda task, done, total, info=None: progress(f"{task} before", done, total, info))
    after = group_metrics(family.build_module({**state, **replaced}), family, data, groups,
                          lambda task, done, total, info=None: progress(f"{task} after", done, total, info))
    return {"before": before, "after": after}


def premise_warnings(report: AlignReport) -> list[str]:
    notes = []
    neg = f"{report.negative_share:.0%} of the layer's weights are negative"
    for g in report.groups[1:]:
        if g.capped:
            notes.append(
                f"classes {g.start}:{g.end}: mean weight norm {g.mean_norm_before:.4g} is already below the "
                f"old classes' {report.groups[0].mean_norm_before:.4g} (gamma {g.gamma_raw:.3f} > 1), so the "
                f"premise of Weight Aligning fails and the rows were left unchanged ({neg}: the model was "
                "probably trained without weight clipping); --no-clamp scales them anyway")
        elif not report.clamp and g.gamma_raw > 1.0 + ALIGNED_TOL:
            notes.append(
                f"classes {g.start}:{g.end}: gamma {g.gamma_raw:.3f} > 1 scales the new classes UP; the premise of "
                f"Weight Aligning fails here ({neg}) and accuracy usually drops")
    return notes


def write_aligned(ckpt: Checkpoint, out: Path, lin: Linear, new_w: torch.Tensor, new_b: torch.Tensor | None,
                  options: AlignOptions, progress: Progress | None = None) -> list[str]:
    """Stream every tensor to ``out``: the classifier's new weight (and bias), the rest copied."""
    replaced = {lin.weight: new_w}
    if lin.bias and new_b is not None:
        replaced[lin.bias] = new_b
    names = ckpt.keys()  # a list, in the checkpoint's order
    planned = [plan_tensor(k, replaced[k]) if k in replaced else plan_copy(ckpt, k) for k in names]
    metadata = {k: v for k, v in ckpt.metadata.items() if k.startswith("modelsurgery.")}
    written = write_checkpoint(
        out, planned, provenance=Provenance("align", options.parameters(), ckpt.source_files),
        config=ckpt.config, metadata=metadata, extra_files=ckpt.extra_files(), force=options.force,
        progress=progress, **options.write_kwargs(),
    )
    return [str(f) for f in written.files]
