"""`surgery merge` and `surgery analyze`: weight matching (Git Re-Basin) and merging of models."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from modelsurgery.cli.common import (
    check_device,
    check_finite_option,
    check_range,
    emit_json,
    out_console,
    parse_float_list,
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
from modelsurgery.ops.analyze import AnalyzeOptions, analyze_pair
from modelsurgery.ops.merge import all_methods
from modelsurgery.ops.merge.merge import MATCHING_DEFAULTS, MergeOptions, merge_checkpoints
from modelsurgery.ops.merge.plot import check_plot, plot_path

#: the most alpha values evaluated along the path (each is a full evaluation of a merged model)
MAX_POINTS = 1001
#: alpha values evaluated along the path when --eval is given without --points (the operation's default)
DEFAULT_POINTS = MergeOptions.points
METHOD_HELP = "match (weight matching + average, default), linear, slerp, task-arithmetic, ties."


def merge_command(
    models: list[Path] = typer.Argument(..., help="Two or more checkpoints of the same architecture."),
    output: Path = typer.Option(..., "-o", "--output", help="Output: .safetensors file or a folder."),
    method: str = typer.Option("match", "--method", help=METHOD_HELP),
    alpha: float = typer.Option(None, "--alpha", help="Two models: (1-alpha)*A + alpha*B (default 0.5)."),
    weights: str = typer.Option(None, "--weights",
                                help="Comma-separated weight per model (e.g. 0.5,0.3,0.2); normalized for "
                                "match/linear/slerp, per task vector for task-arithmetic/ties."),
    base: Path = typer.Option(None, "--base", help="Base model for task-arithmetic and ties."),
    align: bool = typer.Option(None, "--align/--no-align",
                               help="Weight-match every model into the first's basis (the base's with --base); "
                               "default: on for match."),
    backend: str = typer.Option(None, "--backend", help="Assignment solver of weight matching: auto, lap, scipy, "
                                f"torch (default {MATCHING_DEFAULTS['backend']}; only when matching)."),
    device: str = typer.Option(None, "--device", help="Device for the similarities and torch solver of weight "
                               f"matching: cpu, cuda (default {MATCHING_DEFAULTS['device']}; only when matching)."),
    seed: int = typer.Option(None, "--seed", help="Seed of the random group order of weight matching (default "
                             f"{MATCHING_DEFAULTS['seed']}; only when matching)."),
    model: str = model_option(),
    eval_data: Path = typer.Option(None, "--eval",
                                   help="Data (.safetensors/.pt/.npz with inputs+labels or input_ids, or a text file) "
                                   "to evaluate along the interpolation path."),
    points: int = typer.Option(None, "--points", help="Number of alpha values on the path (with --eval; "
                               f"default {DEFAULT_POINTS})."),
    repair: bool = typer.Option(False, "--repair",
                                help="Reset BatchNorm statistics / REPAIR rescaling on --eval data."),
    plot: Path = typer.Option(None, "--plot", help="Write the loss/accuracy path to a PNG, SVG or PDF file "
                              "(needs matplotlib and --eval)."),
    dtype: str = dtype_option(),
    max_shard_size: str = max_shard_size_option(),
    no_input_hash: bool = no_input_hash_option(),
    json_out: bool = json_option(),
    force: bool = force_option(),
    quiet: bool = quiet_option(),
    debug: bool = debug_option(),
    **method_params: Any,
) -> None:
    """Merge models: permute every model after the first into its basis (weight matching), then average.

    Examples:\n
      surgery merge a.safetensors b.safetensors -o merged.safetensors\n
      surgery merge a.safetensors b.safetensors -o m.safetensors --eval eval.safetensors --plot path.png\n
      surgery merge a b c -o m --weights 0.5,0.25,0.25 --dtype bfloat16\n
      surgery merge ft1 ft2 --method ties --base base -o m --density 0.2
    """
    with user_errors(debug):
        check_finite_option(alpha, "--alpha")
        check_range(points, "--points", 1, MAX_POINTS, integer=True)
        if points is not None and eval_data is None:
            raise SurgeryError("--points needs --eval DATA (it counts the alpha values evaluated on it)")
        points = DEFAULT_POINTS if points is None else points
        check_range(seed, "--seed", 0, integer=True)
        device = check_device(device)
        for name, value in method_params.items():
            if isinstance(value, float):
                check_finite_option(value, f"--{name}")
        inputs = [*models, *([base] if base is not None else []), *([eval_data] if eval_data is not None else [])]
        options = MergeOptions(
            method=method, alpha=alpha, weights=parse_float_list(weights, "--weights"), base=base, align=align,
            params=given_params(method_params), backend=backend, device=device, seed=seed, model=model,
            eval_data=eval_data, points=points, repair=repair, plot=plot, dtype=dtype,
            max_shard_size=max_shard_size, hash_inputs=not no_input_hash,
        )
        options.check_write_options()
        if plot is not None:
            if eval_data is None:
                raise SurgeryError(f"{plot}: --plot needs --eval DATA")
            check_plot(plot, len(models), points, force=force, inputs=[*inputs, output])
        with progress_bar(quiet) as progress:
            result = merge_checkpoints(models, output, options, force=force, progress=progress)
        if plot is not None and result.evaluation:
            plot_path(result.evaluation, plot, force=force)
    for note in result.notes:
        warn(note)
    if json_out:
        emit_json(result.to_dict())
        return
    render_merge(result.to_dict())


def method_flags() -> dict[str, list]:
    """Every parameter declared by a merge method, by name, with the methods declaring it."""
    flags: dict[str, list] = {}
    for m in all_methods().values():
        for p in m.params:
            flags.setdefault(p.name, []).append((m.name, p))
    return flags


def given_params(values: dict[str, Any]) -> dict[str, Any]:
    """The method flags given on the command line (the operation checks them against the method)."""
    return {k: v for k, v in values.items() if v is not None}


def _add_method_flags(command):
    """Give ``command`` one option per declared method parameter (so --help lists them with defaults)."""
    sig = inspect.signature(command)
    fixed = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    names = {p.name for p in fixed}
    extra = []
    for name, decls in method_flags().items():
        if name in names:
            raise RuntimeError(f"merge method parameter '{name}' clashes with a merge option")
        kind = decls[0][1].type
        decl = f"--{name}/--no-{name}" if kind is bool else f"--{name}"
        helps = "; ".join(f"{m}: {p.help} (default {p.default}; {p.paper})" if p.paper else
                          f"{m}: {p.help} (default {p.default})" for m, p in decls)
        extra.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                                       default=typer.Option(None, decl, help=helps, show_default=False)))
    hints = dict(getattr(command, "__annotations__", {}))

    def wrapper(**kwargs: Any) -> None:
        params = {e.name: kwargs.pop(e.name) for e in extra}
        command(**kwargs, **params)

    wrapper.__doc__ = command.__doc__
    wrapper.__name__ = command.__name__
    wrapper.__signature__ = sig.replace(parameters=[p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in fixed]
                                        + extra)
    wrapper.__annotations__ = {**hints, **{e.name: e.annotation for e in extra}}
    return wrapper


merge_command = _add_method_flags(merge_command)


def render_merge(r: dict) -> None:
    out_console.print(f"merged {r['num_models']} {safe(r['family'])} models with [cyan]{safe(r['method'])}[/] "
                      f"(weights {', '.join(f'{w:.3g}' for w in r['weights'])}) -> [bold]{safe(r['output'])}[/]")
    for m in r["matching"]:
        out_console.print(f"  model {m['model']}: weight matching objective {m['objective_before']:.4g} -> "
                          f"{m['objective_after']:.4g} in {m['iterations']} passes ({m['assignment_solves']} solves)")
    ev = r.get("evaluation")
    if not ev:
        return
    metric = ev["metric"]
    table = Table(title=f"evaluation on {safe(ev['data'])}" + (" (repaired)" if ev["repair"] else ""), show_edge=False)
    table.add_column("alpha", justify="right")
    curves = [c for c in ("naive", "matched") if c in ev]
    for c in curves:
        table.add_column(f"{c} loss", justify="right")
        table.add_column(f"{c} {metric}", justify="right")
    for i, p in enumerate(ev.get("naive", [])):
        row = [f"{p['alpha']:.2f}"]
        for c in curves:
            row += [f"{ev[c][i]['loss']:.4f}", f"{ev[c][i][metric]:.4f}"]
        table.add_row(*row)
    if curves:
        out_console.print(table)
        for c in curves:
            out_console.print(f"{c} barrier: loss {ev[c + '_barrier']:.4f}, {metric} {ev[f'{c}_{metric}_barrier']:.4f}")
    rep = ev.get("repaired")
    if rep and rep["method"] == "batchnorm-reset":
        out_console.print(f"repair: reset the statistics of {rep['batchnorms']} BatchNorm layers")
    elif rep:
        kinds = sorted({x["correction"] for x in rep["layers"]})
        skipped = safe(", ".join(f"{x['name']} ({x['reason']})" for x in rep["skipped"]) or "none")
        out_console.print(f"repair: {len(rep['layers'])} layers rescaled ({'/'.join(kinds)}); kept: {skipped}")
    if metric is None:  # an encoder: nothing scored
        return
    ends = ", ".join(f"{e[metric]:.4f}" for e in ev["endpoints"])
    out_console.print(f"endpoints {metric}: {ends}; merged output: loss {ev['merged']['loss']:.4f}, "
                      f"{metric} {ev['merged'][metric]:.4f}")


def analyze_command(
    a: Path = typer.Argument(..., help="First checkpoint (the reference basis)."),
    b: Path = typer.Argument(..., help="Second checkpoint, same architecture."),
    top_k: int = typer.Option(5, "--top-k", help="Number of top singular vectors compared per layer."),
    backend: str = typer.Option("auto", "--backend", help="Assignment solver: auto, lap, scipy, torch."),
    device: str = typer.Option("cpu", "--device", help="Device for matching and SVDs (cpu, cuda)."),
    model: str = model_option(),
    json_out: bool = json_option(),
    force: bool = force_option(),
    quiet: bool = quiet_option(),
    debug: bool = debug_option(),
) -> None:
    """Per layer: L2 distance and top singular vector alignment of two models, before/after weight matching.

    Alignment of singular pair i is |<u_i^A,u_i^B>|*|<v_i^A,v_i^B>| (Ito et al. 2024): matching
    works when it aligns the directions with the largest singular values. A value marked * is of a pair
    whose singular value is too close to a neighbour's (the footnote says how close): its vectors are not
    determined alone, so neither is its alignment.

    Examples:\n
      surgery analyze a.safetensors b.safetensors\n
      surgery analyze a.safetensors b.safetensors --top-k 3 --json
    """
    with user_errors(debug), progress_bar(quiet) as progress:
        check_range(top_k, "--top-k", 1, integer=True)
        device = check_device(device)
        result = analyze_pair(a, b, AnalyzeOptions(top_k=top_k, backend=backend, device=device, model=model),
                              progress=progress)
    for note in result.notes:
        warn(note)
    if json_out:
        emit_json(result.to_dict())
        return
    table = Table(title=safe(f"{result.family}: {a} vs {b}"), show_edge=False)
    for col in ("layer", "shape", "L2 before", "L2 after", f"top-{top_k} align before", f"top-{top_k} align after"):
        table.add_column(col, justify="left" if col in ("layer", "shape") else "right", no_wrap=col == "layer")
    def aligned(values: list[float], separated: list[bool]) -> str:
        return " ".join(f"{x:.2f}" + ("" if ok else "*") for x, ok in zip(values, separated))

    for layer in result.layers:
        table.add_row(safe(layer.name), "x".join(map(str, layer.shape)), f"{layer.distance_before:.4g}",
                      f"{layer.distance_after:.4g}", aligned(layer.alignment_before, layer.separated),
                      aligned(layer.alignment_after, layer.separated))
    out_console.print(table)
    if not all(all(layer.separated) for layer in result.layers):
        out_console.print(f"* singular value within {result.gap_tolerance:g} of the largest from a neighbour (or 0) "
                          "in A or B: its vectors are not determined alone (any rotation among close values is as "
                          "good), so its alignment says little")
    out_console.print(f"matching objective <A, P(B)>: {result.objective_before:.4g} -> {result.objective_after:.4g}")


def demo_step(fixtures: Path, workdir: Path, quiet: bool = False) -> dict:
    """Naive vs matched merge of two fixture MLPs, evaluated along the path."""
    a, b = fixtures / "digits" / "mlp_seed0.safetensors", fixtures / "digits" / "mlp_seed1.safetensors"
    data = fixtures / "data" / "digits_eval.safetensors"
    result = merge_checkpoints([a, b], workdir / "merged_mlp.safetensors",
                               MergeOptions(eval_data=data, points=5), force=True)
    ev = result.evaluation
    mid = len(ev["naive"]) // 2
    summary = {
        "output": result.output,
        "endpoint_accuracy": [e["accuracy"] for e in ev["endpoints"]],
        "naive_midpoint_accuracy": ev["naive"][mid]["accuracy"],
        "matched_midpoint_accuracy": ev["matched"][mid]["accuracy"],
        "naive_barrier": ev["naive_barrier"],
        "matched_barrier": ev["matched_barrier"],
    }
    if not quiet:
        render_merge(result.to_dict())
    return summary
