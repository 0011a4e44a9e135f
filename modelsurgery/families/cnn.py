"""Sequential convolutional networks (LeNet/VGG style): ``nn.Sequential`` of Conv2d, BatchNorm2d and
Linear layers (``0.weight``, ``1.running_mean``, ...) or VGG's ``features.N.*`` / ``classifier.N.*``.

A state dict holds only the parametric layers, so the rest of the network is described by optional
safetensors metadata:

- ``modelsurgery.arch``: a JSON list of layer kinds by Sequential index, e.g.
  ``["conv","bn","relu","maxpool","conv","bn","relu","avgpool","flatten","linear"]``, or for nested
  containers an object ``{"features": [...], "classifier": [...]}`` in forward order. An entry is a
  kind name or an object ``{"kind": "conv", "stride": 2, "padding": 1}``. Kinds: conv, bn, linear,
  relu, gelu, tanh, sigmoid, silu, maxpool (kernel 2 stride 2 unless given), avgpool (global average
  pool unless ``kernel`` is given), flatten, dropout (identity at inference).
- ``modelsurgery.input_shape``: the per-sample input shape, e.g. ``"[1, 8, 8]"``.

Without ``modelsurgery.arch`` the default is: convolutions with stride 1 and "same" padding (k // 2),
a ReLU after each conv(+BN) group and after each hidden linear, and before the first linear a global
average pool + flatten when its in_features equals the last channel count, a flatten otherwise.
Without ``modelsurgery.input_shape`` the input has the first conv's channels and the smallest square
size whose flattened features fit the first linear (8x8 when a global pool makes any size fit).
Built modules (``modules/cnn.SequentialCNN``) accept [N, C, H, W] or flattened [N, C*H*W] inputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.families import register
from modelsurgery.families.base import Family, Linear, Norm
from modelsurgery.families.mlp import ACTIVATIONS as ACTIVATION_KINDS
from modelsurgery.families.mlp import natural_key

if TYPE_CHECKING:
    import torch
    from torch import nn

PARAM_KINDS = ("conv", "bn", "linear")
OTHER_KINDS = (*ACTIVATION_KINDS, "maxpool", "avgpool", "flatten", "dropout")
BN_TENSORS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
# Containers that come before the classifier whatever their names sort as (VGG: features, classifier).
_FIRST = {"features", "feature", "backbone", "body", "encoder", "conv", "convs"}
_LAST = {"classifier", "head", "fc", "output"}
DEFAULT_SPATIAL = 8


@dataclass
class Step:
    """One layer of the network in forward order. ``name`` is the module name for parametric layers."""

    kind: str
    name: str | None = None
    options: dict = field(default_factory=dict)


def _container_rank(prefix: str) -> tuple:
    first = prefix.split(".", 1)[0]
    rank = 0 if first in _FIRST else 2 if first in _LAST else 1
    return (rank, natural_key(prefix))


def param_layers(ckpt: Checkpoint) -> list[tuple[str, str]] | None:
    """(module name, kind) of every parametric layer in forward order; None if one is not conv/bn/linear."""
    members: dict[str, set[str]] = {}
    for k in ckpt:
        if "." not in k:
            return None
        mod, leaf = k.rsplit(".", 1)
        members.setdefault(mod, set()).add(leaf)
    out = []
    for mod in sorted(members, key=_container_rank):
        leaves, w = members[mod], ckpt.shape(f"{mod}.weight") if f"{mod}.weight" in ckpt else None
        if w is None:
            return None
        if "running_mean" in leaves and leaves <= BN_TENSORS and len(w) == 1:
            out.append((mod, "bn"))
        elif leaves <= {"weight", "bias"} and len(w) == 4:
            out.append((mod, "conv"))
        elif leaves <= {"weight", "bias"} and len(w) == 2:
            out.append((mod, "linear"))
        else:
            return None
    return out


def _parse_entry(entry, where: str) -> tuple[str, dict]:
    if isinstance(entry, str):
        kind, options = entry, {}
    elif isinstance(entry, dict) and isinstance(entry.get("kind"), str):
        kind, options = entry["kind"], {k: v for k, v in entry.items() if k != "kind"}
    else:
        raise SurgeryError(f"{where}: modelsurgery.arch entry {entry!r} is not a kind name or {{'kind': ...}}")
    if kind not in PARAM_KINDS + OTHER_KINDS:
        raise SurgeryError(f"{where}: modelsurgery.arch names an unknown layer kind '{kind}'")
    return kind, options


def steps_from_arch(ckpt: Checkpoint, arch, layers: list[tuple[str, str]]) -> list[Step]:
    """Forward-order steps from ``modelsurgery.arch``, checked against the checkpoint's layers."""
    where = str(ckpt.path)
    containers = {"": arch} if isinstance(arch, list) else arch
    if not isinstance(containers, dict) or not all(isinstance(v, list) for v in containers.values()):
        raise SurgeryError(f"{where}: modelsurgery.arch must be a JSON list or an object of lists")
    kinds = dict(layers)
    steps, seen = [], set()
    channels, image = None, True
    for container, entries in containers.items():
        for i, entry in enumerate(entries):
            kind, options = _parse_entry(entry, where)
            name = f"{container}.{i}" if container else str(i)
            if kind in PARAM_KINDS:
                if kinds.get(name) != kind:
                    found = f"a {kinds[name]}" if name in kinds else "nothing"
                    raise SurgeryError(
                        f"{where}: modelsurgery.arch says layer '{name}' is a {kind} but the checkpoint holds {found}"
                    )
                seen.add(name)
                if kind == "linear" and image and channels is not None:
                    # torchvision's VGG flattens in forward(), outside its containers: apply the default
                    if ckpt.shape(f"{name}.weight")[1] == channels:
                        steps.append(Step("avgpool"))
                    steps.append(Step("flatten"))
                    image = False
                if kind == "conv":
                    channels = ckpt.shape(f"{name}.weight")[0]
                steps.append(Step(kind, name, options))
            else:
                image = image and kind != "flatten"
                steps.append(Step(kind, None, options))
    missing = [n for n, _ in layers if n not in seen]
    if missing:
        raise SurgeryError(f"{where}: tensor '{missing[0]}.weight' is not placed by modelsurgery.arch")
    return steps


