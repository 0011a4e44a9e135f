"""`surgery inspect`: what a checkpoint holds, from its headers."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from modelsurgery.cli.common import emit_json, human_bytes, out_console, safe, user_errors
from modelsurgery.cli.options import debug_option, force_option, json_option, model_option, quiet_option
from modelsurgery.ops.inspect import inspect_checkpoint


def inspect_command(
    path: Path = typer.Argument(..., help="Checkpoint: .safetensors, shard index, .pt/.pth/.bin, or a folder."),
    json_out: bool = json_option(),
    model: str = model_option(),
    all_tensors: bool = typer.Option(False, "--all", help="List every tensor (default: a summary per group)."),
    force: bool = force_option(),
    quiet: bool = quiet_option(),
    debug: bool = debug_option(),
) -> None:
    """Show tensors grouped by block, totals, the detected family, metadata and provenance.

    Only headers are read, so inspecting a multi-GB checkpoint is instant.

    Examples:\n
      surgery inspect model.safetensors\n
      surgery inspect ./llama-folder --json | jq .num_parameters
    """
    with user_errors(debug):
        report = inspect_checkpoint(path, model=model)
    if json_out:
        emit_json(report.to_dict())
        return
    render_inspect(report, all_tensors)


def render_inspect(report, all_tensors: bool = False) -> None:
    fam = report.family
    out_console.print(f"[bold]{safe(report.path)}[/]")
    line = f"family [cyan]{safe(fam['family'])}[/]"
    if fam.get("num_layers"):
        line += f", {safe(fam['num_layers'])} layers"
    if fam.get("hidden_size"):
        line += f", hidden size {safe(fam['hidden_size'])}"
    out_console.print(line)
    if fam.get("features"):
        out_console.print(f"features: {safe(', '.join(fam['features']))}")
    if fam.get("closest_family"):
        out_console.print(f"tensor names follow the {safe(fam['closest_family'])} layout (not run as it)")
    table = Table(show_edge=False)
    table.add_column("group / tensor")
    table.add_column("shape")
    table.add_column("dtype")
    table.add_column("parameters", justify="right")
    table.add_column("bytes", justify="right")
    for group, tensors in report.groups.items():
        if all_tensors or len(tensors) == 1:
            for t in tensors:
                table.add_row(safe(t["name"]), "x".join(map(str, t["shape"])) or "scalar", safe(t["dtype"]),
                              f"{t['parameters']:,}", human_bytes(t["bytes"]))
        else:
            dts = ",".join(sorted({t["dtype"] for t in tensors}))
            table.add_row(f"{safe(group)} ({len(tensors)} tensors)", "", safe(dts),
                          f"{sum(t['parameters'] for t in tensors):,}",
                          human_bytes(sum(t["bytes"] for t in tensors)))
    out_console.print(table)
    out_console.print(
        f"total: {report.num_tensors} tensors, {report.num_parameters:,} parameters, "
        f"{human_bytes(report.num_bytes)}"
    )
    if report.quantization:
        out_console.print(f"quantization: {safe(report.quantization)}")
    if report.provenance:
        p = report.provenance
        if isinstance(p, dict):
            out_console.print(safe(f"provenance: {p.get('tool')} {p.get('version')} {p.get('operation')} "
                                   f"{p.get('parameters')}"))
        else:  # a file can hold anything under our metadata key: show it, do not trust its shape
            out_console.print(safe(f"provenance (malformed, a JSON {type(p).__name__}): {p}"))
    if report.metadata:
        out_console.print(f"metadata: {safe(report.metadata)}")


def demo_step(fixtures: Path, workdir: Path, quiet: bool = False) -> dict:
    """Inspect each bundled fixture model."""
    found = {}
    for path in sorted(p for p in fixtures.rglob("*") if p.suffix == ".safetensors" or (p / "config.json").is_file()):
        if path.suffix == ".safetensors" and (path.parent / "config.json").is_file():
            continue  # part of a folder checkpoint, inspected as the folder
        if path.suffix == ".safetensors" and path.name.startswith(("digits_", "charlm_", "calib", "eval")):
            continue  # data files, not models
        report = inspect_checkpoint(path)
        found[str(path.relative_to(fixtures))] = {
            "family": report.family["family"], "num_parameters": report.num_parameters,
            "num_layers": report.family.get("num_layers"),
        }
    if not quiet:
        for name, r in found.items():
            out_console.print(f"{safe(name)}: family [cyan]{safe(r['family'])}[/], "
                              f"{r['num_parameters']:,} parameters, {r['num_layers']} layers")
    return found
