"""Run a mergekit config tensor by tensor on our merge methods (mergekit ``plan.py`` semantics).

Output tensors come in mergekit's order: the pre-block tensors (embeddings) from the first
slice's models, then every slice's layers (output layer k counts across slices; its inputs are
each source's layer ``layer_range[0] + i``), then the post-block tensors (final norm, head) from
the last slice's models. Parameters are evaluated per tensor: global ones by the output tensor's
name, per-model ones by that model's input tensor name, at the layer's position t in its slice
(t = 0 for pre and post tensors). Each merged tensor is computed in float32 from inputs cast to
``dtype`` and written as ``out_dtype`` (else ``dtype``, else the inputs' dtype); ``--dtype`` / a step's
``dtype:`` option sets ``out_dtype`` and must agree with it when the config gives one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modelsurgery.checkpoint import Checkpoint, PlannedTensor, Provenance, check_output, write_checkpoint
from modelsurgery.checkpoint.writer import WriteOptions, dtype_name, float_dtype
from modelsurgery.errors import SurgeryError
from modelsurgery.families import detect_family
from modelsurgery.ops.float_input import float_view
from modelsurgery.ops.merge import get_method
from modelsurgery.ops.merge.configs import compare_configs, config_file
from modelsurgery.ops.merge.ties import trim
from modelsurgery.recipe.mergekit_config import REQUIRED, MergekitConfig, OutSlice
from modelsurgery.recipe.settings import evaluate_setting, is_gradient, layer_position


@dataclass
class TensorJob:
    """One output tensor: where its inputs come from and the values of every parameter for it."""

    name: str
    inputs: list[tuple[str, str]]  # (model, input tensor name), in source order
    base: str | None
    global_params: dict[str, Any]
    model_params: dict[str, dict[str, Any]] = field(default_factory=dict)


def _lookup(scopes: list[dict], name: str, tensor: str, t: float) -> Any:
    for scope in scopes:
        if name in scope:
            value = evaluate_setting(scope[name], tensor, t)
            if value is not None:
                return value
    return None


def _job(cfg: MergekitConfig, out_slice: OutSlice, name: str, inputs: list[tuple[str, str]], t: float) -> TensorJob:
    base = out_slice.base_model or cfg.base_model
    global_scopes = [out_slice.parameters, cfg.parameters]
    gp = {}
    for p, default in cfg.method.global_params.items():
        value = _lookup(global_scopes, p, name, t)
        if value is None and default is REQUIRED:
            raise SurgeryError(f"merge_method {cfg.method.name}: parameter '{p}' is required (tensor '{name}')")
        gp[p] = default if value is None else value
    mp: dict[str, dict[str, Any]] = {}
    for model, in_name in inputs:
        src = next(s for s in out_slice.sources if s.model == model)
        values = {}
        for p, default in cfg.method.tensor_params.items():
            value = _lookup([src.parameters, *global_scopes], p, in_name, t)
            if value is None and default is REQUIRED and model != base:
                raise SurgeryError(f"merge_method {cfg.method.name}: parameter '{p}' is required for model "
                                   f"'{model}' (tensor '{in_name}')")
            values[p] = default if value is None else value
        mp[model] = values
    return TensorJob(name, inputs, base, gp, mp)


class MergekitPlan:
    """The tensors a config produces, each with its inputs and parameter values."""

    def __init__(self, cfg: MergekitConfig):
        self.cfg = cfg
        self.ckpts: dict[str, Checkpoint] = {}
        self.notes: list[str] = []  # packed inputs: dequantized, the output is float
        self.donor = cfg.referenced_models()[0]
        self.jobs: list[TensorJob] = []
        self.num_layers = 0
        self.layer_sources: list[list[tuple[str, int]]] = []  # per output layer: (model, its layer index)
        try:
            for m in cfg.referenced_models():
                if not Path(m).exists():
                    raise SurgeryError(f"model '{m}': no such file or folder (surgery run reads local checkpoints; "
                                       "it does not download)")
                ckpt = Checkpoint.open(m)
                try:  # as `surgery merge` reads it: packed weights dequantized, other tools' quantization refused
                    self.ckpts[m], note = float_view(ckpt, "run")
                except BaseException:
                    ckpt.close()
                    raise
                if note:
                    self.notes.append(note)
            self.families = {m: detect_family(c) for m, c in self.ckpts.items()}
            self._plan()
            # heads, activation, ... must agree across every source; per-layer lists (layer_types) are compared
            # layer by layer where slices put them (output_config)
            per_layer = {k for fam in self.families.values() for k in fam.per_layer_keys}
            self.config_differences = compare_configs([(self.ckpts[m], self.families[m]) for m in self.ckpts],
                                                      skip=per_layer)
        except BaseException:
            self.close()
            raise

    def _block_suffixes(self, model: str, index: int) -> list[str]:
        fam = self.families[model]
        blocks = fam.blocks()
        if not blocks:
            raise SurgeryError(f"model '{model}': family '{fam.name}' has no block stack to slice")
        if index >= len(blocks):
            raise SurgeryError(f"model '{model}': layer {index} is out of range (it has {len(blocks)} layers)")
        return [fam.block_of(n)[1] for n in blocks[index].names]

    def _plan(self) -> None:
        cfg = self.cfg
        for s in cfg.slices:
            for src in s.sources:
                n = len(self.families[src.model].blocks())
                if src.layer_range is None:
                    src.layer_range = (0, n)
                elif src.layer_range[1] > 0 and n == 0:
                    raise SurgeryError(f"model '{src.model}': family '{self.families[src.model].name}' has no layer "
                                       f"stack known here, so layer_range {list(src.layer_range)} cannot be sliced")
                elif src.layer_range[1] > n:
                    raise SurgeryError(f"model '{src.model}': layer_range {list(src.layer_range)} is past its "
                                       f"{n} layers")
            lengths = {src.model: src.layer_range[1] - src.layer_range[0] for src in s.sources}
            if len(set(lengths.values())) > 1:
                raise SurgeryError(f"models {', '.join(f'{m} ({n} layers)' for m, n in lengths.items())}: every model "
                                   "of a merge needs the same number of layers (use slices: to pick layer ranges)")
        self._check_gradients()
        donor_fam = self.families[self.donor]
        first, last = cfg.slices[0], cfg.slices[-1]
        outside = [n for n in self.ckpts[self.donor] if donor_fam.block_of(n) is None]
        embeds = set(donor_fam.embedding_names())
        for model in dict.fromkeys(src.model for src in [*first.sources, *last.sources]):  # embeddings', head's
            fam = self.families[model]
            extra = next((n for n in self.ckpts[model] if fam.block_of(n) is None and n not in outside), None)
            if extra is not None:
                raise SurgeryError(f"model '{model}': tensor '{extra}' is not in '{self.donor}' (whose config.json "
                                   "the output gets): the models differ in architecture (a tied and an untied head?)")
        pre = [n for n in outside if n in embeds]
        post = [n for n in outside if n not in embeds]
        for name in pre:
            self.jobs.append(_job(cfg, first, name, self._same_name(first, name), 0.0))
        out_layer = 0
        for s in cfg.slices:
            length = s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
            for i in range(length):
                t = layer_position(i, length)
                lead = s.sources[0]
                self.layer_sources.append([(src.model, src.layer_range[0] + i) for src in s.sources])
                suffixes = self._block_suffixes(lead.model, lead.layer_range[0] + i)
                for src in s.sources[1:]:  # a tensor only another source has would be dropped
                    extra = next((x for x in self._block_suffixes(src.model, src.layer_range[0] + i)
                                  if x not in suffixes), None)
                    if extra is not None:
                        raise SurgeryError(f"model '{src.model}': layer {src.layer_range[0] + i} has tensor '{extra}', "
                                           f"layer {lead.layer_range[0] + i} of model '{lead.model}' has not "
                                           "(different architecture)")
                for suffix in suffixes:
                    inputs = [(src.model, self.families[src.model].block_name(src.layer_range[0] + i, suffix))
                              for src in s.sources]
                    self.jobs.append(_job(cfg, s, donor_fam.block_name(out_layer, suffix), inputs, t))
                out_layer += 1
        self.num_layers = out_layer
        self._check_layouts()
        for name in post:
            self.jobs.append(_job(cfg, last, name, self._same_name(last, name), 0.0))
        for job in self.jobs:
            for model, in_name in job.inputs:
                if in_name not in self.ckpts[model]:
                    raise SurgeryError(f"model '{model}': tensor '{in_name}' is missing (needed for '{job.name}')")

    def _check_layouts(self) -> None:
        """Ask each model's family, as grow does, whether its blocks may sit where the slices put them (GPT-2
        with scale_attn_by_inverse_layer_idx: block i divides its scores by i + 1). An output position a model
        does not feed is given as its own index, which moves nothing."""
        for model, fam in self.families.items():
            if not fam.blocks():
                continue
            fed = {k: i for k, sources in enumerate(self.layer_sources) for m, i in sources if m == model}
            if fed:
                fam.check_layout([fed.get(k, k) for k in range(self.num_layers)])

    def _check_gradients(self) -> None:
        """A gradient is spread over layers: on a model whose layers we do not know (no family), every tensor
        would sit at t = 0 and take the gradient's first value."""
        cfg = self.cfg
        flat = [m for m in self.ckpts if not self.families[m].blocks()]
        if not flat:
            return
        scopes = [cfg.parameters, *(s.parameters for s in cfg.slices),
                  *(src.parameters for s in cfg.slices for src in s.sources)]
        name = next((k for scope in scopes for k, v in scope.items() if is_gradient(v)), None)
        if name is not None:
            raise SurgeryError(f"parameter '{name}' is a gradient over layers, but model '{flat[0]}' (family "
                               f"'{self.families[flat[0]].name}') has no layer stack known here; give it as a "
                               "scalar or as {filter, value} conditions")

    @staticmethod
    def _same_name(s: OutSlice, name: str) -> list[tuple[str, str]]:
        return [(src.model, name) for src in s.sources]

    def output_config(self) -> dict | None:
        """The donor's config.json with the output's layer count, and every per-layer list (Gemma's
        ``layer_types``) taken entry by entry from the layer each output layer comes from, so a sliced or
        stacked block keeps its attention type (mergekit leaves the donor's list as it is)."""
        donor = self.ckpts[self.donor]
        if donor.folder is None:
            return None
        cfg = self.families[self.donor].config_for_layers(self.num_layers)
        if cfg is None:
            return donor.config
        # a model without config.json (a bare weights file) has no per-layer settings of its own: the donor's
        own = {m: fam.per_layer_config() for m, fam in self.families.items() if self.ckpts[m].config}

        def entry(key: str, model: str, index: int) -> Any:
            values = own.get(model, own.get(self.donor, {})).get(key)
            return values[index] if values is not None and index < len(values) else None

        for key in own.get(self.donor, {}):
            values = []
            for k, sources in enumerate(self.layer_sources):
                found = [(m, i, entry(key, m, i)) for m, i in sources if entry(key, m, i) is not None]
                other = next((f for f in found if f[2] != found[0][2]), None)
                if other is not None:
                    raise SurgeryError(f"output layer {k}: config.json {key} differs between its sources: "
                                       f"{found[0][2]!r} (model '{found[0][0]}' layer {found[0][1]}), {other[2]!r} "
                                       f"(model '{other[0]}' layer {other[1]}); merge layers of the same kind")
                values.append(found[0][2] if found else cfg[key][k])
            cfg[key] = values
        return cfg

    def close(self) -> None:
        for c in self.ckpts.values():
            c.close()

    def source_files(self) -> list[Path]:
        return [f for c in self.ckpts.values() for f in c.source_files]

    def output_dtype(self, job: TensorJob) -> torch.dtype:
        model, name = job.inputs[0]
        dtype = self.ckpts[model].info(name).dtype
        if not dtype.is_floating_point:  # passed through as it is (compute returns it unchanged)
            return dtype
        return self.cfg.out_dtype or self.cfg.dtype or dtype

    def compute(self, job: TensorJob) -> torch.Tensor:
        """The merged tensor for ``job`` (float32 unless passed through as it is)."""
        cfg = self.cfg
        tensors = {}
        for model, name in job.inputs:
            x = self.ckpts[model].get(name)
            tensors[model] = x.to(cfg.dtype) if cfg.dtype is not None and x.is_floating_point() else x
        first = next(iter(tensors.values()))
        if not first.is_floating_point():
            return first
        shapes = {tuple(x.shape) for x in tensors.values()}
        if len(shapes) != 1:
            raise SurgeryError(f"tensor '{job.name}': the models' shapes differ: {sorted(shapes)}")
        return merge_tensor(cfg.method.name, tensors, job)


