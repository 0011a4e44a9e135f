"""Quantized inputs to operations on float weights (merge, analyze, grow, align).

An operation that changes weights cannot keep them quantized: averaging two models' integer codes
or scales is meaningless, and averaged fake-quantized weights are off the grid. So every
operation either works on the float weights a quantized checkpoint stands for and says that its
output is float (``float_view``: merge, analyze), or refuses the input in one line that names the
file (``require_float``: grow and align, which copy tensors byte for byte or edit a few rows).
No output carries quantization metadata onto weights that were changed: the float view has none.

What is recognised: modelsurgery's own record (``modelsurgery.quantization`` metadata, owned by
``ops.quantize.packing``: "packed" codes are dequantized, W = (q - zero_point) * scale; "fake"
weights are already float), and other tools' quantized checkpoints, which are refused: a
``quantization_config`` in config.json (GPTQ, AWQ, bitsandbytes, compressed-tensors...) or tensors
named like their packed weights (``.qzeros``, ``.weight_packed``, ``.SCB``...: ``checkpoint.foreign``, which
family detection refuses for every command).

A packed weight is dequantized each time ``get`` reads it (one read per weight: dequantize, merge's
writing). Weight matching looks every weight up again in every round: the view's ``lazy_state`` (what
merge and analyze match on) dequantizes a packed weight once, at its first lookup, into a memory-mapped
temporary file (in ``tempfile``'s folder: $TMPDIR), and serves it from there, to ``get`` too. Dequantizing
the whole model up front held it in float32 in memory (8x a 4-bit model); dequantizing it again on
each lookup took longer than the matching itself; a bounded in-memory cache misses on every lookup once
the model outgrows it (the matching cycles through all the weights).
"""

from __future__ import annotations

import tempfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.checkpoint.foreign import foreign_quantization
from modelsurgery.checkpoint.formats import TensorInfo
from modelsurgery.checkpoint.store import LazyState
from modelsurgery.errors import SurgeryError
from modelsurgery.memory import file_backed_empty
from modelsurgery.ops.quantize.packing import METADATA_KEY, SUFFIXES, float_config, read_packed_weight, read_scheme


@dataclass(frozen=True)
class Quantization:
    """What kind of quantized checkpoint a file is."""

    format: str  # packed | fake | foreign
    method: str
    bits: str  # "4", "2-8", or "" when unknown

    def describe(self) -> str:
        bits = f"{self.bits}-bit " if self.bits else ""
        if self.format == "foreign":
            return f"quantized checkpoint ({self.method})"
        return f"{self.format} {bits}quantized checkpoint ({self.method})"


def quantization_of(ckpt: Checkpoint) -> Quantization | None:
    """How ``ckpt`` is quantized; None for a float checkpoint."""
    scheme = read_scheme(ckpt.metadata, ckpt.path)
    if scheme is not None:
        bits = sorted({int(layer.get("bits", scheme.get("bits", 0)) or 0) for layer in scheme["layers"].values()
                       if isinstance(layer, dict)} - {0}) or ([int(scheme["bits"])] if scheme.get("bits") else [])
        text = "" if not bits else str(bits[0]) if len(bits) == 1 else f"{bits[0]}-{bits[-1]}"
        return Quantization(str(scheme.get("format", "packed")), str(scheme.get("method", "unknown method")), text)
    config = ckpt.config or {}
    qc = config.get("quantization_config")
    if isinstance(qc, dict):
        method = qc.get("quant_method") or qc.get("format") or "quantization_config"
        return Quantization("foreign", f"config.json quantization_config: {method}", str(qc.get("bits", "")))
    foreign = foreign_quantization(ckpt)
    return None if foreign is None else Quantization("foreign", foreign, "")


def require_float(ckpts: list[Checkpoint], operation: str) -> None:
    """Refuse quantized inputs in one line (operations that copy tensors or edit them in place), naming
    `surgery dequantize` only for the inputs it takes (``ops.dequantize``): not a fake-quantized file,
    which it refuses as already float, nor another tool's format other than GPTQ and compressed-tensors."""
    for c in ckpts:
        q = quantization_of(c)
        if q is not None:
            raise SurgeryError(f"{c.path}: {q.describe()}; {operation} works on float weights: {operation} the "
                               f"float model ({float_source(c, q)}), then quantize the result")


def float_source(ckpt: Checkpoint, q: Quantization) -> str:
    """Where the float model a quantized checkpoint stands for comes from."""
    if q.format == "fake":
        return "the one it was quantized from: its weights are already float, so dequantize has nothing to undo"
    qc = (ckpt.config or {}).get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if q.format == "packed" or method in ("gptq", "compressed-tensors"):
        return "`surgery dequantize` gives it"
    return "surgery dequantize reads only modelsurgery's packed, GPTQ and compressed-tensors checkpoints"


