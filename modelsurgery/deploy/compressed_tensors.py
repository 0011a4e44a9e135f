"""compressed-tensors ``pack-quantized`` (llm-compressor's format, read by transformers with the
``compressed-tensors`` package and served by vLLM): writer and reader.

Per quantized Linear ``X``: ``X.weight_packed`` int32 [out, ceil(in * bits / 32)] (the signed
values q - 2^(b-1), offset back to unsigned, as one dense little-endian bit stream per row),
``X.weight_scale`` [out, n_groups], ``X.weight_shape`` int64 [2] and, for asymmetric grids,
``X.weight_zero_point`` packed the same way along the output dimension [ceil(out * bits / 32),
n_groups]. The value is (q_signed - zp_signed) * scale, which is our (q - z) * s with both shifted
by 2^(b-1): the stored unsigned codes are our codes. config.json carries ``quantization_config``
with one config group per scheme (bits, strategy channel/group, symmetry) whose targets are the
quantized modules by name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from modelsurgery.checkpoint import Checkpoint, PlannedTensor, plan_copy, plan_tensor
from modelsurgery.deploy.common import (
    DeferredCodes,
    DeployReport,
    DeploySource,
    PackedRef,
    check_folder_output,
    module_of,
    pack_words,
    plain_2d,
    read_tensor,
    scale_rounding_error,
    stored_shape,
    stream_words,
    unpack_words,
    write_quantized_folder,
)
from modelsurgery.errors import SurgeryError
from modelsurgery.ops.quantize.packing import SUFFIXES as PACKED_SUFFIXES
from modelsurgery.ops.quantize.packing import PackedWeight

FOLDER = True  # a model folder: config.json, safetensors, tokenizer files
NAME = "compressed-tensors"
QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"


def check_scheme(scheme) -> None:
    if scheme.granularity not in ("channel", "group"):
        raise SurgeryError(f"--format {NAME} ({FORMAT}) stores one scale per output channel or per group: use "
                           f"--granularity channel or group (got {scheme.granularity})")


def model_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The model's float dtype: config.json's (``dtype``, or 4.x's ``torch_dtype``), else the dominant one of
    its float tensors other than a packed checkpoint's scales (float32 whatever the model's)."""
    stated = (ckpt.config or {}).get("dtype") or (ckpt.config or {}).get("torch_dtype")
    if isinstance(stated, str) and isinstance(getattr(torch, stated, None), torch.dtype) \
            and getattr(torch, stated).is_floating_point:
        return getattr(torch, stated)
    return ckpt.dtype(skip=PACKED_SUFFIXES)


def scale_dtype_for(src: DeploySource) -> torch.dtype:
    """Scales in the model's float dtype, as llm-compressor stores them (and vLLM and transformers load
    them): the decompressor computes (q - zp) * scale in the scale's dtype, so a float32 model dequantizes
    exactly, and a quantizer run for this format learns scales that dtype holds."""
    return model_dtype(src.ckpt)


def quantization_config(src: DeploySource) -> dict:
    s = src.scheme
    weights = {"num_bits": s.bits, "type": "int", "symmetric": s.symmetric, "strategy": s.granularity,
               "group_size": s.group_size if s.granularity == "group" else None, "dynamic": False,
               "actorder": None, "observer": "minmax", "block_structure": None}
    return {
        "quant_method": QUANT_METHOD, "format": FORMAT, "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": [module_of(w.name) for w in src.weights], "weights": weights,
                                      "input_activations": None, "output_activations": None, "format": FORMAT}},
        "ignore": [], "kv_cache_scheme": None, "sparsity_config": {}, "global_compression_ratio": None,
    }


