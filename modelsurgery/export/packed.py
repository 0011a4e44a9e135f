"""Packed quantized checkpoints (the quantize/export contract): unpack integer codes, dequantize.

Affine weight quantization, W = (q - zero_point) * scale (Jacob et al., 2018, eq. 1), applied per
tensor, per output channel, or per group of ``group_size`` consecutive elements of a row. A weight
``X.weight`` of shape [out, in, *k] is stored as rows of length R = in * prod(k):

- ``X.weight.qweight``    uint8 [out, ceil(R * bits / 8)], codes as a little-endian bit stream per row;
- ``X.weight.scale``      float32 [out, n_groups];
- ``X.weight.zero_point`` uint8, same shape as scale.

Safetensors metadata ``modelsurgery.quantization`` lists the quantized weights under ``layers``;
an entry with ``"transposed": true`` is a weight stored (in, out), as GPT-2's Conv1D, whose rows
are its output channels (the columns of the stored tensor).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import torch

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError

METADATA_KEY = "modelsurgery.quantization"
SUFFIXES = (".qweight", ".scale", ".zero_point")


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
        """(q - zero_point) * scale in ``dtype``, as DequantizeLinear computes it."""
        q = torch.from_numpy(self.codes.astype(np.int32))
        zp = torch.from_numpy(self.zero_point.astype(np.int32))
        scale = torch.from_numpy(self.scale).to(dtype)
        if self.granularity == "tensor":
            w = (q - zp).to(dtype) * scale
        else:
            size = self.group_size or self.row_length
            zp_full = zp.repeat_interleave(size, dim=1)[:, : self.row_length]
            s_full = scale.repeat_interleave(size, dim=1)[:, : self.row_length]
            w = (q - zp_full).to(dtype) * s_full
        return self.to_stored(w)


def quantization_metadata(ckpt: Checkpoint) -> dict | None:
    """The parsed ``modelsurgery.quantization`` record, or None for a float checkpoint."""
    raw = ckpt.metadata.get(METADATA_KEY)
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise SurgeryError(f"{ckpt.path}: metadata '{METADATA_KEY}' is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("layers"), dict):
        raise SurgeryError(f"{ckpt.path}: metadata '{METADATA_KEY}' has no 'layers' table")
    return meta


def unpack_codes(packed: np.ndarray, bits: int, row_length: int) -> np.ndarray:
    """uint8 [rows, nbytes] little-endian bit streams -> uint8 codes [rows, row_length]."""
    if bits == 8:
        return packed[:, :row_length].copy()
    stream = np.unpackbits(packed, axis=1, bitorder="little")[:, : row_length * bits]
    stream = stream.reshape(packed.shape[0], row_length, bits).astype(np.uint8)
    weights = (1 << np.arange(bits, dtype=np.uint8)).astype(np.uint8)
    return (stream * weights).sum(axis=2, dtype=np.uint16).astype(np.uint8)


def read_packed_weight(ckpt: Checkpoint, name: str, layer: dict) -> PackedWeight:
    """Unpack ``name`` (a weight listed in the metadata) and validate it against the contract."""
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
    if transposed and len(shape) != 2:
        raise SurgeryError(f"{ckpt.path}: quantized weight '{name}' is marked transposed but has shape {shape}")
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
        stated = int(layer.get("group_size") or 0)
        group = None if groups == 1 else (stated or math.ceil(length / groups))
        if group is not None and math.ceil(length / group) != groups:
            raise SurgeryError(f"{ckpt.path}: tensor '{name}.scale' has {groups} groups, which does not fit rows "
                               f"of {length} elements in groups of {group}")
    codes = unpack_codes(packed, bits, length)
    if int(zero_point.max(initial=0)) >= 1 << bits or int(codes.max(initial=0)) >= 1 << bits:
        raise SurgeryError(f"{ckpt.path}: quantized weight '{name}' has codes or zero points above {bits} bits")
    return PackedWeight(name, shape, bits, group, codes, np.ascontiguousarray(scale), zero_point.copy(), transposed)


def read_packed(ckpt: Checkpoint) -> list[PackedWeight]:
    """Every quantized weight of a packed checkpoint (empty for a float checkpoint)."""
    meta = quantization_metadata(ckpt)
    if meta is None:
        return []
    return [read_packed_weight(ckpt, name, layer or {}) for name, layer in meta["layers"].items()]


def dequantized_state(ckpt: Checkpoint, weights: list[PackedWeight], dtype: torch.dtype = torch.float32
                      ) -> dict[str, torch.Tensor]:
    """The float state dict a packed checkpoint stands for: packed triples replaced by ``X.weight``."""
    packed_names = {w.name + s for w in weights for s in SUFFIXES}
    state = {k: ckpt.get(k) for k in ckpt.keys() if k not in packed_names}  # noqa: SIM118 (no __iter__)
    for w in weights:
        state[w.name] = w.dequantize(dtype)
    return state
