"""What every deployment format shares: the quantized weights in our representation, the source
checkpoint's float tensors, and fp16 scale storage.

Our representation is the packed format's (``modelsurgery.export.packed.PackedWeight``): integer
codes [rows, R], scale and zero point [rows, n_groups], W = (q - z) * s. A deployment format stores
the same codes and a scale rounded to fp16, so a weight converts without re-quantization; the
quantizer can learn on fp16-representable scales (``storable_scale``) so that nothing moves.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.ops.quantize.packing import SUFFIXES, PackedWeight, read_packed, read_scheme

if TYPE_CHECKING:
    from modelsurgery.ops.quantize.grids import QuantScheme


@dataclass
class DeploySource:
    """A quantized model ready to be written: its weights, float tensors and folder files."""

    ckpt: Checkpoint
    weights: list[PackedWeight]
    scheme: QuantScheme
    method: str = "unknown"
    #: the operation and parameters recorded as the output's provenance (default: this conversion)
    operation: str = "deploy"
    parameters: dict = field(default_factory=dict)
    #: the files the provenance names (default: the checkpoint's own)
    sources: list[str] | None = None

    def source_files(self) -> list[Path]:
        return [Path(p) for p in self.sources] if self.sources is not None else list(self.ckpt.source_files)

    @property
    def config(self) -> dict:
        if not self.ckpt.config:
            raise SurgeryError(f"{self.ckpt.path}: no config.json beside the weights; deployment formats need "
                               "the model folder (config.json, tokenizer files)")
        return self.ckpt.config

    @property
    def folder(self) -> Path | None:
        return self.ckpt.folder

    def tensor_names(self) -> list[str]:
        """Every weight in checkpoint order, a packed triple under its weight's name."""
        quantized = {w.name + s: w.name for w in self.weights for s in SUFFIXES}
        return list(dict.fromkeys(quantized.get(k, k) for k in self.ckpt.keys()))  # noqa: SIM118

    def quantized(self) -> dict[str, PackedWeight]:
        return {w.name: w for w in self.weights}


@dataclass
class DeployReport:
    format: str
    output: str
    files: list[str]
    bytes_out: int
    layers: int
    scheme: dict
    #: largest |W_stored - W_ours| over all weights (0.0 when the scales were already fp16)
    max_scale_rounding_error: float = 0.0
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def scheme_of(meta: dict) -> QuantScheme:
    from modelsurgery.ops.quantize.grids import QuantScheme

    return QuantScheme(int(meta["bits"]), meta.get("granularity", "channel"), meta.get("group_size"),
                       bool(meta.get("symmetric", True)))


def open_packed(path: str | Path) -> DeploySource:
    """A packed checkpoint (``surgery quantize --format packed``) as a deployment source."""
    ckpt = Checkpoint.open(path)
    meta = read_scheme(ckpt.metadata, ckpt.path)
    if meta is None or meta.get("format") != "packed":
        raise SurgeryError(f"{path}: not a packed quantized checkpoint (run surgery quantize --format packed)")
    return DeploySource(ckpt, read_packed(ckpt), scheme_of(meta), meta.get("method", "unknown"))


def weight_from_quantized(name: str, shape: tuple[int, ...], bits: int, qw) -> PackedWeight:
    """A quantizer's ``QuantizedWeight`` in our packed representation (codes, scale, zero point)."""
    groups = qw.scale.shape[1]
    return PackedWeight(name, tuple(shape), bits, qw.group_size if groups > 1 else None,
                        qw.codes.numpy().astype(np.uint8), qw.scale.float().numpy().copy(),
                        qw.zero_point.numpy().astype(np.uint8), qw.transposed)


