"""A lazy view of a checkpoint: tensor names, shapes and dtypes from headers; data on demand.

``Checkpoint.open`` accepts a .safetensors file, a sharded index, a PyTorch pickle, or a
Hugging Face-style folder (config.json, weights, tokenizer and other files). Safetensors data
is memory-mapped tensor by tensor, so inspecting a multi-GB checkpoint reads only headers.
"""

from __future__ import annotations

import json
import struct
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from modelsurgery.checkpoint.carry import CarriedFile, carried_files
from modelsurgery.checkpoint.formats import (
    TensorInfo,
    load_torch_pickle,
    read_json_object,
    read_safetensors_header,
    read_shard_index,
)
from modelsurgery.checkpoint.hub import link_root, resolve_input
from modelsurgery.errors import SurgeryError

if TYPE_CHECKING:  # torch is imported when a tensor's value is read, never for headers
    import torch

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
#: the weight files of a folder in transformers' order of preference (``from_pretrained``)
PREFERRED_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json")


class Checkpoint:
    """Tensors of one model, read lazily. Never modifies its source."""

    def __init__(
        self,
        path: Path,
        infos: OrderedDict[str, TensorInfo],
        metadata: dict[str, str],
        config: dict | None = None,
        folder: Path | None = None,
        loaded: dict[str, torch.Tensor] | None = None,
        tied: dict[str, str] | None = None,
    ):
        self.path = path
        self.infos = infos
        #: names a PyTorch pickle stores as the very data of an earlier name, read as tied (``tied_in_pickle``):
        #: left out of the tensors, as a safetensors file of the same model leaves them out
        self.tied = dict(tied or {})
        self.metadata = metadata
        self.config = config
        self.folder = folder
        self._loaded = loaded or {}
        self._handles: dict[Path, object] = {}
        self._offsets: dict[Path, dict[str, int]] = {}

    # ----- construction -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        path = resolve_input(Path(path))  # a missing path may be a hub id in the local cache
        if path.is_dir():
            return cls._open_folder(path)
        return cls._open_file(path, folder=None, config=None)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], path: str | Path = "<memory>",
                        config: dict | None = None, metadata: dict | None = None) -> Checkpoint:
        """Wrap tensors already in memory (tests, library users, intermediate results)."""
        p = Path(str(path))
        infos = OrderedDict(
            (k, TensorInfo(k, tuple(v.shape), v.dtype, p)) for k, v in state.items()
        )
        return cls(p, infos, dict(metadata or {}), config=config, loaded=dict(state))

    @classmethod
    def _open_file(cls, path: Path, folder: Path | None, config: dict | None) -> Checkpoint:
        name = path.name
        if name.endswith(".index.json"):
            return cls._open_index(path, folder, config)
        if name.endswith(".safetensors"):
            infos, metadata = read_safetensors_header(path)
            return cls(path, OrderedDict(infos), metadata, config, folder)
        if name.endswith(PICKLE_SUFFIXES):
            state = load_torch_pickle(path)
            tied = tied_in_pickle(state, config)
            infos = OrderedDict((k, TensorInfo(k, tuple(v.shape), v.dtype, path)) for k, v in state.items()
                                if k not in tied)
            return cls(path, infos, {}, config, folder, loaded=state, tied=tied)
        # No known suffix: sniff. A safetensors file starts with a little-endian header length.
        try:
            infos, metadata = read_safetensors_header(path)
            return cls(path, OrderedDict(infos), metadata, config, folder)
        except SurgeryError:
            pass
        raise SurgeryError(
            f"{path}: not a checkpoint (expected .safetensors, a shard index, .pt/.pth/.bin, or a folder)"
        )

    @classmethod
    def _open_index(cls, path: Path, folder: Path | None, config: dict | None) -> Checkpoint:
        weight_map = read_shard_index(path)
        infos: OrderedDict[str, TensorInfo] = OrderedDict()
        metadata: dict[str, str] = {}
        if path.name.startswith("pytorch_model"):
            loaded: dict[str, torch.Tensor] = {}
            for shard in dict.fromkeys(weight_map.values()):
                state = load_torch_pickle(shard)
                _refuse_unlisted(path, shard, state, weight_map)
                loaded.update(state)
            tied = tied_in_pickle(loaded, config)
            for k in weight_map:
                if k not in loaded:
                    raise SurgeryError(f"{path}: tensor '{k}' is listed but missing from its shard")
                if k not in tied:
                    infos[k] = TensorInfo(k, tuple(loaded[k].shape), loaded[k].dtype, weight_map[k])
            return cls(path, infos, {}, config, folder, loaded=loaded, tied=tied)
        shard_infos: dict[Path, dict[str, TensorInfo]] = {}
        for shard in dict.fromkeys(weight_map.values()):
            shard_infos[shard], md = read_safetensors_header(shard)
            _refuse_unlisted(path, shard, shard_infos[shard], weight_map)
            metadata = metadata or md
        for k, shard in weight_map.items():
            if k not in shard_infos[shard]:
                raise SurgeryError(f"{path}: tensor '{k}' is listed in the index but missing from {shard.name}")
            infos[k] = shard_infos[shard][k]
        return cls(path, infos, metadata, config, folder)

    @classmethod
    def _open_folder(cls, folder: Path) -> Checkpoint:
        config = None
        cfg_path = folder / "config.json"
        if cfg_path.exists():
            config = read_json_object(cfg_path, "config.json")
        return cls._open_file(_folder_weights(folder), folder, config)

    # ----- access -------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.infos)

    def __iter__(self):
        return iter(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def __len__(self) -> int:
        return len(self.infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise SurgeryError(f"{self.path}: no tensor named '{name}'") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.infos.items()}

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (memory-mapped for safetensors; do not modify it in place)."""
        if name in self._loaded:
            return self._loaded[name]
        info = self.info(name)
        handle = self._handles.get(info.file)
        if handle is None:
            from safetensors import safe_open

            try:
                handle = safe_open(str(info.file), framework="pt", device="cpu")
            except Exception as e:  # the Rust reader reports its own validation failures
                raise SurgeryError(f"{info.file}: cannot open ({e})") from e
            self._handles[info.file] = handle
        return handle.get_tensor(name)

    def close(self) -> None:
        """Unmap the files read so far (their pages count as resident memory while mapped); later
        reads open them again."""
        self._handles.clear()

    def byte_range(self, name: str) -> tuple[Path, int, int] | None:
        """(file, absolute offset, length) of a tensor's bytes in its safetensors file; None when it is
        not stored that way (pickles, tensors in memory). The header was validated when opened."""
        if name in self._loaded:
            return None
        info = self.info(name)
        offsets = self._offsets.get(info.file)
        if offsets is None:
            with open(info.file, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            offsets = {k: 8 + n + v["data_offsets"][0] for k, v in header.items()}
            self._offsets[info.file] = offsets
        return info.file, offsets[name], info.nbytes

    def lazy_state(self) -> LazyState:
        """The tensors as a read-only mapping that reads each one when it is looked up and keeps none
        (``state_dict`` reads every tensor now: a whole model for pickles' copies or dequantized views)."""
        return LazyState(self)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All tensors (memory-mapped where the format allows)."""
        return {k: self.get(k) for k in self.infos}

    def aliases(self) -> dict[str, str]:
        """Tensors a PyTorch pickle stores as the very data of an earlier name (a tied embedding and head
        saved by ``torch.save``): name -> that earlier name, the ones read as tied (``tied``, not among the
        tensors) and the ones kept because config.json does not say the model ties them. A safetensors
        file has no shared data."""
        return {**self.tied, **shared_data({k: v for k, v in self._loaded.items() if k in self.infos})}

    @property
    def num_parameters(self) -> int:
        return sum(i.numel for i in self.infos.values())

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    @property
    def source_files(self) -> list[Path]:
        """Files holding the weights (what provenance digests)."""
        files = list(dict.fromkeys(i.file for i in self.infos.values()))
        return [f for f in files if f.exists()]

    def input_paths(self) -> list[Path]:
        """What this checkpoint was read from (its folder, index and weight files): outputs never go there."""
        return list(dict.fromkeys([*([self.folder] if self.folder is not None else []), self.path,
                                   *self.source_files]))

    def extra_files(self) -> list[CarriedFile]:
        """Non-weight files of a folder checkpoint to carry along (tokenizer, generation config, and
        sub-folders such as sentence-transformers' 1_Pooling/), each with its name in the output: only
        regular files that resolve inside the folder; others are skipped with a SurgeryWarning (rules in
        ``checkpoint.carry``)."""
        if self.folder is None:
            return []
        # a hub snapshot's files link into its cache folder
        return carried_files(self.folder, [*self.source_files, self.path], link_root(self.folder))

    def dtype(self, skip: tuple[str, ...] = ()) -> torch.dtype:
        """The dominant floating dtype (by bytes), leaving out tensors whose names end with ``skip``."""
        import torch

        totals: dict[torch.dtype, int] = {}
        for i in self.infos.values():
            if i.dtype.is_floating_point and not i.name.endswith(skip):
                totals[i.dtype] = totals.get(i.dtype, 0) + i.nbytes
        return max(totals, key=totals.get) if totals else torch.float32

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self)} tensors)"


def shared_data(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Each name whose tensor is the very data of an earlier name's (same storage, offset, shape, strides
    and dtype: the same values, always) -> that earlier name."""
    seen: dict[tuple, str] = {}
    out: dict[str, str] = {}
    for name, t in state.items():
        if t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen:
            out[name] = seen[key]
        else:
            seen[key] = name
    return out


def tied_in_pickle(state: dict[str, torch.Tensor], config: dict | None) -> dict[str, str]:
    """The names of a PyTorch pickle read as tied to an earlier name, and so left out of the checkpoint
    as a safetensors file of the same model leaves them out (``save_pretrained`` keeps one name of each
    shared tensor there; transformers 4's ``safe_serialization=False`` and ``torch.save(model.state_dict())``
    keep both, sharing one storage). Then every family and operation decides tying as it does for
    safetensors (a missing ``lm_head.weight`` is a tied head) and writes the tied name once.

    Shared storage is read as the model's tie only when config.json says ``tie_word_embeddings: true``,
    as transformers then ties them on loading. With ``false``, or no such key (its default is the model
    class's: true for GPT-2, false for LLaMA), transformers loads both names as separate weights, so
    both are kept: an untied model whose two tensors start equal. Without config.json (a bare
    ``torch.save`` of a user's module) both are kept too: the module's own state_dict names both."""
    if not config or config.get("tie_word_embeddings") is not True:
        return {}
    return shared_data(state)


class LazyState(Mapping):
    """A checkpoint's tensors by name, each read by ``Checkpoint.get`` when looked up, never kept."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.ckpt:
            raise KeyError(name)
        return self.ckpt.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.ckpt.infos)

    def __len__(self) -> int:
        return len(self.ckpt.infos)


def _folder_weights(folder: Path) -> Path:
    """The file a folder checkpoint is read from, in transformers' order of preference
    (``from_pretrained``: model.safetensors, its shard index, pytorch_model.bin, its shard index), so a
    folder holding both formats (many hub repositories keep the old .bin shards beside the safetensors)
    is read as transformers loads it; else its one .safetensors file, else its one PyTorch weight file."""
    for name in PREFERRED_WEIGHTS:
        if (folder / name).exists():
            return folder / name
    st = sorted(folder.glob("*.safetensors"))
    if len(st) == 1:
        return st[0]
    if len(st) > 1:
        raise SurgeryError(
            f"{folder}: several .safetensors files and no model.safetensors.index.json to say how they fit"
        )
    pickles = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
    if len(pickles) == 1:
        return pickles[0]
    if len(pickles) > 1:
        raise SurgeryError(f"{folder}: several PyTorch weight files and no index to say how they fit")
    raise SurgeryError(f"{folder}: no weights found (no .safetensors, shard index or .pt/.pth/.bin file)")


def weight_files(path: str | Path) -> list[Path]:
    """The files ``Checkpoint.open(path)`` reads weights from (what provenance digests), found from
    the folder's listing and shard index alone, without reading a header or a tensor; [] when
    ``path`` is not a checkpoint."""
    try:
        path = resolve_input(Path(path))
        if path.is_dir():
            path = _folder_weights(path)
        if path.name.endswith(".index.json"):
            return list(dict.fromkeys(read_shard_index(path).values()))
        return [path] if path.is_file() and path.name.endswith((".safetensors", *PICKLE_SUFFIXES)) else []
    except (SurgeryError, OSError, ValueError):
        return []


def _refuse_unlisted(index: Path, shard: Path, names, weight_map: dict[str, Path]) -> None:
    """A tensor in a shard that the index does not list would be silently dropped: refuse instead."""
    unlisted = [k for k in names if k not in weight_map]
    if unlisted:
        more = f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""
        raise SurgeryError(f"{index}: tensor '{unlisted[0][:200]}' is in {shard.name} but not in the index"
                           f"{more}; the index is incomplete (add it to weight_map or remove it from the shard)")


def open_checkpoint(path: str | Path) -> Checkpoint:
    return Checkpoint.open(path)
