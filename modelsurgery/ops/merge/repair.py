"""REPAIR (Jordan et al. 2023, "REPAIR: REnormalizing Permuted Activations for Interpolation
Repair", Sec. 4): after averaging, rescale each hidden channel so its activation mean and std are
the interpolation of the endpoints' statistics. For networks with BatchNorm this reduces to
recomputing BatchNorm statistics on data (their "RESET" variant), done here by a cumulative pass.
"""

from __future__ import annotations

import torch
from torch import nn

BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _batches(inputs: dict[str, torch.Tensor], size: int = 512):
    n = next(iter(inputs.values())).shape[0]
    for i in range(0, n, size):
        yield {k: v[i:i + size] for k, v in inputs.items()}


@torch.no_grad()
def reset_batchnorm(module: nn.Module, inputs: dict[str, torch.Tensor]) -> bool:
    """Recompute every BatchNorm's running mean/var on ``inputs``; False when there is none."""
    bns = [m for m in module.modules() if isinstance(m, BN)]
    if not bns:
        return False
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
    return True


@torch.no_grad()
def _channel_stats(module: nn.Module, layer: nn.Module, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    outs = []
    handle = layer.register_forward_hook(lambda m, i, o: outs.append(o.transpose(0, 1).reshape(o.shape[1], -1)))
    try:
        for batch in _batches(inputs):
            module(**batch)
    finally:
        handle.remove()
    x = torch.cat(outs, dim=1)
    return x.mean(1), x.std(1)


@torch.no_grad()
def repair(merged: nn.Module, endpoints: list[nn.Module], weights: list[float], inputs: dict[str, torch.Tensor]
           ) -> str:
    """Correct ``merged`` in place; ``endpoints`` are the aligned source models (same architecture)."""
    if reset_batchnorm(merged, inputs):
        return "batchnorm-reset"
    total = sum(weights)
    w = [x / total for x in weights]
    layers = [n for n, m in merged.named_modules() if isinstance(m, LAYERS)][:-1]  # the output layer stays
    for name in layers:
        target_mean = target_std = 0
        for ep, wi in zip(endpoints, w):
            mu, sd = _channel_stats(ep, ep.get_submodule(name), inputs)
            target_mean, target_std = target_mean + wi * mu, target_std + wi * sd
        layer = merged.get_submodule(name)
        mu, sd = _channel_stats(merged, layer, inputs)
        gain = target_std / sd.clamp_min(1e-8)
        shape = (-1,) + (1,) * (layer.weight.ndim - 1)
        layer.weight.mul_(gain.view(shape))
        if layer.bias is not None:
            layer.bias.copy_((layer.bias - mu) * gain + target_mean)
    return "repair"
