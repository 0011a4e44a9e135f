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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.ops.quantize.packing import SUFFIXES, PackedWeight, read_scheme

if TYPE_CHECKING:
    from modelsurgery.ops.quantize.grids import QuantScheme


@dataclass
class DeploySource:
    """A quantized model ready to be written: its weights, float tensors and folder files."""

    ckpt: Checkpoint
    #: in memory (a quantizer's output) or ``PackedRef`` (read from a packed checkpoint as written)
    weights: list[PackedWeight | PackedRef]
    scheme: QuantScheme
    method: str = "unknown"
    #: the operation and parameters recorded as the output's provenance (default: this conversion)
    operation: str = "deploy"
    parameters: dict = field(default_factory=dict)
    #: the files the provenance names (default: the checkpoint's own)
    sources: list[str] | None = None
    #: the folder of the model the user gave, which names the output as llama.cpp's converter names it
    #: (GGUF's general.name); default: the checkpoint's own folder
    model_folder: Path | None = None

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

    def quantized(self) -> dict[str, PackedWeight | PackedRef]:
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
    """A packed checkpoint (``surgery quantize --format packed``) as a deployment source. Its weights are
    ``PackedRef``s, checked against the header now and read one at a time as the writer reaches them."""
    ckpt = Checkpoint.open(path)
    meta = read_scheme(ckpt.metadata, ckpt.path)
    if meta is None or meta.get("format") != "packed":
        raise SurgeryError(f"{path}: not a packed quantized checkpoint (run surgery quantize --format packed)")
    refs = [packed_ref(ckpt, name, layer or {}) for name, layer in meta["layers"].items()]
    return DeploySource(ckpt, refs, scheme_of(meta), meta.get("method", "unknown"))


# ----- streaming reads of a packed checkpoint -------------------------------------------------------
def read_tensor(ckpt: Checkpoint, name: str) -> torch.Tensor:
    """One stored tensor read with a plain file read into a fresh buffer: no mapped pages stay resident,
    so converting a multi-GB checkpoint holds about one tensor (``Checkpoint.get`` for other formats)."""
    where = ckpt.byte_range(name)
    if where is None:
        return ckpt.get(name)
    info = ckpt.info(name)
    file, offset, count = where
    buf = np.empty(count, np.uint8)
    with open(file, "rb") as f:
        f.seek(offset)
        if f.readinto(memoryview(buf)) != count:
            raise SurgeryError(f"{file}: tensor '{name}' ends before its {count} bytes (truncated file?)")
    return torch.from_numpy(buf).view(info.dtype).reshape(info.shape)


def stored_shape(ckpt: Checkpoint, name: str, expected: tuple[int, ...] | int, fmt: str, implied: str
                 ) -> tuple[int, ...]:
    """The header shape of ``name`` in a GPTQ or compressed-tensors folder, refused in one line when the tensor
    is missing or its shape is not ``expected`` (a shape, or a number of dimensions), which ``implied`` says
    what implies: checked from the header before anything is read or written, so that a module's tensors that
    do not fit each other cannot broadcast into a wrong weight."""
    if name not in ckpt:
        raise SurgeryError(f"{ckpt.path}: {fmt} tensor '{name}' is missing")
    shape = tuple(ckpt.shape(name))
    if (len(shape) != expected) if isinstance(expected, int) else (shape != tuple(expected)):
        want = f"{expected} dimensions" if isinstance(expected, int) else str(list(expected))
        raise SurgeryError(f"{ckpt.path}: {fmt} tensor '{name}' has shape {list(shape)}; {implied} imply {want}")
    return shape


