"""`surgery export`: a checkpoint (float or packed-quantized) to ONNX, checked in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from modelsurgery.cli.common import (
    check_choice,
    check_range,
    emit_json,
    human_bytes,
    out_console,
    progress_bar,
    safe,
    user_errors,
    warn,
)
from modelsurgery.cli.options import debug_option, force_option, json_option, model_option, quiet_option
from modelsurgery.errors import SurgeryError
from modelsurgery.export import ExportOptions, ExportReport, export_checkpoint

#: the batch of check inputs is kept small: the check runs the model once in torch and once in ONNX Runtime
MAX_CHECK_SAMPLES = 4096


def export_command(
    path: Path = typer.Argument(..., help="Checkpoint: .safetensors, HF folder, .pt; float or packed (surgery "
                                          "quantize --format packed)."),
    output: Path = typer.Option(..., "-o", "--output", help="The .onnx file to write (above 2 GB the tensors go "
                                                            "to OUT.onnx.data beside it)."),
    opset: int = typer.Option(None, "--opset", help="ONNX opset (default 17; 21 for packed checkpoints; 4-bit and "
                                                    "per-group weights need 21)."),
    dtype: str = typer.Option("fp32", "--dtype", help="Float type of the graph: fp32 or fp16."),
    check: bool = typer.Option(True, "--check/--no-check", help="Run the export in ONNX Runtime and compare it "
                                                                "with the torch forward."),
    tolerance: float = typer.Option(None, "--tolerance", help="Largest max-abs difference the check accepts "
                                                              "(default 1e-4 for fp32, 5e-2 for fp16)."),
    data: Path = typer.Option(None, "--data", help="Sample inputs for the check (default: generated)."),
    samples: int = typer.Option(None, "--samples", help="Batch size of the check inputs (default 4)."),
    seq_len: int = typer.Option(None, "--seq-len", help="Tokens per check input, generated or a --data text line "
                                                        "(token models; default 12)."),
    model: str = model_option(),
    force: bool = force_option(),
    quiet: bool = quiet_option(),
    json_out: bool = json_option(),
    debug: bool = debug_option(),
) -> None:
    """Export a checkpoint to ONNX with dynamic batch (and sequence) axes and check it in ONNX Runtime.

    MLP/CNN/ResNet: input -> logits. GPT-2/LLaMA: input_ids, attention_mask -> logits.
    BERT: input_ids, attention_mask, token_type_ids -> last_hidden_state.

    Packed checkpoints keep their integer weights (uint8; uint4 for 4 bits or fewer) behind DequantizeLinear;
    the check compares with the dequantized torch forward. From opset 21 the file runs faithfully with
    ONNX Runtime's default session options.

    Examples:\n
      surgery export fixtures/digits/mlp_seed0.safetensors -o mlp.onnx\n
      surgery export ./gpt2-folder -o gpt2.onnx --dtype fp16\n
      surgery export gpt2-4bit.safetensors -o gpt2-4bit.onnx --json
    """
    with user_errors(debug):
        check_choice(dtype, "--dtype", ("fp32", "fp16"))
        check_range(tolerance, "--tolerance", 0, low_open=True)
        check_range(samples, "--samples", 1, MAX_CHECK_SAMPLES, integer=True)
        check_range(seq_len, "--seq-len", 1, integer=True)
        if not check:  # read only by the check: given with --no-check they would be silently ignored
            for flag, value in (("--tolerance", tolerance), ("--data", data), ("--samples", samples),
                                ("--seq-len", seq_len)):
                if value is not None:
                    raise SurgeryError(f"{flag} configures the check, which --no-check skips: drop one of them")
        options = ExportOptions(opset=opset, dtype=dtype, check=check, tolerance=tolerance, model=model,
                                data=data, samples=ExportOptions.samples if samples is None else samples,
                                seq_len=seq_len, force=force)
        with progress_bar(quiet) as progress:
            report = export_checkpoint(path, output, options, progress)
    if json_out:
        emit_json(report.to_dict())
        return
    render_export(report)


def render_export(report: ExportReport) -> None:
    out_console.print(f"[bold]{safe(report.output)}[/]: {safe(report.family)}, {report.dtype}, opset {report.opset}, "
                      f"{human_bytes(report.file_bytes)}" + (" (external data)" if report.external_data else ""))
    out_console.print(f"inputs {safe(', '.join(report.inputs))} -> {safe(', '.join(report.outputs))}; "
                      f"{report.export_seconds:.2f} s (export and check)")
    if report.quantization:
        q = report.quantization
        out_console.print(f"integer weights: {q['integer_weights']} ({'/'.join(map(str, q['bits']))} bits, "
                          f"{', '.join(q['granularity'])})")
    if report.check:
        c = report.check
        out_console.print(f"ONNX Runtime check: max abs diff {c.max_abs_diff:.3g} (tolerance {c.tolerance:g}, "
                          f"|output| up to {c.max_abs_reference:.3g}) on inputs "
                          f"{safe(', '.join(f'{k} {v}' for k, v in c.input_shapes.items()))} [green]ok[/]")
    if report.session_config:
        out_console.print("session config needed: "
                          + safe(", ".join(f"{k}={v}" for k, v in report.session_config.items())))
    table = Table(show_edge=False, title="operators")
    table.add_column("op")
    table.add_column("count", justify="right")
    for op, n in report.op_counts.items():
        table.add_row(safe(op), str(n))
    out_console.print(table)
    for w in report.warnings:
        warn(w)


def demo_step(fixtures: Path, workdir: Path, quiet: bool = False) -> dict:
    """Export the digits MLP (and the character GPT-2 when bundled) and run each in ONNX Runtime."""
    results = {}
    sources = [fixtures / "digits" / "mlp_seed0.safetensors", fixtures / "charlm" / "gpt2"]
    for src in sources:
        if not src.exists():
            continue
        out = workdir / f"{src.stem}.onnx"
        report = export_checkpoint(src, out, ExportOptions(force=True))
        results[str(src.relative_to(fixtures))] = {
            "output": str(out), "family": report.family, "bytes": report.file_bytes,
            "max_abs_diff": report.check.max_abs_diff if report.check else None,
        }
        if not quiet:
            render_export(report)
    return results
