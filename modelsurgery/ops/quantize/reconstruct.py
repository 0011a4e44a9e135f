"""Block-by-block reconstruction (BRECQ, Li et al. ICLR 2021; as used by FlexRound): each block's
quantized weights are learned so that the block, fed the output of the already-quantized previous
blocks, reproduces the float model's output of that block on calibration data.

Only the current block's activations are cached: its quantized input and its float target (the
float input is replaced by the target batch by batch), each in one tensor for all calibration
batches (``BatchCache``). No float copy of the model is kept: a block's float target is computed
with its own weights before they are quantized, and each quantized weight is held once, by the
model (``QuantizedWeight.dequantized`` shares the parameter's storage). The integer codes are not
kept either: they are recomputed from the float32 weight when the packed output is written.

With ``low_memory`` (the default), while a block trains, the C allocator's free pages are handed
back to the OS after every step and before every backward pass, and allocations from 1 MB get their
own mapping for the duration of the calibration only (``memory.py``): without that, glibc keeps the
holes that one step's transients leave in its heap, and resident memory grows by half again over
what is live. The price is page faults on every step's allocations, which on small blocks can
double the training time.

Loss, as BRECQ's and FlexRound's ``lp_loss``: squared error summed over the feature dimension only
and averaged over everything else (samples, positions, pixels; padding positions left out), so that
a regulariser's weight means the same for an MLP layer, a conv block and a transformer block. The
feature dimension is the channel axis (1) of a block made of convolutions, else the last one. Adam,
with the learning rate, steps, batch size and schedule the method declares. Weights are found
through the built module's own parameters and mapped to checkpoint names by identity. Embedding
tables (quantized only when asked) are rounded to nearest per row, whatever the method.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from modelsurgery.errors import SurgeryError
from modelsurgery.memory import file_backed_empty, large_allocations_mapped, release_freed_memory
from modelsurgery.ops.quantize.base import QuantizedWeight, WeightQuantizer
from modelsurgery.ops.quantize.distributed import DataParallel
from modelsurgery.ops.quantize.grids import Grid, QuantScheme, fake_quantize
from modelsurgery.ops.quantize.rtn import RTNQuantizer

Progress = Callable[[str, int, int, dict], None]
#: allocations from this size on get their own mapping while blocks are trained (``memory.py``)
MAP_FROM_BYTES = 1 << 20


@dataclass
class Target:
    """A weight to quantize: its checkpoint name, whether it is stored (in, out), and whether it is
    an embedding table (rounded to nearest per row: a lookup has no input to reconstruct)."""

    name: str
    transposed: bool = False
    embedding: bool = False


@dataclass
class BlockReport:
    index: int
    weights: list[str]
    rtn_loss: float | None = None
    loss: float | None = None
    seconds: float = 0.0
    #: bytes of the activations cached for this block (quantized input, float target, context
    #: tensors such as attention biases, masks), each distinct tensor counted once
    cached_bytes: int = 0

    def to_dict(self) -> dict:
        return {"block": self.index, "weights": self.weights, "rtn_loss": self.rtn_loss, "loss": self.loss,
                "seconds": round(self.seconds, 3), "cached_bytes": self.cached_bytes}


@dataclass
class ReconstructOptions:
    #: the method's resolved parameters (``WeightQuantizer.resolve``); empty: its defaults
    settings: dict = field(default_factory=dict)
    grid: str | None = None
    seed: int = 0
    #: return freed memory to the OS at every step, and map allocations from MAP_FROM_BYTES
    low_memory: bool = True
    #: where the block being reconstructed and its activations live ("cpu", "cuda", "cuda:N")
    device: str = "cpu"
    #: keep the cached activations in files here (memory-mapped) instead of in memory
    offload_dir: Path | None = None
    #: data-parallel calibration under torchrun: this rank's share of each batch (``distributed.py``)
    parallel: DataParallel | None = None


class Residency:
    """Where the model's weights are while blocks are reconstructed. This base: all in memory (a
    built model), so loading and releasing do nothing; ``streaming.LazyWeights`` reads them from
    the checkpoint when their turn comes and drops them after."""

    def load(self, params: list[nn.Parameter], device: torch.device) -> None:
        for p in params:
            if p.device != device:
                torch.utils.swap_tensors(p, nn.Parameter(p.detach().to(device), requires_grad=False))

    def release(self, params: list[nn.Parameter]) -> None:
        for p in params:
            if p.device.type != "cpu":
                torch.utils.swap_tensors(p, nn.Parameter(p.detach().cpu(), requires_grad=False))


@dataclass
class ReconstructResult:
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    blocks: list[BlockReport] = field(default_factory=list)


CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_quantizable(module: nn.Module) -> tuple[bool, bool]:
    """(quantize its weight?, stored transposed?) for Linear, Conv, Embedding and transformers' Conv1D."""
    if isinstance(module, (nn.Linear, nn.Embedding, *CONVS)):
        return True, False
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return True, True  # GPT-2: weight stored (in, out)
    return False, False


