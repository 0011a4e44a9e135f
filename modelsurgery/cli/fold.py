"""`surgery fold`: PEFT adapters (LoRA, DoRA, MiSS/Bone, LoKr) folded into the base weights, streaming."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from modelsurgery.cli.common import emit_json, human_bytes, out_console, progress_bar, safe, user_errors
from modelsurgery.cli.options import (
    debug_option,
    dtype_option,
    force_option,
    json_option,
    max_shard_size_option,
    no_input_hash_option,
    quiet_option,
)
from modelsurgery.errors import SurgeryError
from modelsurgery.ops.adapters import FoldOptions, fold_adapters


def fold_command(
    base: Path = typer.Argument(..., help="Base model: a folder (config.json, weights, tokenizer) or a file."),
    adapter: Path = typer.Argument(None, help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."),
    output: Path = typer.Option(None, "-o", "--output", help="Output: a folder or a .safetensors file."),
    adapters: list[Path] = typer.Option(None, "--adapter", help="Another adapter, folded after ADAPTER; repeatable, "
                                        "folded in the order given."),
    scale: float = typer.Option(FoldOptions.scale, "--scale", help="Fraction of each adapter's change to fold "
                                "(1 = PEFT's merge_and_unload; 0.5 = half the fine-tune)."),
    dtype: str = dtype_option(),
    max_shard_size: str = max_shard_size_option(),
    no_input_hash: bool = no_input_hash_option(),
    json_out: bool = json_option(),
    force: bool = force_option(),
    quiet: bool = quiet_option(),
    debug: bool = debug_option(),
) -> None:
    """Fold PEFT adapters into the base weights, one tensor at a time (the whole model is never in memory).

    Adapter types: LORA (with DoRA, rsLoRA, rank/alpha patterns, fan_in_fan_out), MISS, BONE, LOKR.

    A LoftQ adapter (init_lora_weights "loftq", or a loftq_config) folds only onto LoftQ's quantized backbone (the
    base model PEFT's LoftQ init saved beside it); BASE's targeted weights are checked for its NF4 / int8 grid and
    the float model is refused.

    Names, dtypes (unless --dtype), config.json and tokenizer files of BASE are kept; provenance names each
    adapter.

    Examples:\n
      surgery fold llama/ my-lora/ -o llama-tuned/\n
      surgery fold llama/ a-lora/ --adapter b-dora/ -o merged/\n
      surgery fold gpt2/ lora/ -o half/ --scale 0.5 --json\n
      surgery fold llama/ lora/ -o llama-bf16/ --dtype bfloat16 --max-shard-size 2GB
    """
    with user_errors(debug):
        paths = ([adapter] if adapter else []) + list(adapters or [])
        if output is None:
            raise SurgeryError("no output given: pass -o OUT (a folder or a .safetensors file)")
        options = FoldOptions(scale=scale, dtype=dtype, max_shard_size=max_shard_size,
                              hash_inputs=not no_input_hash, force=force)
        options.check_write_options()
        with progress_bar(quiet) as progress:
            report = fold_adapters(base, paths, output, options, progress)
    if json_out:
        emit_json(report.to_dict())
        return
    table = Table(show_header=False, show_edge=False)
    table.add_row("base", safe(f"{report.base} ({report.family})"))
    for a in report.adapters:
        table.add_row("adapter", safe(f"{a['path']} ({a['peft_type']}: {a['modules']} modules, "
                                      f"{a['whole_tensors']} whole tensors)"))
    table.add_row("scale", f"{report.scale:g}")
    table.add_row("tensors", f"{report.tensors_updated} updated, {report.tensors_copied} copied")
    table.add_row("output", f"{safe(report.output)} ({human_bytes(report.bytes_written)})")
    out_console.print(table)


def demo_step(fixtures: Path, workdir: Path, quiet: bool = False) -> dict:
    """Fold a rank-4 LoRA into the LLaMA character LM, then extract it back from the folded model."""
    import torch

    from modelsurgery.checkpoint import Checkpoint, Provenance, plan_tensor
    from modelsurgery.families import detect_family
    from modelsurgery.ops.adapters import ExtractOptions, extract_lora
    from modelsurgery.ops.adapters.peft_format import lora_config, module_key, write_lora_adapter

    base = fixtures / "charlm" / "llama"
    if not base.is_dir():
        return {}
    family = detect_family(Checkpoint.open(base))
    gen = torch.Generator().manual_seed(0)
    tensors, modules = [], []
    for i in range(family.num_layers):
        for lin in family.block_linears(i).values():
            out_f, in_f = family.ckpt.shape(lin.weight)
            module = lin.weight.removesuffix(".weight")
            modules.append(module)
            a, b = torch.randn(4, in_f, generator=gen), torch.randn(out_f, 4, generator=gen)
            tensors.append(plan_tensor(module_key(module, "lora_A.weight"), 0.03 * a))
            tensors.append(plan_tensor(module_key(module, "lora_B.weight"), 0.03 * b))
    adapter = workdir / "demo-lora"
    write_lora_adapter(adapter, tensors, lora_config(4, 8, modules, {}, {}, False, str(base)),
                       Provenance("demo", {"rank": 4}), force=True)
    folded = workdir / "folded-llama"
    fold = fold_adapters(base, [adapter], folded, FoldOptions(force=True))
    extracted = extract_lora(base, folded, workdir / "extracted-lora", ExtractOptions(rank=4, force=True))
    before, after = detect_family(Checkpoint.open(base)), detect_family(Checkpoint.open(folded))
    inputs = before.example_inputs(batch=2, seq_len=8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        change = float((before.build_module()(**inputs) - after.build_module()(**inputs)).abs().max())
    worst = max(layer.relative_error for layer in extracted.layers)
    result = {"adapter": str(adapter), "output": str(folded), "tensors_updated": fold.tensors_updated,
              "max_logit_change": change, "extracted_layers": len(extracted.layers),
              "extract_max_relative_error": worst}
    if not quiet:
        out_console.print(f"fold: rank-4 LoRA into {safe(base.name)}: {fold.tensors_updated} tensors updated, "
                          f"max logit change {change:.3g}; extract at rank 4 recovers it "
                          f"(max relative error {worst:.2g})")
    return result
