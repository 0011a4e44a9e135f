"""Example user factories for ``--model package.module:function`` (used by the custom-family tests).

Run from the repository root, ``--model tests.custom_models:tiny_convnet`` imports this module.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyConvNet(nn.Module):
    """A model no built-in family knows: named children run in order, a 1x8x8 input."""

    example_input_shape = (1, 8, 8)

    def __init__(self, width: int = 6):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.GELU())
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=width), nn.Tanh())
        self.pool = nn.AdaptiveMaxPool2d(2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * width, 10))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.body(self.stem(image))))


def tiny_convnet() -> nn.Module:
    return TinyConvNet()


def digits_mlp() -> nn.Module:
    """The architecture of fixtures/digits/mlp_seed*.safetensors."""
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def mlp_from_config(config: dict | None) -> nn.Module:
    """A factory taking the checkpoint's config.json dict."""
    width = (config or {}).get("width", 16)
    return nn.Sequential(nn.Linear(4, width), nn.SiLU(), nn.Linear(width, 3))


def token_model() -> nn.Module:
    """First layer an Embedding: example inputs are token ids."""
    return nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 11))


def not_a_module():
    return {"weight": torch.zeros(1)}


def broken_factory() -> nn.Module:
    raise RuntimeError("factory exploded on purpose")
