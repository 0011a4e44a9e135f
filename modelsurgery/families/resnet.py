"""CIFAR-style residual networks (He et al. 2016, "Deep Residual Learning", section 4.2: ResNet-20/32/56).

Tensors: stem ``conv1``/``bn1``; blocks ``layer{s}.{j}.conv1/bn1/conv2/bn2`` (BasicBlock:
``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``) with an optional projection shortcut
``shortcut.0`` (1x1 conv) / ``shortcut.1`` (BN) (``downsample.0/1`` also accepted); global average
pool; head ``linear`` or ``fc``. Any number of stages, blocks per stage and widths; a block's inner width
(conv1's outputs = conv2's inputs) is read from its tensors and may differ from its stage's width (width
growth widens it).

Geometry not stored in a state dict follows the paper: 3x3 convolutions with padding 1; a block's
first convolution (and its projection shortcut) has stride 2 when the block changes the channel count,
1 otherwise; a block that changes channels without a projection uses the parameter-free "option A"
shortcut (subsample by 2, zero-pad channels equally on both sides). ``modelsurgery.input_shape``
metadata ("[C, H, W]") gives the input shape (default: the stem's channels, 8x8; a global pool makes
any size work). Built modules (``modules/resnet.ResNetModule``) accept [N, C, H, W] or flattened
[N, C*H*W] inputs.

For weight matching, ``residual_groups()`` names the tensors that share one residual stream (one
permutation must be tied across every block of a stage), ``inner_groups()`` the free channels inside
each block.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.families import register
from modelsurgery.families.base import Block, ChannelGroup, Family, Linear, Norm, WidthGroup

if TYPE_CHECKING:
    import torch
    from torch import nn

BLOCK_RE = re.compile(r"layer(\d+)\.(\d+)\.")
BN_STATS = ("weight", "bias", "running_mean", "running_var")
DEFAULT_SPATIAL = 8


@dataclass(frozen=True)
class ResBlock:
    """Block ``index`` (global order) = ``layer{stage}.{position}``."""

    index: int
    stage: int
    position: int
    prefix: str
    in_channels: int
    out_channels: int
    inner_channels: int  # conv1's outputs, conv2's inputs
    stride: int
    shortcut: str | None  # module name of the projection shortcut, or None

    @property
    def option_a(self) -> bool:
        return self.shortcut is None and self.in_channels != self.out_channels


@register
class ResNetFamily(Family):
    name = "resnet"
    priority = 30

    @classmethod
    def detect(cls, ckpt: Checkpoint) -> bool:
        keys = set(ckpt.keys())
        if not {"conv1.weight", "bn1.weight", "bn1.running_mean"} <= keys:
            return False
        if not any(k.startswith("layer1.0.conv1.") for k in keys):
            return False
        if not ({"linear.weight", "fc.weight"} & keys) or len(ckpt.shape("conv1.weight")) != 4:
            return False
        try:
            cls(ckpt).res_blocks()
        except SurgeryError:
            return False
        return True

    # ----- structure ----------------------------------------------------------------------------
    @property
    def head(self) -> str:
        return "linear" if "linear.weight" in self.ckpt else "fc"

    def _need(self, name: str) -> tuple[int, ...]:
        if name not in self.ckpt:
            raise SurgeryError(f"{self.ckpt.path}: tensor '{name}' needed by the resnet model is missing")
        return self.ckpt.shape(name)

    def res_blocks(self) -> list[ResBlock]:
        """Residual blocks in order (stage, then position), with their inferred geometry."""
        if getattr(self, "_res_blocks", None) is None:
            self._res_blocks = self._read_blocks()
        return list(self._res_blocks)

    def _read_blocks(self) -> list[ResBlock]:
        found = sorted({(int(m.group(1)), int(m.group(2))) for k in self.ckpt if (m := BLOCK_RE.match(k))})
        out = []
        for i, (s, j) in enumerate(found):
            prefix = f"layer{s}.{j}."
            w1, w2 = self._need(prefix + "conv1.weight"), self._need(prefix + "conv2.weight")
            for bn in ("bn1", "bn2"):
                self._need(f"{prefix}{bn}.weight")
            shortcut = next((prefix + n for n in ("shortcut", "downsample") if f"{prefix}{n}.0.weight" in self.ckpt),
                            None)
            in_c, out_c = w1[1], w2[0]
            if w1[0] != w2[1] or w1[2:] != (3, 3) or w2[2:] != (3, 3):
                raise SurgeryError(f"{self.ckpt.path}: block '{prefix[:-1]}' is not a 3x3 BasicBlock")
            if out_c < in_c and shortcut is None:
                raise SurgeryError(f"{self.ckpt.path}: block '{prefix[:-1]}' narrows channels without a shortcut")
            out.append(ResBlock(i, s, j, prefix, in_c, out_c, w1[0], 2 if in_c != out_c else 1, shortcut))
        if not out:
            raise SurgeryError(f"{self.ckpt.path}: no residual blocks (layer1.0.*)")
        return out

    def blocks(self) -> list[Block]:
        blocks = []
        for b in self.res_blocks():
            blocks.append(Block(b.index, b.prefix, [k for k in self.ckpt if k.startswith(b.prefix)]))
        return blocks

    def block_of(self, name: str) -> tuple[int, str] | None:
        for b in self.res_blocks():
            if name.startswith(b.prefix):
                return b.index, name[len(b.prefix):]
        return None

    def block_name(self, index: int, suffix: str) -> str:
        return self.res_blocks()[index].prefix + suffix

    def check_layout(self, source_indices: Sequence[int]) -> None:
        """Refused: blocks change width and stride from stage to stage and are named by stage
        (``layer{s}.{j}``), so a block fits only where it is: only the layout that keeps every block runs."""
        if list(source_indices) == list(range(len(self.res_blocks()))):
            return
        raise SurgeryError(
            f"{self.ckpt.path}: family 'resnet' cannot change its depth (its blocks change width and stride from "
            "stage to stage, so each fits only where it is); use --method width"
        )

    def stage_blocks(self) -> list[list[int]]:
        """Block indices of each stage (layer1, layer2, ...)."""
        stages: dict[int, list[int]] = {}
        for b in self.res_blocks():
            stages.setdefault(b.stage, []).append(b.index)
        return [stages[s] for s in sorted(stages)]

    @property
    def hidden_size(self) -> int | None:
        return self.ckpt.shape("conv1.weight")[0]

    def _conv(self, name: str) -> Linear:
        return Linear(f"{name}.weight", f"{name}.bias" if f"{name}.bias" in self.ckpt else None)

    def _bn(self, name: str) -> Norm:
        return Norm(f"{name}.weight", f"{name}.bias", kind="batchnorm", running_mean=f"{name}.running_mean",
                    running_var=f"{name}.running_var")

    def _out_names(self, conv: str, bn: str) -> list[str]:
        lin = self._conv(conv)
        return [lin.weight] + ([lin.bias] if lin.bias else []) + [f"{bn}.{t}" for t in BN_STATS]

    def block_linears(self, index: int) -> dict[str, Linear]:
        """Roles conv1, conv2 and (when present) shortcut: convolution weights [out, in, kh, kw]."""
        b = self.res_blocks()[index]
        roles = {"conv1": self._conv(b.prefix + "conv1"), "conv2": self._conv(b.prefix + "conv2")}
        if b.shortcut:
            roles["shortcut"] = self._conv(b.shortcut + ".0")
        return roles

    def block_norms(self, index: int) -> dict[str, Norm]:
        b = self.res_blocks()[index]
        norms = {"bn1": self._bn(b.prefix + "bn1"), "bn2": self._bn(b.prefix + "bn2")}
        if b.shortcut:
            norms["shortcut"] = self._bn(b.shortcut + ".1")
        return norms

    def output_projections(self, index: int) -> list[Linear]:
        """bn2's affine map: with its weight and bias zeroed an identity-shortcut block returns
        relu(x) = x (its input is already a ReLU output). Projection-shortcut blocks have none."""
        b = self.res_blocks()[index]
        if b.shortcut or b.option_a:
            return []
        return [Linear(f"{b.prefix}bn2.weight", f"{b.prefix}bn2.bias")]

    def layers(self) -> list[Linear | Norm]:
        """Every conv/linear (as ``Linear``) and BatchNorm (as ``Norm``) in forward order."""
        out: list[Linear | Norm] = [self._conv("conv1"), self._bn("bn1")]
        for b in self.res_blocks():
            out += [self._conv(b.prefix + "conv1"), self._bn(b.prefix + "bn1"),
                    self._conv(b.prefix + "conv2"), self._bn(b.prefix + "bn2")]
            if b.shortcut:
                out += [self._conv(b.shortcut + ".0"), self._bn(b.shortcut + ".1")]
        return [*out, self._conv(self.head)]

    def residual_groups(self) -> list[ChannelGroup]:
        """One group per residual stream. A stream spans the stem (when layer1 keeps its width) and
        every block of a stage; a projection or option-A shortcut starts a new stream."""
        groups: list[ChannelGroup] = []
        current = ChannelGroup("residual.0", self.hidden_size, self._out_names("conv1", "bn1"), [], [0])
        for b in self.res_blocks():
            current.in_axis.append(f"{b.prefix}conv1.weight")
            if b.shortcut or b.option_a:
                if b.shortcut:
                    current.in_axis.append(f"{b.shortcut}.0.weight")
                groups.append(current)
                current = ChannelGroup(f"residual.{len(groups)}", b.out_channels, [], [], [b.stage])
                if b.shortcut:
                    current.out_axis += self._out_names(b.shortcut + ".0", b.shortcut + ".1")
                else:
                    current.padded_from = groups[-1].name
                    current.pad_offset = (b.out_channels - b.in_channels) // 2
            elif b.stage not in current.stages:
                current.stages.append(b.stage)
            current.out_axis += self._out_names(b.prefix + "conv2", b.prefix + "bn2")
        current.in_axis.append(f"{self.head}.weight")
        groups.append(current)
        return groups

    def channel_groups(self) -> list[ChannelGroup]:
        """The residual streams, then each block's inner channels (the permutation groups)."""
        return [*self.residual_groups(), *self.inner_groups()]

    def width_groups(self) -> list[WidthGroup]:
        """Each block's inner width: conv1's outputs and bn1, conv2's inputs. The residual stream, which
        every block, shortcut and the head share, keeps its width, so shortcuts stay valid."""
        return [
            WidthGroup(f"{b.prefix}inner", b.inner_channels, (self._conv(b.prefix + "conv1"),),
                       (self._conv(b.prefix + "conv2"),), (self._bn(b.prefix + "bn1"),))
            for b in self.res_blocks()
        ]

    def inner_groups(self) -> list[ChannelGroup]:
        """The channels between conv1 and conv2 of each block (free to permute independently)."""
        return [
            ChannelGroup(f"{b.prefix}inner", b.inner_channels, self._out_names(b.prefix + "conv1", b.prefix + "bn1"),
                         [f"{b.prefix}conv2.weight"], [b.stage])
            for b in self.res_blocks()
        ]

    def embedding_names(self) -> list[str]:
        return self._out_names("conv1", "bn1")

    def head_names(self) -> list[str]:
        return [n for n in (f"{self.head}.weight", f"{self.head}.bias") if n in self.ckpt]

    # ----- running ------------------------------------------------------------------------------
    def input_shape(self) -> tuple[int, ...]:
        raw = self.ckpt.metadata.get("modelsurgery.input_shape")
        if raw is None:
            return (self.ckpt.shape("conv1.weight")[1], DEFAULT_SPATIAL, DEFAULT_SPATIAL)
        try:
            shape = tuple(int(d) for d in json.loads(raw))
        except (ValueError, TypeError) as e:
            raise SurgeryError(f"{self.ckpt.path}: modelsurgery.input_shape '{raw}' is not a list of ints") from e
        if len(shape) != 3:
            raise SurgeryError(f"{self.ckpt.path}: modelsurgery.input_shape {list(shape)} is not [C, H, W]")
        return shape

    def build_module(self, state=None, dtype=None) -> nn.Module:
        from modelsurgery.families.modules.resnet import ResNetModule

        biases = {k[: -len(".bias")] for k in self.ckpt if k.endswith(".bias")}
        stem = self.ckpt.shape("conv1.weight")
        module = ResNetModule((stem[0], stem[1]), self.res_blocks(), self.head,
                              self.ckpt.shape(f"{self.head}.weight"), biases, self.input_shape())
        return self.load_state(module, state, dtype)

    def example_inputs(self, batch=2, seq_len=8, generator=None) -> dict[str, torch.Tensor]:
        import torch

        return {"input": torch.randn(batch, *self.input_shape(), generator=generator)}

    def describe(self) -> dict:
        d = super().describe()
        blocks = self.res_blocks()
        d["stages"] = [len(s) for s in self.stage_blocks()]
        d["widths"] = [self.hidden_size] + [blocks[s[-1]].out_channels for s in self.stage_blocks()]
        d["inner_widths"] = [b.inner_channels for b in blocks]
        d["input_shape"] = list(self.input_shape())
        return d
