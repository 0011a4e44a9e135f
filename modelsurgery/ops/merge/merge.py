"""`surgery merge`: weight matching into the first model's basis, then a merge method
(Ainsworth et al. 2023, Git Re-Basin; N models: Ito et al. 2024, each aligned to the first).

Pure function: checkpoints + options -> written checkpoint + report. Tensors are produced one at a
time while the output streams. Weight matching reads the memory-mapped inputs tensor by tensor
(``weight_matching(streaming=True)``): memory holds the permutations, the similarity matrices and
one merged tensor, not the models in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from modelsurgery.checkpoint import Checkpoint, PlannedTensor, Provenance, check_output, write_checkpoint
from modelsurgery.checkpoint.writer import WriteOptions, float_dtype
from modelsurgery.errors import SurgeryError
from modelsurgery.families import detect_family
from modelsurgery.ops.float_input import float_view
from modelsurgery.ops.match.derive import permutation_spec
from modelsurgery.ops.match.spec import Perms, PermutationSpec, permute_tensor
from modelsurgery.ops.match.weight_matching import weight_matching
from modelsurgery.ops.merge import Method, get_method
from modelsurgery.ops.merge.configs import compare_configs, config_file

#: the settings of weight matching and their values when it runs; None in ``MergeOptions`` means not given, and
#: giving one to a merge that does not match (``--method linear`` without ``--align``) is refused, never ignored
MATCHING_DEFAULTS: dict[str, Any] = {"backend": "auto", "device": "cpu", "seed": 0}


@dataclass
class MergeOptions(WriteOptions):
    """The merge method and its settings; how the output is written (dtype, max_shard_size, hash_inputs)
    as ``WriteOptions``."""

    method: str = "match"  # match (weight matching + linear) | linear | slerp | task-arithmetic | ties
    alpha: float | None = None  # two models: (1-alpha)*A + alpha*B
    weights: list[float] | None = None
    base: Path | None = None
    align: bool | None = None  # default: True for match, False otherwise
    params: dict[str, Any] = field(default_factory=dict)  # the method's declared parameters (ops.merge.Param)
    backend: str | None = None  # weight matching only (MATCHING_DEFAULTS when it runs)
    device: str | None = None
    seed: int | None = None
    max_iter: int = 100
    model: str | None = None
    eval_data: Path | None = None
    points: int = 11
    repair: bool = False
    plot: Path | None = None


@dataclass
class MergeResult:
    output: str
    method: str
    family: str
    num_models: int
    weights: list[float]
    matching: list[dict] = field(default_factory=list)
    evaluation: dict | None = None
    files: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)  # the method's resolved parameters
    notes: list[str] = field(default_factory=list)  # quantized inputs dequantized; config.json settings that differ

    def to_dict(self) -> dict:
        return asdict(self)


def check_compatible(ckpts: list[Checkpoint]) -> None:
    """Same tensor names and shapes everywhere; names the first incompatible tensor."""
    first = ckpts[0]
    names = first.keys()
    for other in ckpts[1:]:
        for name in names:
            if name not in other:
                raise SurgeryError(f"{other.path}: tensor '{name}' of {first.path} is missing (different architecture)")
            if other.shape(name) != first.shape(name):
                raise SurgeryError(
                    f"{other.path}: tensor '{name}' has shape {tuple(other.shape(name))}, {first.path} has "
                    f"{tuple(first.shape(name))}"
                )
        other_names = other.keys()
        extra = [k for k in other_names if k not in first]
        if extra:
            raise SurgeryError(f"{other.path}: tensor '{extra[0]}' is not in {first.path} (different architecture)")


def resolve_weights(options: MergeOptions, n: int) -> list[float]:
    if options.alpha is not None and options.weights is not None:
        raise SurgeryError("--alpha and --weights: give one of them")
    if options.alpha is not None:
        if n != 2:
            raise SurgeryError(f"--alpha needs exactly two models, got {n}; use --weights")
        if not 0.0 <= options.alpha <= 1.0:
            raise SurgeryError(f"--alpha {options.alpha}: expected a value in [0, 1]")
        return [1.0 - options.alpha, options.alpha]
    if options.weights is not None:
        if len(options.weights) != n:
            raise SurgeryError(f"--weights has {len(options.weights)} values for {n} models")
        if options.method in ("match", "linear", "slerp") and sum(options.weights) <= 0:
            raise SurgeryError("--weights must have a positive sum")
        return list(options.weights)
    return [1.0 / n] * n if options.method in ("match", "linear", "slerp") else [1.0] * n


def method_params(method: Method, options: MergeOptions, weights: list[float]) -> dict[str, Any]:
    """The method's declared parameters: its defaults, overridden by ``options.params``. A method
    with an interpolation position ``t`` (SLERP) takes it from --alpha/--weights when not given."""
    given = dict(options.params)
    positioned = options.alpha is not None or bool(options.weights)
    if method.param("t") is not None and "t" in given and positioned:  # both set the position: never drop one
        flag = "--alpha" if options.alpha is not None else "--weights"
        raise SurgeryError(f"{flag} and --t: give one of them (both set --method {method.name}'s position)")
    if method.param("t") is not None and "t" not in given and positioned:
        given["t"] = weights[1] / sum(weights)
    return method.resolve(given)


def matching_options(options: MergeOptions, align: bool) -> MergeOptions:
    """``options`` with the weight-matching settings not given set to ``MATCHING_DEFAULTS``; one given to a
    merge that does not match is refused (it would configure nothing)."""
    given = [k for k in MATCHING_DEFAULTS if getattr(options, k) is not None]
    if given and not align:
        raise SurgeryError(f"--{given[0]} configures weight matching, which --method {options.method} "
                           f"{'with --no-align ' if options.method == 'match' else ''}does not run "
                           "(give --align to match, or drop the option)")
    return replace(options, **{k: v for k, v in MATCHING_DEFAULTS.items() if getattr(options, k) is None})


def align_models(states: list[dict[str, torch.Tensor]], spec: PermutationSpec, options: MergeOptions,
                 progress: Callable | None = None, reference: dict[str, torch.Tensor] | None = None
                 ) -> list[tuple[Perms | None, dict]]:
    """Permutations taking every model into the reference's basis: the first model's (which then
    stays as it is) or, for methods with a base, the base model's."""
    out: list[tuple[Perms | None, dict]] = []
    for i, state in enumerate(states):
        if reference is None and i == 0:
            out.append((None, {}))
            continue
        r = weight_matching(states[0] if reference is None else reference, state, spec, max_iter=options.max_iter,
                            seed=options.seed, backend=options.backend, device=options.device, progress=progress,
                            streaming=True)  # the states stay memory-mapped: no float copy of either
        out.append(({g: {k: v.cpu() for k, v in p.items()} for g, p in r.perms.items()}, {"model": i, **r.to_dict()}))
    return out