def find_targets(model: nn.Module) -> dict[int, Target]:
    """id(weight parameter) -> Target for every quantizable layer of ``model`` (a weight shared by
    an embedding and a head is one target, an embedding)."""
    names = {id(p): n for n, p in model.named_parameters()}
    found: dict[int, Target] = {}
    for module in model.modules():
        ok, transposed = is_quantizable(module)
        if ok and id(module.weight) in names:
            embedding = isinstance(module, nn.Embedding) or found.get(id(module.weight), Target("")).embedding
            found[id(module.weight)] = Target(names[id(module.weight)], transposed, embedding)
    return found


def feature_dim(block: nn.Module) -> int:
    """The axis of a block's output that holds its features: the channels (1) of a block made of
    convolutions, else the last one (Linear, Conv1D)."""
    return 1 if any(isinstance(m, CONVS) for m in block.modules()) else -1


def rec_loss(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
             dim: int = -1) -> torch.Tensor:
    """Squared error summed over the feature axis ``dim``, mean over every other (BRECQ's and
    FlexRound's ``lp_loss``); positions where ``mask`` [batch, positions] is 0 are left out."""
    err = (out - target).pow(2).sum(dim if out.dim() > 1 else 0)
    if mask is not None and err.dim() == 2 and tuple(mask.shape) == tuple(err.shape):
        mask = mask.to(err.dtype)
        return (err * mask).sum() / mask.sum().clamp_min(1)
    return err.mean()


class BatchCache:
    """The activations of every calibration batch in one tensor [samples, ...], seen batch by batch.

    One allocation for the whole cache, rewritten in place while a block keeps the shape, instead
    of one tensor per batch: per-batch tensors freed and reallocated between the forward and
    backward transients fragment the C allocator's heap, which then holds its holes (on BERT the
    calibration's resident memory grew by half again over what was live)."""

    def __init__(self, sizes: list[int], device: torch.device | None = None, offload_dir: Path | None = None):
        self.sizes = sizes
        self.starts = [sum(sizes[:j]) for j in range(len(sizes))]
        self.data: torch.Tensor | None = None
        #: where batches are used; with ``offload_dir`` the data stays in a mapped file on the host
        self.device = device
        self.offload_dir = offload_dir

    @classmethod
    def build(cls, sizes: list[int], fn: Callable[[int], torch.Tensor], device: torch.device | None = None,
              offload_dir: Path | None = None) -> BatchCache:
        cache = cls(sizes, device, offload_dir)
        cache.map_(lambda j, _: fn(j))
        return cache

    def _allocate(self, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        if self.offload_dir is None:
            return like.new_empty(shape)
        # a file-backed mapping: its pages are the page cache's to evict, not anonymous memory
        try:
            return file_backed_empty(tuple(shape), like.dtype, self.offload_dir, prefix="activations-")
        except OSError as e:
            nbytes = math.prod(shape) * like.element_size()
            raise SurgeryError(f"--offload-dir {self.offload_dir}: no room for {nbytes} bytes of cached "
                               f"activations ({e.strerror})") from e

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, j: int) -> torch.Tensor:
        batch = self.data.narrow(0, self.starts[j], self.sizes[j])
        return batch.to(self.device) if self.device is not None else batch

    def __iter__(self):
        return (self[j] for j in range(len(self)))

    def map_(self, fn: Callable[[int, torch.Tensor | None], torch.Tensor]) -> None:
        """Replace batch j by ``fn(j, batch j)`` for every j: in place when the shape is kept,
        else into one new tensor (the old one is freed at the end)."""
        out = None
        for j in range(len(self)):
            y = fn(j, self[j] if self.data is not None else None)
            if out is None:
                same = self.data is not None and self.data.shape[1:] == y.shape[1:] and self.data.dtype == y.dtype
                out = self.data if same else self._allocate(y, (sum(self.sizes), *y.shape[1:]))
            out.narrow(0, self.starts[j], self.sizes[j]).copy_(y)
            del y
        self.data = out


