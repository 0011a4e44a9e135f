"""`surgery quantize --format gptq|compressed-tensors|gguf`: refuse what the format cannot hold before
any calibration, quantize on the grid it stores (``QuantizeOptions.storage``: fp16 scales, GPTQ v1
zero points >= 1) into a packed checkpoint beside the output, and convert that without re-quantizing.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from modelsurgery.checkpoint import Checkpoint, check_output
from modelsurgery.families import detect_family


def check_before_calibration(path: Path, opts, scheme) -> None:
    """The format's one-line refusals: scheme, model (architecture, tokenizer) and every weight the
    quantizer would take (the same targets and skips as ``surgery quantize``)."""
    from modelsurgery.deploy import check_model, check_scheme, check_weight
    from modelsurgery.ops.quantize.operation import _skipped
    from modelsurgery.ops.quantize.reconstruct import find_targets

    fmt = opts.format
    check_scheme(fmt, scheme)
    ckpt = Checkpoint.open(path)
    check_model(fmt, ckpt.config, ckpt.folder, str(path), opts.gguf_tokenizer or "auto")
    family = detect_family(ckpt, opts.model)
    if not family.runnable:
        return  # quantize_checkpoint refuses it in its own words
    patterns = list(opts.skip) + (family.embedding_names() + family.head_names() if opts.default_skips else [])
    has_blocks = bool(family.blocks())
    aliases = family.loaded_names()
    for t in find_targets(family.build_empty()).values():
        if t.name in ckpt and not _skipped(t.name, patterns, aliases):
            check_weight(fmt, t.name, ckpt.shape(t.name), t.transposed, t.embedding, scheme,
                         in_block=not has_blocks or family.block_of(t.name) is not None)


def quantize_to_format(path: str | Path, out: str | Path, opts, progress=None):
    """``quantize_checkpoint`` for a deployment format; the result's ``deploy`` is the writer's report."""
    from modelsurgery.deploy import deploy, open_packed, writes_folder
    from modelsurgery.ops.quantize.operation import quantize_checkpoint

    path, out, fmt = Path(path), Path(out), opts.format
    from modelsurgery.deploy import storage_dtype

    packed_opts = replace(opts, format="packed", storage=fmt, storage_dtype=storage_dtype(fmt, Checkpoint.open(path)),
                          force=False, gguf_tokenizer=None)  # the tokenizer is the format writer's (``deploy``)
    scheme = packed_opts.scheme
    scheme.validate()
    check_before_calibration(path, opts, scheme)
    check_output(out, opts.force, [path, *opts.data_files()], folder=writes_folder(fmt))
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.packed-") as tmp:
        packed = Path(tmp) / "packed"
        result = quantize_checkpoint(path, packed, packed_opts, progress)
        if not packed.exists():  # another process of a torchrun group: rank 0 writes
            return result
        src = open_packed(packed)
        original = Checkpoint.open(path)
        src.operation, src.sources = "quantize", [str(p) for p in original.source_files]
        src.model_folder = original.folder  # the model quantized names the output, not the folder packed here
        src.parameters = {"method": opts.method, **scheme.to_dict(), "params": result.options}
        report = deploy(src, out, fmt, opts.force, opts.gguf_tokenizer or "auto")
    result.output, result.bytes_out, result.deploy = str(out), report.bytes_out, report.to_dict()
    result.options = {**result.options, "format": fmt}
    return result
