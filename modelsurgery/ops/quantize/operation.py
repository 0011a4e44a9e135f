"""`surgery quantize`: post-training weight quantization of a checkpoint with RTN, AdaRound
(Nagel et al. 2020) or FlexRound (Lee et al., ICML 2023), reconstructed block by block.

Writes fake-quantized float weights under the same names, or the packed format (``packing.py``);
``FORMATS`` maps each output format to the function that turns one quantized weight into the
tensors written for it. Each method's parameters (steps, learning rate, regulariser ...) come from
its declaration (``params.py``); ``QuantizeOptions.params`` overrides some of them, a preset
(``params.PRESETS``: fast, default, best) sets steps, samples and batch size that the user left
out, and the values used are written to the output's provenance. The options and their checks live in
``options.py``.
"""

from __future__ import annotations

import fnmatch
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelsurgery.checkpoint import (
    Checkpoint,
    Provenance,
    check_output,
    plan_copy,
    plan_tensor,
    write_checkpoint,
)
from modelsurgery.checkpoint.writer import float_dtype
from modelsurgery.data import Dataset, check_fits, load_data
from modelsurgery.devices import resolve_device
from modelsurgery.errors import SurgeryError
from modelsurgery.families import detect_family
from modelsurgery.ops.quantize import distributed, streaming
from modelsurgery.ops.quantize.base import QuantizedWeight, method_by_name
from modelsurgery.ops.quantize.compare import compare_models
from modelsurgery.ops.quantize.grids import group_size_for
from modelsurgery.ops.quantize.options import QuantizeOptions, check_unread, check_writing, with_preset
from modelsurgery.ops.quantize.packing import (
    METADATA_KEY,
    folder_config,
    layer_entry,
    packed_tensors,
    scheme_metadata,
)
from modelsurgery.ops.quantize.reconstruct import (
    Progress,
    ReconstructOptions,
    Target,
    find_targets,
    reconstruct_blocks,
    reconstruct_iter,
)


