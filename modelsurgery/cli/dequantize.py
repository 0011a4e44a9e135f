"""`surgery dequantize`: a packed, GPTQ or compressed-tensors checkpoint back to float weights."""

from __future__ import annotations

from pathlib import Path

import typer

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


def dequantize_command(
    input: Path = typer.Argument(..., help="Quantized checkpoint: a packed .safetensors file or folder "
                                 "(surgery quantize --format packed), a GPTQ or a compressed-tensors folder."),
    output: Path = typer.Option(..., "-o", "--output", help="Output: a folder or a .safetensors file."),
    dtype: str = dtype_option(help="Write the float tensors as float32, float16 or bfloat16 (also fp32, fp16, "
                              "bf16; default: the dtype of the input's float tensors)."),
    max_shard_size: str = max_shard_size_option(),
    no_input_hash: bool = no_input_hash_option(),
    json_out: bool = json_option(),
    force: bool = force_option(),
    quiet: bool = quiet_option(),
    debug: bool = debug_option(),
) -> None:
    """Turn integer codes, scales and zero points back into float weights, W = (q - zero_point) * scale.

    The output loads in transformers (and every surgery command) as the float model the quantized
    checkpoint stands for: config.json loses its quantization_config, other tensors, tokenizer
    files and config are kept.

    Examples:\n
      surgery dequantize gpt2-q4/ -o gpt2-q4-float/\n
      surgery dequantize model-gptq/ -o float/ --dtype float16 --json
    """
    with user_errors(debug):
        from modelsurgery.ops.dequantize import DequantizeOptions, dequantize

        options = DequantizeOptions(dtype=dtype, max_shard_size=max_shard_size, hash_inputs=not no_input_hash,
                                    force=force)
        with progress_bar(quiet) as progress:
            result = dequantize(input, output, options, progress)
    if json_out:
        emit_json(result.to_dict())
    else:  # --quiet as on every command: no progress display, the result still printed
        out_console.print(f"[bold]{safe(result.output)}[/]: {result.weights} {safe(result.source_format)} weights "
                          f"dequantized to {result.dtype}, {human_bytes(result.bytes_in)} -> "
                          f"{human_bytes(result.bytes_out)} in {result.seconds:.1f} s")
