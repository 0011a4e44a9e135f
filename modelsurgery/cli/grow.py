"""`surgery grow`: depth stacking (G_stack), layer slices, identity interleave, function-preserving width
growth, MixtureGrowth, and the when-to-grow guideline (``--plan``)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from modelsurgery.checkpoint import check_output
from modelsurgery.cli.common import (
    check_range,
    emit_json,
    human_bytes,
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
from modelsurgery.ops.grow import METHODS, GrowOptions, grow, plan_growth


def grow_command(
    inputs: list[Path] = typer.Argument(None, help="Input checkpoint(s): file or folder; mixture takes 2+."),
    output: Path = typer.Option(None, "-o", "--output", help="Output: a .safetensors file or a folder."),
    method: str = typer.Option("stack", "--method", "-m", help=f"Growth method: {', '.join(METHODS)}."),
    factor: float = typer.Option(None, "--factor", help="stack: repeat the block stack G times (default 2); "
                                 "width: multiply hidden units by F (default 2)."),
    layers: str = typer.Option(None, "--layers", help="stack: half-open block slices, e.g. '0:24,8:32'."),
    every: int = typer.Option(None, "--every", help="interleave: insert an identity block after every K "
                              "blocks (default 1)."),
    split: bool = typer.Option(False, "--split", help="width: Net2Net splitting instead of zero fan-out."),
    init_scale: float = typer.Option(0.1, "--init-scale", help="width: std of new fan-in weights, relative "
                                     "to the layer's std."),
    coef_scale: float = typer.Option(1.0, "--coef-scale", help="mixture: norm of new coefficients relative "
                                     "to the trained ones."),
    templates: int = typer.Option(None, "--templates", help="mixture: templates per layer for plain "
                                  "checkpoints (default K*K-K+1)."),
    seed: int = typer.Option(0, "--seed", help="Random seed for new weights."),
    plan: bool = typer.Option(False, "--plan", help="Print the when-to-grow guideline instead of growing."),
    params: str = typer.Option(None, "--params", help="--plan: target model parameters, e.g. 7B."),
    tokens: str = typer.Option(None, "--tokens", help="--plan: target training tokens, e.g. 300B."),
    compute: str = typer.Option(None, "--compute", help="--plan: target compute in FLOPs (instead of --tokens)."),
    model: str = model_option(),
    dtype: str = dtype_option(),
    max_shard_size: str = max_shard_size_option(),
    no_input_hash: bool = no_input_hash_option(),
    json_out: bool = json_option(),
    force: bool = force_option(),
    quiet: bool = quiet_option(),
    debug: bool = debug_option(),
) -> None:
    """Grow a trained model deeper or wider, keeping what it learned.

    Methods: stack (G_stack: the block stack repeated G times, or explicit --layers slices),
    interleave (identity blocks: output unchanged), width (new hidden units: output unchanged),
    mixture (MixtureGrowth: K same-shape models into one K times as wide).

    Examples:\n
      surgery grow small/ -o big/ --method stack --factor 4 --dtype bfloat16 --max-shard-size 2GB\n
      surgery grow llama/ -o up/ --method stack --layers "0:24,8:32"\n
      surgery grow gpt2/ -o deeper/ --method interleave --every 2\n
      surgery grow mlp.safetensors -o wide.safetensors --method width --factor 2 --split\n
      surgery grow a.safetensors b.safetensors -o mix.safetensors --method mixture\n
      surgery grow --plan --params 7B --tokens 300B --json
    """
    with user_errors(debug):
        if plan:
            if params is None:
                raise SurgeryError("--plan needs --params (and --tokens or --compute)")
            result = plan_growth(params, tokens, compute)
            for message in result.warnings:
                warn(message)
            if json_out:
                emit_json(result.to_dict())
            else:
                render_plan(result)
            return
        if not inputs:
            raise SurgeryError("no input checkpoint given (see surgery grow --help)")
        if output is None:
            raise SurgeryError("no output given: pass -o OUT (a .safetensors file or a folder)")
        check_grow_options(method, factor, every, init_scale, coef_scale, templates, seed, max_shard_size)
        check_output(output, force, inputs)  # the inputs as given: a folder protects everything in it
        options = GrowOptions(
            method=method, factor=factor, layers=layers, every=every, split=split, init_scale=init_scale,
            coef_scale=coef_scale, num_templates=templates, seed=seed, model=model,
            dtype=dtype, max_shard_size=max_shard_size, force=force, hash_inputs=not no_input_hash,
        )
        options.check_write_options()
        with progress_bar(quiet) as progress:
            report = grow(inputs, output, options, progress)
    if json_out:
        emit_json(report.to_dict())
        return
    render_report(report)


#: the largest growth factor accepted (stack repeats the blocks, width multiplies hidden units)
MAX_FACTOR = 64


def check_grow_options(method, factor, every, init_scale, coef_scale, templates, seed, max_shard_size) -> None:
    """Range-check grow's options before any work (the allowed range is in each message)."""
    from modelsurgery.checkpoint import parse_size

    if method == "stack":
        check_range(factor, "--factor", 1, MAX_FACTOR, integer=True)
    else:
        check_range(factor, "--factor", 1, MAX_FACTOR, low_open=True)
    check_range(every, "--every", 1, integer=True)
    check_range(init_scale, "--init-scale", 0)
    check_range(coef_scale, "--coef-scale", 0)
    check_range(templates, "--templates", 1, integer=True)
    check_range(seed, "--seed", 0, 2**63 - 1, integer=True)
    parse_size(max_shard_size)