def fake_tensors(name: str, qw: QuantizedWeight, bits: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The dequantized weight under its own name and dtype."""
    return {name: qw.dequantized.to(dtype)}


def _packed(name: str, qw: QuantizedWeight, bits: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return packed_tensors(name, qw, bits)


#: output format -> (name, quantized weight, bits, the checkpoint's dtype) -> tensors to write
FORMATS: dict[str, Callable[[str, QuantizedWeight, int, torch.dtype], dict[str, torch.Tensor]]] = {
    "fake": fake_tensors,
    "packed": _packed,
}


@dataclass
class QuantizeResult:
    output: str
    family: str
    options: dict
    layers: dict[str, dict]
    skipped: list[str]
    blocks: list[dict]
    seconds: float
    peak_rss_mb: float
    bytes_in: int
    bytes_out: int
    evaluation: dict | None = None
    #: float weight matrices that stay float, each {name, reason} (``kept_float``)
    kept_float: list[dict] = field(default_factory=list)
    #: the calibration's estimated training time, from the first block's first steps (``CalibrationEstimate``)
    estimate: dict | None = None
    #: --format gptq|compressed-tensors|gguf: the writer's report (files, block type, scale rounding)
    deploy: dict | None = None
    device: str = "cpu"
    streamed: bool = False
    #: processes that calibrated together (torchrun); 1 for a single process
    world_size: int = 1
    #: --skip patterns that name no Linear, Conv or Embedding weight of the model (kept nothing float)
    skip_unmatched: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _skipped(name: str, patterns: list[str], aliases: dict[str, str] | None = None) -> bool:
    """Whether a --skip pattern (or a family's default skip) names the weight ``name``, or its name in ``aliases``
    (``Family.loaded_names``: GPT-NeoX's ``embed_out.weight`` is ``lm_head.weight`` there): a glob on the tensor name
    or on its module's name (the name without its last part, as transformers' ``modules_to_not_convert`` and
    llm-compressor's ``ignore`` name layers: ``model.layers.0.mlp.down_proj``, ``*.down_proj``), or a run of its
    dotted parts: one part of the name (``lm_head``, ``weight``) or a run of the module's (``mlp.down_proj``,
    ``layers.0``; within the module's name, so that a default skip ``conv1.weight`` names no ``layer1.0.conv1``)."""
    if aliases and name in aliases and _skipped(aliases[name], patterns):
        return True
    module = name.rsplit(".", 1)[0]
    return any(fnmatch.fnmatchcase(name, p) or p in name.split(".") or fnmatch.fnmatchcase(module, p)
               or f".{p}." in f".{module}." for p in patterns)


#: steps of the first trained block timed before the estimate is reported (after the first step, which
#: also allocates the block's training state)
ESTIMATE_STEPS = 5


class CalibrationEstimate:
    """The progress callback, timing the first trained block: after ESTIMATE_STEPS steps (past the first)
    it reports one line, "estimated N min for B blocks x S steps (T s/step)", as ``info["message"]``, and
    keeps the figures (``estimate``) for the report. Blocks other than the first may differ in size: it is
    an estimate of the training time, not of reading, writing or evaluation."""

    def __init__(self, progress: Progress | None, trained_blocks: int | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.progress = progress or (lambda *a, **k: None)
        self.clock = clock
        #: blocks that hold weights to learn (default: every block of the run)
        self.trained = trained_blocks
        self.blocks: int | None = None
        self.first: tuple[str, float] | None = None  # (task, time of its step 1)
        self.estimate: dict | None = None

    def __call__(self, task: str, done: int, total: int, info: dict | None = None) -> None:
        now = self.clock()
        self.progress(task, done, total, info or {})
        if task == "blocks":
            self.blocks = self.trained if self.trained is not None else total
            return
        if self.estimate is not None or self.blocks is None or total <= 1:
            return
        if self.first is None:
            if done == 1:
                self.first = (task, now)
            return
        if task != self.first[0] or not (done - 1 >= ESTIMATE_STEPS or done == total):
            return
        per_step = (now - self.first[1]) / (done - 1)
        seconds = self.blocks * total * per_step
        self.estimate = {"seconds": seconds, "blocks": self.blocks, "steps": total, "seconds_per_step": per_step,
                         "timed_steps": done - 1}
        took = f"{seconds / 60:.1f} min" if seconds >= 6 else f"{seconds:.1f} s"
        self.estimate["message"] = f"estimated {took} for {self.blocks} blocks x {total} steps ({per_step:.3g} s/step)"
        self.progress("estimate", 0, 0, {"message": self.estimate["message"]})


def block_label(family, names: list[str]) -> str:
    """A block's own prefix ("transformer.h.0.*", whatever weights it holds), from the family's block
    names; outside a block stack the weights' common prefix, or the one weight's name."""
    if not names:
        return ""
    where = family.block_of(names[0])
    if where is not None:
        return names[0][: len(names[0]) - len(where[1])] + "*"
    if len(names) == 1:
        return names[0]
    common = []
    for parts in zip(*(n.split(".") for n in names)):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return ".".join(common) + ".*" if common else "*"


def kept_float(ckpt: Checkpoint, family, quantized: set[str], targets: dict[int, Target], skip: list[str],
               default_skips: bool) -> list[dict[str, str]]:
    """Every float weight matrix (2 or more dimensions: biases and norms always stay float) of the checkpoint
    that stays float, with the reason: a default skip (embedding, output head), a --skip pattern, or not a
    Linear, Conv or Embedding weight of the model the family runs (a pooler, a tied copy)."""
    embeddings, heads = family.embedding_names(), family.head_names()
    target_names = {t.name for t in targets.values()}
    aliases = family.loaded_names()
    out = []
    for name in ckpt.keys():  # noqa: SIM118 - Checkpoint is not iterable
        info = ckpt.info(name)
        if name in quantized or not info.dtype.is_floating_point or len(info.shape) < 2:
            continue
        if name not in target_names:
            reason = f"not a Linear, Conv or Embedding weight of the {family.name} model"
        elif user := next((p for p in skip if _skipped(name, [p], aliases)), None):
            reason = f"--skip {user}"
        elif default_skips and _skipped(name, embeddings):
            reason = "embedding: default skip"
        elif default_skips and _skipped(name, heads):
            reason = "output head: default skip"
        else:
            reason = "not quantized"
        out.append({"name": name, "reason": reason})
    return out


def read_data(path: Path, family, folder: Path | None, samples: int | None, seq_len: int | None,
              module) -> Dataset:
    """Read calibration or evaluation data and check it fits the model (one forward pass; none when
    ``module`` is None, an empty module read block by block)."""
    data = load_data(path, tokenizer=folder)
    if samples is not None:
        data = data.select(slice(0, samples))
    if data.is_tokens:  # at most seq_len tokens, and no trailing columns that are padding in every sample
        width = min(seq_len or data.input_ids.shape[1], data.input_ids.shape[1])
        if data.attention_mask is not None and data.attention_mask.numel():
            # the last column any sample attends to, not the longest sample's token count: a left-padded
            # or gapped sample's tokens lie beyond that count
            used = data.attention_mask.bool().any(0).nonzero()
            width = min(width, int(used.max()) + 1 if len(used) else 0)
        data.input_ids = data.input_ids[:, :width]
        if data.attention_mask is not None:
            data.attention_mask = data.attention_mask[:, :width]
        if data.labels is not None and data.labels.dim() == 2:  # token targets follow their tokens
            data.labels = data.labels[:, :width]
    check_fits(family, data)
    if module is None:
        return data
    first = next(data.batches(2, family))
    try:
        with torch.no_grad():
            module(**first)
    except Exception as e:
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in first.items())
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SurgeryError(f"{path}: data ({shapes}) does not fit the {family.name} model: {msg}") from None
    return data


def quantize_checkpoint(path: str | Path, out: str | Path, opts: QuantizeOptions,
                        progress: Progress | None = None) -> QuantizeResult:
    """Quantize ``path`` into ``out``. Under torchrun the calibration is data-parallel over the
    processes (``distributed.py``) and only rank 0 writes."""
    with distributed.process_group(resolve_device(opts.device)) as (rank, size):
        return _quantize_checkpoint(path, out, opts, progress, rank, size)


def _quantize_checkpoint(path: str | Path, out: str | Path, opts: QuantizeOptions, progress: Progress | None,
                         rank: int, world_size: int) -> QuantizeResult:
    start = time.perf_counter()
    path, out = Path(path), Path(out)
    scheme = opts.scheme
    scheme.validate()
    method = method_by_name(opts.method)
    check_unread(opts, method)
    given, opts = opts, with_preset(opts, method)
    settings = method.resolve(opts.params)
    if method.optimizer == "signsgd" and not settings["lr"]:  # lr 0 means the method's rule: record its value
        settings["lr"] = method.signed_step(scheme.bits, max(1, settings["steps"]))
    check_writing(opts)
    from modelsurgery.deploy import FORMATS as DEPLOYED  # imported late: deploy reads packing.py

    if opts.format in DEPLOYED:  # GPTQ, compressed-tensors, GGUF (modelsurgery.deploy.quantize)
        from modelsurgery.deploy.quantize import quantize_to_format

        return quantize_to_format(path, out, given, progress)  # which quantizes as given, the preset applied there
    if opts.format not in FORMATS:
        raise SurgeryError(f"--format {opts.format}: expected one of {', '.join((*FORMATS, *DEPLOYED))}")
    from modelsurgery.ops.float_input import float_source, quantization_of  # imported late: they read packing.py

    ckpt = Checkpoint.open(path)
    quantized = quantization_of(ckpt)
    if quantized is not None and quantized.format != "fake":  # fake-quantized weights are float: quantized again
        raise SurgeryError(f"{path}: {quantized.describe()}; quantize needs the float weights "
                           f"({float_source(ckpt, quantized)})")
    family = detect_family(ckpt, opts.model)
    if not family.runnable:
        raise SurgeryError(f"{path}: {family.not_runnable_reason()}")
    if method.learned and opts.calib is None:
        raise SurgeryError(f"--method {opts.method} learns the rounding from data: pass --calib FILE")
    device = resolve_device(opts.device)
    if rank == 0:
        check_output(out, opts.force, [path, *opts.data_files()])

    # --eval compares the whole float and quantized models: it builds them; otherwise the module is
    # built empty and the weights are read a tensor or a block at a time (``streaming.py``)
    streamed = opts.streaming and opts.eval is None
    model = family.build_empty() if streamed else family.build_module()
    ckpt.close()  # the module holds the weights: the mapped file need not stay resident
    targets = all_targets = find_targets(model)
    patterns = list(opts.skip)
    if opts.default_skips:
        patterns += family.embedding_names() + family.head_names()
    aliases = family.loaded_names()
    skipped = sorted(t.name for t in targets.values() if _skipped(t.name, patterns, aliases))
    unmatched = [p for p in opts.skip if not any(_skipped(t.name, [p], aliases) for t in targets.values())]
    targets = {k: t for k, t in targets.items() if t.name not in skipped}
    for t in targets.values():
        if t.name not in ckpt:
            raise SurgeryError(f"{path}: the {family.name} model's weight '{t.name}' is not a checkpoint tensor")
        shape = ckpt.shape(t.name)
        rows = shape[1] if t.transposed else shape[0]
        group_size_for(scheme, (int(torch.tensor(shape).prod()) // rows), t.name)
    if not targets:
        raise SurgeryError(f"{path}: no Linear, Conv or Embedding weight left to quantize (check --skip)")

    calib, used, read = [], 0, []
    seq_len = opts.tokens_per_sample
    if opts.calib is not None:
        data = read_data(Path(opts.calib), family, ckpt.folder, opts.samples, seq_len, None if streamed else model)
        read.append((opts.calib, data))
        used = len(data)  # a file with fewer samples than --samples gives what it has
        calib = list(data.batches(settings["batch_size"], family))
    parallel = None
    if world_size > 1 and calib:
        calib, shares = distributed.split_batches(calib, rank, world_size)
        parallel = distributed.DataParallel(rank, world_size, shares)
    eval_data = None
    if opts.eval is not None:
        eval_data = read_data(Path(opts.eval), family, ckpt.folder, None, seq_len, model)
        read.append((opts.eval, eval_data))
    tokens = any(d.is_tokens for _, d in read)
    if opts.seq_len is not None and not tokens:
        raise SurgeryError(f"--seq-len {opts.seq_len}: it cuts token samples, and {read[0][0]} holds feature inputs, "
                           "not token ids")

    tensors_for = FORMATS[opts.format]
    grid = opts.grid or method.default_grid  # the grid the weights start from (the method's when none is given)
    if opts.dtype is not None:  # a quantized weight goes from float32 to --dtype once, not through the input's dtype
        write_dtype, own = float_dtype(opts.dtype), tensors_for
        tensors_for = lambda name, qw, bits, dtype: own(name, qw, bits, write_dtype)
    in_targets = [any(id(p) in targets for p in b.parameters()) for b in model.stages().blocks]
    timer = CalibrationEstimate(progress, sum(in_targets))
    seed, low_memory = opts.batch_seed, opts.frees_memory
    recon = ReconstructOptions(settings=settings, grid=opts.grid, seed=seed, low_memory=low_memory,
                               device=device, offload_dir=opts.offload_dir, parallel=parallel)
    blocks: list = []
    steps = rounding = None
    if streamed and not calib and not method.learned:
        layers = streaming.layer_entries(ckpt, targets, scheme, opts.bits)
        rounding = streaming.RoundingPool()
        planned = streaming.plan_rtn(ckpt, targets, scheme, method, opts.grid, opts.format, tensors_for, rounding)
    elif streamed:
        layers = streaming.layer_entries(ckpt, targets, scheme, opts.bits)
        steps = reconstruct_iter(model, targets, calib, scheme, method, recon, timer,
                                 streaming.LazyWeights(ckpt, model))
        planned = streaming.plan_calibrated(ckpt, family, targets, steps, opts.format, scheme, tensors_for,
                                            blocks.append)
    else:
        result = reconstruct_blocks(model, targets, calib, scheme, method, recon, timer)
        blocks = result.blocks
        layers = {n: layer_entry(ckpt.shape(n), opts.bits, qw) for n, qw in result.weights.items()}
        planned = []
        # calibrated: block order, as the streamed path writes it (the same bytes); otherwise the checkpoint's
        for name in streaming.block_order(ckpt, family) if calib else ckpt.keys():
            qw = result.weights.get(name)
            if qw is None:
                planned.append(plan_copy(ckpt, name))
            else:
                planned += [plan_tensor(k, v)
                            for k, v in tensors_for(name, qw, opts.bits, ckpt.info(name).dtype).items()]
    # how the weights were read does not change what is written: streaming and offload_dir are left out; the
    # writer records the writing options (the dtype written, the inputs left unhashed)
    params = {k: str(v) if isinstance(v, Path) else v for k, v in opts.__dict__.items()
              if k not in ("force", "streaming", "offload_dir", "dtype", "max_shard_size", "hash_inputs")}
    params["params"] = settings  # the values used, defaults included
    params["grid"] = grid  # None would not say which grid the method started from
    params["seq_len"] = seq_len if tokens else None  # None: no token data was cut
    if method.learned:  # the values used (RTN's are None: it draws no batches and trains nothing)
        params["seed"], params["low_memory"] = seed, low_memory
    if calib:
        params["samples_used"] = used  # a file holding fewer than --samples gives what it has
    else:  # no calibration data: the preset's sample count was not used
        params["samples"] = None
    if world_size > 1:  # the gradients were summed in another order: the codes may differ in rare ties
        params["world_size"] = world_size
    try:
        bytes_out = 0
        if rank == 0:  # the other processes only take part in the calibration
            bytes_out = write_checkpoint(
                out, planned, provenance=Provenance("quantize", params, ckpt.source_files),
                metadata={**{k: v for k, v in ckpt.metadata.items()
                             if k.startswith("modelsurgery.") and k != METADATA_KEY},
                          **scheme_metadata(opts.format, opts.method, scheme.to_dict(), layers)},
                config=folder_config(ckpt.config, opts.format, opts.bits), extra_files=ckpt.extra_files(),
                force=opts.force, **opts.write_kwargs(),
            ).total_bytes
        if steps is not None:
            streaming.finish(steps, blocks.append)
    finally:
        if steps is not None:
            steps.close()
        if rounding is not None:
            rounding.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process peak (Linux: KiB)
    evaluation = None
    if eval_data is not None:  # the float side is built again: calibration never holds two models
        reference = family.build_module()
        ckpt.close()
        evaluation = compare_models(reference, model, family, eval_data)
    return QuantizeResult(
        output=str(out), family=family.name, options={"method": opts.method, "format": opts.format,
                                                      **scheme.to_dict(), **settings, "preset": opts.preset,
                                                      "grid": grid,
                                                      "samples": opts.samples if calib else 0,
                                                      "samples_used": used},
        layers=layers, skipped=skipped,
        kept_float=kept_float(ckpt, family, set(layers), all_targets, opts.skip, opts.default_skips),
        blocks=[{**b.to_dict(), "label": block_label(family, b.weights)} for b in blocks],
        estimate=timer.estimate,
        seconds=time.perf_counter() - start, peak_rss_mb=peak / 2**20,
        bytes_in=ckpt.nbytes, bytes_out=bytes_out, evaluation=evaluation, device=device,
        streamed=streamed, world_size=world_size, skip_unmatched=unmatched,
    )

