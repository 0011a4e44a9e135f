"""`surgery quantize`: post-training weight quantization (RTN, AdaRound, FlexRound), fake or packed."""

from __future__ import annotations

import inspect
from pathlib import Path

import typer
from rich.table import Table

from modelsurgery.cli.common import (
    check_finite_option,
    check_range,
    emit_json,
    human_bytes,
    out_console,
    progress_bar,
    safe,
    user_errors,
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
from modelsurgery.deploy import FORMATS as DEPLOY_FORMATS
from modelsurgery.ops.quantize import QuantizeOptions, quantize_checkpoint
from modelsurgery.ops.quantize.base import all_methods
from modelsurgery.ops.quantize.distributed import world
from modelsurgery.ops.quantize.operation import FORMATS
from modelsurgery.ops.quantize.params import all_params


def with_method_flags(command):
    """Add one ``--flag`` per parameter the quantization methods declare (``params.py``): the
    declaration is the only definition; a flag left out takes the chosen method's default, which
    the help lists per method."""
    extra = []
    for name, decls in all_params(all_methods()).items():
        kind = decls[0][1].type
        defaults = ", ".join(f"{m}: {p.default:g}" if isinstance(p.default, float) else f"{m}: {p.default}"
                             for m, p in decls)
        extra.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind | None,
                                       default=typer.Option(None, decls[0][1].flag,
                                                            help=f"{decls[0][1].help} Default: {defaults}.")))
    sig = inspect.signature(command)
    params = list(sig.parameters.values())
    command.__signature__ = sig.replace(parameters=[p for p in params if p.kind != p.VAR_KEYWORD] + extra)
    return command


#: calibration samples accepted (the data file must hold at least this many)
MAX_SAMPLES = 1_000_000


