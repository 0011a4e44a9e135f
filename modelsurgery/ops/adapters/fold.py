"""``surgery fold``: adapters folded into the base weights, tensor by tensor, as PEFT's
``merge_and_unload()`` folds them (each method's math in its own module: lora, miss, lokr).

Each base tensor is read, updated in float32 when an adapter targets it, cast back to its dtype,
written and dropped; untouched tensors are copied byte for byte. Several adapters are folded in the
order given, each onto the weights the previous ones produced (the same as merging the first,
loading the second onto the merged model, and merging again). ``scale`` s takes the fraction s of each
adapter's change, W + s * (fold(W) - W): for LoRA that is s * (alpha/r) * B A, for a whole tensor the
adapter trained (``modules_to_save``, trained biases) the interpolation towards it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelsurgery.checkpoint import Checkpoint, PlannedTensor, Provenance, check_output, plan_copy, write_checkpoint
from modelsurgery.checkpoint.writer import WriteOptions, float_dtype
from modelsurgery.errors import SurgeryError
from modelsurgery.families import detect_family
from modelsurgery.ops.adapters.loftq import check_backbone, loftq_bits
from modelsurgery.ops.adapters.peft_format import Adapter, read_adapter
from modelsurgery.ops.adapters.variants import Site, Variant, variant_for

Progress = Callable[[str, int, int, dict], None]

#: config switches of LoRA variants whose adapters fold differently or not at all: refused, not ignored
#: (PEFT's merge refuses Arrow's routed experts; KaSA also truncates the base weight's SVD and scales B A by lora_diag)
UNSUPPORTED_SWITCHES = ("use_qalora", "alora_invocation_tokens", "target_parameters", "layer_replication",
                        "trainable_token_indices", "use_bdlora", "arrow_config", "kasa_config")
#: LoRA initialisations that leave the saved adapter relative to a changed (residual) base model (the ones
#: PEFT's LoraModel._convert_state_dict_for_initial_model converts)
RESIDUAL_INITS = ("pissa", "olora", "corda", "lora_ga")


def no_progress(task: str, done: int, total: int, info: dict | None = None) -> None:
    return None


@dataclass
class FoldOptions(WriteOptions):
    """How much of each adapter to fold; how the output is written (dtype, max_shard_size, hash_inputs)
    as ``WriteOptions``."""

    #: fraction of each adapter's change to fold (PEFT's merge_and_unload folds all of it: 1.0)
    scale: float = 1.0
    force: bool = False


@dataclass
class FoldReport:
    base: str
    adapters: list[dict]
    output: str
    family: str
    scale: float
    tensors_updated: int = 0
    tensors_copied: int = 0
    bytes_written: int = 0
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Update:
    """One adapter's change to one base tensor."""

    adapter: Adapter
    variant: Variant
    module: str | None  # None: a whole tensor the adapter stores
    role: str  # 'weight', 'bias' or 'whole'
    key: str | None = None  # the adapter's tensor, for 'whole'


@dataclass
class Plan:
    """What folding does to BASE: its tensors' updates, and the tied heads the fold unties."""

    #: tensor name -> the updates to apply to it, in adapter order
    updates: dict[str, list[Update]] = field(default_factory=dict)
    #: a tied head written as a tensor of its own -> the BASE tensor it starts from (the embedding it read)
    untied: dict[str, str] = field(default_factory=dict)

    def source(self, name: str) -> str:
        return self.untied.get(name, name)


def resolve_name(name: str, base: Checkpoint, where: str, tied: dict[str, str] | None = None) -> str:
    """The base tensor an adapter names: the same name, else the one base name it is a dotted suffix
    of, or that is a dotted suffix of it (an adapter trained on BertForMaskedLM ('bert.encoder...')
    folds into a BertModel checkpoint ('encoder...')), else the tensor a tied weight reads (``tied``: the
    family's; PEFT's merge updates the shared weight, which the merged model saves as the embedding)."""
    if name in base:
        return name
    if tied and name in tied and tied[name] in base:
        return tied[name]
    hits = [k for k in base if k.endswith("." + name) or name.endswith("." + k)]
    if len(hits) == 1:
        return hits[0]
    why = "several" if hits else "no"
    raise SurgeryError(f"{where}: adapter tensor for '{name}' matches {why} tensor(s) of BASE {base.path}")


def check_config(adapter: Adapter) -> None:
    cfg = adapter.config
    for switch in UNSUPPORTED_SWITCHES:
        if cfg.get(switch):
            raise SurgeryError(f"{adapter.path}: LoRA option '{switch}' is not supported by fold")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(RESIDUAL_INITS):
        raise SurgeryError(
            f"{adapter.path}: init_lora_weights='{init}' adapters are relative to a residual base model; save "
            "them with PEFT's path_initial_model_for_weight_conversion to get a plain LoRA, then fold that"
        )


