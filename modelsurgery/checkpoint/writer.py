"""Streaming, atomic checkpoint writer with sharding and provenance.

A safetensors header only needs names, shapes and dtypes, so it is written first and each
tensor is then produced, written and dropped in turn: peak memory stays near one tensor.
Everything goes to a temporary name beside the destination and is renamed at the end, so an
interrupted run leaves nothing behind; an existing output is replaced only with ``force``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelsurgery import __version__
from modelsurgery.checkpoint import digests
from modelsurgery.checkpoint.carry import CarriedFile
from modelsurgery.checkpoint.formats import TORCH_TO_ST, dtype_size
from modelsurgery.checkpoint.output import FILES_KEY, atomic_path, output_is_folder
from modelsurgery.errors import SurgeryError

DEFAULT_MAX_SHARD = 5 * 1000**3

#: the output float types a command writes on request (``--dtype``), by PyTorch's names and the short ones
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class PlannedTensor:
    """A tensor to write: what it will be, and how to produce it when its turn comes."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]
    #: optional raw source: (safetensors file, absolute byte offset) of bytes already in this tensor's
    #: dtype and layout; the writer then copies them file to file without materialising the tensor
    source: tuple[Path, int] | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_size(self.dtype)


def plan_tensor(name: str, tensor: torch.Tensor) -> PlannedTensor:
    """A tensor already in memory."""
    return PlannedTensor(name, tuple(tensor.shape), tensor.dtype, lambda: tensor)


def plan_copy(ckpt, source: str, name: str | None = None, raw: bool = False) -> PlannedTensor:
    """A tensor copied from a checkpoint, read only when written. ``raw``: copy its bytes file to
    file when they sit in a safetensors file (no tensor, no mapped pages: for multi-GB streaming)."""
    info = ckpt.info(source)
    where = ckpt.byte_range(source) if raw else None
    return PlannedTensor(name or source, info.shape, info.dtype, lambda: ckpt.get(source),
                         source=where[:2] if where else None)


@dataclass
class Provenance:
    operation: str
    parameters: dict = field(default_factory=dict)
    sources: Sequence[Path] = ()

    def to_metadata(self, values: Sequence[str] | None = None) -> dict[str, str]:
        """The ``modelsurgery`` metadata entry; the digests ``values`` default to hashing the sources now."""
        if values is None:
            values = [digests.file_digest(p) for p in self.sources]
        record = {
            "tool": "modelsurgery",
            "version": __version__,
            "operation": self.operation,
            "parameters": self.parameters,
            "sources": [{"file": str(p), "sha256": d} for p, d in zip(self.sources, values)],
        }
        return {"modelsurgery": json.dumps(record, default=str, sort_keys=True)}


class PendingDigests:
    """Source digests computed in the background while tensors are written (``digests.start``: the
    files side by side, or already under way since the CLI started), so hashing a multi-GB input
    overlaps the copy instead of preceding it. Headers hold placeholders of the digests' exact
    length, patched in place once the hashes are known."""

    def __init__(self, sources: Sequence[Path]):
        self.sources = [Path(p) for p in sources]
        self.placeholders = [f"pending-sha256-{i:049d}" for i in range(len(sources))]
        self._stop = threading.Event()
        digests.only(self.sources)
        self._jobs = digests.start(self.sources)

    def patch(self, files: Iterable[Path], progress: Callable[[str, int, int, dict], None] | None = None) -> None:
        """Write the digests into the headers of ``files`` (none: nothing to wait for). While the hashing
        outlasts the write, ``progress`` hears ``("hash", bytes hashed, bytes of the sources, {"unit":
        "bytes"})``; nothing when the digests are done already."""
        files = list(files)
        if not files:
            return
        report = None if progress is None else lambda done, total: progress("hash", done, total, {"unit": "bytes"})
        values = digests.results(self._jobs, self.sources, self._stop, report)
        for path in files:
            with open(path, "r+b") as f:
                n = int.from_bytes(f.read(8), "little")
                header = f.read(n)
                for placeholder, digest in zip(self.placeholders, values):
                    header = header.replace(placeholder.encode(), digest.encode())
                f.seek(8)
                f.write(header)

    def close(self) -> None:
        """Stop hashing what is left (a write given up)."""
        self._stop.set()
        digests.only(())


