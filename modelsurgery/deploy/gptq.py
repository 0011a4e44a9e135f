"""The GPTQ checkpoint layout (AutoGPTQ / GPTQModel ``checkpoint_format: gptq``, read by transformers
through optimum and GPTQModel, by vLLM, TGI and ExLlama): writer and reader.

Per quantized Linear ``X`` with in_features I, out_features O, G = group size (I for per channel):

- ``X.qweight`` int32 [I * bits / 32, O]: the unsigned codes of each output column as one dense
  little-endian bit stream along the input dimension (32 / bits codes a word at 2, 4 and 8 bits;
  3-bit codes cross word boundaries, 32 codes in 3 words);
- ``X.qzeros`` int32 [I / G, O * bits / 32]: the zero points packed the same way along the output
  dimension, stored minus one: the v1 convention, which every reader undoes by adding one (so a
  zero point of 0 cannot be stored, and is refused);
- ``X.scales`` fp16 [I / G, O]; ``X.g_idx`` int32 [I], the group of each input (i // G; no act-order).

The weight is scales[g_idx[i], o] * (q[i, o] - (qzeros[g_idx[i], o] + 1)): our (q - z) * s with
the scale rounded to fp16. config.json carries ``quantization_config`` (quant_method gptq, bits,
group_size, sym, desc_act false, checkpoint_format gptq).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from modelsurgery.checkpoint import Checkpoint, PlannedTensor, plan_copy
from modelsurgery.deploy.common import (
    DeferredCodes,
    DeployReport,
    DeploySource,
    PackedRef,
    check_folder_output,
    fp16,
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
from modelsurgery.ops.quantize.packing import PackedWeight

FOLDER = True  # a model folder: config.json, safetensors, tokenizer files
NAME = "gptq"
SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")
BITS = (2, 3, 4, 8)


def check_scheme(scheme) -> None:
    if scheme.bits not in BITS or scheme.granularity not in ("channel", "group"):
        raise SurgeryError(f"--format gptq stores 2, 3, 4 or 8-bit weights with one scale per output channel or "
                           f"group (--granularity channel|group); got {scheme.bits}-bit {scheme.granularity}")


def stores_offset(scheme) -> bool:
    return False


def min_zero_point(scheme) -> int:
    """v1 stores zero - 1: an asymmetric grid must keep its zero points at 1 or above."""
    return 0 if scheme.symmetric else 1


def modules_in_block_to_quantize(src: DeploySource) -> list[list[str]]:
    """The quantized modules, named inside their block ("self_attn.q_proj"). optimum, transformers' GPTQ
    loader, turns every Linear of every block into a QuantLinear unless this lists them: a Linear kept
    float (--skip) would be replaced and left without its weight. Full module names when blocks differ
    (optimum matches by name suffix)."""
    modules = [module_of(w.name) for w in src.weights]
    inside = [re.sub(r"^.*?\.\d+\.", "", m) for m in modules]
    per_block: dict[str, set[str]] = {}
    for module, name in zip(modules, inside):
        per_block.setdefault(module[: len(module) - len(name)], set()).add(name)
    uniform = len({frozenset(v) for v in per_block.values()}) == 1
    return [list(dict.fromkeys(inside if uniform else modules))]


def quantization_config(src: DeploySource) -> dict:
    s = src.scheme
    return {"quant_method": "gptq", "bits": s.bits, "group_size": s.group_size if s.granularity == "group" else -1,
            "sym": s.symmetric, "desc_act": False, "checkpoint_format": "gptq", "true_sequential": True,
            "damp_percent": 0.01, "static_groups": False,
            "modules_in_block_to_quantize": modules_in_block_to_quantize(src), "quantized_by": "modelsurgery",
            **({"block_name_to_quantize": stack} if (stack := block_stack(src)) else {})}


def check_shape(name: str, shape: tuple[int, ...], bits: int) -> None:
    out_features, in_features = shape
    if (in_features * bits) % 32 or (out_features * bits) % 32:
        raise SurgeryError(f"tensor '{name}' {list(shape)}: GPTQ packs {bits}-bit codes into int32 words; "
                           f"in and out features times {bits} must be multiples of 32 (keep it float with --skip)")


def check_in_block(name: str, in_block: bool) -> None:
    """optimum (transformers' GPTQ loader) turns only Linears inside the blocks into QuantLinears: a quantized
    weight outside them (the output head) would be dropped on load and the layer left uninitialised."""
    if not in_block:
        raise SurgeryError(f"tensor '{name}': --format gptq quantizes Linear layers inside the blocks (transformers' "
                           "GPTQ loader leaves any other float, so it would load uninitialised); keep it float "
                           "(drop --no-default-skips, or --skip it)")


def family_of(src: DeploySource):
    """The source's family, detected from its float names (a packed checkpoint's as it stands for them)."""
    from modelsurgery.families import detect_family
    from modelsurgery.ops.float_input import float_view

    return detect_family(float_view(src.ckpt, f"--format {NAME}")[0])


def outside_blocks(src: DeploySource) -> set[str]:
    """The quantized weights outside the family's blocks (none when the family names no blocks)."""
    family = family_of(src)
    if not family.blocks():
        return set()
    return {w.name for w in src.weights if family.block_of(w.name) is None}