def render_plan(result) -> None:
    out_console.print(
        f"target: {result.params:.4g} parameters, {result.compute:.4g} FLOPs"
        + (f" ({result.tokens:.4g} tokens)" if result.tokens else "")
    )
    out_console.print(f"train the small model (~{result.small_model_params:.4g} parameters) on "
                      f"[bold]{result.growth_tokens:.4g}[/] tokens, then grow it with "
                      f"--method stack --factor {result.growth_factor}")


def _compact(layout: list[int]) -> str:
    runs, start = [], 0
    for i in range(1, len(layout) + 1):
        if i == len(layout) or layout[i] != layout[i - 1] + 1:
            a, b = layout[start], layout[i - 1]
            runs.append(f"{a}" if a == b else f"{a}-{b}")
            start = i
    return ", ".join(runs)


def render_report(report) -> None:
    table = Table(show_header=False, show_edge=False)
    table.add_row("method", safe(report.method))
    table.add_row("input", safe(", ".join(map(str, report.inputs))))
    table.add_row("family", safe(report.family))
    if report.layers_before is not None:
        table.add_row("blocks", f"{report.layers_before} -> {report.layers_after}")
        table.add_row("layout", _compact(report.layout or []))
    if report.identity_blocks:
        table.add_row("identity blocks", ", ".join(map(str, report.identity_blocks)))
    if report.width_after:
        sizes = sorted({(report.width_before[k], report.width_after[k]) for k in report.width_after})
        table.add_row("widths", ", ".join(f"{a} -> {b}" for a, b in sizes))
    table.add_row("parameters", f"{report.params_before:,} -> {report.params_after:,}")
    table.add_row("function preserving", "yes" if report.function_preserving else "no")
    for note in report.notes:
        table.add_row("note", safe(note))
    table.add_row("output", f"{safe(report.output)} ({human_bytes(report.bytes_written)})")
    out_console.print(table)


def demo_step(fixtures: Path, workdir: Path, quiet: bool = False) -> dict:
    """Stack the GPT-2 character LM to twice its depth and widen the digits MLP; both still run."""
    import torch

    from modelsurgery.checkpoint import Checkpoint
    from modelsurgery.families import detect_family

    results = {}
    lm = fixtures / "charlm" / "gpt2"
    mlp = fixtures / "digits" / "mlp_seed0.safetensors"
    jobs = []
    if lm.is_dir():
        jobs.append(("stack", lm, workdir / "grown-gpt2", GrowOptions(method="stack", factor=2, force=True)))
    if mlp.is_file():
        jobs.append(("width", mlp, workdir / "wide-mlp.safetensors",
                     GrowOptions(method="width", factor=2, force=True)))
    for name, src, dst, options in jobs:
        report = grow([src], dst, options)
        before = detect_family(Checkpoint.open(src))
        after = detect_family(Checkpoint.open(dst))
        inputs = before.example_inputs(batch=2, seq_len=8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a = before.build_module()(**inputs)
            b = after.build_module()(**inputs)
        results[name] = {
            "input": str(src), "output": str(dst), "params_before": report.params_before,
            "params_after": report.params_after, "layers": [report.layers_before, report.layers_after],
            "output_shape": list(b.shape), "max_output_change": float((a - b).abs().max()),
        }
        if not quiet:
            out_console.print(
                f"{name}: {safe(src.name)} -> {safe(dst.name)}: {report.params_before:,} -> {report.params_after:,} "
                f"parameters; runs, output {list(b.shape)}, "
                f"max change vs input {results[name]['max_output_change']:.3g}"
                + (" (stacking changes the function by design: training continues from it)" if name == "stack"
                   else " (function-preserving: should be ~0)")
            )
    return results