def _nbytes(*trees) -> int:
    """Bytes of the distinct tensors in nested lists/tuples/dicts (a view counts its own size)."""
    seen: dict[tuple[int, int], int] = {}
    stack = list(trees)
    while stack:
        x = stack.pop()
        if isinstance(x, BatchCache):
            x = x.data
        if isinstance(x, torch.Tensor):
            seen[(x.data_ptr(), x.nbytes)] = x.nbytes
        elif isinstance(x, dict):
            stack += x.values()
        elif isinstance(x, (list, tuple)):
            stack += x
    return sum(seen.values())


def _block_loss(block, overrides, xs, ctxs, ys, masks, parallel=None) -> float:
    dim = feature_dim(block)
    with torch.no_grad():
        total = sum(rec_loss(functional_call(block, overrides, (x,), c), y, m, dim).item() * x.shape[0]
                    for x, c, y, m in zip(xs, ctxs, ys, masks))
    count = sum(x.shape[0] for x in xs)
    if parallel is not None:  # over every rank's samples
        total, count = parallel.sum([total, count])
    return total / count


def _store(param: nn.Parameter, qw: QuantizedWeight) -> None:
    """Write the dequantized weight into the module; where the layouts agree, ``qw`` then shares
    the parameter's storage instead of holding a second copy."""
    param.data.copy_(qw.dequantized.to(param.dtype))
    if param.dtype == torch.float32 and param.is_contiguous():
        qw.stored_dequantized = param.data
        qw.stored_codes = None  # exactly recoverable from the float32 weight (``QuantizedWeight.codes``)


def rounded_to_nearest(p: nn.Parameter, t: Target, scheme: QuantScheme, method: type[WeightQuantizer],
                       grid: str | None) -> RTNQuantizer:
    """RTN on the grid the method would start from (the method's grid initialisation)."""
    return RTNQuantizer(p, scheme, t.transposed, grid or method.default_grid, t.name)


def _export(quantizers: dict[str, WeightQuantizer], params: dict[str, nn.Parameter], targets: dict[int, Target]
            ) -> dict[str, QuantizedWeight]:
    """Each quantizer's result, written into its parameter (``_store``). The quantizers are taken out
    of ``quantizers`` one by one, so that each one's learned scales and gradients go as soon as it is
    exported, and none outlives the call (a loop variable left holding the last one kept three
    weight-sized tensors alive through the next block's training)."""
    weights = {}
    for n in list(quantizers):
        qw = quantizers.pop(n).export()
        _store(params[n], qw)
        weights[targets[id(params[n])].name] = qw
    return weights


def rounded_on_initial_grid(q: WeightQuantizer) -> torch.Tensor:
    """``q``'s weight rounded to nearest on the grid it starts from: what ``rounded_to_nearest`` gives
    for the same weight (``RTNQuantizer``: the same float32 view, grid and rounding), without running
    the grid initialisation (the ``--grid search`` clipping search) a second time."""
    return q.to_stored(fake_quantize(q.w, Grid(q.scale0, q.zero), q.scheme))


def quantize_outside_blocks(model: nn.Module, targets: dict[int, Target], scheme: QuantScheme,
                            method: type[WeightQuantizer], grid: str | None) -> dict[str, QuantizedWeight]:
    """Weights outside the block stack (embeddings, heads when asked) are rounded on their grid
    without data, and the module is updated in place."""
    out = {}
    params = dict(model.named_parameters())
    for t in targets.values():
        p = params[t.name]
        qw = rounded_to_nearest(p, t, scheme, method, grid).export()
        _store(p, qw)
        out[t.name] = qw
    return out


def reconstruct_blocks(model: nn.Module, targets: dict[int, Target], calib: list[dict[str, torch.Tensor]],
                       scheme: QuantScheme, method: type[WeightQuantizer], options: ReconstructOptions,
                       progress: Progress | None = None) -> ReconstructResult:
    """Quantize ``targets`` (ids of ``model`` parameters) block by block; ``model`` is updated in
    place with the dequantized weights."""
    result = ReconstructResult()
    for weights, report in reconstruct_iter(model, targets, calib, scheme, method, options, progress):
        result.weights.update(weights)
        if report is not None:
            result.blocks.append(report)
    return result


