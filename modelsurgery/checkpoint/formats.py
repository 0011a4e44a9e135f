"""Readers for the on-disk formats: safetensors (validated header), sharded indexes, torch pickles.

The safetensors header is checked before any offset in it is trusted (the format's own rule):
entries must tile the data region exactly, in bounds, with sizes that match shape x dtype.
Pickles are only ever read with ``torch.load(weights_only=True)``; nothing in them executes.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from modelsurgery.errors import SurgeryError

# safetensors dtype names <-> torch dtypes (the subset torch can hold).
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors reference limit


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, known without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; returns tensor infos and the metadata dict."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SurgeryError(f"{path}: not a safetensors file (empty or shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise SurgeryError(
                    f"{path}: not a safetensors file or truncated (header length {n} does not fit "
                    f"in a file of {size} bytes)"
                )
            raw = f.read(n)
    except OSError as e:
        raise SurgeryError(f"{path}: cannot read ({e.strerror})") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SurgeryError(f"{path}: malformed safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise SurgeryError(f"{path}: malformed safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SurgeryError(f"{path}: malformed safetensors header (__metadata__ is not an object)")
    data_len = size - 8 - n
    infos: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        try:
            dtype_name, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (TypeError, KeyError, ValueError) as e:
            raise SurgeryError(f"{path}: malformed header entry for tensor '{name}'") from e
        if dtype_name not in ST_DTYPES:
            raise SurgeryError(f"{path}: tensor '{name}' has unsupported dtype {dtype_name}")
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise SurgeryError(f"{path}: tensor '{name}' has an invalid shape {shape}")
        dtype = ST_DTYPES[dtype_name]
        expected = math.prod(shape) * dtype_size(dtype)
        if not (isinstance(start, int) and isinstance(end, int)) or end - start != expected:
            raise SurgeryError(
                f"{path}: header lies about tensor '{name}': offsets [{start}, {end}) hold "
                f"{end - start if isinstance(end, int) and isinstance(start, int) else '?'} bytes, "
                f"shape {shape} {dtype_name} needs {expected}"
            )
        if start < 0 or end > data_len:
            raise SurgeryError(
                f"{path}: tensor '{name}' ends at byte {end} but the data region has {data_len} bytes "
                "(truncated file or a header that lies about offsets)"
            )
        spans.append((start, end, name))
        infos[name] = TensorInfo(name, tuple(shape), dtype, path)
    spans.sort()
    pos = 0
    for start, end, name in spans:
        if start != pos:
            kind = "overlaps the previous tensor" if start < pos else "leaves a gap before it"
            raise SurgeryError(f"{path}: header lies about offsets: tensor '{name}' {kind}")
        pos = end
    if pos != data_len:
        raise SurgeryError(
            f"{path}: data region has {data_len} bytes but the header accounts for {pos} "
            "(truncated or padded file)"
        )
    return infos, {str(k): str(v) for k, v in metadata.items()}


def read_shard_index(path: Path) -> dict[str, Path]:
    """``model.safetensors.index.json`` -> {tensor name: shard path}."""
    try:
        index = json.loads(path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SurgeryError(f"{path}: malformed shard index (needs a 'weight_map' object)") from e
    out = {}
    for name, shard in weight_map.items():
        shard_path = path.parent / shard
        if not shard_path.is_file():
            raise SurgeryError(f"{path}: shard '{shard}' listed for tensor '{name}' does not exist")
        out[name] = shard_path
    return out


def _flatten_state(obj, prefix: str, out: dict[str, torch.Tensor], path: Path) -> None:
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif isinstance(value, dict):
            _flatten_state(value, f"{name}.", out, path)
        # plain numbers, strings and lists (epoch counters, hyper-parameters) are not weights


def load_torch_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Load a .pt/.pth/.bin with weights_only=True; unwrap ``state_dict``/``model`` containers."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) pickles cannot be mapped; read them whole
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise SurgeryError(f"{path}: cannot read ({e.strerror or e})") from e
    except Exception as e:  # the weights-only unpickler raises UnpicklingError and friends
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        if "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise SurgeryError(
                f"{path}: refused: the pickle needs more than tensors to load and pickled code is never "
                "executed (save a state_dict, or convert it to safetensors)"
            ) from e
        if "Weights only" in str(e) or "weights_only" in str(e):  # not a pickle, or opcodes it refuses
            raise SurgeryError(
                f"{path}: not a readable PyTorch checkpoint (not a torch.save file of tensors; pickled code is "
                "never executed)"
            ) from e
        raise SurgeryError(f"{path}: not a readable PyTorch checkpoint ({first})") from e
    for key in ("state_dict", "model_state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if isinstance(obj, torch.Tensor) or not isinstance(obj, dict):
        raise SurgeryError(f"{path}: the pickle holds a {type(obj).__name__}, not a state dict of tensors")
    out: dict[str, torch.Tensor] = {}
    _flatten_state(obj, "", out, path)
    if not out:
        raise SurgeryError(f"{path}: the pickle holds no tensors")
    return out