def default_steps(ckpt: Checkpoint, layers: list[tuple[str, str]]) -> list[Step]:
    """The documented default: ReLU after each conv(+BN) group and hidden linear; pool/flatten before the head."""
    steps: list[Step] = []
    channels = None
    linear_seen = False
    last_linear = max(i for i, (_, k) in enumerate(layers) if k == "linear") if any(
        k == "linear" for _, k in layers) else -1
    for i, (name, kind) in enumerate(layers):
        nxt = layers[i + 1][1] if i + 1 < len(layers) else None
        if kind == "linear" and not linear_seen:
            linear_seen = True
            if channels is not None:
                if ckpt.shape(f"{name}.weight")[1] == channels:
                    steps.append(Step("avgpool"))
                steps.append(Step("flatten"))
        steps.append(Step(kind, name))
        if kind == "conv":
            channels = ckpt.shape(f"{name}.weight")[0]
            if nxt != "bn":
                steps.append(Step("relu"))
        elif kind == "bn" or (kind == "linear" and i < last_linear):
            steps.append(Step("relu"))
    return steps


def pool_geometry(options: dict, default: int) -> tuple[int, int, int]:
    """(kernel, stride, padding) of a pooling step, ``default`` kernel unless given."""
    k = int(options.get("kernel", default))
    return k, int(options.get("stride", k)), int(options.get("padding", 0))


