"""mergekit's YAML merge configuration, read as mergekit reads it, for the subset we implement.

Keys and methods we do not implement are refused in one line that names them; nothing is
silently ignored. ``models:`` becomes one output slice over every model's whole layer range
with the base model appended when it is not listed (mergekit ``MergePlanner.normalize_config``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from modelsurgery.checkpoint.writer import FLOAT_DTYPES
from modelsurgery.errors import SurgeryError
from modelsurgery.recipe.settings import check_setting, read_numbers


@dataclass(frozen=True)
class MethodSpec:
    """A mergekit method as we run it: its global and per-model parameters with mergekit's defaults."""

    name: str
    ours: str | None  # the modelsurgery.ops.merge method it runs on (None: passthrough)
    global_params: dict[str, Any]
    tensor_params: dict[str, Any]  # REQUIRED marks a parameter without default
    needs_base: bool = False


REQUIRED = object()
_GTA_GLOBAL = {"int8_mask": False, "rescale": False, "lambda": 1.0}
METHODS = {
    "linear": MethodSpec("linear", "linear", {"normalize": True}, {"weight": REQUIRED}),
    "slerp": MethodSpec("slerp", "slerp", {"t": REQUIRED}, {}, needs_base=True),
    "passthrough": MethodSpec("passthrough", None, {}, {"scale": None}),
    "task_arithmetic": MethodSpec("task_arithmetic", "task-arithmetic", {**_GTA_GLOBAL, "normalize": False},
                                  {"weight": REQUIRED, "density": 1.0}, needs_base=True),
    "ties": MethodSpec("ties", "ties", {**_GTA_GLOBAL, "normalize": True},
                       {"weight": REQUIRED, "density": 1.0}, needs_base=True),
}
#: mergekit methods we know of and refuse (the rest are refused as unknown)
REFUSED_METHODS = ("dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
                   "model_stock", "nuslerp", "multislerp", "karcher", "arcee_fusion", "sce", "nearswap", "ram")
TOP_KEYS = ("merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype",
            "tokenizer_source")
REFUSED_KEYS = ("modules", "tokenizer", "chat_template")
#: the dtype names mergekit's dtype/out_dtype take: the same table as every command's --dtype
DTYPES = FLOAT_DTYPES


@dataclass
class Source:
    model: str
    layer_range: tuple[int, int] | None  # None: the model's whole stack (``models:`` form)
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class OutSlice:
    sources: list[Source]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergekitConfig:
    method: MethodSpec
    slices: list[OutSlice]
    from_models: bool  # written with models: (one slice over whole stacks)
    base_model: str | None
    parameters: dict[str, Any]
    dtype: torch.dtype | None
    out_dtype: torch.dtype | None
    tokenizer_source: str | None
    raw: dict

    def referenced_models(self) -> list[str]:
        """Every model in order of first mention (base first): the donor of config and tokenizer is the first."""
        names = [self.base_model] if self.base_model else []
        for s in self.slices:
            names += [s.base_model] if s.base_model else []
            names += [src.model for src in s.sources]
        return list(dict.fromkeys(names))


def is_mergekit_config(doc: Any) -> bool:
    return isinstance(doc, dict) and "merge_method" in doc


def _keys(obj: Any, allowed: tuple[str, ...], where: str) -> dict:
    if not isinstance(obj, dict):
        raise SurgeryError(f"{where}: expected a mapping, got {obj!r}")
    for k in obj:
        if k not in allowed:
            raise SurgeryError(f"{where}: mergekit key '{k}' is not supported by surgery run "
                               f"(supported here: {', '.join(allowed)})")
    return obj


def _model(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise SurgeryError(f"{where}: model {value!r} is not a path")
    return value


def _params(obj: Any, method: MethodSpec, where: str, per_model: bool) -> dict:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise SurgeryError(f"{where}: parameters must be a mapping, got {obj!r}")
    allowed = method.tensor_params if per_model else {**method.global_params, **method.tensor_params}
    obj = {name: read_numbers(setting) for name, setting in obj.items()}
    for name, setting in obj.items():
        if name not in allowed:
            if per_model and name in method.global_params:
                raise SurgeryError(f"{where}: parameter '{name}' of {method.name} applies to the whole merge; "
                                   "put it under the top-level or slice parameters")
            known = ", ".join(allowed) or "none"
            raise SurgeryError(f"{where}: parameter '{name}' is not a parameter of merge_method {method.name} "
                               f"(its parameters: {known})")
        check_setting(setting, f"{where}: parameter '{name}'")
    return dict(obj)


def _layer_range(value: Any, where: str) -> tuple[int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value) or value[0] > value[1]
            or value[0] < 0):
        raise SurgeryError(f"{where}: layer_range {value!r}: expected [start, end] with 0 <= start <= end")
    return int(value[0]), int(value[1])