def reconstruct_iter(model: nn.Module, targets: dict[int, Target], calib: list[dict[str, torch.Tensor]],
                     scheme: QuantScheme, method: type[WeightQuantizer], options: ReconstructOptions,
                     progress: Progress | None = None, residency: Residency | None = None
                     ) -> Iterator[tuple[dict[str, QuantizedWeight], BlockReport | None]]:
    """``reconstruct_blocks`` one step at a time: first the weights outside the blocks (report None),
    then each block's weights with its report. ``residency`` loads a block's weights when its turn
    comes and releases them once the consumer has taken the yielded weights (default: they are in
    ``model`` already)."""
    progress = progress or (lambda *a, **k: None)
    settings = method.resolve(options.settings)
    with large_allocations_mapped(MAP_FROM_BYTES, enabled=options.low_memory and method.learned):
        yield from _reconstruct(model, targets, calib, scheme, method, options, settings, progress,
                                residency or Residency())


def _reconstruct(model, targets, calib, scheme, method, options, settings, progress, residency):
    release_freed_memory()  # what reading and tokenizing the data left behind
    model.eval().requires_grad_(False)
    device = torch.device(options.device)
    gen = torch.Generator().manual_seed(options.seed)
    stages = model.stages()
    sizes = [next(iter(b.values())).shape[0] for b in calib]
    ctxs: list[dict] = [{} for _ in calib]
    in_block = {id(p) for b in stages.blocks for p in b.parameters()}
    outside = [p for p in model.parameters() if id(p) not in in_block]
    residency.load(outside, device)
    _buffers_to(model, device)

    def embed(j: int, keep_context: bool = False) -> torch.Tensor:
        h, ctx = stages.embed(**{k: v.to(device) for k, v in calib[j].items()})
        if keep_context:  # masks, attention biases, rotary tables: from the float model
            ctxs[j] = ctx
        return h

    cache = {"device": device, "offload_dir": options.offload_dir}
    with torch.no_grad():  # float embeddings: before any weight outside the blocks is rounded
        yf = BatchCache.build(sizes, lambda j: embed(j, True), **cache)  # then each block's float target
    outside_weights = quantize_outside_blocks(
        model, {k: t for k, t in targets.items() if k not in in_block}, scheme, method, options.grid)
    with torch.no_grad():
        xq = BatchCache.build(sizes, embed, **cache)
    yield outside_weights, None
    del outside_weights
    residency.release(outside)
    masks = [b.get("attention_mask") for b in calib]
    masks = [m.to(device) if m is not None else None for m in masks]
    n_blocks = len(stages.blocks)
    progress("blocks", 0, n_blocks, {})  # the whole-run bar from the start, not after block 1
    for i, qblock in enumerate(stages.blocks):
        start = time.perf_counter()
        params = list(qblock.parameters())
        residency.load(params, device)
        release_freed_memory()  # the previous block's training state
        local = {n: p for n, p in qblock.named_parameters() if id(p) in targets}
        report = BlockReport(i, [targets[id(p)].name for p in local.values()])
        with torch.no_grad():  # float target: this block's weights are not quantized yet
            yf.map_(lambda j, h, block=qblock: block(h, **ctxs[j]))
        report.cached_bytes = _nbytes(xq, yf, ctxs, masks)
        weights = {}
        if local:
            quantizers = {n: rounded_to_nearest(p, targets[id(p)], scheme, method, options.grid)
                          if targets[id(p)].embedding else
                          method(p, scheme, targets[id(p)].transposed, options.grid, targets[id(p)].name, settings)
                          for n, p in local.items()}
            if calib:
                report.rtn_loss = _block_loss(qblock, {n: rounded_on_initial_grid(q) for n, q in quantizers.items()},
                                              xq, ctxs, yf, masks, options.parallel)
            if method.learned and calib and settings.get("steps", 0) > 0:
                task = f"block {i + 1}/{n_blocks}"
                train_block(qblock, quantizers, xq, ctxs, yf, masks, settings, method.lr_schedule, options.low_memory,
                            gen, lambda s, loss, task=task: progress(task, s, settings["steps"], {"loss": loss}),
                            options.parallel, method.optimizer, method.batch_order)
            weights = _export(quantizers, local, targets)
            if calib:
                report.loss = _block_loss(qblock, {}, xq, ctxs, yf, masks, options.parallel)
        with torch.no_grad():  # the next block's quantized input, batch by batch in place
            xq.map_(lambda j, h, block=qblock: block(h, **ctxs[j]))
        report.seconds = time.perf_counter() - start
        progress("blocks", i + 1, n_blocks, {"loss": report.loss if report.loss is not None else float("nan")})
        yield weights, report
        del weights
        residency.release(params)
    _buffers_to(model, torch.device("cpu"))