@with_method_flags
def quantize_command(
    input: Path = typer.Argument(..., help="Input checkpoint: .safetensors file or a model folder."),
    output: Path = typer.Option(..., "-o", "--output", help="Output: a .safetensors file or a folder."),
    bits: int = typer.Option(4, "--bits", "-b", help="Bit width of the weights, 2 to 8."),
    method: str = typer.Option(QuantizeOptions.method, "--method", "-m", help="flexround-signsgd (FlexRound's "
                               "learned scales trained with SignRound's signed gradient steps), flexround, adaround "
                               "or rtn."),
    granularity: str = typer.Option("channel", "--granularity", help="One grid per tensor, output channel or group."),
    group_size: int = typer.Option(None, "--group-size", help="Weights per group along a row (--granularity group)."),
    symmetric: bool = typer.Option(True, "--symmetric/--asymmetric", help="Zero point fixed at 2^(bits-1), or "
                                   "fitted to each grid's min/max."),
    skip: list[str] = typer.Option([], "--skip", help="Keep matching weights in float: a glob on the tensor or "
                                   "module name (model.layers.0.mlp.down_proj, *.down_proj), a name part (lm_head) or "
                                   "a run of parts (mlp.down_proj); repeatable."),
    no_default_skips: bool = typer.Option(False, "--no-default-skips", help="Also quantize embeddings and the "
                                          "output head (kept in float by default)."),
    calib: Path = typer.Option(None, "--calib", help="Calibration data: text (one sample a line, needs the "
                               "folder's tokenizer.json) or .safetensors/.pt/.npz with inputs or input_ids."),
    samples: int = typer.Option(None, "--samples", help="Calibration samples (default: the preset's; 128 at "
                                "--preset default)."),
    preset: str = typer.Option(None, "--preset", help="learned methods: fast, default or best: the steps, "
                               "samples and batch size that you do not set yourself (default: each method's "
                               "declared values; table in the README)."),
    seq_len: int = typer.Option(None, "--seq-len", help="Tokens per calibration sample (--eval samples are cut "
                                "to it too; default 128); token data only."),
    grid: str = typer.Option(None, "--grid", help="Grid init: minmax, or search (Lp clipping search). "
                             "Default: minmax for rtn, search for learned methods."),
    fmt: str = typer.Option("fake", "--format", help=f"One of {', '.join((*FORMATS, *DEPLOY_FORMATS))}. fake: "
                            "float weights with the quantization applied; packed: integer codes, scales and zero "
                            "points; gptq, compressed-tensors (folders for transformers/vLLM) and gguf (llama.cpp; "
                            "Q8_0/Q4_0/Q4_1: --granularity group --group-size 32) hold the same codes with fp16 "
                            "scales, which the quantizer then learns on."),
    gguf_tokenizer: str = typer.Option(None, "--gguf-tokenizer", help="--format gguf only: auto (the default: the "
                                       "folder's tokenizer, refused where llama.cpp's converter refuses it) or none "
                                       "(token ids only)."),
    eval_data: Path = typer.Option(None, "--eval", help="Evaluate float vs quantized on this data file."),
    model: str = model_option(),
    seed: int = typer.Option(None, "--seed", help="Random seed for the learned methods' batch order (default 0)."),
    low_memory: bool = typer.Option(None, "--low-memory/--fast", help="Learned methods: while blocks train, return "
                                    "freed memory to the OS every step (the default; peak memory within twice the "
                                    "model plus one block's activations), or skip that for speed (page faults cost "
                                    "time on small blocks)."),
    device: str = typer.Option("cpu", "--device", help="Where the block being calibrated and its activations "
                               "live: cpu, cuda, cuda:N or auto (cuda when present); the rest stays on the host."),
    offload_dir: Path = typer.Option(None, "--offload-dir", help="Keep the cached calibration activations in "
                                     "memory-mapped files in this folder instead of in memory."),
    streaming: bool = typer.Option(True, "--streaming/--whole-model", help="Read the checkpoint a tensor (RTN) or "
                                   "a block (calibration) at a time, or build the whole float model first "
                                   "(the same output; --eval always builds it)."),
    dtype: str = dtype_option(help="--format fake: write the float tensors (the quantized weights included) as "
                              "float32, float16 or bfloat16 (default: as the input); refused for other formats."),
    max_shard_size: str = max_shard_size_option(),
    no_input_hash: bool = no_input_hash_option(),
    json_out: bool = json_option(),
    force: bool = force_option(),
    quiet: bool = quiet_option(),
    debug: bool = debug_option(),
    **method_params,
) -> None:
    """Quantize Linear and Conv weights to 2-8 bits, learning the rounding block by block.

    FlexRound (learned element-wise division) and AdaRound (learned up/down rounding) reconstruct
    each block's float output on calibration data; the default, flexround-signsgd, trains FlexRound's
    scales with SignRound's signed gradient steps (AutoRound's optimiser); RTN rounds to nearest
    without data.
    Embeddings and the output head stay float unless --no-default-skips (embedding tables are then
    rounded to nearest, a token's row as an output channel). Each method's flags (--steps, --lr,
    --batch-size; AdaRound's --reg-weight, --beta-start, --beta-end, --warmup) default to the values of
    its paper or reference code, and the values used are written to the output's provenance.

    Examples:\n
      surgery quantize mlp.safetensors -o q.safetensors --bits 3 --calib calib.safetensors\n
      surgery quantize gpt2/ -o gpt2-q4/ --method flexround --calib text.txt --samples 256 --format packed\n
      surgery quantize gpt2/ -o gpt2-q4/ --calib text.txt --preset fast\n
      surgery quantize bert/ -o q/ --bits 4 --granularity group --group-size 64 --asymmetric --calib s.txt\n
      surgery quantize model/ -o rtn/ --method rtn --bits 8 --eval eval.safetensors --json\n
      torchrun --nproc_per_node 2 -m modelsurgery quantize model/ -o q/ --calib text.txt --device cuda
    """
    with user_errors(debug):
        if samples is not None:
            check_range(samples, "--samples", 1, MAX_SAMPLES, integer=True)
        check_range(seq_len, "--seq-len", 1, integer=True)
        check_range(group_size, "--group-size", 1, integer=True)
        check_range(seed, "--seed", 0, integer=True)
        for name, value in method_params.items():
            if isinstance(value, float):
                check_finite_option(value, "--" + name.replace("_", "-"))
        options = QuantizeOptions(
            bits=bits, method=method, granularity=granularity, group_size=group_size, symmetric=symmetric,
            skip=list(skip), default_skips=not no_default_skips, calib=calib, samples=samples, seq_len=seq_len,
            params={k: v for k, v in method_params.items() if v is not None}, preset=preset, grid=grid, format=fmt,
            eval=eval_data, model=model, seed=seed, low_memory=low_memory, streaming=streaming, device=device,
            offload_dir=offload_dir, force=force, gguf_tokenizer=gguf_tokenizer, dtype=dtype,
            max_shard_size=max_shard_size, hash_inputs=not no_input_hash,
        )
        rank = world()[0]  # under torchrun only rank 0 shows progress and prints
        with progress_bar(quiet or rank != 0) as progress:
            result = quantize_checkpoint(input, output, options, progress)
    if rank != 0:
        return
    if json_out:
        emit_json(result.to_dict())
        return
    render_result(result.to_dict())


