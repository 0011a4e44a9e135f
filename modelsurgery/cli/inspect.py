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
        rows = _display_rows(tensors, report.quantized_layers)
        if all_tensors or len(rows) == 1:
            for t in rows:
                tied = f" (tied to {t['tied_to']})" if t.get("tied_to") else ""
                table.add_row(safe(t["name"] + tied), "x".join(map(str, t["shape"])) or "scalar", safe(t["dtype"]),
                              f"{t['parameters']:,}", human_bytes(t["bytes"]))
        else:
            dts = ",".join(sorted({t["dtype"] for t in rows}))
            table.add_row(f"{safe(group)} ({len(tensors)} tensors)", "", safe(dts),
                          f"{sum(t['parameters'] for t in rows):,}",
                          human_bytes(sum(t["bytes"] for t in rows)))
    out_console.print(table)
    out_console.print(
        f"total: {report.num_tensors} tensors, {report.num_parameters:,} parameters, "
        f"{human_bytes(report.num_bytes)}"
    )
    if report.scheme:
        render_scheme(report.scheme)
    elif report.quantization:
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


def _display_rows(tensors: list[dict], layers: dict[str, dict]) -> list[dict]:
    """One row per stored tensor, except that the parts of a quantized weight (codes, scales, zero
    points) make one row: the weight's name, its stored shape, its bits, and the parts' bytes."""
    rows: list[dict] = []
    merged: dict[str, dict] = {}
    for t in tensors:
        weight = t.get("quantized_weight")
        if weight is None:
            rows.append(t)
            continue
        if weight not in merged:
            layer = layers.get(weight, {})
            merged[weight] = {"name": weight, "shape": layer.get("shape", []), "dtype": f"{layer.get('bits')}-bit",
                              "parameters": 0, "bytes": 0}
            rows.append(merged[weight])
        merged[weight]["parameters"] += t["parameters"]
        merged[weight]["bytes"] += t["bytes"]
    return rows


SCHEME_LABELS = {"format": "format", "method": "method", "type": "type", "file_type": "file type", "bits": "bits",
                 "granularity": "granularity", "group_size": "group size", "symmetric": "symmetric",
                 "quantized_weights": "quantized weights", "kept_float": "kept float"}


def render_scheme(scheme: dict) -> None:
    """The quantization scheme as a short two-column table (kept float: a count and the first names)."""
    table = Table(show_edge=False, show_header=False, title="quantization", title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    order = list(SCHEME_LABELS)
    for key, value in sorted(scheme.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
        if value is None:
            continue
        if key == "kept_float":
            names = ", ".join(value[:4]) + (f", ... ({len(value) - 4} more)" if len(value) > 4 else "")
            value = f"{len(value)} weight matrices" + (f" ({names})" if value else "")
        elif key == "symmetric":
            value = "yes" if value else "no (zero points stored)"
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        table.add_row(safe(SCHEME_LABELS.get(key, key)), safe(value))
    out_console.print(table)


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
