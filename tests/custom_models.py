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


# ----- shared layers (issue 11, item 1): one parameter axis reached twice ------------------------
class TiedLM(nn.Module):
    """Embedding and output head are one matrix under two names (weight tying, as in GPT-2), with a
    projection and a residual MLP on [batch, seq, width] values."""

    def __init__(self, vocab: int = 13, width: int = 8, hidden: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.proj = nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(self.emb(input_ids)))
        return h + self.fc2(torch.relu(self.fc1(h)))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(input_ids))


class TiedNormLM(TiedLM):
    """Pre-norm: a LayerNorm over the last axis of the residual stream before the MLP and the head."""

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(self.emb(input_ids)))
        return self.norm(h + self.fc2(torch.relu(self.fc1(self.norm(h)))))


class TiedFunctionalLM(TiedLM):
    """The tied head read directly as a tensor (``F.linear(h, self.emb.weight)``), not as a module."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.hidden(input_ids), self.emb.weight)


class BlockTwice(nn.Module):
    """One residual block applied twice (weight sharing across depth)."""

    def __init__(self, width: int = 8, hidden: int = 16):
        super().__init__()
        self.inp = nn.Linear(6, width)
        self.block = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))
        self.out = nn.Linear(width, 3)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        h = self.inp(input)
        h = h + self.block(h)
        h = h + self.block(h)
        return self.out(h)


class LinearTwice(nn.Module):
    """One Linear applied twice in sequence."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.inp, self.shared, self.out = nn.Linear(6, width), nn.Linear(width, width), nn.Linear(width, 3)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(input))
        h = torch.relu(self.shared(h))
        return self.out(torch.relu(self.shared(h)))


class SharedProjection(nn.Module):
    """One projection fed two different hidden values."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.a, self.b = nn.Linear(6, width), nn.Linear(6, width)
        self.proj, self.out = nn.Linear(width, 5), nn.Linear(5, 3)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        pa = torch.relu(self.proj(torch.relu(self.a(input))))
        pb = torch.tanh(self.proj(torch.tanh(self.b(input))))
        return self.out(pa * pb)


def tied_lm() -> nn.Module:
    return TiedLM()


def tied_norm_lm() -> nn.Module:
    return TiedNormLM()


def tied_functional_lm() -> nn.Module:
    return TiedFunctionalLM()


def block_twice() -> nn.Module:
    return BlockTwice()


def linear_twice() -> nn.Module:
    return LinearTwice()


def shared_projection() -> nn.Module:
    return SharedProjection()
