"""Inspect a checkpoint from its headers: tensors grouped by block, totals, family, provenance."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.checkpoint.foreign import foreign_quantization
from modelsurgery.checkpoint.formats import TensorInfo
from modelsurgery.errors import SurgeryError
from modelsurgery.families import identify_family

# The packed format's record, as its owner ``ops.quantize.packing`` writes it (METADATA_KEY, SUFFIXES,
# read_scheme), spelled out here because importing ops.quantize imports torch: inspect reads a float or a
# packed checkpoint's headers without it. tests/test_startup.py checks each against the owner's.
#: packing.METADATA_KEY
QUANTIZATION_KEY = "modelsurgery.quantization"
#: packing.SUFFIXES: the stored parts of a packed ``X.weight`` (codes, scale, zero point)
PACKED_SUFFIXES = (".qweight", ".scale", ".zero_point")


def read_record(metadata: dict, source: object = "checkpoint") -> dict | None:
    """packing.read_scheme: the parsed quantization record of ``metadata``, or None for a float checkpoint."""
    raw = metadata.get(QUANTIZATION_KEY)
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise SurgeryError(f"{source}: metadata '{QUANTIZATION_KEY}' is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("layers"), dict):
        raise SurgeryError(f"{source}: metadata '{QUANTIZATION_KEY}' has no 'layers' table")
    return meta


@dataclass
class InspectReport:
    path: str
    family: dict
    num_parameters: int
    num_bytes: int
    num_tensors: int
    dtypes: dict[str, int]
    groups: dict[str, list[dict]]
    metadata: dict = field(default_factory=dict)
    provenance: dict | None = None
    quantization: dict | None = None
    files: list[str] = field(default_factory=list)
    #: a quantized checkpoint's scheme in short (format, method, bits, granularity, group size,
    #: symmetric, quantized weights, float matrices kept); None for a float checkpoint
    scheme: dict | None = None
    #: each quantized weight ``X.weight``: its stored ``shape``, ``bits`` and ``group_size``
    quantized_layers: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        tensors = [t for g in self.groups.values() for t in g]
        return {
            "path": self.path,
            "family": self.family["family"],
            "family_info": self.family,
            "num_layers": self.family.get("num_layers"),
            "hidden_size": self.family.get("hidden_size"),
            "features": self.family.get("features", []),
            "num_parameters": self.num_parameters,
            "num_bytes": self.num_bytes,
            "num_tensors": self.num_tensors,
            "dtypes": self.dtypes,
            "groups": {k: [t["name"] for t in v] for k, v in self.groups.items()},
            "tensors": tensors,
            "metadata": self.metadata,
            "provenance": self.provenance,
            "quantization": self.quantization,
            "scheme": self.scheme,
            "quantized_layers": self.quantized_layers,
            "files": self.files,
        }


def _group_of(family, name: str) -> str:
    where = family.block_of(name)
    if where is not None:
        return f"block {where[0]}"
    return name.rsplit(".", 1)[0] if "." in name else "(top level)"


def _json_field(metadata: dict, key: str) -> dict | None:
    if key not in metadata:
        return None
    try:
        return json.loads(metadata[key])
    except ValueError:
        return {"raw": metadata[key]}


def _foreign(ckpt: Checkpoint) -> dict | None:
    """Another tool's quantized tensors without a config.json saying so (bitsandbytes '.SCB'): what every other
    command refuses them for."""
    foreign = foreign_quantization(ckpt)
    return None if foreign is None else {"format": "another tool's", "refused": foreign}


def _is_float(dtype_name: str) -> bool:
    return dtype_name.startswith(("float", "bfloat"))


@dataclass
class QuantizedLayout:
    """The weights a quantized checkpoint stands for: ``weights`` maps each quantized ``X.weight`` to
    its stored shape, bits and group size; ``parts`` each stored tensor of one (codes, scales, zero
    points) to the weight it holds; ``scheme`` the short description ``surgery inspect`` shows."""

    weights: dict[str, dict]
    parts: dict[str, str]
    scheme: dict

    def float_checkpoint(self, ckpt: Checkpoint) -> Checkpoint:
        """``ckpt`` seen with each quantized weight as a float ``X.weight`` of its stored shape, at the
        position of its first part (names and shapes only: what family detection reads)."""
        infos: OrderedDict[str, TensorInfo] = OrderedDict()
        for name, info in ckpt.infos.items():
            weight = self.parts.get(name)
            if weight is None:
                infos[name] = info
            elif weight not in infos:
                infos[weight] = TensorInfo(weight, tuple(self.weights[weight]["shape"]), "float32", info.file)
        return Checkpoint(ckpt.path, infos, ckpt.metadata, ckpt.config, ckpt.folder)


def _layers_of(record: dict, where: object) -> dict[str, dict]:
    """The per-weight entries of a quantization record, checked enough to trust their shapes."""
    out = {}
    for name, layer in record["layers"].items():
        shape = (layer or {}).get("shape") if isinstance(layer, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise SurgeryError(f"{where}: quantized weight '{str(name)[:200]}' has no stored shape in its metadata")
        out[name] = {"shape": shape, "bits": layer.get("bits", record.get("bits")),
                     "group_size": layer.get("group_size", record.get("group_size"))}
    return out


def quantized_layout(ckpt: Checkpoint) -> QuantizedLayout | None:
    """How ``ckpt`` stores quantized weights, from headers and metadata (None for a float checkpoint).

    modelsurgery's record (``modelsurgery.quantization``, owned by ``ops.quantize.packing``) lists every
    quantized weight with its shape, for the packed format and for the GPTQ and compressed-tensors folders
    ``surgery quantize`` writes; another tool's GPTQ or compressed-tensors folder is read by
    ``modelsurgery.deploy`` (which reads its tensors)."""
    qc = (ckpt.config or {}).get("quantization_config")
    if QUANTIZATION_KEY not in ckpt.metadata and not isinstance(qc, dict):
        return None  # a float checkpoint: nothing quantization-related is imported (torch, numpy)
    record = read_record(ckpt.metadata, ckpt.path)
    if record is not None:
        fmt = str(record.get("format", "packed"))
        weights = _layers_of(record, ckpt.path)
        scheme = {"format": fmt, "method": record.get("method"), "granularity": record.get("granularity"),
                  "group_size": record.get("group_size"), "symmetric": record.get("symmetric")}
    else:
        from modelsurgery.deploy import FORMATS, read_deployed

        fmt = str(qc.get("quant_method") or qc.get("format") or "unknown")
        deployed = read_deployed(ckpt) if fmt in FORMATS else None
        if deployed is None:  # a quantization this tool does not read: say what config.json says
            return QuantizedLayout({}, {}, {"format": fmt, "bits": qc.get("bits"), "quantized_weights": None})
        weights = {w.name: {"shape": list(w.shape), "bits": w.bits, "group_size": w.group_size} for w in deployed}
        granularities = sorted({w.granularity for w in deployed})
        sym = qc.get("sym", next((g.get("weights", {}).get("symmetric") for g in qc.get("config_groups", {}).values()
                                  if isinstance(g, dict)), None))
        scheme = {"format": fmt, "method": None, "granularity": ",".join(granularities) or None,
                  "group_size": qc.get("group_size"), "symmetric": sym}
    parts: dict[str, str] = {}
    if fmt == "packed":
        parts = {w + s: w for w in weights for s in PACKED_SUFFIXES}
    elif fmt != "fake":  # GPTQ or compressed-tensors: the format's owner in deploy (torch) names the parts
        from modelsurgery.deploy import FORMATS

        suffixes = getattr(FORMATS.get(fmt), "SUFFIXES", ())
        parts = {w.removesuffix(".weight") + s: w for w in weights for s in suffixes}
    parts = {k: v for k, v in parts.items() if k in ckpt}
    missing = [w for w in weights if fmt != "fake" and w not in parts.values()]
    if missing:
        raise SurgeryError(f"{ckpt.path}: quantized weight '{missing[0][:200]}' is listed in the metadata but none "
                           "of its tensors is in the checkpoint")
    bits = sorted({int(w["bits"]) for w in weights.values() if isinstance(w["bits"], int)})
    quantized = set(weights)
    kept = [n for n, i in ckpt.infos.items()
            if n not in parts and n not in quantized and _is_float(i.dtype_name) and len(i.shape) >= 2]
    if scheme.get("granularity") != "group":
        scheme["group_size"] = None
    scheme = {**scheme, "bits": bits[0] if len(bits) == 1 else bits, "quantized_weights": len(weights),
              "kept_float": kept}
    return QuantizedLayout(weights, parts, scheme)


def inspect_checkpoint(path: str | Path, model: str | None = None) -> InspectReport:
    """Read only headers (and config.json): nothing is loaded for safetensors inputs. A quantized
    checkpoint is shown as the model it stands for: family and blocks from its weights' names (the
    codes, scales and zero points of ``X.weight`` stand for ``X.weight``), parameters counted once per
    weight (on its first stored part), and the scheme summarised."""
    if Path(path).suffix == ".gguf":
        from modelsurgery.deploy.gguf import inspect_report

        report = inspect_report(path)
        report.scheme = {k: v for k, v in (report.quantization or {}).items() if not isinstance(v, (dict, list))}
        return report
    ckpt = Checkpoint.open(path)
    layout = quantized_layout(ckpt)
    family = identify_family(layout.float_checkpoint(ckpt) if layout else ckpt, model)
    groups: dict[str, list[dict]] = {}
    dtypes: dict[str, int] = {}
    num_parameters = 0
    first_parts: set[str] = set()
    aliases = ckpt.aliases()  # a tied head pickled as the embedding's own data: counted once, as stored
    # the file's names, the tied ones too (the checkpoint reads them as tied, not as tensors of their own)
    stored = [*ckpt.infos.values(), *(replace(ckpt.info(first), name=name) for name, first in ckpt.tied.items())]
    num_bytes = sum(i.nbytes for i in stored if i.name not in aliases)
    for info in stored:
        weight = layout.parts.get(info.name) if layout else None
        entry = {"name": info.name, "shape": list(info.shape), "dtype": info.dtype_name,
                 "parameters": info.numel, "bytes": info.nbytes}
        if info.name in aliases:
            entry.update(parameters=0, bytes=0, tied_to=aliases[info.name])
        elif weight is not None:  # the weight's parameters count once, on its first stored part
            w = layout.weights[weight]
            entry["quantized_weight"] = weight
            entry["parameters"] = 0 if weight in first_parts else math.prod(w["shape"])
            first_parts.add(weight)
            if entry["parameters"]:
                key = f"{w['bits']}-bit"
                dtypes[key] = dtypes.get(key, 0) + entry["parameters"]
        else:
            dtypes[info.dtype_name] = dtypes.get(info.dtype_name, 0) + info.numel
        num_parameters += entry["parameters"]
        groups.setdefault(_group_of(family, weight or info.name), []).append(entry)
    metadata = {k: v for k, v in ckpt.metadata.items() if not k.startswith("modelsurgery")}
    return InspectReport(
        path=str(path),
        family=family.describe(),
        num_parameters=num_parameters,
        num_bytes=num_bytes,
        num_tensors=len(stored),
        dtypes=dtypes,
        groups=groups,
        metadata=metadata,
        provenance=_json_field(ckpt.metadata, "modelsurgery"),
        quantization=(_json_field(ckpt.metadata, QUANTIZATION_KEY)
                      or (ckpt.config or {}).get("quantization_config")  # GPTQ, compressed-tensors
                      or _foreign(ckpt)),
        scheme=layout.scheme if layout else None,
        quantized_layers=layout.weights if layout else {},
        files=[str(f) for f in ckpt.source_files],
    )
