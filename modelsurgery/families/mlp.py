"""Multi-layer perceptrons: ``torch.nn.Sequential`` (``0.weight``, ``2.weight``, ...) and named MLPs
(``fc1.weight``, ``layers.0.weight``, ...). Linear layers in natural name order with ReLU between.

The activation can be named in safetensors metadata (``modelsurgery.activation``: relu, gelu, tanh).
The module built is ``modules/mlp.ChainMLP``.
"""

from __future__ import annotations

import re
from itertools import pairwise
from typing import TYPE_CHECKING

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.families import register
from modelsurgery.families.base import Family, Linear

if TYPE_CHECKING:
    import torch
    from torch import nn

#: activation name (metadata, CNN layer kinds) -> the ``torch.nn`` class that computes it
ACTIVATIONS = {"relu": "ReLU", "gelu": "GELU", "tanh": "Tanh", "sigmoid": "Sigmoid", "silu": "SiLU"}


def natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def module_prefixes(ckpt: Checkpoint) -> list[str]:
    """Module names owning the tensors, in natural order ('fc1', 'layers.0', '0')."""
    mods = {k.rsplit(".", 1)[0] if "." in k else "" for k in ckpt}
    return sorted(mods, key=natural_key)


@register
class MLPFamily(Family):
    name = "mlp"
    priority = 10

    @classmethod
    def detect(cls, ckpt: Checkpoint) -> bool:
        if not ckpt.keys():
            return False
        prefixes = module_prefixes(ckpt)
        if len(prefixes) < 1 or "" in prefixes:
            return False
        for p in prefixes:
            names = {k for k in ckpt if k.rsplit(".", 1)[0] == p}
            w, b = f"{p}.weight", f"{p}.bias"
            if w not in names or names - {w, b} or len(ckpt.shape(w)) != 2:
                return False
            if b in names and ckpt.shape(b) != ckpt.shape(w)[:1]:
                return False
        shapes = [ckpt.shape(f"{p}.weight") for p in prefixes]
        return all(a[0] == b[1] for a, b in pairwise(shapes))

    def layers(self) -> list[Linear]:
        """The linear layers in forward order."""
        return [
            Linear(f"{p}.weight", f"{p}.bias" if f"{p}.bias" in self.ckpt else None)
            for p in module_prefixes(self.ckpt)
        ]

    def chain_layers(self) -> list[Linear]:
        """An MLP is one chain: every layer feeds the next."""
        return self.layers()

    @property
    def hidden_size(self) -> int | None:
        layers = self.layers()
        return self.ckpt.shape(layers[0].weight)[0] if len(layers) > 1 else None

    @property
    def activation(self) -> str:
        act = self.ckpt.metadata.get("modelsurgery.activation", "relu")
        if act not in ACTIVATIONS:
            raise SurgeryError(f"{self.ckpt.path}: metadata modelsurgery.activation '{act}' is not supported "
                               f"(known: {', '.join(ACTIVATIONS)})")
        return act

    def head_names(self) -> list[str]:
        last = self.layers()[-1]
        return [n for n in (last.weight, last.bias) if n]

    def build_module(self, state=None, dtype=None) -> nn.Module:
        from modelsurgery.families.modules.mlp import ChainMLP

        layers = self.layers()
        module = ChainMLP(
            [lin.weight.rsplit(".", 1)[0] for lin in layers],
            [self.ckpt.shape(lin.weight) for lin in layers],
            [lin.bias is not None for lin in layers],
            self.activation,
        )
        return self.load_state(module, state, dtype)

    def example_inputs(self, batch=2, seq_len=8, generator=None) -> dict[str, torch.Tensor]:
        import torch

        in_features = self.ckpt.shape(self.layers()[0].weight)[1]
        return {"input": torch.randn(batch, in_features, generator=generator)}

    def describe(self) -> dict:
        d = super().describe()
        d["num_layers"] = len(self.layers())
        d["activation"] = self.ckpt.metadata.get("modelsurgery.activation", "relu")
        d["widths"] = [self.ckpt.shape(self.layers()[0].weight)[1]] + [
            self.ckpt.shape(lin.weight)[0] for lin in self.layers()
        ]
        return d