def check_loftq(base: Checkpoint, adapters: list[Adapter], plan: Plan) -> dict[int, dict]:
    """Each LoftQ adapter (by position) -> what was checked: its weights must be BASE's own, and BASE must be
    LoftQ's quantized backbone (``loftq.check_backbone``); refused otherwise, before anything is written."""
    found: dict[int, dict] = {}
    for i, adapter in enumerate(adapters):
        bits = loftq_bits(adapter.config)
        if bits is None:
            continue
        updates = plan.updates
        mine = [name for name, ups in updates.items() if any(u.adapter is adapter and u.role == "weight" for u in ups)]
        earlier = next((name for name in mine if updates[name][0].adapter is not adapter), None)
        if earlier is not None:
            raise SurgeryError(f"{adapter.path}: a LoftQ adapter folds onto LoftQ's backbone, but an adapter given "
                               f"before it changes '{earlier}' first; give the LoftQ adapter first")
        check_backbone(base, [plan.source(n) for n in mine], bits, str(adapter.path))
        base.close()
        found[i] = {"bits": bits, "tensors_on_grid": len(mine)}
    return found


def untie_for_whole(name: str, base: Checkpoint, adapter: Adapter, tied: dict[str, str], plan: Plan) -> str | None:
    """The tensor a whole tensor of ``adapter`` (``modules_to_save``) replaces, where it is one of a tied head
    and its embedding and the adapter does not keep them tied (``ensure_weight_tying``); None otherwise.
    PEFT's ModulesToSaveWrapper trains a copy of that one module while the other keeps the shared weight, and
    merge_and_unload leaves them untied (tie_word_embeddings set to false): the fold writes the head too."""
    module = name.rpartition(".")[0]
    trained = any(module == m or module.endswith("." + m) for m in adapter.config.get("modules_to_save") or [])
    if not trained or adapter.config.get("ensure_weight_tying"):
        return None  # (save_embedding_layers stores the base embedding itself: that keeps the tie)
    for head, embed in list(tied.items()):
        if name in (head, embed) and embed in base:
            del tied[head]
            plan.untied[head] = embed
            return name
    return None


def plan_updates(base: Checkpoint, adapters: list[Adapter], variants: list[Variant],
                 transposed: Callable[[str, Adapter], bool], tied: dict[str, str] | None = None,
                 renamed: dict[str, str] | None = None) -> Plan:
    """The updates of every tensor, in adapter order, and the heads untied. Every shape an adapter fixes is
    checked against BASE here, before any tensor is read. ``renamed``: the family's names of the model PEFT
    trained on -> BASE's (``Family.renamed_weights``)."""
    plan = Plan()
    updates = plan.updates
    tied = dict(tied or {})
    renamed = renamed or {}
    for adapter, variant in zip(adapters, variants):
        where = str(adapter.path)

        def resolve(name: str, where: str = where) -> str:
            return name if name in plan.untied else resolve_name(name, base, where, tied)

        # whole tensors first: PEFT loads a trained bias into the layer, then merging adds lora_B.bias to it
        for name, key in adapter.whole.items():
            name = name if name in base else renamed.get(name, name)
            target = untie_for_whole(name, base, adapter, tied, plan) or resolve(name)
            have, want = tuple(adapter.weights.shape(key)), tuple(base.shape(plan.source(target)))
            if have != want:
                raise SurgeryError(f"{where}: adapter tensor '{key}' has shape {have}, BASE tensor '{target}' {want}")
            updates.setdefault(target, []).append(Update(adapter, variant, None, "whole", key))
        for module, parts in adapter.modules.items():
            weight = f"{module}.weight"
            weight = resolve(weight if weight in base else renamed.get(weight, weight))
            shape = tuple(base.shape(plan.source(weight)))
            if len(shape) == 2 and transposed(weight, adapter):
                shape = shape[::-1]
            want = variant.weight_shape({p: tuple(adapter.weights.shape(k)) for p, k in parts.items()})
            if len(shape) != 2 or any(w is not None and w != h for w, h in zip(want, shape)):
                shown = " x ".join("?" if w is None else str(w) for w in want)
                raise SurgeryError(f"{where}: adapter module '{module}' updates a {shown} (out x in) weight, but "
                                   f"BASE tensor '{weight}' is {' x '.join(map(str, shape))} (out x in)")
            updates.setdefault(weight, []).append(Update(adapter, variant, module, "weight"))
            if "lora_B.bias" in parts:
                bias = weight.removesuffix("weight") + "bias"
                if bias not in base:
                    raise SurgeryError(f"{where}: module '{module}' trains a bias (lora_bias) but BASE has no "
                                       f"tensor '{bias}'")
                updates.setdefault(bias, []).append(Update(adapter, variant, module, "bias"))
    return plan