def merge_checkpoints(paths: list[Path], out: Path, options: MergeOptions, force: bool = False,
                      progress: Callable[[str, int, int, dict], None] | None = None) -> MergeResult:
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise SurgeryError("merge needs at least two models")
    inputs = paths + [Path(p) for p in (options.base, options.eval_data) if p]
    check_output(Path(out), force, inputs)
    options.check_write_options()
    target = float_dtype(options.dtype)  # merged in float32, rounded once to the output's dtype
    method_name = options.method
    method = None if method_name == "match" else get_method(method_name)
    align = options.align if options.align is not None else method_name == "match"
    if method is not None and method.max_models and len(paths) > method.max_models:
        raise SurgeryError(f"--method {method_name} merges {method.max_models} models, got {len(paths)}")
    if method is not None and method.needs_base and options.base is None:
        raise SurgeryError(f"--method {method_name} needs --base (the model the others were fine-tuned from)")
    if options.base is not None and not align and not (method is not None and method.needs_base):
        raise SurgeryError(f"--base: --method {method_name} without --align does not read it (task-arithmetic and "
                           "ties take their task vectors from it, --align its basis)")
    options = matching_options(options, align)
    weights = resolve_weights(options, len(paths))
    # match averages as linear does, with linear's declared parameters under its own name
    params = method_params(method or replace(get_method("linear"), name="match"), options, weights)
    views = [float_view(Checkpoint.open(p), "merge") for p in [*paths, *([options.base] if options.base else [])]]
    float_notes = [note for _, note in views if note]
    ckpts = [c for c, _ in views[:len(paths)]]
    base = views[-1][0] if options.base else None
    every = ckpts + ([base] if base else [])
    check_compatible(every)
    families = [detect_family(c, options.model) for c in every]
    family = families[0]
    for c, other in zip(every, families):
        if other.name != family.name:
            raise SurgeryError(f"{c.path}: family '{other.name}', but {ckpts[0].path} is '{family.name}'")
    # the output carries the first model's config.json: refuse models that compute another function
    differences = compare_configs(list(zip(every, families)))
    notes = float_notes + [d.note(config_file(ckpts[0])) for d in differences]

    spec, aligned, matching = None, [(None, {})] * len(paths), []
    if align:
        spec = permutation_spec(family)
        # each tensor read when matching looks it up (a packed input's weights dequantized once: ops.float_input)
        states = [c.lazy_state() for c in ckpts]
        reference = base.lazy_state() if base is not None else None
        aligned = align_models(states, spec, options, progress, reference)
        matching = [m for _, m in aligned if m]
        del states

    combine = method.fn if method else get_method("linear").fn

    def load(name: str, i: int) -> torch.Tensor:
        t = ckpts[i].get(name)
        perms = aligned[i][0]
        return permute_tensor(spec, name, t, perms) if perms is not None and name in spec.axes else t

    def merged(name: str) -> torch.Tensor:
        first = ckpts[0].get(name)
        if not first.is_floating_point():
            return first
        tensors = [load(name, i) for i in range(len(ckpts))]
        b = base.get(name) if base is not None else None
        return combine(tensors, weights, b, params).to(target or first.dtype)

    state_override = None
    evaluation = None
    if options.eval_data is not None or options.repair:
        from modelsurgery.ops.merge.path import evaluate_path

        evaluation, state_override = evaluate_path(family, ckpts, aligned, spec, merged, weights, options, progress)

    planned = []
    names = ckpts[0].keys()
    for name in names:
        info = ckpts[0].info(name)
        dtype = target if target is not None and info.dtype.is_floating_point else info.dtype
        if state_override is not None and name in state_override:
            planned.append(PlannedTensor(name, info.shape, dtype, lambda n=name: state_override[n]))
        else:
            planned.append(PlannedTensor(name, info.shape, dtype, lambda n=name: merged(n)))
    recorded = {"method": method_name, "weights": weights, "aligned": align,
                **({"backend": options.backend, "seed": options.seed} if align else {}),
                "base": str(options.base) if options.base else None, "repair": options.repair, **params}
    if float_notes:
        recorded["float_inputs"] = float_notes
    if differences:
        recorded["config_differences"] = {d.key: d.values for d in differences}
        recorded["config_from"] = config_file(ckpts[0])
    if evaluation is not None and "repaired" in evaluation:
        rep = evaluation["repaired"]
        recorded["repaired"] = {"method": rep["method"], "layers": [x["name"] for x in rep["layers"]],
                                "batchnorms": rep.get("batchnorms", 0)}
    sources = [f for c in ckpts + ([base] if base else []) for f in c.source_files]
    metadata = {k: v for k, v in ckpts[0].metadata.items() if k not in ("modelsurgery", "format")}
    report = write_checkpoint(
        out, planned, provenance=Provenance("merge", recorded, sources), metadata=metadata,
        config=ckpts[0].config if ckpts[0].folder is not None else None,
        extra_files=ckpts[0].extra_files(), force=force, **options.write_kwargs(),
    )
    return MergeResult(str(out), method_name, family.name, len(paths), weights, matching, evaluation,
                       [str(f) for f in report.files], params, notes)
