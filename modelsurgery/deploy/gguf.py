"""GGUF, llama.cpp's file format: writer and reader for the decoder families, with the weights in
the block formats our quantizers learn exactly (ggml-common.h, 32 weights a block):

- Q8_0: fp16 d, 32 int8 q; w = d * q        (our 8-bit symmetric grid, q = code - 128)
- Q4_0: fp16 d, 16 bytes of nibbles; w = d * (q - 8)   (our 4-bit symmetric grid, zero point 8)
- Q4_1: fp16 d, fp16 m, 16 bytes of nibbles; w = d * q + m   (our 4-bit asymmetric grid, m = -z * d)

A block's 32 nibbles hold element j in the low half and element j + 16 in the high half of byte j.
Tensor names, row reorderings, value shifts and metadata keys follow llama.cpp's ``convert_hf_to_gguf.py``
per family (``gguf_families.py``), and so does the tokenizer (``gguf_tokenizer.py``); names come from the
``gguf`` package's own tensor map. The file is written through the ``gguf`` package's ``GGUFWriter``: header,
metadata and tensor infos first, then each tensor's data as it is produced (one weight in memory at a time).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
import yaml

from modelsurgery.checkpoint import Provenance, check_output
from modelsurgery.checkpoint.hub import hub_repo_of
from modelsurgery.checkpoint.writer import atomic_path
from modelsurgery.deploy.common import (
    DeployReport,
    DeploySource,
    PackedRef,
    fp16,
    loaded,
    read_tensor,
    scale_rounding_error,
    unpack_stream,
)
from modelsurgery.deploy.gguf_families import (
    GGUFFamily,
    check_family,
    head_dim,
    leaves_out,
    longrope_factors,
    rope_of,
    row_order,
    value_shift,
)
from modelsurgery.deploy.gguf_tokenizer import check_tokenizer, write_tokenizer
from modelsurgery.errors import SurgeryError
from modelsurgery.memory import row_blocks
from modelsurgery.ops.quantize.packing import PackedWeight

NAME = "gguf"
FOLDER = False  # one .gguf file
BLOCK = 32
Q = gguf.GGMLQuantizationType

#: (bits, symmetric) -> block type and the GGUF file type the converter writes for it
TYPES = {(8, True): (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
         (4, True): (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
         (4, False): (Q.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1)}


# ----- scheme ---------------------------------------------------------------------------------------
def block_type(scheme) -> Q:
    """The GGUF block type holding ``scheme`` exactly, or a one-line refusal."""
    found = TYPES.get((scheme.bits, scheme.symmetric))
    if found is None or scheme.granularity != "group" or scheme.group_size != BLOCK:
        sym = "symmetric" if scheme.symmetric else "asymmetric"
        gran = scheme.granularity + (f" {scheme.group_size}" if scheme.granularity == "group" else "")
        raise SurgeryError(
            f"--format gguf stores Q8_0 (--bits 8, symmetric), Q4_0 (--bits 4, symmetric) or Q4_1 (--bits 4 "
            f"--asymmetric), all with --granularity group --group-size 32; got {scheme.bits}-bit {sym} {gran}")
    return found[0]


def check_scheme(scheme) -> None:
    block_type(scheme)


def stores_offset(scheme) -> bool:
    """Q4_1 stores m = -z * d in fp16: its scales keep fewer significant bits (common.storable_scale)."""
    return not scheme.symmetric


def check_model(config: dict, where: str) -> GGUFFamily:
    """The family's GGUF description, or a one-line refusal (``gguf_families.check_family``)."""
    return check_family(config, where)


# ----- blocks ---------------------------------------------------------------------------------------
def _nibbles(codes: np.ndarray) -> np.ndarray:
    """[rows, nb, 32] codes < 16 -> [rows, nb, 16] bytes (j low, j + 16 high)."""
    return (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8).reshape(*x.shape[:-1], 2)


