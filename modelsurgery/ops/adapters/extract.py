"""``surgery extract``: a LoRA adapter from a full fine-tune, by truncated SVD of each layer's delta
(Eckart-Young: the rank-r truncation of TUNED - BASE is the best rank-r approximation in Frobenius
norm; mergekit's ``mergekit-extract-lora`` and LoRA-resizing scripts do the same), written as a PEFT
LoRA adapter folder that ``PeftModel.from_pretrained(base, ADAPTER)`` loads as it is.

For delta = U S V^T (as (out, in)), the adapter stores lora_B = U_r S_r^(1/2) and lora_A = S_r^(1/2) V_r^T
with lora_alpha = r, so PEFT's scaling alpha / r is 1 and B A is the truncation itself; the square root
splits the spectrum evenly between the factors, so a cast to bfloat16 loses the same in both.
``rank`` >= 1 is a rank (capped by the layer's smaller side); 0 < rank < 1 is an energy fraction:
each layer keeps the fewest singular values whose squares reach that fraction of ||delta||_F^2, and
the per-layer ranks go to ``rank_pattern`` / ``alpha_pattern``. Layers whose smaller side exceeds
``lowrank_above`` use randomized SVD (``torch.svd_lowrank``, Halko et al. 2011) with ``oversample``
extra columns and ``niter`` power iterations; smaller ones exact ``torch.linalg.svd``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelsurgery.checkpoint import Checkpoint, PlannedTensor, Provenance, check_output, plan_tensor
from modelsurgery.checkpoint.writer import float_dtype
from modelsurgery.devices import resolve_device
from modelsurgery.errors import SurgeryError
from modelsurgery.families import Family, detect_family
from modelsurgery.memory import large_allocations_mapped
from modelsurgery.ops.adapters.peft_format import lora_config, module_key, write_lora_adapter

#: allocations from this size get their own mapping while layers are extracted (``memory.large_allocations_mapped``)
MAP_FROM_BYTES = 1 << 20

Progress = Callable[[str, int, int, dict], None]
@dataclass(frozen=True)
class Declared:
    name: str
    type: type
    default: object
    help: str
    source: str = ""


PARAMETERS = (
    Declared("rank", float, 8, "Rank per layer (>= 1), or an energy fraction in (0, 1) kept per layer.",
             "PEFT LoraConfig.r default 8"),
    Declared("lowrank_above", int, 1024, "Use randomized SVD when a layer's smaller side exceeds this.",
             "exact SVD of a 1024-wide layer takes well under a second on CPU"),
    Declared("oversample", int, 10, "Randomized SVD: extra columns beyond the rank.",
             "Halko, Martinsson & Tropp 2011, Sec. 4.2: p = 5 or 10"),
    Declared("niter", int, 4, "Randomized SVD: power (subspace) iterations.",
             "Halko et al. 2011, Sec. 4.5: q = 1..3 for slowly decaying spectra; torch default 2"),
    Declared("seed", int, 0, "Randomized SVD: seed of its random sketch (the same adapter on every run).",
             "torch.svd_lowrank draws its sketch from torch's global generator, unseeded"),
)
DEFAULTS = {p.name: p.default for p in PARAMETERS}


def no_progress(task: str, done: int, total: int, info: dict | None = None) -> None:
    return None


@dataclass
class ExtractOptions:
    rank: float = DEFAULTS["rank"]
    targets: list[str] | None = None  # module names or dotted suffixes (as PEFT's target_modules)
    device: str | None = None
    dtype: str | None = None  # float32 | bfloat16 | float16; default: BASE's dominant dtype
    lowrank_above: int = DEFAULTS["lowrank_above"]
    oversample: int = DEFAULTS["oversample"]
    niter: int = DEFAULTS["niter"]
    seed: int = DEFAULTS["seed"]
    force: bool = False

    def parameters(self) -> dict:
        return {"rank": self.rank, "targets": self.targets, "dtype": self.dtype, "lowrank_above": self.lowrank_above,
                "oversample": self.oversample, "niter": self.niter, "seed": self.seed}


@dataclass
class LayerResult:
    module: str
    shape: tuple[int, int]  # (out, in)
    rank: int
    relative_error: float  # ||delta - B A||_F / ||delta||_F
    svd: str  # exact | lowrank


@dataclass
class ExtractReport:
    base: str
    tuned: str
    output: str
    family: str
    rank: float
    layers: list[LayerResult] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)  # targeted layers with a zero delta (left out)
    other_changed: list[str] = field(default_factory=list)  # changed tensors a LoRA cannot carry
    adapter_parameters: int = 0
    adapter_bytes: int = 0
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["layers"] = [dict(x.__dict__) for x in self.layers]
        return d


def check_same_architecture(base: Checkpoint, tuned: Checkpoint, bf: Family, tf: Family) -> None:
    if bf.name != tf.name:
        raise SurgeryError(f"{tuned.path}: TUNED is a '{tf.name}' model, BASE {base.path} a '{bf.name}' model")
    missing = [k for k in base if k not in tuned]
    if missing:
        raise SurgeryError(f"{tuned.path}: TUNED has no tensor '{missing[0]}' (BASE has it): another architecture")
    extra = [k for k in tuned if k not in base]
    if extra:
        raise SurgeryError(f"{tuned.path}: TUNED has a tensor '{extra[0]}' that BASE lacks: another architecture")
    for k in base:
        if base.shape(k) != tuned.shape(k):
            raise SurgeryError(f"{tuned.path}: tensor '{k}' has shape {tuple(tuned.shape(k))} in TUNED, "
                               f"{tuple(base.shape(k))} in BASE: another architecture")


def linear_targets(family: Family, targets: list[str] | None) -> dict[str, bool]:
    """Weight tensor -> transposed, for the layers to extract: every linear in the blocks, or the 2-D
    weights whose module name equals or ends with one of ``targets`` (PEFT's target_modules rule)."""
    ckpt = family.ckpt
    block = {lin.weight: lin.transposed for i in range(family.num_layers)
             for lin in family.block_linears(i).values()}
    if not targets:
        if not block:
            raise SurgeryError(f"{ckpt.path}: family '{family.name}' names no linear layers; pass --targets")
        return block
    embeddings = set(family.embedding_names())
    renamed = family.renamed_weights()
    chosen: dict[str, bool] = {}
    for t in targets:
        if f"{t}.weight" in renamed:  # transformers' name of a module the checkpoint spells otherwise
            t = renamed[f"{t}.weight"].removesuffix(".weight")
        hits = [n for n in ckpt if n.endswith(".weight") and len(ckpt.shape(n)) == 2
                and (n[:-7] == t or n[:-7].endswith("." + t))]
        if not hits:
            raise SurgeryError(f"--targets '{t}': no 2-D weight of {ckpt.path} has a module name ending in '{t}'")
        for n in hits:
            if n in embeddings:
                raise SurgeryError(f"--targets '{t}': '{n}' is an embedding; extract writes LoRA for linear layers")
            chosen[n] = block.get(n, False)
    return chosen


def choose_rank(s: torch.Tensor, total_energy: float, rank: float) -> int:
    if rank >= 1:
        return min(int(rank), s.numel())
    energy = torch.cumsum(s.double() ** 2, 0) / total_energy
    return min(int(torch.searchsorted(energy, torch.tensor(rank, dtype=energy.dtype)).item()) + 1, s.numel())


def truncated_svd(delta: torch.Tensor, options: ExtractOptions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(U_r, S_r, V_r) of the rank the options ask for, exact or randomized."""
    small = min(delta.shape)
    # ||delta||_F^2 in float64: an energy fraction's denominator; a whole rank does not read it (two
    # float64 copies of the layer, the slowest step of a lowrank layer, for nothing)
    total = float((delta.double() ** 2).sum()) if options.rank < 1 else math.nan
    if small <= options.lowrank_above:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = choose_rank(s, total, options.rank)
        return u[:, :r], s[:r], vh[:r].t(), "exact"
    q = min(small, int(options.rank) + options.oversample) if options.rank >= 1 else min(small, 64)
    while True:
        # the sketch from a generator seeded here, leaving the caller's random state as it was
        with torch.random.fork_rng(devices=[delta.device] if delta.device.type == "cuda" else []):
            torch.manual_seed(options.seed)
            u, s, v = torch.svd_lowrank(delta, q=q, niter=options.niter)
        if options.rank >= 1 or q == small or float((s.double() ** 2).sum()) / total >= options.rank:
            break
        q = min(small, 2 * q)  # the fraction is not reached yet: widen the sketch
    r = choose_rank(s, total, options.rank) if options.rank < 1 else min(int(options.rank), s.numel())
    return u[:, :r], s[:r], v[:, :r], "lowrank"


def extract_lora(base_path: str | Path, tuned_path: str | Path, out: str | Path,
                 options: ExtractOptions | None = None, progress: Progress = no_progress) -> ExtractReport:
    options = options or ExtractOptions()
    out = Path(out)
    if not ((options.rank >= 1 and float(options.rank).is_integer()) or 0 < options.rank < 1):
        raise SurgeryError(f"--rank {options.rank}: expected a whole rank >= 1 or an energy fraction in (0, 1)")
    dtype = float_dtype(options.dtype)
    device = torch.device(resolve_device(options.device or "cpu"))
    base, tuned = Checkpoint.open(base_path), Checkpoint.open(tuned_path)
    bf, tf = detect_family(base), detect_family(tuned)
    check_same_architecture(base, tuned, bf, tf)
    targets = linear_targets(bf, options.targets)
    check_output(out, options.force, [base.path, tuned.path])
    dtype = dtype or base.dtype()

    report = ExtractReport(str(base.path), str(tuned.path), str(out), bf.name, options.rank)
    tensors: list[PlannedTensor] = []
    ranks: dict[str, int] = {}
    # the adapter names modules as the model PEFT loads them (transformers 5: GPT-NeoX's embed_out is lm_head)
    loaded = bf.loaded_names()
    flips: dict[str, bool] = {}
    # each layer's delta and SVD factors are freed before the next: mapped, they go back to the OS when
    # freed (in glibc's heap, the holes they left kept 1.3 GB resident on the 1.7 GB bench model; 0.4 GB mapped)
    with large_allocations_mapped(MAP_FROM_BYTES):
        for i, (name, flipped) in enumerate(targets.items()):
            module = loaded.get(name, name).removesuffix(".weight")
            flips[module] = flipped
            # in place: TUNED's float32 copy minus BASE's tensor; a 16-bit BASE is widened (exactly) as it is read,
            # any other dtype is first rounded to float32 as before: the same float32 subtraction either way
            before = base.get(name).to(device)
            if before.dtype not in (torch.float16, torch.bfloat16):
                before = before.to(torch.float32)
            delta = tuned.get(name).to(device, torch.float32, copy=True).sub_(before)
            del before
            base.close(), tuned.close()  # unmap: read pages of mapped inputs count as resident memory until then
            if flipped:
                delta = delta.t()
            if not int(torch.count_nonzero(delta)):  # any() reads a float tensor at half the speed
                report.unchanged.append(module)
                progress("extract", i + 1, len(targets), {})  # counted too: a bar ending on one stops short of 100 %
                continue
            u, s, v, how = truncated_svd(delta, options)
            root = s.sqrt()
            lora_b, lora_a = (u * root).to(dtype), (v * root).t().to(dtype)
            # the error of what the adapter holds: after the cast to its dtype
            # (B A - delta): the norm of delta - B A, negated exactly, without a second layer-sized temporary
            error = float(torch.linalg.norm((lora_b.float() @ lora_a.float()).sub_(delta)) / torch.linalg.norm(delta))
            report.layers.append(LayerResult(module, tuple(delta.shape), int(s.numel()), error, how))
            ranks[module] = int(s.numel())
            tensors.append(plan_tensor(module_key(module, "lora_A.weight"), lora_a.to("cpu").contiguous()))
            tensors.append(plan_tensor(module_key(module, "lora_B.weight"), lora_b.to("cpu").contiguous()))
            progress("extract", i + 1, len(targets), {"rank": ranks[module], "error": error})
    if not tensors:
        raise SurgeryError(f"{tuned.path}: no targeted layer differs from BASE; there is nothing to extract")
    others = [k for k in base if k not in targets]
    for i, k in enumerate(others):  # a full read of both models' other tensors (embeddings, heads)
        if not torch.equal(base.get(k), tuned.get(k)):
            report.other_changed.append(k)
        progress("compare", i + 1, len(others), {})
    base.close(), tuned.close()
    common = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {m: r for m, r in ranks.items() if r != common}
    config = lora_config(common, common, sorted(ranks), pattern, dict(pattern),
                         fan_in_fan_out=any(flips[m] for m in ranks), base=str(base_path))
    provenance = Provenance("extract", options.parameters(), [*base.source_files, *tuned.source_files])
    files = write_lora_adapter(out, tensors, config, provenance, options.force)
    report.adapter_parameters = sum(math.prod(t.shape) for t in tensors)
    report.adapter_bytes = sum(t.nbytes for t in tensors)
    report.files = [str(f) for f in files]
    return report
