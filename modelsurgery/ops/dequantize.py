"""Dequantize: the float checkpoint a quantized one stands for, W = (q - zero_point) * scale
(Jacob et al., 2018, eq. 1), for modelsurgery's packed format (``ops.quantize.packing``) and the
GPTQ and compressed-tensors folders that ``modelsurgery.deploy`` reads.

The output holds ``X.weight`` where the input held codes, scales and zero points; every other tensor
is copied as it is; config.json loses its ``quantization_config``, so transformers loads the folder
as the float model it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelsurgery.checkpoint import DEFAULT_MAX_SHARD, Provenance, open_checkpoint, plan_copy
from modelsurgery.checkpoint.output import check_output
from modelsurgery.checkpoint.writer import float_dtype, write_checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.memory import large_allocations_mapped
from modelsurgery.ops.float_input import float_view, quantization_of
from modelsurgery.ops.quantize.packing import METADATA_KEY

#: allocations from this size get their own mapping while the weights are dequantized and written
#: (``memory.large_allocations_mapped``)
MAP_FROM_BYTES = 1 << 20


@dataclass
class DequantizeOptions:
    #: dtype of the output's floating tensors; None: the input's float dtype (float32 if it has none)
    dtype: str | None = None
    max_shard_size: int | str = DEFAULT_MAX_SHARD
    hash_inputs: bool = True
    force: bool = False


@dataclass
class DequantizeResult:
    input: str
    output: str
    source_format: str  # packed | gptq | compressed-tensors
    weights: int  # quantized weights turned into float
    dtype: str
    bytes_in: int
    bytes_out: int
    seconds: float
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def dequantize(path: str | Path, out: str | Path, options: DequantizeOptions | None = None,
               progress: Callable[[str, int, int, dict], None] | None = None) -> DequantizeResult:
    """Write the float checkpoint ``path`` stands for to ``out`` (a folder or a .safetensors file);
    ``progress`` hears the writer's "write" task (a packed weight is dequantized as it is written)."""
    opts = options or DequantizeOptions()
    start = time.perf_counter()
    path, out = Path(path), Path(out)
    dtype = float_dtype(opts.dtype)  # the writing commands' --dtype names (writer.FLOAT_DTYPES)
    check_output(out, opts.force, [path])
    ckpt = open_checkpoint(path)
    q = quantization_of(ckpt)
    if q is None:
        raise SurgeryError(f"{path}: not a quantized checkpoint (no {METADATA_KEY} metadata and no "
                           "quantization_config); nothing to dequantize")
    if q.format == "fake":
        raise SurgeryError(f"{path}: {q.describe()}: its weights are already float; use it as it is")
    from modelsurgery.deploy import deployed_planned, read_deployed  # only GPTQ/compressed-tensors need it

    if q.format == "packed":
        view, _ = float_view(ckpt, "dequantize")
        source, count = "packed", len([n for n in view.keys() if n not in ckpt])  # noqa: SIM118
        planned = [plan_copy(view, n) for n in view.keys()]  # noqa: SIM118 - dequantized when written
        config, metadata = view.config, view.metadata
    else:
        weights = read_deployed(ckpt)
        if weights is None:
            raise SurgeryError(f"{path}: {q.describe()}; dequantize reads modelsurgery's packed format, GPTQ "
                               "(without act-order) and compressed-tensors pack-quantized folders")
        source, count = str(ckpt.config["quantization_config"].get("quant_method")), len(weights)
        planned = deployed_planned(ckpt, weights, torch.float32)  # dequantized when written
        config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
        metadata = {k: v for k, v in ckpt.metadata.items() if k.startswith("modelsurgery.") and k != METADATA_KEY}
    if dtype is None:
        kept = [ckpt.info(n).dtype for n in ckpt.keys() if ckpt.info(n).dtype.is_floating_point  # noqa: SIM118
                and n in {t.name for t in planned}]
        dtype = max(set(kept), key=kept.count) if kept else torch.float32
    if config is not None and "torch_dtype" in config:
        config = {**config, "torch_dtype": str(dtype).removeprefix("torch.")}
    if config is not None and "dtype" in config:
        config = {**config, "dtype": str(dtype).removeprefix("torch.")}
    params = {"dtype": str(dtype).removeprefix("torch."), "source_format": source}
    sources = ckpt.source_files
    if not opts.hash_inputs:  # the digest is a full read of the input: skippable for multi-GB inputs
        params["inputs_unhashed"] = [str(f) for f in sources]
        sources = []
    # each weight's codes, float32 values and cast copy are freed before the next weight: mapped, they go back
    # to the OS when freed (in glibc's heap their holes stayed resident: 300-340 MB against 225 MB mapped on
    # the 1.7 GB bench model's GPTQ, compressed-tensors and packed outputs)
    with large_allocations_mapped(MAP_FROM_BYTES):
        report = write_checkpoint(
            out, planned, provenance=Provenance("dequantize", params, sources),
            metadata=metadata, config=config, extra_files=ckpt.extra_files(), max_shard_size=opts.max_shard_size,
            dtype=dtype, force=opts.force, progress=progress)
    return DequantizeResult(str(path), str(out), source, count, params["dtype"], ckpt.nbytes,
                            report.total_bytes, time.perf_counter() - start, [str(f) for f in report.files])