def planned_tensors(w: PackedWeight | PackedRef, symmetric: bool, scale_dtype: torch.dtype,
                    errors: dict[str, float]) -> list[PlannedTensor]:
    """The module's stored tensors, each produced when the writer reaches it; writing the scale records
    in ``errors`` how far storing it in ``scale_dtype`` moves the weight."""
    plain_2d(w, NAME)
    module = module_of(w.name)
    rows, length = w.shape
    groups = -(-length // (w.group_size or length))
    words = -(-length * w.bits // 32)

    def weight_scale() -> torch.Tensor:
        stored = torch.from_numpy(w.scale).to(scale_dtype)
        errors[w.name] = scale_rounding_error(w, stored.float().numpy())
        return stored

    def weight_zero_point() -> torch.Tensor:
        return torch.from_numpy(pack_words(w.zero_point.T, w.bits).T.copy())

    out = [PlannedTensor(f"{module}.weight_packed", (rows, words), torch.int32,
                         lambda: torch.from_numpy(stream_words(w))),
           PlannedTensor(f"{module}.weight_scale", (rows, groups), scale_dtype, weight_scale),
           plan_tensor(f"{module}.weight_shape", torch.tensor([rows, length], dtype=torch.int64))]
    if not symmetric:
        out.append(PlannedTensor(f"{module}.weight_zero_point", (-(-rows * w.bits // 32), groups), torch.int32,
                                 weight_zero_point))
    return out


def write_compressed_tensors(src: DeploySource, out: str | Path, force: bool = False) -> DeployReport:
    """Write ``src`` as a compressed-tensors folder, tensor by tensor (float tensors copied file to file)."""
    out = Path(out)
    check_folder_output(src, out, NAME)
    check_scheme(src.scheme)
    quantized = src.quantized()
    for w in src.weights:  # every weight checked before anything is written (zero points are small)
        plain_2d(w, NAME)
        if src.scheme.symmetric and (w.zero_point != 1 << (w.bits - 1)).any():
            raise SurgeryError(f"tensor '{w.name}': a symmetric scheme needs zero point {1 << (w.bits - 1)}")
    planned, errors = [], {}
    scale_dtype = scale_dtype_for(src)
    for name in src.tensor_names():
        w = quantized.get(name)
        planned += ([plan_copy(src.ckpt, name, raw=True)] if w is None
                    else planned_tensors(w, src.scheme.symmetric, scale_dtype, errors))
    report = write_quantized_folder(src, out, planned, quantization_config(src), NAME, force)
    return DeployReport(NAME, str(out), [str(f) for f in report.files], sum(Path(f).stat().st_size
                        for f in report.files), len(src.weights), src.scheme.to_dict(),
                        max(errors.values(), default=0.0), {"quant_method": QUANT_METHOD, "format": FORMAT})


# ----- reader ---------------------------------------------------------------------------------------
def is_compressed_tensors(config: dict | None) -> bool:
    qc = (config or {}).get("quantization_config") or {}
    return qc.get("quant_method") == QUANT_METHOD


def group_targets(name: str, target: str) -> bool:
    """compressed-tensors' ``match_name`` for a packed module: its name, a "re:" pattern (``re.match``), or
    the class name ``Linear`` (every packed module is one)."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target in (name, "Linear")


def read_compressed_tensors(ckpt: Checkpoint) -> list[DeferredCodes]:
    """Every pack-quantized weight of a compressed-tensors folder, in our representation (codes read when
    asked for); each module read
    with the weights scheme of the config group that targets it (llm-compressor writes one group per scheme)."""
    qc = ckpt.config["quantization_config"]
    if qc.get("format") != FORMAT:
        raise SurgeryError(f"{ckpt.path}: compressed-tensors format '{qc.get('format')}' is not read; "
                           f"'{FORMAT}' is")
    groups = {name: group for name, group in (qc.get("config_groups") or {}).items() if group.get("weights")}
    for args in (g["weights"] for g in groups.values()):
        strategy = args.get("strategy")
        if strategy not in ("channel", "group") or args.get("type", "int") != "int":
            raise SurgeryError(f"{ckpt.path}: compressed-tensors weights of strategy '{strategy}', type "
                               f"'{args.get('type')}' are not read (int channel and group are)")
    weights = []
    for module in [n[: -len(".weight_packed")] for n in ckpt.keys() if n.endswith(".weight_packed")]:  # noqa: SIM118
        args = module_weights(ckpt, module, groups)
        bits, strategy = int(args.get("num_bits", 0)), args["strategy"]
        stored_shape(ckpt, f"{module}.weight_shape", (2,), NAME, "a 2-D weight")
        shape = tuple(int(x) for x in ckpt.get(f"{module}.weight_shape").tolist())
        rows, length = shape
        group = int(args.get("group_size") or 0) if strategy == "group" else None
        per_row = -(-length // group) if group else 1  # scales (and zero points) per row
        implied = f"'{module}.weight_shape' {list(shape)} with {bits} bits, {strategy}{f' {group}' if group else ''}"
        stored_shape(ckpt, f"{module}.weight_packed", (rows, -(-length * bits // 32)), NAME, implied)
        stored_shape(ckpt, f"{module}.weight_scale", (rows, per_row), NAME, implied)
        scale = ckpt.get(f"{module}.weight_scale").float().numpy()
        if f"{module}.weight_zero_point" in ckpt:
            stored_shape(ckpt, f"{module}.weight_zero_point", (-(-rows * bits // 32), per_row), NAME, implied)
            zp = ckpt.get(f"{module}.weight_zero_point").numpy()
            zero = unpack_words(zp.T, bits, rows).T.copy()
        else:
            zero = np.full(scale.shape, 1 << (bits - 1), np.uint8)
        weights.append(DeferredCodes(
            f"{module}.weight", shape, bits, group,
            lambda m=module, b=bits, n=length: unpack_words(read_tensor(ckpt, f"{m}.weight_packed").numpy(), b, n),
            np.ascontiguousarray(scale), np.ascontiguousarray(zero)))
    return weights


def module_weights(ckpt: Checkpoint, module: str, groups: dict[str, dict]) -> dict:
    """The weights scheme ``module`` was packed with: the one of the config groups whose targets match it;
    refused when none does or two groups disagree."""
    found = {name: g["weights"] for name, g in groups.items()
             if any(group_targets(module, t) for t in g.get("targets") or [])}
    if len({json.dumps(a, sort_keys=True) for a in found.values()}) > 1:
        raise SurgeryError(f"{ckpt.path}: module '{module}' is targeted by config groups {', '.join(found)} with "
                           "different weight schemes")
    if not found:
        raise SurgeryError(f"{ckpt.path}: module '{module}' is packed but no config group targets it "
                           f"(groups: {', '.join(groups) or 'none'})")
    return next(iter(found.values()))


SUFFIXES = (".weight_packed", ".weight_scale", ".weight_shape", ".weight_zero_point")