def encode(w: PackedWeight, qtype: Q) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """uint8 [rows, n_blocks * block bytes] of ``w`` in ``qtype``, with the stored d (and Q4_1's m) as
    float32 [rows, n_blocks]. Raises when the grid is not the one the block type holds."""
    rows, length = w.rows, w.row_length
    nb = length // BLOCK
    if (w.group_size or length) != BLOCK or length % BLOCK:
        raise SurgeryError(f"tensor '{w.name}': GGUF blocks hold 32 weights; it has groups of {w.group_size or length}")
    codes = w.codes.reshape(rows, nb, BLOCK).astype(np.uint8, copy=False)
    zero = w.zero_point.reshape(rows, nb)
    d = fp16(w.scale.reshape(rows, nb))
    if qtype in (Q.Q8_0, Q.Q4_0):
        mid = 128 if qtype == Q.Q8_0 else 8
        if w.bits != (8 if qtype == Q.Q8_0 else 4) or (zero != mid).any():
            raise SurgeryError(f"tensor '{w.name}': {qtype.name} needs a symmetric {8 if mid == 128 else 4}-bit grid "
                               f"(zero point {mid})")
        qs = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8) if mid == 128 else _nibbles(codes)
        blocks = np.concatenate([_f16_bytes(d[..., None]), qs], axis=-1)
        return blocks.reshape(rows, -1), d, None
    if qtype == Q.Q4_1:
        if w.bits != 4:
            raise SurgeryError(f"tensor '{w.name}': Q4_1 needs a 4-bit grid")
        m = fp16(-zero.astype(np.float32) * d)
        blocks = np.concatenate([_f16_bytes(d[..., None]), _f16_bytes(m[..., None]), _nibbles(codes)], axis=-1)
        return blocks.reshape(rows, -1), d, m
    raise SurgeryError(f"GGUF type {qtype.name} is not written by modelsurgery")


def decode(raw: np.ndarray, qtype: Q, rows: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of ``encode``: codes uint8 [rows, length], scale float32 and zero point uint8 [rows, n_blocks]."""
    nb = length // BLOCK
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(rows, nb, -1)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    if qtype == Q.Q8_0:
        codes = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        zero = np.full((rows, nb), 128, np.uint8)
    else:
        start = 2 if qtype == Q.Q4_0 else 4
        qs = blocks[..., start:]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
        if qtype == Q.Q4_0:
            zero = np.full((rows, nb), 8, np.uint8)
        else:
            m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
            with np.errstate(divide="ignore", invalid="ignore"):
                zero = np.where(d > 0, np.round(-m / d), 0).clip(0, 15).astype(np.uint8)
    return codes.reshape(rows, length), d, zero


# ----- the converter's layout -----------------------------------------------------------------------
def llama3_rope_factors(config: dict) -> np.ndarray:
    """The ``rope_freqs.weight`` llama.cpp's converter writes for rope_type llama3 (LLaMA 3.1's frequency
    scaling): per rotary frequency, the factor llama.cpp divides it by (1 above the high-frequency
    wavelength, ``factor`` below the low one, smoothly interpolated between)."""
    rope = rope_of(config)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (float(rope["rope_theta"]) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factor, low, high = float(rope.get("factor", 8.0)), float(rope.get("low_freq_factor", 1.0)), \
        float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    factors = np.where(wavelen < old_context / high, 1.0,
                       np.where(wavelen > old_context / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


def rope_tensors(config: dict) -> dict[str, np.ndarray]:
    """The rope tensors the converter adds (LLaMA 3.1's rope_freqs, Phi-3 longrope's long/short factors)."""
    rope_type = rope_of(config).get("rope_type")
    if rope_type == "llama3":
        return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": llama3_rope_factors(config)}
    if rope_type == "longrope":
        return longrope_factors(config)
    return {}


def model_name(folder: Path | None) -> str | None:
    """``general.name`` as llama.cpp's converter writes it for the model in ``folder`` (``prepare_metadata``):
    for a cached hub snapshot the repo id (its ``--remote`` mode names the file after the id it reads);
    else what the gguf package's ``Metadata.load`` finds: the model card's ``name``/``model_name``, then
    config.json's ``_name_or_path`` when it is a hub id, then the folder's name, the last two in title
    form ('my-llama-merge' -> 'My Llama Merge'); else the folder's name. None without a folder."""
    if folder is None:
        return None
    folder = Path(os.path.abspath(folder))  # '.' or 'x/..' named after the folder they stand for (links kept)
    repo = hub_repo_of(folder)
    if repo is not None:
        return repo
    try:
        found = gguf.Metadata.load(model_path=folder).name
    except (yaml.YAMLError, UnicodeDecodeError):  # a model card the converter fails on: the rules without it
        found = gguf.Metadata.apply_metadata_heuristic(gguf.Metadata(), {}, gguf.Metadata.load_hf_parameters(folder),
                                                       folder).name
    return found or folder.name