# ----- fp16 scales ---------------------------------------------------------------------------------
def fp16(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to the nearest fp16 value, as float32."""
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


def round_significand(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to ``bits`` significant binary digits (elementwise)."""
    mant, exp = torch.frexp(x)
    step = torch.pow(2.0, bits.to(x.dtype))
    return torch.ldexp(torch.round(mant * step) / step, exp)


def storable_scale(scale: torch.Tensor, zero: torch.Tensor, min_offset: bool = False) -> torch.Tensor:
    """The nearest scale a format with fp16 scales stores exactly (float32 in, float32 out).

    With ``min_offset`` (GGUF Q4_1 stores m = -z * s in fp16 beside d = s) the scale keeps only
    11 - (significant bits of z) significant bits, so that z * s is an fp16 value too and
    d * q + m, as llama.cpp computes it, equals (q - z) * s exactly."""
    if not min_offset:  # fp16 keeps 2^-24 (its least subnormal) to 65504
        return scale.float().clamp(2.0**-24, 65504.0).to(torch.float16).float()
    s = scale.float().clamp(min=2.0**-14).to(torch.float16).float()  # normal fp16: 11 significant bits
    keep = 11 - _SIGNIFICANT_BITS[zero.round().to(torch.int64).clamp(0, 255)]
    return round_significand(s, keep).to(torch.float16).float()


#: significant binary digits of 0..255 (bit length once trailing zeros are dropped)
_SIGNIFICANT_BITS = torch.tensor([(z >> ((z & -z).bit_length() - 1)).bit_length() if z else 0 for z in range(256)])


def max_abs_difference(weights: list[PackedWeight], stored_scales: dict[str, np.ndarray],
                       stored_offsets: dict[str, np.ndarray] | None = None) -> float:
    """Largest |W_stored - W_ours| when scales (and Q4_1 offsets) are replaced by what is stored."""
    worst = 0.0
    for w in weights:
        s = stored_scales.get(w.name)
        if s is None:
            continue
        ours = w.dequantize().float()
        q = torch.from_numpy(w.codes.astype(np.float32))
        size = w.group_size or w.row_length
        s_full = torch.from_numpy(s).repeat_interleave(size, dim=1)
        if stored_offsets is not None and w.name in stored_offsets:
            m_full = torch.from_numpy(stored_offsets[w.name]).repeat_interleave(size, dim=1)
            stored = q * s_full + m_full
        else:
            z_full = torch.from_numpy(w.zero_point.astype(np.float32)).repeat_interleave(size, dim=1)
            stored = (q - z_full) * s_full
        worst = max(worst, float((w.to_stored(stored) - ours).abs().max()) if ours.numel() else 0.0)
    return worst


def row_groups(w: PackedWeight) -> int:
    return math.ceil(w.row_length / (w.group_size or w.row_length))


# ----- int32 words ---------------------------------------------------------------------------------
def pack_words(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes [rows, n] -> int32 [rows, ceil(n * bits / 32)]: one little-endian bit stream per
    row (element i at stream bits [i * bits, (i + 1) * bits), word k holding stream bits 32k..32k+31),
    the dense packing both GPTQ and compressed-tensors use."""
    from modelsurgery.ops.quantize.packing import pack_codes

    rows, n = codes.shape
    if bits in (2, 4, 8) and n % (32 // bits) == 0:  # whole words: shift and add, no bit-level arrays
        per = 32 // bits
        shifts = (np.arange(per, dtype=np.uint32) * bits).astype(np.uint32)
        words = (codes.reshape(rows, n // per, per).astype(np.uint32) << shifts).sum(-1, dtype=np.uint32)
        return words.view("<i4")
    packed = pack_codes(torch.from_numpy(np.ascontiguousarray(codes)), bits).numpy()
    words = -(-n * bits // 32)
    out = np.zeros((rows, words * 4), np.uint8)
    out[:, : packed.shape[1]] = packed
    return out.view("<i4")


def unpack_words(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of ``pack_words``: int32 [rows, words] -> uint8 codes [rows, n]."""
    from modelsurgery.ops.quantize.packing import unpack_codes

    if bits in (2, 4, 8) and n % (32 // bits) == 0:
        per = 32 // bits
        shifts = (np.arange(per, dtype=np.uint32) * bits).astype(np.uint32)
        w = np.ascontiguousarray(words).astype("<i4").view(np.uint32)[:, : n // per]
        return ((w[:, :, None] >> shifts) & ((1 << bits) - 1)).reshape(w.shape[0], n).astype(np.uint8)
    raw = np.ascontiguousarray(words).astype("<i4").view(np.uint8)
    return np.asarray(unpack_codes(raw[:, : -(-n * bits // 8)], bits, n)).astype(np.uint8)


# ----- folder formats ------------------------------------------------------------------------------
def check_folder_output(src: DeploySource, out: Path, fmt: str) -> None:
    if out.suffix in (".safetensors", ".pt", ".bin", ".gguf"):
        raise SurgeryError(f"{out}: --format {fmt} writes a model folder (config.json + safetensors); "
                           "give a folder name")


def write_quantized_folder(src: DeploySource, out: Path, planned: list, quantization_config: dict, fmt: str,
                           force: bool):
    """The model folder with ``planned`` tensors and ``quantization_config`` in config.json; the folder's
    other files (tokenizer, generation config) carried along."""
    from modelsurgery.checkpoint import Provenance, write_checkpoint

    record = {"format": fmt, "method": src.method, **src.scheme.to_dict(),
              "layers": {w.name: {"shape": list(w.shape), "bits": w.bits, "group_size": w.group_size}
                         for w in src.weights}}
    return write_checkpoint(
        out, planned, provenance=Provenance(src.operation, {"format": fmt, **src.parameters}, src.source_files()),
        metadata={"modelsurgery.quantization": json.dumps(record, sort_keys=True)},
        config={**src.config, "quantization_config": quantization_config},
        extra_files=src.ckpt.extra_files(), force=force)


def module_of(weight_name: str) -> str:
    if not weight_name.endswith(".weight"):
        raise SurgeryError(f"tensor '{weight_name}': a quantized weight must be a module's '.weight'")
    return weight_name[: -len(".weight")]


def plain_2d(w: PackedWeight, fmt: str) -> None:
    if w.transposed or len(w.shape) != 2:
        raise SurgeryError(f"tensor '{w.name}' {list(w.shape)}: --format {fmt} holds Linear weights "
                           "[out, in] only (keep it in float with --skip)")