def unpack_stream(raw: np.ndarray, bits: int, n: int) -> np.ndarray:
    """uint8 [rows, ceil(n * bits / 8)] little-endian bit streams (the packed ``qweight``) -> uint8 codes
    [rows, n], by shift and mask over whole arrays: at 1, 2, 4 and 8 bits a byte holds 8 / bits codes;
    otherwise every ``bits`` bytes hold 8 codes, code j starting at bit j * bits of them."""
    raw = np.asarray(raw, dtype=np.uint8)
    rows, mask = raw.shape[0], (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        chunks = raw[:, :, None]
    else:
        per = 8
        chunks = np.zeros((rows, -(-n // 8) * bits), np.uint8)
        chunks[:, : raw.shape[1]] = raw
        chunks = chunks.reshape(rows, -1, bits)
    codes = np.empty((rows, chunks.shape[1], per), np.uint8)
    for j in range(per):  # at most 8 code positions, each a few whole-array operations
        byte, shift = divmod(j * bits, 8)
        out = codes[:, :, j]
        np.right_shift(chunks[:, :, byte], shift, out=out)
        if shift + bits > 8:  # the code continues in the next byte
            np.bitwise_or(out, np.left_shift(chunks[:, :, byte + 1], 8 - shift), out=out)
        if shift + bits != 8:
            np.bitwise_and(out, mask, out=out)
    codes = codes.reshape(rows, -1)
    return codes if codes.shape[1] == n else np.ascontiguousarray(codes[:, :n])


@dataclass
class PackedRef:
    """One weight of a packed checkpoint, not yet read: the shape, bits and grouping from the header,
    and its codes, scale and zero point read from the file each time they are asked for (one weight
    in memory at a time). ``load`` gives the ``PackedWeight``."""

    ckpt: Checkpoint
    name: str
    shape: tuple[int, ...]
    bits: int
    group_size: int | None
    transposed: bool = False

    @property
    def rows(self) -> int:
        return self.shape[1] if self.transposed else self.shape[0]

    @property
    def row_length(self) -> int:
        return self.shape[0] if self.transposed else math.prod(self.shape[1:])

    def stream(self) -> np.ndarray:
        """The stored bit streams, uint8 [rows, ceil(R * bits / 8)]."""
        return read_tensor(self.ckpt, self.name + ".qweight").numpy()

    @property
    def scale(self) -> np.ndarray:
        return read_tensor(self.ckpt, self.name + ".scale").to(torch.float32).numpy()

    @property
    def zero_point(self) -> np.ndarray:
        zero = read_tensor(self.ckpt, self.name + ".zero_point").numpy()
        if int(zero.max(initial=0)) >= 1 << self.bits:
            raise SurgeryError(f"{self.ckpt.path}: quantized weight '{self.name}' has zero points above "
                               f"{self.bits} bits")
        return zero

    @property
    def codes(self) -> np.ndarray:
        return unpack_stream(self.stream(), self.bits, self.row_length)

    def load(self) -> PackedWeight:
        return PackedWeight(self.name, self.shape, self.bits, self.group_size, self.codes, self.scale,
                            self.zero_point, self.transposed)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.load().dequantize(dtype)


@dataclass
class DeferredCodes:
    """One weight of a GPTQ or compressed-tensors folder: its scale and zero point read and checked, its
    codes unpacked from the file by ``read_codes`` each time they are asked for, so that reading a folder
    holds one weight's codes at a time. ``load`` gives the ``PackedWeight``."""

    name: str
    shape: tuple[int, ...]
    bits: int
    group_size: int | None
    read_codes: Callable[[], np.ndarray]
    scale: np.ndarray
    zero_point: np.ndarray
    transposed: bool = False

    rows = PackedWeight.rows
    row_length = PackedWeight.row_length
    granularity = PackedWeight.granularity  # from the scale's shape alone

    @property
    def codes(self) -> np.ndarray:
        return self.read_codes()

    def load(self) -> PackedWeight:
        return PackedWeight(self.name, self.shape, self.bits, self.group_size, self.codes, self.scale,
                            self.zero_point, self.transposed)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.load().dequantize(dtype)


def loaded(w: PackedWeight | PackedRef | DeferredCodes) -> PackedWeight:
    return w.load() if isinstance(w, PackedRef | DeferredCodes) else w


def packed_ref(ckpt: Checkpoint, name: str, layer: dict) -> PackedRef:
    """``name`` of a packed checkpoint checked against the format from the header alone (the checks of
    ``packing.read_packed_weight`` that need no data; zero points are checked when read)."""
    for suffix in SUFFIXES:
        if name + suffix not in ckpt:
            raise SurgeryError(f"{ckpt.path}: quantized weight '{name}' has no tensor '{name}{suffix}'")
    try:
        shape = tuple(int(d) for d in layer["shape"])
        bits = int(layer["bits"])
    except (KeyError, TypeError, ValueError):
        raise SurgeryError(f"{ckpt.path}: quantization entry for '{name}' needs 'shape' and 'bits'") from None
    if not 1 <= bits <= 8:
        raise SurgeryError(f"{ckpt.path}: quantized weight '{name}' has {bits} bits; 1 to 8 are supported")
    transposed = bool(layer.get("transposed", False))
    if not shape or (transposed and len(shape) != 2):
        raise SurgeryError(f"{ckpt.path}: quantized weight '{name}' has shape {shape}"
                           + (" and is marked transposed" if transposed else ""))
    ref = PackedRef(ckpt, name, shape, bits, None, transposed)
    rows, length = ref.rows, ref.row_length
    packed, scale, zero = (ckpt.info(name + s) for s in SUFFIXES)
    want = (rows, math.ceil(length * bits / 8))
    if packed.dtype != torch.uint8 or tuple(packed.shape) != want:
        raise SurgeryError(f"{ckpt.path}: tensor '{name}.qweight' is {packed.dtype} {tuple(packed.shape)}, "
                           f"expected uint8 {want} for shape {shape} at {bits} bits")
    if len(scale.shape) != 2 or scale.shape[0] not in (1, rows) or tuple(zero.shape) != tuple(scale.shape) \
            or not scale.dtype.is_floating_point or zero.dtype != torch.uint8:
        raise SurgeryError(f"{ckpt.path}: tensors '{name}.scale' {scale.dtype} {tuple(scale.shape)} and "
                           f"'{name}.zero_point' {zero.dtype} {tuple(zero.shape)} do not fit a weight of {rows} "
                           "rows (float scale, uint8 zero point)")
    groups = scale.shape[1]
    if scale.shape[0] == 1 and rows > 1:
        if groups != 1:
            raise SurgeryError(f"{ckpt.path}: tensor '{name}.scale' {tuple(scale.shape)}: one row of groups "
                               "for several weight rows is not in the packed format")
        return ref
    stated = layer.get("group_size") or 0
    if isinstance(stated, bool) or not isinstance(stated, int) or stated < 0:
        raise SurgeryError(f"{ckpt.path}: quantization entry for '{name}' has group_size {stated!r}; "
                           "expected a whole number of elements")
    ref.group_size = None if groups == 1 else (stated or math.ceil(length / groups))
    if ref.group_size is not None and math.ceil(length / ref.group_size) != groups:
        raise SurgeryError(f"{ckpt.path}: tensor '{name}.scale' has {groups} groups, which does not fit rows "
                           f"of {length} elements in groups of {ref.group_size}")
    return ref


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


def scale_rounding_error(w: PackedWeight, stored_scale: np.ndarray, stored_offset: np.ndarray | None = None
                         ) -> float:
    """Largest |W_stored - W_ours| of one weight when its scale (and Q4_1's offset m) is replaced by what
    the format stores: W_stored = (q - z) * s_stored, or q * d + m with an offset. Both are linear in the
    code q within a group, so the largest difference is at the group's smallest or largest code."""
    scale = np.asarray(w.scale, np.float32)
    if stored_offset is None and np.array_equal(np.asarray(stored_scale, np.float32), scale):
        return 0.0  # the same products, bit for bit
    codes, zero = w.codes, w.zero_point.astype(np.int32)
    if codes.size == 0:
        return 0.0
    starts = np.arange(0, w.row_length, w.group_size or w.row_length)
    worst = 0.0
    for q in (np.minimum.reduceat(codes, starts, axis=1), np.maximum.reduceat(codes, starts, axis=1)):
        ours = (q.astype(np.int32) - zero).astype(np.float32) * scale
        if stored_offset is not None:
            stored = q.astype(np.float32) * stored_scale + stored_offset
        else:
            stored = (q.astype(np.float32) - zero.astype(np.float32)) * stored_scale
        worst = max(worst, float(np.abs(stored - ours).max()))
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


def stream_words(w: PackedWeight | PackedRef) -> np.ndarray:
    """``pack_words(w.codes, w.bits)`` [rows, ceil(R * bits / 32)] int32. From a packed checkpoint that is
    its stored bit stream itself, zero-padded to whole words (the same little-endian stream): nothing
    is unpacked."""
    if not isinstance(w, PackedRef):
        return pack_words(w.codes, w.bits)
    raw = w.stream()
    used = w.row_length * w.bits
    words = np.zeros((raw.shape[0], -(-used // 32) * 4), np.uint8)
    words[:, : raw.shape[1]] = raw
    if used % 8:  # bits past the last code are not part of the stream
        words[:, raw.shape[1] - 1] &= (1 << (used % 8)) - 1
    return words.view("<i4")


def unpack_words(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of ``pack_words``: int32 [rows, words] -> uint8 codes [rows, n]. The words' little-endian
    bytes are the packed format's bit stream, unpacked by ``unpack_stream`` in uint8 (no int32 or wider
    copy of the codes: at 4 bits one was 8 bytes per code, twice the float32 weight it dequantizes to)."""
    raw = np.ascontiguousarray(words, dtype="<i4").view(np.uint8)  # a copy only when transposed
    return unpack_stream(raw[:, : -(-n * bits // 8)], bits, n)


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


def linear_refusal(name: str, shape, transposed: bool, fmt: str) -> str | None:
    """Why ``fmt`` (GPTQ, compressed-tensors) cannot hold the weight, or None when it is a Linear weight [out, in]. A
    weight stored [in, out] (GPT-2's Conv1D) is not skipped: every block weight of such a model is one, so skipping
    it would leave nothing to quantize."""
    if transposed:
        return (f"tensor '{name}' {list(shape)} is stored [in, out] (a Conv1D layer, as in GPT-2): --format {fmt} "
                "holds Linear weights [out, in] only; quantize this model with --format packed or fake")
    if len(shape) != 2:
        return (f"tensor '{name}' {list(shape)}: --format {fmt} holds Linear weights [out, in] only "
                "(keep it float with --skip)")
    return None


def plain_2d(w: PackedWeight, fmt: str) -> None:
    if why := linear_refusal(w.name, w.shape, w.transposed, fmt):
        raise SurgeryError(why)