def write_hparams(w: gguf.GGUFWriter, config: dict, name: str, file_type: int, fam: GGUFFamily) -> None:
    """The keys ``TextModel.set_gguf_parameters`` writes, the vocabulary size, and the family's own
    (``GGUFFamily.hparams``; ``LlamaModel``'s rope dimension count for the llama architecture)."""
    n_head = config["num_attention_heads"]
    rope = rope_of(config)
    w.add_name(name)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    if fam.arch != gguf.MODEL_ARCH.GPTNEOX:  # LayerNorm: its epsilon is the family's key
        w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    if config.get("head_dim") is not None or fam.norm_shift:  # Gemma's head_dim defaults to 256, not d / heads
        w.add_key_length(head_dim(config))
        w.add_value_length(head_dim(config))
    w.add_file_type(int(file_type))
    w.add_vocab_size(config["vocab_size"])  # llama.cpp's n_vocab when the file has no token list
    if fam.interleave_qk:
        w.add_rope_dimension_count(head_dim(config))
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    fam.hparams(w, config)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ----- writer ---------------------------------------------------------------------------------------
@dataclass
class _Planned:
    name: str
    shape: tuple[int, ...]  # numpy shape of the data written (bytes for quantized tensors)
    dtype: np.dtype
    nbytes: int
    raw_dtype: Q | None
    load: object


