"""The sequential CNN ``CNNFamily`` runs: its ``Step`` list (forward order, from metadata or the
default) made into torch layers."""

from __future__ import annotations

import torch
from torch import nn

from modelsurgery.families.base import Stages
from modelsurgery.families.cnn import ACTIVATION_KINDS, Step, pool_geometry
from modelsurgery.families.modules import set_submodule


class SequentialCNN(nn.Module):
    """Runs ``steps`` in order; parametric layers keep their checkpoint names."""

    def __init__(self, steps: list[Step], shapes: dict[str, tuple[int, ...]], biases: set[str],
                 input_shape: tuple[int, ...]):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.example_input_shape = self.input_shape
        self._steps = steps
        self._ops: list[nn.Module] = []
        for step in steps:
            op = _make_op(step, shapes, biases)
            if step.name is not None:
                set_submodule(self, step.name, op)
            self._ops.append(op)

    def _to_image(self, input: torch.Tensor) -> torch.Tensor:
        return input.reshape(input.shape[0], *self.input_shape) if input.dim() == 2 else input

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self._to_image(input)
        for op in self._ops:
            x = op(x)
        return x

    def stages(self) -> Stages:
        """One block per conv (+bn, activation, pool) group and per linear; leading ops go to embed."""
        groups: list[list[nn.Module]] = []
        lead: list[nn.Module] = []
        for step, op in zip(self._steps, self._ops):
            if step.kind in ("conv", "linear"):
                groups.append([op])
            elif groups:
                groups[-1].append(op)
            else:
                lead.append(op)
        pre = nn.Sequential(*lead)

        def embed(input: torch.Tensor):
            return pre(self._to_image(input)), {}

        return Stages(embed=embed, blocks=[nn.Sequential(*g) for g in groups], head=lambda h: h)


def _make_op(step: Step, shapes: dict[str, tuple[int, ...]], biases: set[str]) -> nn.Module:
    o = step.options
    if step.kind == "conv":
        out_c, in_c, kh, kw = shapes[step.name]
        return nn.Conv2d(in_c, out_c, (kh, kw), stride=o.get("stride", 1),
                         padding=o.get("padding", (kh // 2, kw // 2)), bias=step.name in biases)
    if step.kind == "bn":
        return nn.BatchNorm2d(shapes[step.name][0], eps=float(o.get("eps", 1e-5)))
    if step.kind == "linear":
        out_f, in_f = shapes[step.name]
        return nn.Linear(in_f, out_f, bias=step.name in biases)
    if step.kind in ACTIVATION_KINDS:
        return getattr(nn, ACTIVATION_KINDS[step.kind])()
    if step.kind == "maxpool":
        return nn.MaxPool2d(*pool_geometry(o, 2))
    if step.kind == "avgpool":
        return nn.AvgPool2d(*pool_geometry(o, 2)) if "kernel" in o else nn.AdaptiveAvgPool2d(1)
    if step.kind == "flatten":
        return nn.Flatten(1)
    return nn.Identity()  # dropout: identity at inference