def _out_size(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


@register
class CNNFamily(Family):
    name = "cnn"
    priority = 20

    @classmethod
    def detect(cls, ckpt: Checkpoint) -> bool:
        layers = param_layers(ckpt) if len(ckpt) else None
        if not layers or not any(k == "conv" for _, k in layers):
            return False
        channels, prev = None, None
        for name, kind in layers:
            shape = ckpt.shape(f"{name}.weight")
            if kind == "conv":
                if channels is not None and shape[1] != channels:
                    return False
                channels = shape[0]
            elif kind == "bn" and shape[0] != channels:
                return False
            elif kind == "linear":
                if prev == "linear" and shape[1] != channels:
                    return False
                channels = shape[0]
            prev = kind
        return True

    # ----- structure ----------------------------------------------------------------------------
    def _layers(self) -> list[tuple[str, str]]:
        layers = param_layers(self.ckpt)
        if not layers:
            raise SurgeryError(f"{self.ckpt.path}: not a sequential CNN (tensors other than conv/bn/linear)")
        return layers

    def steps(self) -> list[Step]:
        """Every layer in forward order, parametric or not (from metadata or the default)."""
        if getattr(self, "_steps", None) is None:
            self._steps = self._read_steps()
        return list(self._steps)

    def _read_steps(self) -> list[Step]:
        raw = self.ckpt.metadata.get("modelsurgery.arch")
        layers = self._layers()
        if raw is None:
            return default_steps(self.ckpt, layers)
        try:
            arch = json.loads(raw)
        except ValueError as e:
            raise SurgeryError(f"{self.ckpt.path}: modelsurgery.arch metadata is not JSON ({e})") from e
        return steps_from_arch(self.ckpt, arch, layers)

    def _linear(self, name: str) -> Linear:
        return Linear(f"{name}.weight", f"{name}.bias" if f"{name}.bias" in self.ckpt else None)

    def _norm(self, name: str) -> Norm:
        return Norm(f"{name}.weight", f"{name}.bias" if f"{name}.bias" in self.ckpt else None, kind="batchnorm",
                    running_mean=f"{name}.running_mean", running_var=f"{name}.running_var")

    def layers(self) -> list[Linear | Norm]:
        """Conv and linear layers (as ``Linear``; conv weights are [out, in, kh, kw]) and BatchNorms
        (as ``Norm``, kind 'batchnorm') in forward order."""
        return [self._norm(n) if k == "bn" else self._linear(n) for n, k in self._layers()]

    def chain_layers(self) -> list[Linear | Norm]:
        """A sequential CNN is one chain: every layer feeds the next (pools and the flatten between)."""
        return self.layers()

    def weight_layers(self) -> list[Linear]:
        """Only the conv and linear layers, in forward order."""
        return [x for x in self.layers() if isinstance(x, Linear)]

    def input_shape(self) -> tuple[int, ...]:
        """Per-sample input shape (C, H, W): metadata, else derived from the layer shapes."""
        raw = self.ckpt.metadata.get("modelsurgery.input_shape")
        if raw is not None:
            try:
                shape = tuple(int(d) for d in json.loads(raw))
            except (ValueError, TypeError) as e:
                raise SurgeryError(f"{self.ckpt.path}: modelsurgery.input_shape '{raw}' is not a list of ints") from e
            if len(shape) != 3:
                raise SurgeryError(f"{self.ckpt.path}: modelsurgery.input_shape {list(shape)} is not [C, H, W]")
            return shape
        steps = self.steps()
        first_conv = next(s for s in steps if s.kind == "conv")
        channels = self.ckpt.shape(f"{first_conv.name}.weight")[1]
        first_linear = next((s for s in steps if s.kind == "linear"), None)
        if first_linear is None:
            return (channels, DEFAULT_SPATIAL, DEFAULT_SPATIAL)
        need = self.ckpt.shape(f"{first_linear.name}.weight")[1]
        for size in [DEFAULT_SPATIAL, *range(1, 257)]:
            if self.features_into(first_linear.name, (channels, size, size)) == need:
                return (channels, size, size)
        raise SurgeryError(
            f"{self.ckpt.path}: no square input fits tensor '{first_linear.name}.weight' (in_features {need}); "
            "add modelsurgery.input_shape metadata"
        )

    def features_into(self, linear: str, input_shape: tuple[int, ...]) -> int | None:
        """Flattened feature count reaching linear ``linear`` for a given input shape (shape arithmetic)."""
        c, h, w = input_shape
        flat = None
        for step in self.steps():
            o = step.options
            if step.name == linear:
                return flat if flat is not None else None
            if step.kind == "conv":
                out_c, _, kh, kw = self.ckpt.shape(f"{step.name}.weight")
                s, p = o.get("stride", 1), o.get("padding", (kh // 2, kw // 2))
                s = (s, s) if isinstance(s, int) else s
                p = (p, p) if isinstance(p, int) else p
                c, h, w = out_c, _out_size(h, kh, s[0], p[0]), _out_size(w, kw, s[1], p[1])
            elif step.kind == "maxpool" or (step.kind == "avgpool" and "kernel" in o):
                k, s, p = pool_geometry(o, 2)
                h, w = _out_size(h, k, s, p), _out_size(w, k, s, p)
            elif step.kind == "avgpool":
                h = w = 1
            elif step.kind == "flatten":
                flat = c * h * w
            elif step.kind == "linear":
                flat = self.ckpt.shape(f"{step.name}.weight")[0]
            if h < 1 or w < 1:
                return None
        return None

    def spatial_positions(self, linear: str) -> int:
        """Spatial positions per channel in the flattened input of ``linear`` (1 after a global pool).
        Feature j of the linear's input is channel j // positions (channel-major flatten). A conv
        layer's input axis has one position per channel (1)."""
        steps = self.steps()
        if not any(s.kind in ("linear", "conv") and s.name == linear for s in steps):
            raise SurgeryError(f"{self.ckpt.path}: '{linear}' is not a conv or linear layer of this CNN")
        first = next((s.name for s in steps if s.kind == "linear"), None)
        if linear != first:
            return 1
        prev_conv = [s.name for s in steps[: [s.name for s in steps].index(linear)] if s.kind == "conv"]
        if not prev_conv:
            return 1
        channels = self.ckpt.shape(f"{prev_conv[-1]}.weight")[0]
        return self.ckpt.shape(f"{linear}.weight")[1] // channels

    @property
    def hidden_size(self) -> int | None:
        return self.ckpt.shape(self.weight_layers()[0].weight)[0]

    def head_names(self) -> list[str]:
        last = self.weight_layers()[-1]
        return [n for n in (last.weight, last.bias) if n]

    # ----- running ------------------------------------------------------------------------------
    def build_module(self, state=None, dtype=None) -> nn.Module:
        from modelsurgery.families.modules.cnn import SequentialCNN

        steps = self.steps()
        input_shape = self.input_shape()
        shapes = {n: self.ckpt.shape(f"{n}.weight") for n, _ in self._layers()}
        biases = {n for n, k in self._layers() if k != "bn" and f"{n}.bias" in self.ckpt}
        for step in steps:
            if step.kind == "linear":
                got = self.features_into(step.name, input_shape)
                need = shapes[step.name][1]
                if got is not None and got != need:
                    raise SurgeryError(
                        f"{self.ckpt.path}: tensor '{step.name}.weight' expects {need} input features but an "
                        f"input of shape {list(input_shape)} gives {got}"
                    )
                break
        module = SequentialCNN(steps, shapes, biases, input_shape)
        return self.load_state(module, state, dtype)

    def example_inputs(self, batch=2, seq_len=8, generator=None) -> dict[str, torch.Tensor]:
        import torch

        return {"input": torch.randn(batch, *self.input_shape(), generator=generator)}

    def describe(self) -> dict:
        d = super().describe()
        d["num_layers"] = len(self.weight_layers())
        try:  # inspect must work even when the metadata lies or no input shape fits
            d["layers"] = [s.kind for s in self.steps()]
            d["input_shape"] = list(self.input_shape())
        except SurgeryError as e:
            d["layers"], d["input_shape"], d["runnable"] = None, None, False
            d["problem"] = str(e)
        return d
