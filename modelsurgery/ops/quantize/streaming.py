"""Quantization that streams the checkpoint instead of building the whole float model (the way
AutoRound, llm-compressor and GPTQModel move one decoder layer at a time).

The module is built empty (``Family.build_empty``: parameters on the meta device), which is enough
to find the weights to quantize and to run the stages. Then:

- round to nearest needs no forward pass: each weight is read from the lazy checkpoint, rounded
  and turned into its output tensors when the writer asks for them, so peak memory is about one
  tensor in float32 (``plan_rtn``);
- calibrated methods (``plan_calibrated``) read the weights outside the blocks for the embedding
  passes and drop them, then each block's weights when its turn comes (``LazyWeights``); the
  block's output tensors are handed to the writer, which writes the tensors in block order, and the
  block's weights go back to the meta device.

The codes are those of the whole-model path (``reconstruct_blocks`` over ``build_module``): the same
quantizers run on the same float32 weights in the same order with the same random stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from itertools import pairwise
from types import SimpleNamespace

import torch
from torch import nn

from modelsurgery.checkpoint import Checkpoint, PlannedTensor, check_finite, plan_copy
from modelsurgery.errors import SurgeryError
from modelsurgery.ops.quantize.base import QuantizedWeight
from modelsurgery.ops.quantize.grids import QuantScheme, group_size_for, rows_per_chunk
from modelsurgery.ops.quantize.packing import layer_entry
from modelsurgery.ops.quantize.reconstruct import Residency, Target, rounded_to_nearest

#: (name, quantized weight, bits, the checkpoint's dtype) -> tensors to write (``operation.FORMATS``)
TensorsFor = Callable[[str, QuantizedWeight, int, torch.dtype], dict[str, torch.Tensor]]


class LazyWeights(Residency):
    """Parameters of an empty module (``Family.build_empty``) read from the checkpoint when loaded,
    in float32 on the calibration device, and put back on the meta device when released; the
    parameter objects keep their identity (``torch.utils.swap_tensors``)."""

    def __init__(self, ckpt: Checkpoint, model: nn.Module):
        self.ckpt = ckpt
        self.names = {id(p): n for n, p in model.named_parameters()}

    def load(self, params: list[nn.Parameter], device: torch.device) -> None:
        for p in params:
            if p.is_meta:
                value = self.ckpt.get(self.names[id(p)]).to(device=device, dtype=p.dtype)
                torch.utils.swap_tensors(p, nn.Parameter(value, requires_grad=False))

    def release(self, params: list[nn.Parameter]) -> None:
        for p in params:
            if not p.is_meta:
                torch.utils.swap_tensors(p, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))
        self.ckpt.close()  # the mapped pages read so far


def layer_entries(ckpt: Checkpoint, targets: dict[int, Target], scheme: QuantScheme, bits: int) -> dict[str, dict]:
    """The quantization record's ``layers`` table, from the shapes alone (``packing.layer_entry``)."""
    out = {}
    for t in targets.values():
        shape = ckpt.shape(t.name)
        rows = shape[1] if t.transposed else shape[0]
        group = group_size_for(scheme, math.prod(shape) // rows, t.name)
        out[t.name] = layer_entry(shape, bits, SimpleNamespace(group_size=group, transposed=t.transposed))
    return out


def output_shapes(fmt: str, shape: tuple[int, ...], dtype: torch.dtype, target: Target, scheme: QuantScheme
                  ) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(suffix, shape, dtype) of each tensor ``fmt`` writes for one weight, in the order it writes them."""
    if fmt == "fake":
        return [("", shape, dtype)]
    rows = shape[1] if target.transposed else shape[0]
    length = math.prod(shape) // rows
    group = group_size_for(scheme, length, target.name)
    grid = (1, 1) if scheme.granularity == "tensor" else (rows, length // group)
    return [(".qweight", (rows, math.ceil(length * scheme.bits / 8)), torch.uint8),
            (".scale", grid, torch.float32), (".zero_point", grid, torch.uint8)]


class _Produced:
    """Output tensors made but not written yet; each is handed out once."""

    def __init__(self, fill: Callable[[str], None]):
        self.tensors: dict[str, torch.Tensor] = {}
        self.fill = fill

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors.update({k: v.cpu() for k, v in tensors.items()})

    def take(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            self.fill(name)
        return self.tensors.pop(name)


def _planned(ckpt: Checkpoint, names: list[str], targets: dict[str, Target], fmt: str, scheme: QuantScheme,
             produced: _Produced) -> list[PlannedTensor]:
    planned = []
    for name in names:
        t = targets.get(name)
        if t is None:
            planned.append(plan_copy(ckpt, name, raw=True))
            continue
        info = ckpt.info(name)
        for suffix, shape, dtype in output_shapes(fmt, info.shape, info.dtype, t, scheme):
            planned.append(PlannedTensor(name + suffix, shape, dtype, lambda k=name + suffix: produced.take(k)))
    return planned


#: elements of a weight (whole rows) that streaming RTN rounds at a time: 2 MB of float32, so that the
#: quantizer's passes over them run in the CPU's cache and its temporaries stay small
RTN_CHUNK_ELEMENTS = 1 << 19


def rounded_in_chunks(weight: torch.Tensor, target: Target, scheme: QuantScheme, method, grid: str | None,
                      fmt: str, tensors_for: TensorsFor, chunk_elements: int | None = None,
                      pool: Executor | None = None) -> dict[str, torch.Tensor]:
    """``tensors_for`` of the weight rounded to nearest, computed a few rows at a time (on ``pool``'s
    threads side by side when given): per channel or per group every row has its own grid, so
    rounding rows apart gives the same tensors as rounding the whole weight at once (a per-tensor grid
    needs the whole weight: one piece). Only the rows being rounded are in float32, not the whole
    weight."""
    shape, dtype = tuple(weight.shape), weight.dtype
    axis = 1 if target.transposed else 0  # the stored axis of the rows (``grids.to_matrix``)
    rows = shape[axis]
    length = math.prod(shape) // max(rows, 1)
    step = rows if scheme.granularity == "tensor" else rows_per_chunk(length, chunk_elements or RTN_CHUNK_ELEMENTS)
    outputs = {name: (full_shape, 1 if target.transposed and not suffix else 0)
               for suffix, full_shape, _ in output_shapes(fmt, shape, dtype, target, scheme)
               for name in [target.name + suffix]}

    def piece_tensors(start: int) -> tuple[int, dict[str, torch.Tensor]]:
        piece = weight.narrow(axis, start, min(step, rows - start)).float()
        try:
            qw = rounded_to_nearest(piece, target, scheme, method, grid).export()
        except SurgeryError:
            check_finite(target.name, weight)  # a NaN/Inf: counted over the whole weight, not the piece
            raise
        return start, tensors_for(target.name, qw, scheme.bits, dtype)

    starts = range(0, rows, step)
    result: dict[str, torch.Tensor] = {}
    for start, tensors in (pool.map if pool is not None and len(starts) > 1 else map)(piece_tensors, starts):
        for name, value in tensors.items():
            if step >= rows:
                result[name] = value
                continue
            full_shape, along = outputs[name]
            if name not in result:
                result[name] = value.new_empty(full_shape)
            result[name].narrow(along, start, value.shape[along]).copy_(value)
    return result


class RoundingPool:
    """Threads for ``plan_rtn``: one rounds the weight after the one being written, while the writer
    writes (torch and numpy let go of the GIL, so rounding and file I/O overlap), and that weight's
    pieces of rows are rounded side by side on as many threads as torch had intra-op threads when
    the pool opened, each running torch on one thread (set for the pool's life and restored on
    ``close``). Memory stays at two weights' output tensors and one piece of rows per thread, however
    many threads."""

    def __init__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.next_weight = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rtn-next")
        self.pieces = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="rtn")

    def close(self) -> None:
        self.next_weight.shutdown(wait=True, cancel_futures=True)
        self.pieces.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(self.threads)


def plan_rtn(ckpt: Checkpoint, targets: dict[int, Target], scheme: QuantScheme, method, grid: str | None,
             fmt: str, tensors_for: TensorsFor, pool: RoundingPool) -> list[PlannedTensor]:
    """Every checkpoint tensor in its order; a weight to quantize is read, rounded to nearest and
    turned into its output tensors when the writer first asks for one of them, and the next weight
    is rounded meanwhile (``RoundingPool``)."""
    by_name = {t.name: t for t in targets.values()}
    following = dict(pairwise([n for n in ckpt.keys() if n in by_name]))  # noqa: SIM118 - not iterable
    pending: dict[str, Future] = {}

    def rounded(name: str) -> dict[str, torch.Tensor]:
        return rounded_in_chunks(ckpt.get(name), by_name[name], scheme, method, grid, fmt, tensors_for,
                                 pool=pool.pieces)

    def fill(key: str) -> None:
        name = next(n for n in (key, key.rsplit(".", 1)[0]) if n in by_name)
        job = pending.pop(name, None) or pool.next_weight.submit(rounded, name)
        ahead = following.get(name)
        if ahead is not None and ahead not in pending:
            pending[ahead] = pool.next_weight.submit(rounded, ahead)
        produced.add(job.result())  # a failure (a NaN weight) is raised here, in the writer's thread

    produced = _Produced(fill)
    return _planned(ckpt, ckpt.keys(), by_name, fmt, scheme, produced)


def plan_calibrated(ckpt: Checkpoint, family, targets: dict[int, Target], steps: Iterator, fmt: str,
                    scheme: QuantScheme, tensors_for: TensorsFor, on_report: Callable) -> list[PlannedTensor]:
    """The tensors outside the blocks first, then block by block (checkpoint order within each); a
    quantized weight's tensors come from ``steps`` (``reconstruct_iter``), advanced when the writer
    first asks for a tensor it has not produced yet."""
    by_name = {t.name: t for t in targets.values()}

    def fill(key: str) -> None:
        for weights, report in steps:
            produced.add({k: v for name, qw in weights.items()
                          for k, v in tensors_for(name, qw, scheme.bits, ckpt.info(name).dtype).items()})
            if report is not None:
                on_report(report)
            if key in produced.tensors:
                return
        raise RuntimeError(f"tensor '{key}' was planned but no block produced it")

    produced = _Produced(fill)
    return _planned(ckpt, block_order(ckpt, family), by_name, fmt, scheme, produced)


def block_order(ckpt: Checkpoint, family) -> list[str]:
    """The checkpoint's tensor names as a calibrated run writes them: those outside the blocks first, then block
    by block, checkpoint order within each (the whole-model path writes the same order: the same bytes)."""
    order = {name: i for i, name in enumerate(ckpt.keys())}

    def position(name: str) -> tuple[int, int]:
        where = family.block_of(name)
        return (where[0] if where else -1, order[name])

    return sorted(ckpt.keys(), key=position)


def finish(steps: Iterator, on_report: Callable) -> None:
    """Run what is left of ``steps`` (blocks with nothing to write still report)."""
    for _, report in steps:
        if report is not None:
            on_report(report)
