"""`surgery align`: Weight Aligning of the classifier of a class-incremental model."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import typer
from rich.table import Table

from modelsurgery.cli.common import (
    check_choice,
    check_range,
    emit_json,
    out_console,
    progress_bar,
    safe,
    user_errors,
    warn,
)
from modelsurgery.cli.options import (
    debug_option,
    dtype_option,
    force_option,
    json_option,
    max_shard_size_option,
    model_option,
    no_input_hash_option,
    quiet_option,
)
from modelsurgery.errors import SurgeryError
from modelsurgery.ops.align import AlignOptions, AlignReport, align_checkpoint, parse_class_groups

BAR_WIDTH = 32
CHART_ROWS = 64  # classes drawn one line each; more are drawn as ranges
GROUP_STYLES = ("green", "yellow", "magenta", "cyan", "blue", "red")


def align_command(
    path: Path = typer.Argument(..., help="Checkpoint: .safetensors, .pt, shard index or folder."),
    output: Path = typer.Option(None, "-o", "--output", help="Output .safetensors file or folder (omit for a "
                                "report only; nothing is written)."),
    old_classes: int = typer.Option(None, "--old-classes", help="Rows [0, N) are old classes, [N, end) new ones."),
    classes: str = typer.Option(None, "--classes", help="Class groups 'a:b,b:c,...' for several incremental "
                                "steps; every later group is aligned to the first."),
    layer: str = typer.Option(None, "--layer", help="Classifier layer or weight tensor (default: the last "
                              "Linear of the model)."),
    norm: int = typer.Option(1, "--norm", help="Row norm: 1 (the official code) or 2 (PyCIL)."),
    bias: str = typer.Option("scale", "--bias", help="scale: new-class biases times gamma too (the new logits "
                             "are scaled); keep: leave biases alone (PyCIL)."),
    clamp: bool = typer.Option(True, "--clamp/--no-clamp", help="Cap gamma at 1 so a model whose new-class "
                               "norms are already smaller is left alone."),
    eval_data: Path = typer.Option(None, "--eval", help="Evaluation data (inputs, labels): accuracy overall, "
                                   "on old and on new classes, before and after."),
    model: str = model_option(),
    dtype: str = dtype_option(),
    max_shard_size: str = max_shard_size_option(),
    no_input_hash: bool = no_input_hash_option(),
    json_out: bool = json_option(),
    force: bool = force_option(),
    quiet: bool = quiet_option(),
    debug: bool = debug_option(),
) -> None:
    """Weight Aligning (Zhao et al., CVPR 2020): rescale the new-class rows of the classifier so their
    mean norm matches the old classes', removing the bias toward new classes after class-incremental
    training. gamma = mean norm(old rows) / mean norm(new rows), capped at 1 unless --no-clamp.

    Examples:\n
      surgery align model.safetensors -o aligned.safetensors --old-classes 5\n
      surgery align model.safetensors -o aligned.safetensors --old-classes 5 --eval digits_eval.safetensors\n
      surgery align ./cil-folder -o ./aligned --classes 0:50,50:60,60:70 --norm 2 --bias keep\n
      surgery align model.safetensors --old-classes 5 --json   (report only)
    """
    with user_errors(debug):
        check_range(old_classes, "--old-classes", 1, integer=True)
        check_choice(norm, "--norm", (1, 2))
        check_choice(bias, "--bias", ("scale", "keep"))
        options = AlignOptions(
            old_classes=old_classes, groups=parse_class_groups(classes) if classes is not None else None,
            layer=layer, norm=norm, bias=bias, clamp=clamp, eval_data=eval_data, model=model, force=force,
            dtype=dtype, max_shard_size=max_shard_size, hash_inputs=not no_input_hash,
        )
        options.check_write_options()
        with progress_bar(quiet) as progress:
            report = align_checkpoint(path, output, options, progress)
    for w in report.warnings:
        warn(w)
    if json_out:
        emit_json(report.to_dict())
        return
    render_align(report)


def render_align(report: AlignReport) -> None:
    out_console.print(f"[bold]{safe(report.input)}[/]: classifier [cyan]{safe(report.layer)}[/] "
                      f"({len(report.norms_before)} classes, family {safe(report.family)}), L{report.norm} norms, "
                      f"bias {safe(report.bias) if report.bias_name else 'none'}")
    table = Table(show_edge=False)
    for col in ("classes", "mean norm before", "mean norm after", "gamma", "capped"):
        table.add_column(col, justify="left" if col == "classes" else "right")
    for i, g in enumerate(report.groups):
        table.add_row(f"{g.start}:{g.end}" + (" (reference)" if i == 0 else ""), f"{g.mean_norm_before:.4f}",
                      f"{g.mean_norm_after:.4f}", f"{g.gamma:.4f}" if i else "",
                      ("yes" if g.capped else "no") if i else "")
    out_console.print(table)
    out_console.print(f"negative weights in the layer: {report.negative_share:.1%}"
                      + ("  (none: trained with weight clipping?)" if report.negative_share == 0 else ""))
    render_norm_chart(report)
    if report.eval:
        render_eval(report.eval)
    if report.output:
        out_console.print(f"wrote {safe(report.output)}" + ("" if report.changed else " (unchanged: nothing to align)"))
    else:
        out_console.print("report only: nothing written (pass -o OUT to write the aligned model)")


def render_norm_chart(report: AlignReport) -> None:
    """Per-class norms before (light) and after (solid), colored by group: one line each up to CHART_ROWS
    classes; a larger head (an LLM's vocabulary, ImageNet's 1000 classes) is drawn as the mean norm of ranges of
    consecutive classes, never across a group's boundary, so the chart stays a screen long."""
    rows = chart_rows(report)
    finite = [v for _, b, a, _ in rows for v in (b, a) if math.isfinite(v)]
    top = max(finite, default=0.0) or 1.0
    binned = len(rows) < len(report.norms_before)
    title = "per-class weight norms" + (", mean per range" if binned else "")
    chart = Table(show_edge=False, show_header=True, box=None, title=title)
    chart.add_column("classes" if binned else "class", justify="right")
    chart.add_column("before / after")
    chart.add_column("norm", justify="right")
    for label, b, a, s in rows:
        chart.add_row(label, f"[dim {s}]{bar(b, top)}[/]", f"{b:.3f}")
        chart.add_row("", f"[{s}]{bar(a, top)}[/]", f"{a:.3f}")
    out_console.print(chart)


