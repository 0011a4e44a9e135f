"""`surgery extract`: a PEFT LoRA adapter from a full fine-tune (BASE, TUNED) by truncated SVD."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Column, Table

from modelsurgery.cli.common import emit_json, human_bytes, out_console, progress_bar, safe, user_errors
from modelsurgery.cli.options import debug_option, dtype_option, force_option, json_option, quiet_option
from modelsurgery.errors import SurgeryError
from modelsurgery.ops.adapters import ExtractOptions, extract_lora
from modelsurgery.ops.adapters.extract import PARAMETERS

HELP = {p.name: f"{p.help} Default {p.default} ({p.source})." for p in PARAMETERS}
DEFAULT = {p.name: p.default for p in PARAMETERS}


def parse_rank(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise SurgeryError(f"--rank '{text}': expected a rank such as 16 or an energy fraction such as 0.9") from None


def extract_command(
    base: Path = typer.Argument(..., help="Base model (folder or file)."),
    tuned: Path = typer.Argument(..., help="The fine-tuned model, same architecture as BASE."),
    output: Path = typer.Option(None, "-o", "--output", help="Adapter folder to write."),
    rank: str = typer.Option(str(DEFAULT["rank"]), "--rank", "-r", help=HELP["rank"]),
    targets: str = typer.Option(None, "--targets", help="Comma-separated module names or suffixes "
                                "(e.g. q_proj,v_proj); default: every linear in the blocks."),
    device: str = typer.Option(None, "--device", help="Device for the SVDs (cpu, cuda, cuda:1)."),
    dtype: str = dtype_option(help="Adapter dtype: float32, float16 or bfloat16 (also fp32, fp16, bf16; "
                              "default: BASE's)."),
    lowrank_above: int = typer.Option(DEFAULT["lowrank_above"], "--lowrank-above", help=HELP["lowrank_above"]),
    oversample: int = typer.Option(DEFAULT["oversample"], "--oversample", help=HELP["oversample"]),
    niter: int = typer.Option(DEFAULT["niter"], "--niter", help=HELP["niter"]),
    seed: int = typer.Option(DEFAULT["seed"], "--seed", help=HELP["seed"]),
    json_out: bool = json_option(),
    force: bool = force_option(),
    quiet: bool = quiet_option(),
    debug: bool = debug_option(),
) -> None:
    """Extract a LoRA adapter (TUNED - BASE, truncated SVD per layer) that PEFT loads as it is.

    Examples:\n
      surgery extract llama/ llama-ft/ -o ft-lora/ --rank 16\n
      surgery extract llama/ llama-ft/ -o ft-lora/ --rank 0.9   (90% of each delta's energy)\n
      surgery extract gpt2/ gpt2-ft/ -o lora/ --rank 8 --targets c_attn --dtype bfloat16 --json
    """
    with user_errors(debug):
        if output is None:
            raise SurgeryError("no output given: pass -o ADAPTER (a folder)")
        options = ExtractOptions(
            rank=parse_rank(rank), targets=[t.strip() for t in targets.split(",") if t.strip()] if targets else None,
            device=device, dtype=dtype, lowrank_above=lowrank_above, oversample=oversample, niter=niter, seed=seed,
            force=force,
        )
        with progress_bar(quiet) as progress:
            report = extract_lora(base, tuned, output, options, progress)
    if json_out:
        emit_json(report.to_dict())
        return
    table = Table(Column("layer", overflow="fold"), "shape (out, in)", "rank", "relative error", "svd",
                  show_edge=False)
    for layer in report.layers:
        table.add_row(safe(layer.module), f"{layer.shape[0]} x {layer.shape[1]}", str(layer.rank),
                      f"{layer.relative_error:.4f}", safe(layer.svd))
    out_console.print(table)
    if report.unchanged:
        out_console.print(f"unchanged (left out): {len(report.unchanged)} layers")
    if report.other_changed:
        out_console.print(f"[yellow]note:[/] {len(report.other_changed)} other tensors differ and are not in the "
                          f"adapter (e.g. {safe(report.other_changed[0])})")
    out_console.print(f"adapter: {safe(report.output)}: {len(report.layers)} layers, {report.adapter_parameters:,} "
                      f"parameters, {human_bytes(report.adapter_bytes)}")