def float_dtype(value: str | torch.dtype | None, flag: str = "--dtype") -> torch.dtype | None:
    """``value`` as one of the output float types (None stays None: keep each tensor's dtype)."""
    if value is None or (isinstance(value, torch.dtype) and value in FLOAT_DTYPES.values()):
        return value
    if isinstance(value, str) and value.strip().lower().removeprefix("torch.") in FLOAT_DTYPES:
        return FLOAT_DTYPES[value.strip().lower().removeprefix("torch.")]
    raise SurgeryError(f"{flag} {value}: expected float32, float16 or bfloat16 (or fp32, fp16, bf16)")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class WriteOptions:
    """How an operation writes its checkpoint, shared by every operation that writes one (the CLI's
    ``--dtype``, ``--max-shard-size`` and ``--no-input-hash``); an operation's options extend it."""

    #: float type of every floating tensor written (float32/float16/bfloat16 or a torch dtype); None: as produced
    dtype: str | torch.dtype | None = None
    #: a folder output is split into shards of at most this size ("5GB", "500MB", bytes)
    max_shard_size: int | str = DEFAULT_MAX_SHARD
    #: record the inputs' SHA-256 in the provenance (a full read of every input; skippable for big ones)
    hash_inputs: bool = True

    def check_write_options(self) -> None:
        """Refuse a bad dtype or shard size in one line, before the operation does any work."""
        float_dtype(self.dtype)
        parse_size(self.max_shard_size)

    def write_kwargs(self) -> dict:
        """``write_checkpoint``'s keyword arguments for these options."""
        return {"dtype": self.dtype, "max_shard_size": self.max_shard_size, "hash_inputs": self.hash_inputs}


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 1:
            raise SurgeryError(f"max shard size {text}: must be at least 1 byte (e.g. 5GB)")
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise SurgeryError(f"max shard size '{text}': expected a size such as 5GB, 500MB or 1000000")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary else 1000
    size = int(number * base ** " KMGT".index(unit or " "))
    if size < 1:
        raise SurgeryError(f"max shard size '{text}': must be at least 1 byte (e.g. 5GB)")
    return size