def merge_tensor(method: str, tensors: dict[str, torch.Tensor], job: TensorJob) -> torch.Tensor:
    """One mergekit method on one tensor, through our per-tensor merge methods."""
    gp, mp = job.global_params, job.model_params
    if method == "passthrough":
        (model, x), = tensors.items()
        scale = mp[model].get("scale")
        return x if scale is None else x.to(torch.float32) * float(scale)
    if method == "slerp":
        if len(tensors) == 1:
            return next(iter(tensors.values()))
        other = next(m for m in tensors if m != job.base)
        ours = get_method("slerp")
        return ours.fn([tensors[job.base], tensors[other]], [1.0, 1.0], None, ours.resolve({"t": float(gp["t"])}))
    if method == "linear":
        ours = get_method("linear")
        unweighted = [m for m in tensors if mp[m]["weight"] is REQUIRED]
        if unweighted:  # mergekit adds base_model as a source; linear then needs its weight too
            raise SurgeryError(f"merge_method linear: model '{unweighted[0]}' has no weight (tensor '{job.name}')")
        weights = [float(mp[m]["weight"]) for m in tensors]
        return ours.fn(list(tensors.values()), weights, None, ours.resolve({"normalize": bool(gp["normalize"])}))
    # task_arithmetic and ties: task vectors of every model but the base
    base = tensors[job.base].to(torch.float32)
    others = [m for m in tensors if m != job.base]
    if not others:
        return base
    weights = [float(mp[m]["weight"]) for m in others]
    if method == "task_arithmetic":
        total = sum(weights)
        if gp["normalize"] and abs(total) >= 1e-8:  # mergekit divides the summed vector by the weight sum
            weights = [w / total for w in weights]
        ours = get_method("task-arithmetic")
        return ours.fn([tensors[m] for m in others], weights, base, ours.resolve({"scale": float(gp["lambda"])}))
    # ties: each model's own density (and l1 rescale) applied here, since density is per model in mergekit
    trimmed = []
    for m in others:
        delta = tensors[m].to(torch.float32) - base
        kept = trim(delta, float(mp[m]["density"]))
        if gp["rescale"]:
            before, after = delta.abs().sum(), kept.abs().sum()
            if before >= 1e-7 and after >= 1e-7:
                kept = kept * (before / after)
        trimmed.append(base + kept)
    ours = get_method("ties")
    return ours.fn(trimmed, weights, base, ours.resolve({"density": 1.0, "scale": float(gp["lambda"]),
                                                             "normalize": bool(gp["normalize"])}))