def write_gguf(src: DeploySource, out: str | Path, force: bool = False, tokenizer: str = "auto") -> DeployReport:
    """Write ``src`` to one GGUF file (atomic; refuses an existing output without ``force``)."""
    out = Path(out)
    config = src.config
    fam = check_model(config, str(src.ckpt.path))
    arch = fam.arch
    qtype = block_type(src.scheme)
    file_type = dict(TYPES.values())[qtype]
    check_tokenizer(src.folder, tokenizer)
    check_output(out, force, src.ckpt.source_files, folder=False)
    n_blocks = config["num_hidden_layers"]
    tmap = gguf.get_tensor_name_map(arch, n_blocks)
    quantized = src.quantized()
    errors: dict[str, float] = {}
    planned: list[_Planned] = []
    for name in src.tensor_names():
        if leaves_out(fam, name, config):
            continue
        gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise SurgeryError(f"tensor '{name}': no GGUF name for it in llama.cpp's {arch.name} tensor map")
        w = quantized.get(name)
        perm = row_order(fam, gname, w.rows if w is not None else src.ckpt.shape(name)[0], config)
        if w is not None:
            nbytes = w.rows * (w.row_length // BLOCK) * gguf.GGML_QUANT_SIZES[qtype][1]
            planned.append(_Planned(gname, (w.rows, nbytes // w.rows), np.dtype(np.uint8), nbytes, qtype,
                                    _quantized_loader(w, qtype, perm, errors)))
        else:
            info = src.ckpt.info(name)
            shift = value_shift(fam, name)
            dtype = np.dtype(np.float16) if info.dtype == torch.float16 and not shift else np.dtype(np.float32)
            planned.append(_Planned(gname, tuple(info.shape), dtype, math.prod(info.shape) * dtype.itemsize, None,
                                    _float_loader(src.ckpt, name, dtype, perm, shift)))
    for tname, factors in reversed(rope_tensors(config).items()):  # generate_extra_tensors in the converter
        planned.insert(0, _Planned(tname, factors.shape, np.dtype(np.float32), factors.nbytes, None,
                                   lambda factors=factors: factors))
    with atomic_path(out, force, is_dir=False) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        write_hparams(writer, config, model_name(src.model_folder or src.folder) or out.stem, file_type, fam)
        tok = write_tokenizer(writer, src.folder, config["vocab_size"], tokenizer)
        # the record every output of ours carries (tool version, parameters, sources with their sha256)
        writer.add_string("modelsurgery", Provenance(src.operation, {"format": NAME, **src.parameters},
                                                     src.source_files()).to_metadata()["modelsurgery"])
        writer.add_string("modelsurgery.quantization", json.dumps(
            {"format": NAME, "method": src.method, "type": qtype.name, **src.scheme.to_dict()}, sort_keys=True))
        for p in planned:
            writer.add_tensor_info(p.name, p.shape, p.dtype, p.nbytes, raw_dtype=p.raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p in planned:
            data = p.load()
            if data.nbytes != p.nbytes:
                raise SurgeryError(f"tensor '{p.name}': {data.nbytes} bytes, planned {p.nbytes}")
            writer.write_tensor_data(data)
            del data  # before the next one is made: one tensor's data at a time
        writer.close()
    return DeployReport(NAME, str(out), [str(out)], out.stat().st_size, len(src.weights), src.scheme.to_dict(),
                        max(errors.values(), default=0.0),
                        {"type": qtype.name, "architecture": gguf.MODEL_ARCH_NAMES[arch], "tokenizer": tok})


#: weights per slice of rows a loader converts at a time: its temporaries stay a few MB beside the output
CHUNK = 1 << 20


def _row_slices(rows: int, row_size: int, perm: np.ndarray | None) -> list[tuple[int, int, slice | np.ndarray]]:
    """The output's rows in slices of about ``CHUNK`` elements: (start, stop, the source rows they take)."""
    return [(a, b, perm[a:b] if perm is not None else slice(a, b)) for a, b in row_blocks(0, rows, row_size, CHUNK)]


def _quantized_loader(ref: PackedWeight | PackedRef, qtype: Q, perm, errors: dict[str, float]):
    """The tensor's blocks, encoded a slice of rows at a time into the output array: beside it, the scales
    and zero points and one slice's bit streams and temporaries (an in-memory weight: its codes), not
    the whole weight's codes unpacked and copied."""
    def load() -> np.ndarray:
        w = ref if isinstance(ref, PackedRef) else loaded(ref)
        scale, zero, length = w.scale, w.zero_point, w.row_length  # a PackedRef reads them when asked
        if isinstance(w, PackedRef):  # the bit streams read a slice of rows at a time, as the floats are
            qweight = w.name + ".qweight"
            read = _source_rows(w.ckpt, qweight, tuple(w.ckpt.shape(qweight)), torch.uint8)
            codes_of = lambda rows: unpack_stream(read(rows).numpy(), w.bits, length)
        else:
            codes_of = lambda rows: w.codes[rows]
        out = np.empty((w.rows, length // BLOCK * gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8)
        worst = 0.0
        for start, stop, rows in _row_slices(w.rows, length, perm):
            part = PackedWeight(w.name, (stop - start, length), w.bits, w.group_size, codes_of(rows), scale[rows],
                                zero[rows])
            out[start:stop], d, m = encode(part, qtype)
            worst = max(worst, scale_rounding_error(part, d, m))
        errors[w.name] = worst
        return out
    return load


def _float_loader(ckpt, name: str, dtype: np.dtype, perm, shift: float = 0.0):
    """The tensor converted to ``dtype`` (plus ``shift``) a slice of rows at a time into the output array,
    read from its file a slice at a time: the output is the only whole-tensor copy. Nothing is added
    without a shift (-0.0 stays -0.0, as the converter's float32 copy keeps it)."""
    def load() -> np.ndarray:
        info = ckpt.info(name)
        shape = tuple(info.shape) or (1,)
        out = np.empty(shape, dtype)
        target = torch.from_numpy(out)
        read = _source_rows(ckpt, name, shape, info.dtype)
        for start, stop, rows in _row_slices(shape[0], math.prod(shape[1:]), perm):
            target[start:stop] = read(rows).float() + shift if shift else read(rows)  # converted as copied
        return out.reshape(tuple(info.shape))
    return load


def _source_rows(ckpt, name: str, shape: tuple[int, ...], dtype: torch.dtype):
    """rows (a slice or indices) -> those rows of the stored tensor, read from its safetensors file into a
    buffer of their size (one read per run of consecutive rows), else from the tensor ``read_tensor`` gives."""
    where = ckpt.byte_range(name)
    if where is None:
        whole = read_tensor(ckpt, name).reshape(shape)
        return lambda rows: whole[rows if isinstance(rows, slice) else torch.from_numpy(rows)]
    file, offset, _ = where
    row_bytes = math.prod(shape[1:]) * dtype.itemsize

    def read(rows: slice | np.ndarray) -> torch.Tensor:
        index = np.arange(rows.start, rows.stop) if isinstance(rows, slice) else np.asarray(rows)
        order = np.argsort(index, kind="stable")
        wanted = index[order]
        buf = np.empty(len(index) * row_bytes, np.uint8)
        at = 0
        with open(file, "rb") as f:
            for run in np.split(wanted, np.flatnonzero(np.diff(wanted) != 1) + 1):
                f.seek(offset + int(run[0]) * row_bytes)
                if f.readinto(memoryview(buf)[at: at + len(run) * row_bytes]) != len(run) * row_bytes:
                    raise SurgeryError(f"{file}: tensor '{name}' ends before its {shape[0]} rows (truncated file?)")
                at += len(run) * row_bytes
        part = torch.from_numpy(buf).view(dtype).reshape(len(index), *shape[1:])
        return part if isinstance(rows, slice) else part[torch.from_numpy(np.argsort(order))]
    return read


# ----- reader ---------------------------------------------------------------------------------------
def read_gguf(path: str | Path) -> dict:
    """The GGUF file's metadata (scalars and short arrays) and tensors (name, type, shape), read with
    the ``gguf`` package's reader; ``modelsurgery.quantization`` parsed when present."""
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise SurgeryError(f"{path}: not a readable GGUF file ({e})") from None
    fields = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if isinstance(value, list) and len(value) > 8:
            value = f"[{len(value)} items]"
        fields[key] = value
    tensors = [{"name": t.name, "type": t.tensor_type.name, "shape": [int(x) for x in reversed(t.shape)],
                "bytes": int(t.n_bytes)} for t in reader.tensors]
    quant = fields.get("modelsurgery.quantization")
    return {"metadata": fields, "tensors": tensors, "quantization": json.loads(quant) if quant else None}


def read_weight(path: str | Path, gguf_name: str) -> PackedWeight:
    """One quantized tensor of a GGUF file back in our representation (rows in the file's order)."""
    reader = gguf.GGUFReader(path)
    for t in reader.tensors:
        if t.name == gguf_name:
            qtype = Q(t.tensor_type)
            if qtype not in (Q.Q8_0, Q.Q4_0, Q.Q4_1):
                raise SurgeryError(f"{path}: tensor '{gguf_name}' is {qtype.name}, not Q8_0, Q4_0 or Q4_1")
            length, rows = int(t.shape[0]), int(math.prod(t.shape[1:]))
            codes, d, zero = decode(np.asarray(t.data), qtype, rows, length)
            return PackedWeight(gguf_name, (rows, length), 8 if qtype == Q.Q8_0 else 4, BLOCK, codes, d, zero)
    raise SurgeryError(f"{path}: no tensor '{gguf_name}'")


def inspect_report(path: str | Path):
    """``surgery inspect`` of a GGUF file: its tensors grouped by block, metadata, format and scheme."""
    from modelsurgery.ops.inspect import InspectReport

    info = read_gguf(path)
    meta = info["metadata"]
    arch = meta.get("general.architecture", "?")
    groups: dict[str, list[dict]] = {}
    dtypes: dict[str, int] = {}
    for t in info["tensors"]:
        numel = math.prod(t["shape"])
        dtypes[t["type"]] = dtypes.get(t["type"], 0) + numel
        parts = t["name"].split(".")
        group = f"block {parts[1]}" if parts[0] == "blk" else parts[0]
        groups.setdefault(group, []).append({"name": t["name"], "shape": t["shape"], "dtype": t["type"],
                                             "parameters": numel, "bytes": t["bytes"]})
    quantization = info["quantization"] or {"format": NAME}
    file_type = meta.get("general.file_type")
    if file_type is not None:
        quantization["file_type"] = gguf.LlamaFileType(file_type).name
    return InspectReport(
        path=str(path),
        family={"family": f"gguf:{arch}", "num_layers": meta.get(f"{arch}.block_count"),
                "hidden_size": meta.get(f"{arch}.embedding_length")},
        num_parameters=sum(dtypes.values()), num_bytes=Path(path).stat().st_size,
        num_tensors=len(info["tensors"]), dtypes=dtypes, groups=groups,
        metadata={k: v for k, v in meta.items() if not k.startswith("modelsurgery")},
        provenance=json.loads(meta["modelsurgery"]) if "modelsurgery" in meta else None,
        quantization=quantization, files=[str(path)])
