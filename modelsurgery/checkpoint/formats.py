"""Readers for the on-disk formats: safetensors (validated header), sharded indexes, torch pickles.

The safetensors header is checked before any offset in it is trusted (the format's own rule):
entries must tile the data region exactly, in bounds, with sizes that match shape x dtype.
Pickles are only ever read with ``torch.load(weights_only=True)``; nothing in them executes.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from modelsurgery.errors import SurgeryError

if TYPE_CHECKING:
    import torch

# Headers are read without torch (``surgery inspect`` answers in a fraction of a second): dtypes are
# names until a tensor's value or a torch dtype is asked for. safetensors dtype name -> torch's name
# for the same dtype (the subset torch can hold) and its size in bytes.
ST_NAMES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
ITEMSIZE: dict[str, int] = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
                            "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors reference limit


def __getattr__(name: str):
    """``ST_DTYPES`` (safetensors name -> torch dtype) and ``TORCH_TO_ST``, built on first use (they need torch)."""
    if name in ("ST_DTYPES", "TORCH_TO_ST"):
        import torch

        st_dtypes = {k: getattr(torch, v) for k, v in ST_NAMES.items()}
        globals().update(ST_DTYPES=st_dtypes, TORCH_TO_ST={v: k for k, v in st_dtypes.items()})
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def name_of_dtype(dtype: str | torch.dtype) -> str:
    """torch's name of a dtype ("float32", "bfloat16"), from a torch dtype or the name itself."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def dtype_size(dtype: str | torch.dtype) -> int:
    name = name_of_dtype(dtype)
    if name in ITEMSIZE:
        return ITEMSIZE[name]
    import torch

    return torch.empty((), dtype=getattr(torch, name)).element_size()


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, known without reading its data, nor importing torch:
    ``dtype_name`` is torch's name of the dtype (given as that name or as a torch dtype), ``dtype``
    the torch dtype, imported when asked for."""

    name: str
    shape: tuple[int, ...]
    dtype_name: str
    file: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype_name", name_of_dtype(self.dtype_name))

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype_name)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype_name)


MAX_DIMS = 64
MAX_NAME_CHARS = 4096
MAX_JSON_BYTES = 100 * 1024 * 1024
MAX_JSON_DEPTH = 200


def require_regular_file(path: Path, what: str = "file") -> int:
    """Refuse anything that is not a regular file (FIFOs and devices would block or never end) before
    opening it; returns its size."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise SurgeryError(f"{path}: cannot read ({e.strerror})") from e
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (FIFO, device or socket)"
        raise SurgeryError(f"{path}: is {kind}; expected a {what}")
    return st.st_size


def _depth(obj, limit: int) -> int:
    """Nesting depth of parsed JSON, iteratively (no recursion on hostile input)."""
    stack, deepest = [(obj, 1)], 0
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            if d > limit:
                return d
            deepest = max(deepest, d)
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