def _buffers_to(model: nn.Module, device: torch.device) -> None:
    """Move the buffers (rotary tables, norm statistics) only: parameters move with their block."""
    for module in model.modules():
        for k, b in module._buffers.items():
            if b is not None and b.device != device:
                module._buffers[k] = b.to(device)


def batch_indices(n: int, steps: int, order: str, gen: torch.Generator) -> Iterator[int]:
    """The batch each of ``steps`` steps trains on, out of ``n``: "random" draws one per step
    (``torch.randint``), "epochs" goes through all n in a fresh ``torch.randperm`` order per epoch.
    Every rank of a data-parallel run draws the same indices from the same ``gen``."""
    if order not in ("random", "epochs"):
        raise ValueError(f"batch order {order!r}: expected random or epochs")
    epoch: list[int] = []
    for _ in range(steps):
        if order == "random":
            yield int(torch.randint(n, (1,), generator=gen))
            continue
        if not epoch:
            epoch = torch.randperm(n, generator=gen).tolist()[::-1]
        yield epoch.pop()


def train_block(block: nn.Module, quantizers: dict[str, WeightQuantizer], xs, ctxs, ys, masks, settings: dict,
           schedule: str, low_memory: bool, gen: torch.Generator, report: Callable[[int, float], None],
           parallel: DataParallel | None = None, optimizer: str = "adam", batch_order: str = "random") -> None:
    """Adam (or, ``optimizer="signsgd"``, SGD on the sign of the gradient as SignRound; an lr of 0
    there means each quantizer's ``initial_step()``) on the quantizers' parameters; under ``parallel`` each step's
    gradient is the whole batch's, summed over the ranks (every rank draws the same batch index from ``gen``)."""
    steps = settings["steps"]
    params = [p for q in quantizers.values() for p in q.parameters()]
    if not params:  # only embeddings in this block: nothing is learned
        return
    signed = optimizer == "signsgd"
    if signed:  # an lr of 0: each quantizer's own step size (``initial_step``)
        opt = torch.optim.SGD([{"params": list(q.parameters()), "lr": q.initial_step()}
                               for q in quantizers.values() if any(True for _ in q.parameters())], lr=settings["lr"])
    else:
        opt = torch.optim.Adam(params, lr=settings["lr"])
    decay = {"cosine": lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
             "linear": lambda s: max(0.0, 1 - s / steps)}.get(schedule)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, decay) if decay else None
    every = max(1, steps // 50)
    dim = feature_dim(block)
    for step, b in enumerate(batch_indices(len(xs), steps, batch_order, gen)):
        # the last step's gradients go before the forward pass, not after it: they would sit beside
        # the activations and fake-quantized weights it keeps for backward (the step's peak)
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            out = functional_call(block, {n: q() for n, q in quantizers.items()}, (xs[b],), ctxs[b])
            loss = rec_loss(out, ys[b], masks[b], dim)
            reg = sum(q.regularizer(step / steps) for q in quantizers.values())
            if low_memory:
                release_freed_memory()  # the forward pass's temporaries, before backward allocates
            (loss + reg).backward()
        if parallel is not None:
            parallel.average_grads(params, b)
        if signed:
            for p in params:
                if p.grad is not None:
                    p.grad.sign_()
        opt.step()
        if sched is not None:
            sched.step()
        if low_memory:
            release_freed_memory()  # the step's transients: the next step reuses their pages or not at all
        if step % every == 0 or step == steps - 1 or step <= 5:  # the first steps time the run (its estimate)
            report(step + 1, loss.item())
