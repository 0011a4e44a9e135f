"""Inspect a checkpoint from its headers: tensors grouped by block, totals, family, provenance."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.families import detect_family


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


def inspect_checkpoint(path: str | Path, model: str | None = None) -> InspectReport:
    """Read only headers (and config.json): nothing is loaded for safetensors inputs."""
    if Path(path).suffix == ".gguf":
        from modelsurgery.deploy.gguf import inspect_report

        return inspect_report(path)
    ckpt = Checkpoint.open(path)
    family = detect_family(ckpt, model)
    groups: dict[str, list[dict]] = {}
    dtypes: dict[str, int] = {}
    for info in ckpt.infos.values():
        dt = info.dtype_name
        dtypes[dt] = dtypes.get(dt, 0) + info.numel
        groups.setdefault(_group_of(family, info.name), []).append(
            {"name": info.name, "shape": list(info.shape), "dtype": dt, "parameters": info.numel,
             "bytes": info.nbytes}
        )
    metadata = {k: v for k, v in ckpt.metadata.items() if not k.startswith("modelsurgery")}
    return InspectReport(
        path=str(path),
        family=family.describe(),
        num_parameters=ckpt.num_parameters,
        num_bytes=ckpt.nbytes,
        num_tensors=len(ckpt),
        dtypes=dtypes,
        groups=groups,
        metadata=metadata,
        provenance=_json_field(ckpt.metadata, "modelsurgery"),
        quantization=(_json_field(ckpt.metadata, "modelsurgery.quantization")
                      or (ckpt.config or {}).get("quantization_config")),  # GPTQ, compressed-tensors
        files=[str(f) for f in ckpt.source_files],
    )