def parse_json(raw: bytes | str, where: str, what: str):
    """Parse JSON text from a file; one SurgeryError for bad bytes, bad syntax, absurd nesting or
    numbers too long to convert."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        obj = json.loads(text)
    except UnicodeDecodeError as e:
        raise SurgeryError(f"{where}: malformed {what} (not UTF-8 at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise SurgeryError(f"{where}: malformed {what} ({e.msg} at line {e.lineno} column {e.colno})") from e
    except (ValueError, RecursionError) as e:  # 5,000-digit integers, deeply nested arrays
        raise SurgeryError(f"{where}: malformed {what} (numbers too long or nesting too deep)") from e
    if _depth(obj, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise SurgeryError(f"{where}: malformed {what} (nested deeper than {MAX_JSON_DEPTH} levels)")
    return obj


def read_json_object(path: Path, what: str) -> dict:
    """A JSON file that must hold an object (config.json, shard indexes, recipes)."""
    size = require_regular_file(path, what)
    if size > MAX_JSON_BYTES:
        raise SurgeryError(f"{path}: {what} larger than {MAX_JSON_BYTES // 2**20} MiB; refusing to parse it")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SurgeryError(f"{path}: cannot read ({e.strerror})") from e
    obj = parse_json(raw, str(path), what)
    if not isinstance(obj, dict):
        raise SurgeryError(f"{path}: malformed {what} (a JSON {type(obj).__name__}, expected an object)")
    return obj


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _header_entry(path: Path, name, entry, data_len: int) -> tuple[TensorInfo, int, int]:
    """Validate one header entry completely (types, ranges, size) before anything trusts it."""
    shown = repr(name)[:80]
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
        raise SurgeryError(f"{path}: malformed safetensors header (tensor name {shown} is empty or longer "
                           f"than {MAX_NAME_CHARS} characters)")
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise SurgeryError(f"{path}: malformed header entry for tensor {shown} (needs exactly dtype, shape and "
                           "data_offsets)")
    dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in ST_NAMES:
        raise SurgeryError(f"{path}: tensor {shown} has unsupported dtype {str(dtype_name)[:40]!r} "
                           f"(expected one of {', '.join(ST_NAMES)})")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(_is_int(d) and 0 <= d < 2**63 for d in shape)):
        raise SurgeryError(f"{path}: tensor {shown} has an invalid shape {str(shape)[:80]} (expected a list of "
                           f"at most {MAX_DIMS} non-negative integers)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise SurgeryError(f"{path}: tensor {shown} has invalid data_offsets {str(offsets)[:80]} (expected "
                           "[start, end] integers)")
    start, end = offsets
    dtype = ST_NAMES[dtype_name]
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if end - start != expected:
        raise SurgeryError(
            f"{path}: header lies about tensor {shown}: offsets [{start}, {end}) hold {end - start} bytes, "
            f"shape {shape} {dtype_name} needs {expected}"
        )
    if start < 0 or end > data_len:
        raise SurgeryError(
            f"{path}: tensor {shown} ends at byte {end} but the data region has {data_len} bytes "
            "(truncated file or a header that lies about offsets)"
        )
    return TensorInfo(name, tuple(shape), dtype, path), start, end


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; returns tensor infos and the metadata dict."""
    size = require_regular_file(path, "safetensors file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SurgeryError(f"{path}: not a safetensors file (empty or shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            # the message names neither n nor the bytes: a path pointed at a secret must not leak it
            if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise SurgeryError(f"{path}: not a safetensors file, or truncated (its header length does not "
                                   "fit in the file)")
            raw = f.read(n)
    except OSError as e:
        raise SurgeryError(f"{path}: cannot read ({e.strerror})") from e
    if not raw.lstrip().startswith(b"{"):
        raise SurgeryError(f"{path}: not a safetensors file (its header is not a JSON object)")
    header = parse_json(raw, str(path), "safetensors header")
    if not isinstance(header, dict):
        raise SurgeryError(f"{path}: malformed safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SurgeryError(f"{path}: malformed safetensors header (__metadata__ must map strings to strings)")
    data_len = size - 8 - n
    infos: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        info, start, end = _header_entry(path, name, entry, data_len)
        spans.append((start, end, name))
        infos[name] = info
    spans.sort()
    pos = 0
    for start, end, name in spans:
        if start != pos:
            kind = "overlaps the previous tensor" if start < pos else "leaves a gap before it"
            raise SurgeryError(f"{path}: header lies about offsets: tensor {name[:80]!r} {kind}")
        pos = end
    if pos != data_len:
        raise SurgeryError(
            f"{path}: data region has {data_len} bytes but the header accounts for {pos} "
            "(truncated or padded file)"
        )
    return infos, dict(metadata)


def inside_folder(folder: Path, name, where: Path, what: str) -> Path:
    """``folder / name`` when ``name`` is a relative path that resolves (after symlinks) inside
    ``folder`` to a regular file; nothing outside a checkpoint's folder is ever read. A cached hub
    snapshot's files are links into its repository's ``blobs/``: there, inside the repository folder."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise SurgeryError(f"{where}: {what} {str(name)[:80]!r} is not a file name")
    from modelsurgery.checkpoint.hub import link_root

    candidate = folder / name
    root = folder.resolve()
    links = link_root(folder)  # a cached hub snapshot's files are links into its repository's blobs/
    try:
        resolved = candidate.resolve(strict=True)
    except (OSError, RuntimeError):
        raise SurgeryError(f"{where}: {what} '{name[:200]}' does not exist") from None
    inside = root in resolved.parents or (links != root and ".." not in Path(name).parts and links in resolved.parents)
    if Path(name).is_absolute() or not inside:
        raise SurgeryError(f"{where}: {what} '{name[:200]}' lies outside the checkpoint folder {folder}; "
                           "refusing to read it")
    require_regular_file(resolved, what)
    return candidate


def read_shard_index(path: Path) -> dict[str, Path]:
    """``model.safetensors.index.json`` -> {tensor name: shard path}; shards must lie in its folder."""
    index = read_json_object(path, "shard index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise SurgeryError(f"{path}: malformed shard index (needs a non-empty 'weight_map' object)")
    out: dict[str, Path] = {}
    checked: dict[str, Path] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise SurgeryError(f"{path}: malformed shard index (tensor '{name[:80]}' maps to a JSON "
                               f"{type(shard).__name__}, expected a file name)")
        if shard not in checked:
            checked[shard] = inside_folder(path.parent, shard, path, f"shard for tensor '{name[:80]}'")
        out[name] = checked[shard]
    return out


MAX_PICKLE_DEPTH = 32


def _flatten_state(obj, prefix: str, out: dict[str, torch.Tensor], path: Path, depth: int = 0) -> None:
    import torch

    if depth > MAX_PICKLE_DEPTH:
        raise SurgeryError(f"{path}: dicts nested deeper than {MAX_PICKLE_DEPTH} levels at '{prefix[:80]}'")
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            if name in out:
                raise SurgeryError(f"{path}: two tensors are both named '{name[:200]}' (a dotted key and a nested "
                                   "dict); refusing to guess which one is meant")
            check_dense(value, name, path)
            out[name] = value
        elif isinstance(value, dict):
            _flatten_state(value, f"{name}.", out, path, depth + 1)
        elif isinstance(value, (list, tuple)) and _holds_tensor(value):
            raise SurgeryError(f"{path}: '{name[:200]}' holds tensors inside a list; only dicts of tensors "
                               "are read (save a flat state_dict)")
        # plain numbers, strings and lists of them (epoch counters, hyper-parameters) are not weights


def _holds_tensor(seq, depth: int = 0) -> bool:
    import torch

    for v in seq:
        if isinstance(v, torch.Tensor):
            return True
        if isinstance(v, (list, tuple)) and depth < MAX_PICKLE_DEPTH and _holds_tensor(v, depth + 1):
            return True
        if isinstance(v, dict) and depth < MAX_PICKLE_DEPTH and _holds_tensor(list(v.values()), depth + 1):
            return True
    return False


def check_dense(t: torch.Tensor, name: str, path: Path) -> None:
    """Only dense tensors with data are weights."""
    import torch

    if t.is_meta or t.device.type == "meta":
        raise SurgeryError(f"{path}: tensor '{name[:200]}' is a meta tensor (shape only, no data)")
    if getattr(t, "is_nested", False):
        raise SurgeryError(f"{path}: tensor '{name[:200]}' is a nested tensor; only dense tensors are read")
    if t.layout != torch.strided:
        raise SurgeryError(f"{path}: tensor '{name[:200]}' is {str(t.layout).replace('torch.', '')}; only dense "
                           "tensors are read (call .to_dense() before saving)")
    if t.is_quantized:
        raise SurgeryError(f"{path}: tensor '{name[:200]}' is a torch quantized tensor; only plain tensors are read")


def check_finite(name: str, tensor: torch.Tensor, where: str | Path = "") -> None:
    """Refuse a floating tensor holding NaN or Inf, naming it and how many values are bad."""
    import torch

    if not tensor.dtype.is_floating_point or tensor.numel() == 0:
        return
    # a NaN or Inf makes the sum non-finite, so a finite sum (one vectorised pass, no mask) clears the
    # tensor; a non-finite sum (a bad value, or finite values overflowing) is counted exactly
    if torch.isfinite(tensor.sum()):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:  # else the sum overflowed: every value is finite
        prefix = f"{where}: " if str(where) else ""
        raise SurgeryError(f"{prefix}tensor '{name[:200]}' holds {bad} NaN/Inf value(s) of {tensor.numel()}; "
                           "fix the input model first")


def load_torch_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Load a .pt/.pth/.bin with weights_only=True; unwrap ``state_dict``/``model`` containers."""
    import torch

    require_regular_file(path, "PyTorch checkpoint")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) pickles cannot be mapped; read them whole
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise SurgeryError(f"{path}: cannot read ({e.strerror or e})") from e
    except RecursionError as e:
        raise SurgeryError(f"{path}: not a readable PyTorch checkpoint (nested too deeply)") from e
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