@dataclass
class MergekitResult:
    output: str
    merge_method: str
    num_tensors: int
    num_layers: int
    models: list[str]
    files: list[str]
    notes: list[str] = field(default_factory=list)  # config.json settings that differ between the models

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _tokenizer_files(plan: MergekitPlan) -> list[Path]:
    """Tagalong files (tokenizer, generation config) from the tokenizer's model (mergekit's donor)."""
    cfg = plan.cfg
    donor = cfg.base_model if cfg.tokenizer_source == "base" else plan.donor
    if cfg.tokenizer_source == "union":
        ref = _vocabulary(plan.ckpts[plan.donor])
        for m, c in plan.ckpts.items():
            if _vocabulary(c) != ref:
                raise SurgeryError(f"tokenizer_source: union: the vocabulary of '{m}' differs from '{plan.donor}'; "
                                   "building a union vocabulary is not supported (use tokenizer_source: base)")
    elif cfg.tokenizer_source == "base":
        # mergekit moves each model's embedding rows to the base's token ids (its own row where it has the token,
        # the base's where not) before merging; rows merged by index are right only for the same vocabulary
        ref = _vocabulary(plan.ckpts[donor])
        for m, c in plan.ckpts.items():
            vocab = _vocabulary(c)
            if ref is not None and vocab is not None and vocab != ref:
                raise SurgeryError(f"tokenizer_source: base: the vocabulary of '{m}' differs from the base '{donor}'; "
                                   "moving embedding rows to the base's token ids is not supported (merge models "
                                   "with the base's tokenizer)")
    return plan.ckpts[donor].extra_files()