def fold_adapters(base_path: str | Path, adapter_paths: list[str | Path], out: str | Path,
                  options: FoldOptions | None = None, progress: Progress = no_progress) -> FoldReport:
    """Fold ``adapter_paths`` (PEFT adapter folders, in order) into ``base_path``; write ``out``."""
    options = options or FoldOptions()
    out = Path(out)
    if not adapter_paths:
        raise SurgeryError("no adapter given (pass ADAPTER, or --adapter several times)")
    if options.scale != options.scale:
        raise SurgeryError("--scale is NaN")
    options.check_write_options()
    target = float_dtype(options.dtype)  # a folded tensor goes from float32 to it directly: one rounding
    base = Checkpoint.open(base_path)
    family = detect_family(base)
    transposed = {lin.weight for i in range(family.num_layers) for lin in family.block_linears(i).values()
                  if lin.transposed}
    knows_layout = any(family.block_linears(i) for i in range(family.num_layers))
    if "modelsurgery.quantization" in base.metadata:
        raise SurgeryError(f"{base.path}: BASE holds quantized weights (a fold would move them off their grid); "
                           "fold into the float model, then quantize")
    adapters, variants = [], []
    for path in adapter_paths:
        adapter = read_adapter(path, lambda peft_type, p=path: variant_for(peft_type, str(p)).parameter_names)
        check_config(adapter)
        adapters.append(adapter)
        variants.append(variant_for(adapter.peft_type, str(path)))

    def flipped(name: str, adapter: Adapter) -> bool:
        return name in transposed if knows_layout else bool(adapter.config.get("fan_in_fan_out"))

    plan = plan_updates(base, adapters, variants, flipped, family.tied_weights(), family.renamed_weights())
    updates = plan.updates
    loftq = check_loftq(base, adapters, plan)
    check_output(out, options.force, [base.path, *(a.path for a in adapters)])

    def apply(name: str, value: torch.Tensor) -> torch.Tensor:
        for u in updates[name]:
            if u.role == "whole":
                new = u.adapter.tensor(u.key)
            else:
                site = Site(name, u.module, value, flipped(name, u.adapter), u.adapter.parts(u.module),
                            u.adapter.config, str(u.adapter.path))
                if u.role == "weight":
                    new = u.variant.fold_weight(site)
                else:
                    new = u.variant.fold_bias(site, value) if u.variant.fold_bias else value
            if tuple(new.shape) != tuple(value.shape):
                raise SurgeryError(f"{u.adapter.path}: the folded '{name}' has shape {tuple(new.shape)}, "
                                   f"BASE {tuple(value.shape)}")
            value = value + options.scale * (new - value) if options.scale != 1.0 else new
        return value

    names = base.keys()
    done = [0]

    def fold_one(name: str) -> torch.Tensor:
        value = base.get(plan.source(name)).to(torch.float32, copy=True)
        base.close()  # unmap: pages of a mapped input count as resident memory until then
        value = apply(name, value) if name in updates else value
        done[0] += 1
        progress("fold", done[0], len(updates), {})
        return value.to(target or base.info(plan.source(name)).dtype)

    plans: list[PlannedTensor] = []
    for name in [*names, *plan.untied]:
        if name in updates or name in plan.untied:
            info = base.info(plan.source(name))
            plans.append(PlannedTensor(name, info.shape, target or info.dtype, lambda n=name: fold_one(n)))
        else:
            plans.append(plan_copy(base, name, raw=True))
    provenance = Provenance("fold", {
        "scale": options.scale,
        "adapters": [{"path": str(a.path), "peft_type": a.peft_type,
                      **({"loftq_backbone": loftq[i]} if i in loftq else {})} for i, a in enumerate(adapters)],
        **({"untied": plan.untied} if plan.untied else {}),
    }, [*base.source_files, *(f for a in adapters for f in a.files)])
    metadata = {k: v for k, v in base.metadata.items()
                if k.startswith("modelsurgery.") and k != "modelsurgery.quantization"}
    config = base.config
    if plan.untied and config is not None:  # as PEFT's merge_and_unload sets it when it unties them
        config = {**config, "tie_word_embeddings": False}
    written = write_checkpoint(out, plans, provenance=provenance, config=config, metadata=metadata,
                               extra_files=base.extra_files(), force=options.force, progress=progress,
                               **options.write_kwargs())
    report = FoldReport(
        base=str(base.path), output=str(out), family=family.name, scale=options.scale,
        adapters=[{"path": str(a.path), "peft_type": a.peft_type, "modules": len(a.modules),
                   "whole_tensors": len(a.whole)} for a in adapters],
        tensors_updated=len(updates), tensors_copied=len(plans) - len(updates),
        bytes_written=written.total_bytes, files=[str(f) for f in written.files],
    )
    return report

