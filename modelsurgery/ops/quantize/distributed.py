"""Data-parallel calibration under torchrun (torch.distributed): every calibration batch is split over
the ranks, each rank reconstructs the same block on its share of the samples, and the gradients
are summed weighted by each rank's share of the batch, so that every rank takes the step the single
process would take on the whole batch (up to the order of the float additions) and learns the same
rounding. The grid search reads only the weights, identical on every rank; the reported losses are
reduced the same way. gloo on the CPU, NCCL on CUDA devices. Only rank 0 writes and prints.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from modelsurgery.errors import SurgeryError


@dataclass
class DataParallel:
    rank: int
    world_size: int
    #: per calibration batch: this rank's samples / the batch's samples
    shares: list[float]

    def average_grads(self, params: list[torch.Tensor], batch: int) -> None:
        """Each parameter's gradient becomes the whole batch's: sum over ranks of share * local gradient."""
        for p in params:
            if p.grad is not None:
                p.grad.mul_(self.shares[batch])
                dist.all_reduce(p.grad)

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()


def world() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them in the environment; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


@contextmanager
def process_group(device: str) -> Iterator[tuple[int, int]]:
    """The default process group for the run when launched by torchrun (gloo for the CPU, NCCL for
    CUDA), destroyed at the end if this call made it; yields (rank, world size)."""
    rank, size = world()
    made = False
    if size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        made = True
    try:
        yield rank, size
    finally:
        if made:
            dist.destroy_process_group()


def split_batches(calib: list[dict[str, torch.Tensor]], rank: int, size: int
                  ) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """This rank's rows of every batch (contiguous, as ``torch.tensor_split``) and its share of each."""
    mine, shares = [], []
    for j, batch in enumerate(calib):
        n = next(iter(batch.values())).shape[0]
        if n < size:
            raise SurgeryError(f"calibration batch {j} has {n} samples for {size} processes: use at least "
                               f"{size} samples per batch (--batch-size, --samples) or fewer processes")
        part = {k: torch.tensor_split(v, size)[rank] for k, v in batch.items()}
        mine.append(part)
        shares.append(next(iter(part.values())).shape[0] / n)
    return mine, shares