def _dtype(value: Any, key: str) -> torch.dtype | None:
    if value is None:
        return None
    if value not in DTYPES:
        raise SurgeryError(f"{key} '{value}': expected one of {', '.join(DTYPES)}")
    return DTYPES[value]


def parse_config(doc: dict, where: str = "recipe") -> MergekitConfig:
    """Validate a mergekit config mapping; every refusal names the key, method or parameter."""
    for k in doc:
        if k in REFUSED_KEYS or k not in TOP_KEYS:
            raise SurgeryError(f"{where}: mergekit key '{k}' is not supported by surgery run "
                               f"(supported: {', '.join(TOP_KEYS)})")
    name = doc["merge_method"]
    if name not in METHODS:
        known = "a mergekit method we do not implement" if name in REFUSED_METHODS else "not a mergekit method"
        raise SurgeryError(f"{where}: merge_method '{name}' is {known} (supported: {', '.join(METHODS)})")
    method = METHODS[name]
    if ("models" in doc) == ("slices" in doc):
        raise SurgeryError(f"{where}: give exactly one of 'models' or 'slices'")
    base = _model(doc["base_model"], f"{where}: base_model") if doc.get("base_model") is not None else None
    parameters = _params(doc.get("parameters"), method, f"{where}: parameters", per_model=False)
    if "models" in doc:
        models = doc["models"]
        if not isinstance(models, list) or not models:
            raise SurgeryError(f"{where}: models must be a non-empty list")
        sources = []
        for i, m in enumerate(models):
            w = f"{where}: models[{i}]"
            m = _keys(m, ("model", "parameters"), w)
            sources.append(Source(_model(m.get("model"), w), None,
                                  _params(m.get("parameters"), method, w, per_model=True)))
        if base and base not in [s.model for s in sources]:
            sources.append(Source(base, None, {}))
        slices = [OutSlice(sources)]
    else:
        if not isinstance(doc["slices"], list) or not doc["slices"]:
            raise SurgeryError(f"{where}: slices must be a non-empty list")
        slices = []
        for i, s in enumerate(doc["slices"]):
            w = f"{where}: slices[{i}]"
            s = _keys(s, ("sources", "base_model", "parameters"), w)
            if not isinstance(s.get("sources"), list) or not s["sources"]:
                raise SurgeryError(f"{w}: sources must be a non-empty list")
            srcs = []
            for j, src in enumerate(s["sources"]):
                ws = f"{w}.sources[{j}]"
                src = _keys(src, ("model", "layer_range", "parameters"), ws)
                if "layer_range" not in src:
                    raise SurgeryError(f"{ws}: layer_range is required in a slice source")
                srcs.append(Source(_model(src.get("model"), ws), _layer_range(src["layer_range"], ws),
                                   _params(src.get("parameters"), method, ws, per_model=True)))
            lengths = {r.layer_range[1] - r.layer_range[0] for r in srcs}
            if len(lengths) != 1:
                raise SurgeryError(f"{w}: all sources of a slice must span the same number of layers, "
                                   f"got {sorted(lengths)}")
            slice_base = _model(s["base_model"], f"{w}: base_model") if s.get("base_model") is not None else None
            slices.append(OutSlice(srcs, slice_base, _params(s.get("parameters"), method, w, per_model=False)))
    for i, s in enumerate(slices):
        b = s.base_model or base
        names = [src.model for src in s.sources]
        twice = next((m for j, m in enumerate(names) if m in names[:j]), None)
        if twice is not None:  # inputs are keyed by model (in mergekit too): one of the two would be dropped
            raise SurgeryError(f"{where}: slices[{i}]: model '{twice}' is listed twice; a merge takes each model "
                               "once (give a copy of it another path to merge two of its layer ranges)")
        if method.needs_base and b is None:
            raise SurgeryError(f"{where}: merge_method {name} needs base_model")
        if method.needs_base and b not in names:
            raise SurgeryError(f"{where}: slices[{i}]: base_model '{b}' is not among the slice's sources")
        if name == "slerp" and len(names) != 2:
            raise SurgeryError(f"{where}: slices[{i}]: slerp merges exactly two models, got {len(names)}")
        if name == "passthrough" and len(names) != 1:
            raise SurgeryError(f"{where}: slices[{i}]: passthrough takes exactly one source, got {len(names)}")
    tok = doc.get("tokenizer_source")
    if tok is not None and tok not in ("base", "union"):
        raise SurgeryError(f"{where}: tokenizer_source '{tok}' is not supported (supported: base, union)")
    if tok == "base" and base is None:
        raise SurgeryError(f"{where}: tokenizer_source: base needs base_model")
    return MergekitConfig(method, slices, "models" in doc, base, parameters, _dtype(doc.get("dtype"), "dtype"),
                          _dtype(doc.get("out_dtype"), "out_dtype"), tok, doc)