def _vocabulary(ckpt: Checkpoint) -> Any:
    if ckpt.folder is None or not (ckpt.folder / "tokenizer.json").exists():
        return None
    tok = json.loads((ckpt.folder / "tokenizer.json").read_text())
    return (tok.get("model", {}).get("vocab"), [(a.get("id"), a.get("content")) for a in tok.get("added_tokens", [])])


def with_out_dtype(cfg: MergekitConfig, write: WriteOptions) -> MergekitConfig:
    """``cfg`` written as ``write.dtype`` when given: the config's ``out_dtype`` by another name, so the two
    must agree when both are given."""
    dtype = float_dtype(write.dtype)
    if dtype is None:
        return cfg
    if cfg.out_dtype is not None and cfg.out_dtype != dtype:
        raise SurgeryError(f"--dtype {dtype_name(dtype)}: the mergekit config says out_dtype: "
                           f"{dtype_name(cfg.out_dtype)}; give one of them")
    return dataclasses.replace(cfg, out_dtype=dtype)


def run_mergekit(cfg: MergekitConfig, out: Path, force: bool = False,
                 progress: Callable[[str, int, int, dict], None] | None = None,
                 write: WriteOptions | None = None) -> MergekitResult:
    """Write the merge ``cfg`` describes to ``out`` (a folder or a .safetensors file); ``write``: the
    output's dtype (the config's ``out_dtype``), shard size and input hashing."""
    out = Path(out)
    write = write or WriteOptions()
    write.check_write_options()
    cfg = with_out_dtype(cfg, write)
    check_output(out, force, [Path(m) for m in cfg.referenced_models()])
    plan = MergekitPlan(cfg)
    try:
        extra = _tokenizer_files(plan)
        done = [0]

        def produce(job: TensorJob) -> torch.Tensor:
            x = plan.compute(job)
            done[0] += 1
            if progress is not None:
                progress("merge", done[0], len(plan.jobs), {})
            return x

        planned = []
        for job in plan.jobs:
            model, name = job.inputs[0]
            shape = plan.ckpts[model].info(name).shape
            planned.append(PlannedTensor(job.name, shape, plan.output_dtype(job), lambda j=job: produce(j)))
        config = plan.output_config()
        recorded = {"config": cfg.raw, **({"float_inputs": plan.notes} if plan.notes else {})}
        carried = config_file(plan.ckpts[plan.donor])
        if plan.config_differences:
            recorded["config_differences"] = {d.key: d.values for d in plan.config_differences}
            recorded["config_from"] = carried
        report = write_checkpoint(out, planned, provenance=Provenance("mergekit", recorded, plan.source_files()),
                                  config=config, extra_files=extra, force=force,
                                  dtype=cfg.out_dtype or cfg.dtype,  # config.json's torch_dtype, as mergekit sets it
                                  max_shard_size=write.max_shard_size, hash_inputs=write.hash_inputs)
    finally:
        plan.close()
    return MergekitResult(str(out), cfg.method.name, len(planned), plan.num_layers, list(plan.ckpts),
                          [str(f) for f in report.files], [d.note(carried) for d in plan.config_differences])
