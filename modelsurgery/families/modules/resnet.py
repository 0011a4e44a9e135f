"""The CIFAR ResNet ``ResNetFamily`` runs (He et al. 2016, section 4.2): a stem, BasicBlocks with
identity, projection or option-A shortcuts, global average pool and a linear head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modelsurgery.families.base import Stages
from modelsurgery.families.modules import set_submodule
from modelsurgery.families.resnet import ResBlock


class BasicBlock(nn.Module):
    def __init__(self, in_c: int, out_c: int, stride: int, biases: set[str], shortcut: str | None, inner_c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_c, inner_c, 3, stride=stride, padding=1, bias="conv1" in biases)
        self.bn1 = nn.BatchNorm2d(inner_c)
        self.conv2 = nn.Conv2d(inner_c, out_c, 3, stride=1, padding=1, bias="conv2" in biases)
        self.bn2 = nn.BatchNorm2d(out_c)
        self.shortcut_name = shortcut
        self.pad = (0, 0) if shortcut or in_c == out_c else ((out_c - in_c) // 2, out_c - in_c - (out_c - in_c) // 2)
        self.stride = stride
        if shortcut:
            proj = nn.Sequential(nn.Conv2d(in_c, out_c, 1, stride=stride, bias=shortcut + ".0" in biases),
                                 nn.BatchNorm2d(out_c))
            self.add_module(shortcut, proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut_name:
            short = getattr(self, self.shortcut_name)(x)
        elif self.pad != (0, 0):  # option A: subsample, zero-pad the new channels
            short = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, *self.pad))
        else:
            short = x
        return F.relu(out + short)


class ResNetModule(nn.Module):
    def __init__(self, stem: tuple[int, int], blocks: list[ResBlock], head: str, head_shape: tuple[int, int],
                 biases: set[str], input_shape: tuple[int, ...]):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.example_input_shape = self.input_shape
        out_c, in_c = stem
        self.conv1 = nn.Conv2d(in_c, out_c, 3, padding=1, bias="conv1" in biases)
        self.bn1 = nn.BatchNorm2d(out_c)
        self._blocks: list[BasicBlock] = []
        for b in blocks:
            local = {n[len(b.prefix):] for n in biases if n.startswith(b.prefix)}
            block = BasicBlock(b.in_channels, b.out_channels, b.stride, local,
                               b.shortcut[len(b.prefix):] if b.shortcut else None, b.inner_channels)
            set_submodule(self, b.prefix.rstrip("."), block)
            self._blocks.append(block)
        self._head_name = head
        set_submodule(self, head, nn.Linear(head_shape[1], head_shape[0], bias=head in biases))

    def _embed(self, input: torch.Tensor):
        x = input.reshape(input.shape[0], *self.input_shape) if input.dim() == 2 else input
        return F.relu(self.bn1(self.conv1(x))), {}

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return getattr(self, self._head_name)(h.mean(dim=(2, 3)))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x, _ = self._embed(input)
        for block in self._blocks:
            x = block(x)
        return self._head(x)

    def stages(self) -> Stages:
        """Stem as embed, one block per residual block, global average pool + linear as head."""
        return Stages(embed=self._embed, blocks=list(self._blocks), head=self._head)