def render_result(r: dict) -> None:
    o = r["options"]
    gran = o["granularity"] + (f" {o['group_size']}" if o.get("group_size") else "")
    out_console.print(
        f"[bold]{safe(r['output'])}[/]: {o['method']} {o['bits']}-bit {gran} "
        f"{'symmetric' if o['symmetric'] else 'asymmetric'}, {len(r['layers'])} weights quantized, "
        f"{len(r['kept_float'])} kept float, {o['format']} format"
        + (f", preset {o['preset']} ({o['steps']} steps, batch {o['batch_size']})" if o.get("preset") else "")
    )
    if r["kept_float"]:
        out_console.print("kept float: " + "; ".join(_kept(r["kept_float"])), soft_wrap=True)
    for pattern in r.get("skip_unmatched") or []:
        out_console.print(f"--skip {safe(pattern)} matched no Linear, Conv or Embedding weight of the model and kept "
                          "nothing float (a head tied to the embedding is the embedding's weight)", soft_wrap=True)
    if r.get("estimate"):
        e = r["estimate"]
        out_console.print(f"{safe(e['message'])}, timed on the first {e['timed_steps']} steps of block 1")
    if o.get("samples_used"):
        short = o["samples_used"] < o["samples"]
        out_console.print(f"calibration: {o['samples_used']} samples" + (
            f" (the file holds fewer than the {o['samples']} asked for)" if short else ""))
    if any(b["loss"] is not None for b in r["blocks"]):
        table = Table(show_edge=False, title="block reconstruction error (calibration data)")
        for col in ("block", "weights", "RTN", o["method"], "seconds"):
            table.add_column(col, justify="right" if col != "weights" else "left")
        for b in r["blocks"]:
            if b["weights"]:
                table.add_row(str(b["block"]), safe(_weights(b)), _num(b["rtn_loss"]), _num(b["loss"]),
                              f"{b['seconds']:.1f}")
        out_console.print(table)
    if r.get("evaluation"):
        ev = r["evaluation"]
        table = Table(show_edge=False, title=f"evaluation ({ev['samples']} samples)")
        table.add_column("metric")
        table.add_column("float", justify="right")
        table.add_column("quantized", justify="right")
        for k in ev["float"]:
            if k in ev["quantized"]:
                table.add_row(safe(k), _num(ev["float"][k]), _num(ev["quantized"][k]))
        table.add_row("output cosine (mean)", "1", _num(ev["agreement"]["cosine_mean"]))
        if "top1_agreement" in ev["agreement"]:
            table.add_row("top-1 agreement", "1", _num(ev["agreement"]["top1_agreement"]))
        if "sentence_cosine" in ev:
            table.add_row("sentence-embedding cosine", "1", _num(ev["sentence_cosine"]))
        out_console.print(table)
    out_console.print(f"{human_bytes(r['bytes_in'])} -> {human_bytes(r['bytes_out'])} in {r['seconds']:.1f} s, "
                      f"peak RSS {r['peak_rss_mb']:.0f} MB")


def _weights(block: dict) -> str:
    names = block["weights"]
    return names[0] if len(names) == 1 else f"{len(names)} ({block.get('label') or names[0]})"


def _kept(entries: list[dict], shown: int = 3) -> list[str]:
    """'name, name (reason)' per reason, at most ``shown`` names each."""
    by_reason: dict[str, list[str]] = {}
    for e in entries:
        by_reason.setdefault(e["reason"], []).append(e["name"])
    return [safe(", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
                 + f" ({reason})") for reason, names in by_reason.items()]


def _num(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def demo_step(fixtures: Path, workdir: Path, quiet: bool = False) -> dict:
    """Quantize the digits MLP to 3 bits with RTN and with FlexRound; print both side by side."""
    model = fixtures / "digits" / "mlp_seed0.safetensors"
    calib, evald = fixtures / "data" / "digits_calib.safetensors", fixtures / "data" / "digits_eval.safetensors"
    results = {}
    for method in ("rtn", "flexround"):
        opts = QuantizeOptions(bits=3, method=method, calib=calib, samples=256, eval=evald,
                               params={"steps": 300} if method != "rtn" else {},
                               default_skips=False, format="packed",  # same format: the bytes compare
                               force=True)
        r = quantize_checkpoint(model, workdir / f"mlp_{method}_3bit.safetensors", opts)
        results[method] = {"accuracy": r.evaluation["quantized"]["accuracy"],
                           "float_accuracy": r.evaluation["float"]["accuracy"],
                           "output_cosine": r.evaluation["agreement"]["cosine_mean"], "output": r.output,
                           "bytes": r.bytes_out, "seconds": round(r.seconds, 2)}
    if not quiet:
        table = Table(show_edge=False, title="digits MLP, every layer 3-bit per channel, packed")
        for col in ("method", "accuracy", "float accuracy", "output cosine", "bytes", "seconds"):
            table.add_column(col)
        for m, x in results.items():
            table.add_row(m, f"{x['accuracy']:.4f}", f"{x['float_accuracy']:.4f}", f"{x['output_cosine']:.4f}",
                          human_bytes(x["bytes"]), f"{x['seconds']:.1f}")
        out_console.print(table)
    return results
