"""The packed quantized checkpoint format, its one owner: writing, reading, validating, dequantizing.

Affine weight quantization, W = (q - zero_point) * scale (Jacob et al., 2018, eq. 1), per tensor,
per output channel, or per group of ``group_size`` consecutive elements of a row. A weight
``X.weight`` of shape [out, in, *k] is seen as rows of length R = in * prod(k) (an embedding table:
one row per token); one stored (in, out), as GPT-2's Conv1D, has its columns as rows:

- ``X.weight.qweight``    uint8 [rows, ceil(R * bits / 8)], unsigned codes as a little-endian bit
  stream per row (at 4 bits element 2j is the low nibble of byte j);
- ``X.weight.scale``      float32 [1, 1] (tensor), [rows, 1] (channel) or [rows, ceil(R / G)] (group);
- ``X.weight.zero_point`` uint8, the shape of the scale.

The safetensors metadata key ``modelsurgery.quantization`` holds a JSON record: the format ("fake"
or "packed"), the method, the scheme and ``layers``: per quantized weight its stored ``shape``,
``bits`` (1 to 8), ``group_size`` and ``"transposed": true`` for weights stored (in, out).
``surgery quantize`` writes 2 to 8 bits; the reader accepts every width the layout defines.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import torch

from modelsurgery.errors import SurgeryError
from modelsurgery.ops.quantize.base import QuantizedWeight

METADATA_KEY = "modelsurgery.quantization"
SUFFIXES = (".qweight", ".scale", ".zero_point")
MIN_BITS, MAX_BITS = 1, 8


# ----- bit streams ------------------------------------------------------------------------------
def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, R] integer codes in [0, 2^bits) -> uint8 [rows, ceil(R * bits / 8)]."""
    if not MIN_BITS <= bits <= MAX_BITS:
        raise SurgeryError(f"bit width {bits}: the packed format holds {MIN_BITS} to {MAX_BITS} bits")
    a = q.to(torch.int64).cpu().numpy() if q.dtype != torch.uint8 else q.cpu().numpy()
    if a.size and (a.min() < 0 or a.max() >= 2**bits):
        raise SurgeryError(f"codes out of range for {bits} bits")
    rows, length = a.shape
    # the fewest codes that fill whole bytes (2 at 4 bits, 4 at 2 or 6 bits, 8 at 3, 5 or 7) make one
    # little-endian word, code k at bit k * bits, whose low bytes are that stretch of the stream; a row
    # is padded with zero codes to a whole number of words, whose zero bits are the stream's padding
    per = 8 // math.gcd(bits, 8)
    nbytes = per * bits // 8
    word_type = np.dtype("<u8" if nbytes > 4 else "<u4" if nbytes > 1 else "u1")
    words = -(-length // per)
    if words * per == length:
        lanes = a.astype(word_type, copy=False).reshape(rows, words, per)
    else:
        lanes = np.zeros((rows, words, per), dtype=word_type)
        lanes.reshape(rows, words * per)[:, :length] = a
    word = lanes[:, :, 0].copy()
    for k in range(1, per):
        word |= lanes[:, :, k] << word_type.type(k * bits)
    stream = word.view(np.uint8).reshape(rows, words, word_type.itemsize)[:, :, :nbytes].reshape(rows, -1)
    return torch.from_numpy(np.ascontiguousarray(stream[:, :math.ceil(length * bits / 8)]))


def unpack_codes(packed: np.ndarray | torch.Tensor, bits: int, length: int) -> np.ndarray:
    """Inverse of ``pack_codes``: uint8 [rows, bytes] -> uint8 codes [rows, length]."""
    a = packed.cpu().numpy() if isinstance(packed, torch.Tensor) else np.asarray(packed)
    if a.ndim != 2 or a.shape[1] != math.ceil(length * bits / 8):
        raise SurgeryError(f"packed rows of shape {tuple(a.shape)} cannot hold {length} codes of {bits} bits")
    if bits == 8:
        return a[:, :length].astype(np.uint8)
    # pack_codes's words read back: ``per`` codes fill ``nbytes`` whole bytes, a little-endian word with
    # code k at bit k * bits (a shift and a mask per code of the word, not a byte per bit of the stream)
    rows = a.shape[0]
    per = 8 // math.gcd(bits, 8)
    nbytes = per * bits // 8
    words = -(-length // per)
    if nbytes == 1:
        word = a if a.shape[1] == words else np.pad(a, ((0, 0), (0, words - a.shape[1])))
    else:
        word_type = np.dtype("<u8" if nbytes > 4 else "<u4")
        flat = np.zeros((rows, words * nbytes), dtype=np.uint8)  # the stream, padded to whole words
        flat[:, :a.shape[1]] = a
        lanes = np.zeros((rows, words, word_type.itemsize), dtype=np.uint8)
        lanes[:, :, :nbytes] = flat.reshape(rows, words, nbytes)  # each word's bytes, low first
        word = lanes.view(word_type).reshape(rows, words)
    mask = word.dtype.type((1 << bits) - 1)
    codes = np.empty((rows, words, per), dtype=np.uint8)
    for k in range(per):
        codes[:, :, k] = (word >> word.dtype.type(k * bits)) & mask
    codes = codes.reshape(rows, words * per)
    return codes if words * per == length else np.ascontiguousarray(codes[:, :length])


# ----- writing ----------------------------------------------------------------------------------
def packed_tensors(name: str, qw: QuantizedWeight, bits: int) -> dict[str, torch.Tensor]:
    return {
        f"{name}.qweight": pack_codes(qw.codes, bits),
        f"{name}.scale": qw.scale.float(),
        f"{name}.zero_point": qw.zero_point.to(torch.uint8),
    }


def layer_entry(shape: tuple[int, ...], bits: int, qw: QuantizedWeight) -> dict:
    entry = {"shape": list(shape), "bits": bits, "group_size": qw.group_size}
    if qw.transposed:
        entry["transposed"] = True  # stored (in, out) as GPT-2's Conv1D; rows are its columns
    return entry


def scheme_metadata(fmt: str, method: str, scheme: dict, layers: dict[str, dict]) -> dict[str, str]:
    """The safetensors metadata entry that describes a quantized checkpoint."""
    return {METADATA_KEY: json.dumps({"format": fmt, "method": method, **scheme, "layers": layers}, sort_keys=True)}


#: config.json ``quantization_config["format"]`` of a packed folder. No ``quant_method``: transformers
#: then refuses the folder ("has no `quant_method` attribute") instead of loading random float weights
#: (an unknown quant_method only logs a warning and loads the model unquantized).
CONFIG_FORMAT = "modelsurgery-packed"


def folder_config(config: dict | None, fmt: str, bits: int) -> dict | None:
    """config.json of a quantized folder: a packed one says what it is and how to get floats back."""
    if config is None or fmt != "packed":
        return config
    return {**config, "quantization_config": {
        "format": CONFIG_FORMAT, "bits": bits,
        "dequantize": "surgery dequantize <this folder> -o <float folder> (the weights are packed integer codes)"}}


def float_config(config: dict | None) -> dict | None:
    """``config`` without a packed folder's ``quantization_config`` (for float outputs)."""
    qc = (config or {}).get("quantization_config")
    if not isinstance(qc, dict) or qc.get("format") != CONFIG_FORMAT:
        return config
    return {k: v for k, v in config.items() if k != "quantization_config"}


# ----- reading ----------------------------------------------------------------------------------
def read_scheme(metadata: dict, source: object = "checkpoint") -> dict | None:
    """The parsed quantization record of a checkpoint's ``metadata``, or None for a float checkpoint."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise SurgeryError(f"{source}: metadata '{METADATA_KEY}' is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("layers"), dict):
        raise SurgeryError(f"{source}: metadata '{METADATA_KEY}' has no 'layers' table")
    return meta


@dataclass
class PackedWeight:
    """One quantized weight, unpacked: ``codes`` uint8 [rows, R]; ``scale``/``zero_point`` [rows, n_groups]."""

    name: str
    shape: tuple[int, ...]
    bits: int
    group_size: int | None  # None: the whole row (per channel) or the whole tensor (per tensor)
    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    #: stored (in, out) like GPT-2's Conv1D while the rows are its output channels (metadata "transposed")
    transposed: bool = False

    @property
    def rows(self) -> int:
        return self.shape[1] if self.transposed else self.shape[0]

    @property
    def row_length(self) -> int:
        return self.shape[0] if self.transposed else math.prod(self.shape[1:])

    def to_stored(self, rows: torch.Tensor) -> torch.Tensor:
        """A [rows, R] matrix in the checkpoint's stored shape."""
        return rows.t().contiguous() if self.transposed else rows.reshape(self.shape)

    @property
    def granularity(self) -> str:
        if self.scale.shape == (1, 1) and self.rows > 1:
            return "tensor"
        return "channel" if self.scale.shape[1] == 1 else "group"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(q - zero_point) * scale in ``dtype`` (as DequantizeLinear computes it), in the stored shape."""
        # each group's codes against its own zero point and scale by broadcasting (no full-size copies of
        # them); q and z are integers below 256, exact in every float type, so (q - z) is the same exact
        # value as the integer difference, and the product the same rounding of it
        q = torch.from_numpy(self.codes)
        zp = torch.from_numpy(self.zero_point).to(dtype)
        scale = torch.from_numpy(self.scale).to(dtype)
        length, groups = self.row_length, scale.shape[1]
        size = length if groups == 1 else (self.group_size or -(-length // groups))
        if size * groups != length:  # a last group cut short: pad it with codes dropped below
            q = torch.nn.functional.pad(q, (0, size * groups - length))
        w = q.reshape(q.shape[0], groups, size).to(dtype)
        w.sub_(zp.unsqueeze(-1)).mul_(scale.unsqueeze(-1))
        w = w.reshape(w.shape[0], size * groups)
        return self.to_stored(w if size * groups == length else w[:, :length])


def read_packed_weight(ckpt, name: str, layer: dict) -> PackedWeight:
    """Unpack ``name`` (a weight listed in the metadata of ``ckpt``) and validate it against the format."""
    for suffix in SUFFIXES:
        if name + suffix not in ckpt:
            raise SurgeryError(f"{ckpt.path}: quantized weight '{name}' has no tensor '{name}{suffix}'")
    try:
        shape = tuple(int(d) for d in layer["shape"])
        bits = int(layer["bits"])
    except (KeyError, TypeError, ValueError):
        raise SurgeryError(f"{ckpt.path}: quantization entry for '{name}' needs 'shape' and 'bits'") from None
    if not MIN_BITS <= bits <= MAX_BITS:
        raise SurgeryError(f"{ckpt.path}: quantized weight '{name}' has {bits} bits; "
                           f"{MIN_BITS} to {MAX_BITS} are supported")
    transposed = bool(layer.get("transposed", False))
    if transposed and len(shape) != 2:
        raise SurgeryError(f"{ckpt.path}: quantized weight '{name}' is marked transposed but has shape {shape}")
    if not shape:
        raise SurgeryError(f"{ckpt.path}: quantized weight '{name}' has an empty shape")
    rows, length = (shape[1], shape[0]) if transposed else (shape[0], math.prod(shape[1:]))
    packed = ckpt.get(name + ".qweight").numpy()
    want = (rows, math.ceil(length * bits / 8))
    if packed.dtype != np.uint8 or tuple(packed.shape) != want:
        raise SurgeryError(
            f"{ckpt.path}: tensor '{name}.qweight' is {packed.dtype} {tuple(packed.shape)}, expected uint8 {want} "
            f"for shape {shape} at {bits} bits"
        )
    scale = ckpt.get(name + ".scale").to(torch.float32).numpy()
    zero_point = ckpt.get(name + ".zero_point").numpy()
    if scale.ndim != 2 or scale.shape[0] not in (1, rows) or tuple(zero_point.shape) != tuple(scale.shape):
        raise SurgeryError(
            f"{ckpt.path}: tensors '{name}.scale' {tuple(scale.shape)} and '{name}.zero_point' "
            f"{tuple(zero_point.shape)} do not fit a weight of {rows} rows"
        )
    if zero_point.dtype != np.uint8:
        raise SurgeryError(f"{ckpt.path}: tensor '{name}.zero_point' is {zero_point.dtype}, expected uint8")
    if scale.shape[0] == 1 and rows > 1:
        if scale.shape[1] != 1:
            raise SurgeryError(f"{ckpt.path}: tensor '{name}.scale' {tuple(scale.shape)}: one row of groups "
                               "for several weight rows is not in the packed format")
        group = None
    else:
        groups = scale.shape[1]
        stated = layer.get("group_size") or 0
        if isinstance(stated, bool) or not isinstance(stated, int) or stated < 0:
            raise SurgeryError(f"{ckpt.path}: quantization entry for '{name}' has group_size {stated!r}; "
                               "expected a whole number of elements")
        group = None if groups == 1 else (stated or math.ceil(length / groups))
        if group is not None and math.ceil(length / group) != groups:
            raise SurgeryError(f"{ckpt.path}: tensor '{name}.scale' has {groups} groups, which does not fit rows "
                               f"of {length} elements in groups of {group}")
    codes = unpack_codes(packed, bits, length)
    if int(zero_point.max(initial=0)) >= 1 << bits or int(codes.max(initial=0)) >= 1 << bits:
        raise SurgeryError(f"{ckpt.path}: quantized weight '{name}' has codes or zero points above {bits} bits")
    return PackedWeight(name, shape, bits, group, codes, np.ascontiguousarray(scale), zero_point.copy(), transposed)


def read_packed(ckpt) -> list[PackedWeight]:
    """Every quantized weight of a packed checkpoint (empty for a float or fake-quantized checkpoint)."""
    meta = read_scheme(ckpt.metadata, ckpt.path)
    if meta is None or meta.get("format", "packed") != "packed":
        return []
    return [read_packed_weight(ckpt, name, layer or {}) for name, layer in meta["layers"].items()]


def dequantized_state(ckpt, weights: list[PackedWeight], dtype: torch.dtype = torch.float32
                      ) -> dict[str, torch.Tensor]:
    """The float state dict a packed checkpoint stands for: packed triples replaced by ``X.weight``."""
    packed_names = {w.name + s for w in weights for s in SUFFIXES}
    state = {k: ckpt.get(k) for k in ckpt.keys() if k not in packed_names}  # noqa: SIM118 (no __iter__)
    for w in weights:
        state[w.name] = w.dequantize(dtype)
    return state


def dequantize_checkpoint(ckpt) -> dict[str, torch.Tensor]:
    """A packed checkpoint's state dict with every quantized weight dequantized to float32."""
    scheme = read_scheme(ckpt.metadata, ckpt.path)
    if not scheme or scheme.get("format") != "packed":
        raise SurgeryError(f"{ckpt.path}: not a packed quantized checkpoint (no {METADATA_KEY} metadata)")
    return dequantized_state(ckpt, read_packed(ckpt))