def chart_rows(report: AlignReport, limit: int | None = None) -> list[tuple[str, float, float, str]]:
    """(label, norm before, norm after, style) per chart line: every class when there are at most ``limit``
    (CHART_ROWS), else each group split into ranges of consecutive classes (lines shared out by size, at
    least one per group) with their mean norms; a range holding a NaN or Inf shows it."""
    limit = CHART_ROWS if limit is None else limit
    before, after = report.norms_before, report.norms_after
    owner: list[int | None] = [None] * len(before)  # the group of each class (None: in no group)
    for i, g in enumerate(report.groups):
        owner[g.start:g.end] = [i] * (g.end - g.start)
    spans = []  # runs of consecutive classes of one group
    for i, run in itertools.groupby(range(len(owner)), key=owner.__getitem__):
        classes = list(run)
        spans.append((classes[0], classes[-1] + 1, i))
    out = []
    for start, end, i in spans:
        style = "white" if i is None else GROUP_STYLES[min(i, len(GROUP_STYLES) - 1)]
        n = end - start
        lines = n if len(before) <= limit else max(1, min(n, round(limit * n / len(before))))
        edges = [start + round(k * n / lines) for k in range(lines + 1)]
        for a, b in itertools.pairwise(edges):
            label = str(a) if b - a == 1 else f"{a}:{b}"
            out.append((label, _mean(before[a:b]), _mean(after[a:b]), style))
    return out


def _mean(values: list[float]) -> float:
    bad = [v for v in values if not math.isfinite(v)]
    return bad[0] if bad else sum(values) / len(values)


def bar(value: float, top: float) -> str:
    if not math.isfinite(value):  # a NaN/Inf row: say so instead of drawing (round(nan) raises)
        return f"({value})"
    return "█" * max(1 if value > 0 else 0, round(value / top * BAR_WIDTH))


def render_eval(ev: dict) -> None:
    table = Table(show_edge=False, title="evaluation")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for key, label in (("accuracy", "accuracy"), ("accuracy_old", "accuracy, old classes"),
                       ("accuracy_new", "accuracy, new classes"), ("new_prediction_share", "predicted as new")):
        table.add_row(label, *("n/a" if ev[w][key] is None else f"{ev[w][key]:.4f}" for w in ("before", "after")))
    out_console.print(table)


def demo_step(fixtures: Path, workdir: Path, quiet: bool = False) -> dict:
    """Align the clipped class-incremental fixture and show accuracy before and after."""
    src = fixtures / "digits" / "incremental_clipped.safetensors"
    data = fixtures / "data" / "digits_eval.safetensors"
    if not src.is_file() or not data.is_file():
        raise SurgeryError(f"{src}: class-incremental fixture missing (run python fixtures/make_incremental.py)")
    report = align_checkpoint(src, workdir / "incremental_aligned.safetensors",
                              AlignOptions(old_classes=5, eval_data=data, force=True))
    before, after = report.eval["before"], report.eval["after"]
    result = {"input": str(src), "output": report.output, "gamma": report.groups[1].gamma,
              "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
              "new_prediction_share_before": before["new_prediction_share"],
              "new_prediction_share_after": after["new_prediction_share"]}
    if not quiet:
        out_console.print(f"aligned {safe(src.name)}: gamma {result['gamma']:.3f}, accuracy "
                          f"{result['accuracy_before']:.3f} -> {result['accuracy_after']:.3f}, predicted as new "
                          f"{result['new_prediction_share_before']:.0%} -> {result['new_prediction_share_after']:.0%}")
    return result