def block_stack(src: DeploySource) -> str | None:
    """The module holding the blocks ("model.layers", "encoder.layer"): optimum guesses it from a list of
    decoder prefixes only, so a BERT folder that does not say it cannot be loaded."""
    blocks = family_of(src).blocks()
    return re.sub(r"\.\d+\.$", "", blocks[0].prefix) if blocks else None


def check_zero_points(w: PackedWeight | PackedRef) -> None:
    if int(w.zero_point.min(initial=1)) < 1:
        raise SurgeryError(f"tensor '{w.name}': a zero point of 0 cannot be stored in GPTQ v1 (zeros are stored "
                           "minus one); quantize with --format gptq so the grid keeps zero points >= 1")


def gptq_planned(w: PackedWeight | PackedRef, errors: dict[str, float]) -> list[PlannedTensor]:
    """The module's four GPTQ tensors, each produced when the writer reaches it; writing ``scales``
    records in ``errors`` how far the fp16 scale moves the weight."""
    plain_2d(w, NAME)
    check_shape(w.name, w.shape, w.bits)
    out_features, in_features = w.shape
    group = w.group_size or in_features
    groups = -(-in_features // group)
    module = module_of(w.name)
    mask = (1 << w.bits) - 1

    def qweight() -> torch.Tensor:
        return torch.from_numpy(stream_words(w).T.copy())

    def qzeros() -> torch.Tensor:
        stored = ((w.zero_point.astype(np.int64) - 1) & mask).T.astype(np.uint8)
        return torch.from_numpy(pack_words(stored, w.bits).copy())

    def scales() -> torch.Tensor:
        scale = fp16(w.scale)
        errors[w.name] = scale_rounding_error(w, scale)  # reads the codes only when the scale moved
        return torch.from_numpy(scale.T.copy()).to(torch.float16)

    def g_idx() -> torch.Tensor:
        return torch.arange(in_features, dtype=torch.int32) // group

    words = in_features * w.bits // 32
    return [PlannedTensor(f"{module}.qweight", (words, out_features), torch.int32, qweight),
            PlannedTensor(f"{module}.qzeros", (groups, out_features * w.bits // 32), torch.int32, qzeros),
            PlannedTensor(f"{module}.scales", (groups, out_features), torch.float16, scales),
            PlannedTensor(f"{module}.g_idx", (in_features,), torch.int32, g_idx)]


def write_gptq(src: DeploySource, out: str | Path, force: bool = False) -> DeployReport:
    """Write ``src`` as a GPTQ folder, tensor by tensor (float tensors copied file to file)."""
    out = Path(out)
    check_folder_output(src, out, NAME)
    check_scheme(src.scheme)
    quantized = src.quantized()
    outside = outside_blocks(src)
    for w in src.weights:  # every weight checked before anything is written (zero points are small)
        plain_2d(w, NAME)
        check_in_block(w.name, w.name not in outside)
        check_shape(w.name, w.shape, w.bits)
        check_zero_points(w)
    planned, errors = [], {}
    for name in src.tensor_names():
        w = quantized.get(name)
        planned += [plan_copy(src.ckpt, name, raw=True)] if w is None else gptq_planned(w, errors)
    report = write_quantized_folder(src, out, planned, quantization_config(src), NAME, force)
    return DeployReport(NAME, str(out), [str(f) for f in report.files],
                        sum(Path(f).stat().st_size for f in report.files), len(src.weights), src.scheme.to_dict(),
                        max(errors.values(), default=0.0), {"checkpoint_format": "gptq"})


# ----- reader ---------------------------------------------------------------------------------------
def is_gptq(config: dict | None) -> bool:
    qc = (config or {}).get("quantization_config") or {}
    return qc.get("quant_method") == "gptq"


def check_readable(qc: dict, where) -> None:
    """Refuse the GPTQModel settings that change how a module's tensors decode or what they stand for:
    per-module overrides (``dynamic``: other bits or group size than the config's), words other than int32
    (``pack_dtype``), and rotated weights (``rotation``: the stored weight is W times a rotation)."""
    overrides = [k for k in (qc.get("dynamic") or {}) if not str(k).startswith("-:")]  # '-:' only skips modules
    if overrides:
        raise SurgeryError(f"{where}: GPTQ quantization_config 'dynamic' overrides modules matching "
                           f"'{overrides[0]}' with their own scheme; per-module overrides are not read")
    if str(qc.get("pack_dtype") or "int32") != "int32":
        raise SurgeryError(f"{where}: GPTQ pack_dtype '{qc['pack_dtype']}' is not read (int32 words are)")
    if qc.get("rotation"):
        raise SurgeryError(f"{where}: GPTQ rotation '{qc['rotation']}': the stored weights are rotated; not read")


def read_gptq(ckpt: Checkpoint) -> list[DeferredCodes]:
    """Every GPTQ weight of a folder in our representation (v1 zeros: stored value + 1), its codes read when
    asked for."""
    qc = ckpt.config["quantization_config"]
    if qc.get("checkpoint_format", "gptq") != "gptq" or qc.get("desc_act"):
        raise SurgeryError(f"{ckpt.path}: GPTQ checkpoint_format '{qc.get('checkpoint_format')}' with desc_act "
                           f"{qc.get('desc_act')} is not read (gptq without act-order is)")
    check_readable(qc, ckpt.path)
    bits, group_size = int(qc["bits"]), int(qc.get("group_size") or -1)
    weights = []
    modules = [n[: -len(".qweight")] for n in ckpt.keys() if n.endswith(".qweight")]  # noqa: SIM118
    for module in modules:
        words, out_features = stored_shape(ckpt, f"{module}.qweight", 2, NAME, "a 2-D weight")
        in_features = words * 32 // bits
        group = group_size if 0 < group_size < in_features else in_features
        groups = -(-in_features // group)
        implied = f"'{module}.qweight' {[words, out_features]} with {bits} bits, group_size {group_size}"
        stored_shape(ckpt, f"{module}.scales", (groups, out_features), NAME, implied)
        stored_shape(ckpt, f"{module}.qzeros", (groups, -(-out_features * bits // 32)), NAME, implied)
        if f"{module}.g_idx" in ckpt:
            stored_shape(ckpt, f"{module}.g_idx", (in_features,), NAME, implied)
        scales = ckpt.get(f"{module}.scales").float().numpy()
        zeros = unpack_words(ckpt.get(f"{module}.qzeros").numpy(), bits, out_features).astype(np.int64) + 1
        if (zeros > (1 << bits) - 1).any():
            raise SurgeryError(f"{ckpt.path}: tensor '{module}.qzeros' holds a zero point of {1 << bits} "
                               "(stored -1, the v1 overflow): not representable")
        g_idx = ckpt.get(f"{module}.g_idx").numpy() if f"{module}.g_idx" in ckpt else None
        if g_idx is not None and not (g_idx == np.arange(in_features) // group).all():
            raise SurgeryError(f"{ckpt.path}: tensor '{module}.g_idx' is not in input order (act-order is not read)")
        weights.append(DeferredCodes(
            f"{module}.weight", (out_features, in_features), bits, group if groups > 1 else None,
            lambda m=module, n=in_features: unpack_words(read_tensor(ckpt, f"{m}.qweight").numpy().T, bits, n),
            np.ascontiguousarray(scales.T), np.ascontiguousarray(zeros.T.astype(np.uint8))))
    return weights
