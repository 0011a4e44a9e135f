"""A user factory for ``--model tests.ops.match.user_models:residual_mlp`` (fx-derived specs)."""

import torch
from torch import nn


class ResidualMLP(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.inp = nn.Linear(64, width)
        self.norm = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        self.out = nn.Linear(width, 10)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(input))
        h = h + self.fc2(torch.relu(self.fc1(self.norm(h))))
        return self.out(h)


def residual_mlp() -> nn.Module:
    return ResidualMLP()
