"""REPAIR (Jordan et al. 2023, "REPAIR: REnormalizing Permuted Activations for Interpolation
Repair", Sec. 4): after averaging, rescale each hidden channel so its activation mean and std are
the interpolation of the endpoints' statistics. For networks with BatchNorm this reduces to
recomputing BatchNorm statistics on data (their "RESET" variant), done here by a cumulative pass.

A channel is a layer's output feature: dim 1 of a conv's output, the last axis of a Linear's or
GPT-2 Conv1D's ([batch, features] or [batch, tokens, features]); statistics reduce over every other
axis (and skip padded tokens when the data has an attention mask). Layers are corrected in order,
each measured on the merged model with the layers before it already corrected, as in the paper.
A layer with a bias gets the full affine correction; one without (LLaMA's projections) can only be
rescaled, so its std is matched and its mean scaled with it ("scale" in the report). Output
layers (the family's head tensors; the last layer when the family names none) and layers
whose weight is shared with another module (tied embeddings) stay as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from modelsurgery.errors import SurgeryError
from modelsurgery.families.transformer import Conv1D

BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: GPT-2's layer stores its weight (in, out): output channels on weight axis 1
TRANSPOSED: tuple[type, ...] = (Conv1D,)
try:  # transformers' own Conv1D, as a user module (--model) may use it
    from transformers.pytorch_utils import Conv1D as HFConv1D

    TRANSPOSED += (HFConv1D,)
except ImportError:  # pragma: no cover - transformers is a dependency, but REPAIR does not need it
    pass
LAYERS = (nn.Linear, *CONVS, *TRANSPOSED)


def _batches(inputs: dict[str, torch.Tensor], size: int = 512):
    n = next(iter(inputs.values())).shape[0]
    for i in range(0, n, size):
        yield {k: v[i:i + size] for k, v in inputs.items()}


@torch.no_grad()
def reset_batchnorm(module: nn.Module, inputs: dict[str, torch.Tensor]) -> int:
    """Recompute every BatchNorm's running mean/var on ``inputs``; the number of BatchNorms."""
    bns = [m for m in module.modules() if isinstance(m, BN)]
    if not bns:
        return 0
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the whole pass
    module.train()
    for batch in _batches(inputs):
        module(**batch)
    module.eval()
    for m, momentum in saved:
        m.momentum = momentum
    return len(bns)


def channel_axis(layer: nn.Module) -> int:
    return 1 if isinstance(layer, CONVS) else -1


def weight_out_axis(layer: nn.Module) -> int:
    return 1 if isinstance(layer, TRANSPOSED) else 0


class _Moments:
    """Per-channel count, sum and sum of squares (float64) of a layer's outputs."""

    def __init__(self):
        self.n, self.s, self.sq = 0, 0.0, 0.0

    def add(self, out: torch.Tensor, axis: int, mask: torch.Tensor | None) -> None:
        x = out.movedim(axis, -1)
        if mask is not None and x.ndim == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
            x = x[mask.bool()]  # tokens only, no padding
        x = x.reshape(-1, x.shape[-1]).double()
        self.n += x.shape[0]
        self.s = self.s + x.sum(0)
        self.sq = self.sq + (x * x).sum(0)

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.s / self.n
        var = (self.sq - self.n * mean * mean) / max(self.n - 1, 1)
        return mean.float(), var.clamp_min(0).sqrt().float()


@torch.no_grad()
def channel_stats(module: nn.Module, names: list[str], inputs: dict[str, torch.Tensor]
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and std of the outputs of the layers ``names``, in one pass over ``inputs``."""
    moments = {n: _Moments() for n in names}
    mask: list[torch.Tensor | None] = [None]
    handles = []
    for n in names:
        layer = module.get_submodule(n)
        handles.append(layer.register_forward_hook(
            lambda m, i, o, n=n, ax=channel_axis(layer): moments[n].add(o, ax, mask[0])))
    try:
        for batch in _batches(inputs):
            mask[0] = batch.get("attention_mask")
            module(**batch)
    finally:
        for h in handles:
            h.remove()
    return {n: m.mean_std() for n, m in moments.items()}


def repair_layers(module: nn.Module, protected: set[str]) -> tuple[list[str], list[dict]]:
    """(layers REPAIR corrects, in forward order of definition; skipped layers with the reason)."""
    shared: dict[int, int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        shared[id(p)] = shared.get(id(p), 0) + 1
    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, LAYERS)]
    if layers and not protected:
        protected = {f"{layers[-1][0]}.weight"}  # the family names no head: the last layer is the output
    out, skipped = [], []
    for name, layer in layers:
        if f"{name}.weight" in protected:
            skipped.append({"name": name, "reason": "output layer"})
        elif shared[id(layer.weight)] > 1:
            skipped.append({"name": name, "reason": "weight shared with another module"})
        else:
            out.append(name)
    return out, skipped


@torch.no_grad()
def repair(merged: nn.Module, endpoints: list[nn.Module], weights: list[float], inputs: dict[str, torch.Tensor],
           protected: set[str] = frozenset(), where: str = "model") -> dict:
    """Correct ``merged`` in place; ``endpoints`` are the aligned source models (same architecture);
    ``protected``: weight names of output layers that stay. Returns what was corrected, per layer."""
    bns = reset_batchnorm(merged, inputs)
    if bns:
        return {"method": "batchnorm-reset", "batchnorms": bns, "layers": []}
    names, skipped = repair_layers(merged, set(protected))
    if not names:
        raise SurgeryError(f"{where}: --repair found no hidden Linear/Conv/Conv1D layer to correct "
                           f"(and no BatchNorm to reset)")
    total = sum(weights)
    w = [x / total for x in weights]
    target: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for ep, wi in zip(endpoints, w):
        for n, (mu, sd) in channel_stats(ep, names, inputs).items():
            tm, ts = target.get(n, (0.0, 0.0))
            target[n] = (tm + wi * mu, ts + wi * sd)
    report = []
    for name in names:
        layer = merged.get_submodule(name)
        (mu, sd), = channel_stats(merged, [name], inputs).values()
        target_mean, target_std = target[name]
        gain = target_std / sd.clamp_min(1e-8)
        axis = weight_out_axis(layer)
        shape = [1] * layer.weight.ndim
        shape[axis] = -1
        layer.weight.mul_(gain.view(shape).to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_((layer.bias - mu) * gain + target_mean)
        report.append({"name": name, "channels": int(gain.numel()),
                       "correction": "affine" if layer.bias is not None else "scale"})
    return {"method": "repair", "layers": report, "skipped": skipped}
