"""The multi-layer perceptron ``MLPFamily`` runs: linears in order with an activation between."""

from __future__ import annotations

import torch
from torch import nn

from modelsurgery.families.base import Stages
from modelsurgery.families.mlp import ACTIVATIONS
from modelsurgery.families.modules import set_submodule


class ChainMLP(nn.Module):
    """Linears applied in order with an activation between; parameter names kept from the checkpoint."""

    def __init__(self, names: list[str], shapes: list[tuple[int, int]], biases: list[bool], activation: str):
        super().__init__()
        self._order = names
        for name, (out_f, in_f), bias in zip(names, shapes, biases):
            set_submodule(self, name, nn.Linear(in_f, out_f, bias=bias))
        self.act = getattr(nn, ACTIVATIONS[activation])()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = input.flatten(1)
        for i, name in enumerate(self._order):
            x = self.get_submodule(name)(x)
            if i < len(self._order) - 1:
                x = self.act(x)
        return x

    def stages(self) -> Stages:
        """One block per linear layer (with its activation, except the last)."""
        last = len(self._order) - 1
        blocks = [_LinearAct(self.get_submodule(n), self.act if i < last else None) for i, n in enumerate(self._order)]
        return Stages(embed=lambda input: (input.flatten(1), {}), blocks=blocks, head=lambda h: h)


class _LinearAct(nn.Module):
    def __init__(self, linear: nn.Linear, act: nn.Module | None):
        super().__init__()
        self.linear = linear
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.act(x) if self.act is not None else x