class _Dequantized(Mapping):
    """The packed weights of a checkpoint, dequantized to float32 one at a time when read."""

    def __init__(self, ckpt: Checkpoint, layers: dict[str, dict]):
        self.ckpt, self.layers = ckpt, layers

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.layers:
            raise KeyError(name)
        return read_packed_weight(self.ckpt, name, self.layers[name] or {}).dequantize(torch.float32)

    def __contains__(self, name: object) -> bool:  # Mapping's would dequantize the weight to answer
        return name in self.layers

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


class _Spilled:
    """Weights of ``source`` each made once, on its first lookup, into a file-backed tensor: a shared mapping
    of an unlinked temporary file, whose pages are the page cache's to write back and evict (not anonymous
    memory), freed with the view."""

    def __init__(self, source: Mapping[str, torch.Tensor], path: Path):
        self.source, self.path = source, path
        self.made: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.made:
            value = self.source[name]
            if value.numel() == 0:
                self.made[name] = value
            else:
                try:
                    mapped = file_backed_empty(tuple(value.shape), value.dtype, prefix="modelsurgery-dequantized-")
                except OSError as e:
                    size = value.numel() * value.element_size()
                    raise SurgeryError(f"{self.path}: no room for packed weight '{name}' dequantized ({size} bytes) "
                                       f"in {tempfile.gettempdir()} ({e.strerror}); set TMPDIR to a folder with "
                                       "room") from e
                self.made[name] = mapped.copy_(value)
        return self.made[name]


class _FloatView(Checkpoint):
    """``source`` seen with other tensor infos and metadata; packed weights read dequantized."""

    def __init__(self, source: Checkpoint, infos: OrderedDict[str, TensorInfo], metadata: dict[str, str],
                 dequantized: Mapping[str, torch.Tensor] | None = None):
        self.__dict__.update(source.__dict__)  # the same files, handles and in-memory tensors
        self.infos, self.metadata = infos, metadata
        self.config = float_config(source.config)  # a float output must not say it is packed
        self._dequantized = dequantized or {}
        self._spilled = _Spilled(self._dequantized, source.path)

    def get(self, name: str) -> torch.Tensor:
        if name in self._spilled.made:
            return self._spilled.made[name]
        if name in self._dequantized:
            return self._dequantized[name]
        return super().get(name)

    def lazy_state(self) -> LazyState:
        """The tensors by name, each read when looked up; a packed weight dequantized once, at its first
        lookup, into a temporary file (module docstring), for the many lookups of weight matching."""
        return _SpillingState(self)


class _SpillingState(LazyState):
    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.ckpt._dequantized:
            return self.ckpt._spilled[name]
        return super().__getitem__(name)


def float_view(ckpt: Checkpoint, operation: str) -> tuple[Checkpoint, str | None]:
    """(a checkpoint of the float weights ``ckpt`` stands for, a note saying what was done or None).

    Packed weights appear as float32 ``X.weight`` at the position of their codes, dequantized when
    read; other tensors are read from the file as they are; the quantization record is dropped
    from the metadata. Another tool's quantized checkpoint is refused in one line."""
    q = quantization_of(ckpt)
    if q is None:
        return ckpt, None
    if q.format == "foreign":
        raise SurgeryError(f"{ckpt.path}: {q.describe()}; {operation} needs float weights: dequantize it first "
                           "(`surgery dequantize` reads GPTQ and compressed-tensors folders)")
    metadata = {k: v for k, v in ckpt.metadata.items() if k != METADATA_KEY}
    if q.format == "fake":
        view = _FloatView(ckpt, OrderedDict(ckpt.infos), metadata)
        return view, (f"{ckpt.path}: {q.describe()}: its weights are float; {operation} changes them, so the "
                      "output is a float checkpoint without quantization metadata")
    if q.format != "packed":
        raise SurgeryError(f"{ckpt.path}: quantization format '{q.format}' is unknown; {operation} needs float "
                           "weights")
    layers = read_scheme(ckpt.metadata, ckpt.path)["layers"]
    packed = {name + s: name for name in layers for s in SUFFIXES}
    infos: OrderedDict[str, TensorInfo] = OrderedDict()
    for name, info in ckpt.infos.items():
        if name not in packed:
            infos[name] = info
        elif packed[name] not in infos:
            layer = layers[packed[name]] or {}
            shape = layer.get("shape")
            if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
                raise SurgeryError(f"{ckpt.path}: quantized weight '{packed[name]}' has no stored shape in its "
                                   "metadata")
            infos[packed[name]] = TensorInfo(packed[name], tuple(shape), torch.float32, info.file)
    missing = [n for n in layers if n not in infos]
    if missing:
        raise SurgeryError(f"{ckpt.path}: quantized weight '{missing[0]}' is listed in the metadata but has no "
                           f"codes ('{missing[0]}.qweight')")
    view = _FloatView(ckpt, infos, metadata, _Dequantized(ckpt, layers))
    return view, (f"{ckpt.path}: {q.describe()}: dequantized to float32 for {operation}; the output is a float "
                  "checkpoint")
