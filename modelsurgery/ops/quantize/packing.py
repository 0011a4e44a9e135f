"""The packed quantized checkpoint format: unsigned codes as a little-endian bit stream per row.

For a weight ``X.weight`` (rows = output channels, row length R): ``X.weight.qweight`` uint8
[out, ceil(R * bits / 8)] (LSB first: at 4 bits element 2j is the low nibble of byte j),
``X.weight.scale`` float32 and ``X.weight.zero_point`` uint8 of shape [1, 1] (tensor), [out, 1]
(channel) or [out, R / G] (group). W = (q - zero_point) * scale. The safetensors metadata key
``modelsurgery.quantization`` holds the scheme and, per weight, its stored shape.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from modelsurgery.errors import SurgeryError
from modelsurgery.ops.quantize.base import QuantizedWeight

METADATA_KEY = "modelsurgery.quantization"
SUFFIXES = (".qweight", ".scale", ".zero_point")


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, R] integer codes in [0, 2^bits) -> uint8 [rows, ceil(R * bits / 8)]."""
    if not 2 <= bits <= 8:
        raise SurgeryError(f"bit width {bits}: expected 2 to 8")
    a = q.to(torch.int64).cpu().numpy()
    if a.size and (a.min() < 0 or a.max() >= 2**bits):
        raise SurgeryError(f"codes out of range for {bits} bits")
    rows, length = a.shape
    shifts = np.arange(bits, dtype=np.int64)
    bitstream = ((a[:, :, None] >> shifts) & 1).astype(np.uint8).reshape(rows, length * bits)
    return torch.from_numpy(np.packbits(bitstream, axis=1, bitorder="little"))


def unpack_codes(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: uint8 [rows, bytes] -> int64 [rows, length]."""
    a = packed.cpu().numpy()
    if a.shape[1] != -(-length * bits // 8):
        raise SurgeryError(f"packed row of {a.shape[1]} bytes cannot hold {length} codes of {bits} bits")
    bitstream = np.unpackbits(a, axis=1, count=length * bits, bitorder="little").astype(np.int64)
    values = (bitstream.reshape(a.shape[0], length, bits) << np.arange(bits, dtype=np.int64)).sum(-1)
    return torch.from_numpy(values)


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


def dequantize_packed(tensors: dict[str, torch.Tensor], name: str, entry: dict) -> torch.Tensor:
    """The float32 weight ``name`` from its packed tensors and metadata entry."""
    shape, bits, transposed = tuple(entry["shape"]), int(entry["bits"]), bool(entry.get("transposed"))
    rows = shape[1] if transposed else shape[0]
    length = (int(np.prod(shape)) // rows) if shape else 1
    q = unpack_codes(tensors[f"{name}.qweight"], bits, length).float()
    scale, zero = tensors[f"{name}.scale"].float(), tensors[f"{name}.zero_point"].float()
    group = length // scale.shape[1]
    w = ((q.reshape(rows, -1, group) - zero[..., None]) * scale[..., None]).reshape(rows, length)
    return w.t().contiguous() if transposed else w.reshape(shape)


def read_scheme(metadata: dict) -> dict | None:
    raw = metadata.get(METADATA_KEY)
    return json.loads(raw) if raw else None


def dequantize_checkpoint(ckpt) -> dict[str, torch.Tensor]:
    """A packed checkpoint's state dict with every quantized weight dequantized to float32."""
    scheme = read_scheme(ckpt.metadata)
    if not scheme or scheme.get("format") != "packed":
        raise SurgeryError(f"{ckpt.path}: not a packed quantized checkpoint (no {METADATA_KEY} metadata)")
    layers = scheme["layers"]
    owned = {f"{n}{s}": n for n in layers for s in SUFFIXES}
    state = {k: ckpt.get(k) for k in ckpt.keys() if k not in owned}  # noqa: SIM118
    for name, entry in layers.items():
        state[name] = dequantize_packed({f"{name}{s}": ckpt.get(f"{name}{s}") for s in SUFFIXES}, name, entry)
    return state