# ----- safetensors streaming -------------------------------------------------------------------
def _header_bytes(tensors: Sequence[PlannedTensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for t in tensors:
        if t.dtype not in TORCH_TO_ST:
            raise SurgeryError(f"tensor '{t.name}': dtype {t.dtype} cannot be stored in safetensors")
        header[t.name] = {
            "dtype": TORCH_TO_ST[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data region to 8 bytes, as the reference writer does
    return len(raw).to_bytes(8, "little") + raw


def _tensor_bytes(t: PlannedTensor) -> memoryview:
    value = _dense(t).contiguous().reshape(-1)
    return memoryview(value.view(torch.uint8).numpy())


def _dense(t: PlannedTensor) -> torch.Tensor:
    """The planned tensor produced, checked (a dense tensor of the planned shape) and cast, on the CPU."""
    value = t.load()
    if not isinstance(value, torch.Tensor):
        raise SurgeryError(f"tensor '{t.name}': produced {type(value).__name__}, not a tensor")
    if value.is_meta or value.layout != torch.strided or getattr(value, "is_nested", False):
        raise SurgeryError(f"tensor '{t.name}': a meta, sparse or nested tensor has no dense data to write")
    if tuple(value.shape) != tuple(t.shape):
        raise SurgeryError(f"tensor '{t.name}': planned shape {t.shape} but produced {tuple(value.shape)}")
    if value.dtype != t.dtype:
        value = value.to(t.dtype)
    return value.detach().to("cpu")


def write_safetensors(path: Path, tensors: Sequence[PlannedTensor], metadata: dict[str, str] | None = None,
                      written: Callable[[], None] | None = None):
    """Write one safetensors file, one tensor in memory at a time; ``written`` is called after each tensor."""
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise SurgeryError(f"tensor '{dup}' is planned twice")
    with open(path, "wb") as f:
        f.write(_header_bytes(tensors, metadata or {}))
        for t in tensors:
            if t.source is not None:
                f.flush()
                copy_file_bytes(t.source[0], t.source[1], t.nbytes, f.fileno())
            else:
                f.write(_tensor_bytes(t))
            if written is not None:
                written()


def copy_file_bytes(src: Path, offset: int, count: int, dst_fd: int, chunk: int = 1 << 24) -> None:
    """Append ``count`` bytes of ``src`` starting at ``offset`` to ``dst_fd`` in the kernel when it can
    (copy_file_range, then sendfile), else through a small buffer; never maps the source."""
    with open(src, "rb") as s:
        fd, done = s.fileno(), 0
        for kernel_copy in (getattr(os, "copy_file_range", None), getattr(os, "sendfile", None)):
            if kernel_copy is None:
                continue
            try:
                while done < count:
                    if kernel_copy is os.sendfile:
                        n = os.sendfile(dst_fd, fd, offset + done, min(chunk, count - done))
                    else:
                        n = kernel_copy(fd, dst_fd, min(chunk, count - done), offset + done)
                    if n == 0:
                        raise SurgeryError(f"{src}: ended before byte {offset + count} (truncated file?)")
                    done += n
                return
            except OSError:  # not supported between these files: try the next way, from where it stopped
                continue
        s.seek(offset + done)
        while done < count:
            block = s.read(min(chunk, count - done))
            if not block:
                raise SurgeryError(f"{src}: ended before byte {offset + count} (truncated file?)")
            os.write(dst_fd, block)
            done += len(block)


def split_shards(tensors: Sequence[PlannedTensor], max_bytes: int) -> list[list[PlannedTensor]]:
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


@dataclass
class WriteReport:
    path: Path
    files: list[Path]
    num_tensors: int
    total_bytes: int

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "files": [str(f) for f in self.files],
            "num_tensors": self.num_tensors,
            "total_bytes": self.total_bytes,
        }


def write_checkpoint(
    out: str | Path,
    tensors: Sequence[PlannedTensor],
    *,
    provenance: Provenance | None = None,
    metadata: dict[str, str] | None = None,
    config: dict | None = None,
    extra_files: Iterable[Path | CarriedFile] = (),
    max_shard_size: int | str = DEFAULT_MAX_SHARD,
    dtype: str | torch.dtype | None = None,
    hash_inputs: bool = True,
    force: bool = False,
    progress: Callable[[str, int, int, dict], None] | None = None,
) -> WriteReport:
    """Write ``tensors`` to ``out``: a .safetensors file, a .pt file, or a folder (sharded above
    ``max_shard_size``, with config.json and carried-along files). ``dtype`` casts floating tensors
    (and sets config.json's ``torch_dtype``/``dtype``); without ``hash_inputs`` the provenance lists
    its sources as ``inputs_unhashed`` and hashes nothing. ``progress`` (the operations' callback) hears
    ``("write", tensors written, tensors planned, {})`` from the start and after each tensor: producing a
    planned tensor (a fold, a dequantization, a width growth) happens as it is written, so this is the
    bar of most of an operation's time on a large model. When the inputs' SHA-256 is not done as the
    tensors are, it then hears ``("hash", bytes hashed, bytes in all, {"unit": "bytes"})`` while it waits."""
    out = Path(out)
    max_bytes = parse_size(max_shard_size)
    dtype = float_dtype(dtype)
    if dtype is not None:
        tensors = cast_floats(tensors, dtype)
        if config is not None:
            config = {**config, **{k: dtype_name(dtype) for k in ("torch_dtype", "dtype") if k in config}}
        if provenance is not None and "dtype" not in provenance.parameters:
            provenance = Provenance(provenance.operation, {**provenance.parameters, "dtype": dtype_name(dtype)},
                                    provenance.sources)
    if provenance is not None and not hash_inputs:
        provenance = Provenance(provenance.operation, {**provenance.parameters,
                                                       "inputs_unhashed": [str(p) for p in provenance.sources]})
    md = {"format": "pt", **(metadata or {})}
    pending = PendingDigests(provenance.sources) if provenance is not None else None
    if provenance is not None:
        md.update(provenance.to_metadata(pending.placeholders))
    total = sum(t.nbytes for t in tensors)
    folder = output_is_folder(out)
    written = _Counter(progress, len(tensors))
    if not folder:  # an input folder's list of its files (passed on with its metadata) is no file's list
        md.pop(FILES_KEY, None)
    try:
        with atomic_path(out, force, is_dir=folder) as tmp:
            if not folder and out.name.endswith(".safetensors"):
                if total > max_bytes:
                    raise SurgeryError(
                        f"{out}: {total} bytes exceed --max-shard-size {max_bytes}; write to a folder to shard"
                    )
                write_safetensors(tmp, tensors, md, written)
                files = [out]
            elif not folder:
                torch.save({t.name: written.after(_dense(t)) for t in tensors}, tmp)
                files = [out]
            else:
                files = _write_folder(tmp, out, tensors, md, max_bytes, config, extra_files, written)
            if pending is not None:
                pending.patch([tmp.parent / f.relative_to(out.parent) for f in files
                               if f.name.endswith(".safetensors") and f.parent in (out, out.parent)], progress)
    finally:
        if pending is not None:
            pending.close()
    return WriteReport(out, files, len(tensors), total)


def cast_floats(tensors: Sequence[PlannedTensor], dtype: torch.dtype) -> list[PlannedTensor]:
    """``tensors`` with every floating one planned as ``dtype``. float8 tensors are refused: they are
    quantized values whose scales live in other tensors, and a cast would not apply them."""
    out = []
    for t in tensors:
        if t.dtype.is_floating_point and t.dtype.itemsize == 1:
            raise SurgeryError(f"tensor '{t.name}' is {dtype_name(t.dtype)} (quantized values with separate "
                               f"scales): --dtype {dtype_name(dtype)} would cast it without them; dequantize first")
        if t.dtype.is_floating_point and t.dtype != dtype:
            t = PlannedTensor(t.name, t.shape, dtype, t.load)
        out.append(t)
    return out


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _carry(src: Path, dst: Path) -> None:
    """Copy a carried file, only when it is a regular file (a FIFO or device is refused, never read);
    where links may point is the reader's business (``Checkpoint.extra_files``)."""
    try:
        fd = os.open(src, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise SurgeryError(f"{src}: cannot carry this file into the output ({e.strerror})") from e
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SurgeryError(f"{src}: not a regular file; refusing to carry it into the output")
        with open(dst, "wb") as g:
            shutil.copyfileobj(f, g)


class _Counter:
    """Tensors written so far, told to the progress callback (nothing without one)."""

    def __init__(self, progress: Callable[[str, int, int, dict], None] | None, total: int):
        self.progress, self.total, self.done = progress, total, 0
        if progress is not None:
            progress("write", 0, total, {})

    def __call__(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress("write", self.done, self.total, {})

    def after(self, value: torch.Tensor) -> torch.Tensor:
        self()
        return value


def _write_folder(tmp: Path, out: Path, tensors, md, max_bytes, config, extra_files, written) -> list[Path]:
    shards = split_shards(tensors, max_bytes)
    # a Path is carried under its own name, a CarriedFile (Checkpoint.extra_files) under its name in the folder
    extra_files = [p if isinstance(p, CarriedFile) else CarriedFile(Path(p), Path(p).name) for p in extra_files]
    names = _shard_names(len(shards)) + (["model.safetensors.index.json"] if len(shards) > 1 else [])
    names += (["config.json"] if config is not None else []) + [p.name for p in extra_files]
    md = {**md, FILES_KEY: json.dumps(names)}
    files = []
    if len(shards) == 1:
        write_safetensors(tmp / "model.safetensors", shards[0], md, written)
        files.append(out / "model.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(tmp / name, shard, md, written)
            files.append(out / name)
            weight_map.update({t.name: name for t in shard})
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        files.append(out / "model.safetensors.index.json")
    if config is not None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        files.append(out / "config.json")
    for src in extra_files:
        (tmp / src.name).parent.mkdir(parents=True, exist_ok=True)  # sub-folders: "1_Pooling/config.json"
        _carry(src.source, tmp / src.name)
        files.append(out / src.name)
    return files
