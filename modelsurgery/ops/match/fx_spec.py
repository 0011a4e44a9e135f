"""Permutation specs derived from the module graph with torch.fx (the automatic spec of Git
Re-Basin's PyTorch ports, Ainsworth et al. 2023): tensors sharing a hidden dimension form a group.

The traced graph is walked once. Every value carries the group of one of its axes: the channel
axis (dim 1) after a conv, the last axis after a Linear or an Embedding. Linear/Conv layers start a
new group on their output and join their weight's input axis to the input's group (when the layer
acts on the axis that carries it); BatchNorm (dim 1), LayerNorm (last dim) and elementwise ops pass
the group through; residual adds (and elementwise products) merge the groups of their operands; a
flatten after a conv spreads each channel over H*W consecutive features; an Embedding starts a
group on its table's columns. Model inputs, outputs and anything an unknown op touches are fixed,
so a spec never changes the function.

Shared layers: every parameter axis has exactly one group. A module called more than once (a
block applied twice, a projection shared by two inputs) and a parameter tied under two names (an
embedding and an output head) register the same axis again, which joins the groups (union-find
over parameter axes); a parameter read directly (``get_attr``) or owned by a module with no rule
has all its axes fixed. So permuting never changes what the model computes.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from modelsurgery.errors import SurgeryError
from modelsurgery.families.base import Family
from modelsurgery.ops.match.spec import PermGroup, PermutationSpec, Segment

ELEMENTWISE_MODULES = (
    nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Dropout, nn.Identity,
    nn.Hardswish, nn.Softplus, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.ReLU6, nn.Mish,
)
ELEMENTWISE_FUNCTIONS = {
    F.relu, torch.relu, torch.tanh, torch.sigmoid, F.gelu, F.silu, F.dropout, F.leaky_relu, F.elu,
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.nn.functional.relu6,
}
ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "float", "to"}
BINARY = {operator.add, operator.iadd, torch.add, operator.mul, operator.imul, torch.mul, operator.sub, torch.sub}
BINARY_METHODS = {"add", "add_", "mul", "mul_", "sub"}
FLATTENS = {torch.flatten}
NO_TENSOR_METHODS = {"size", "dim"}


class _Groups:
    """Union-find over channel groups, with a 'fixed' flag per root."""

    def __init__(self):
        self.parent: list[int] = []
        self.fixed: list[bool] = []

    def new(self, fixed: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.fixed.append(fixed)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            self.fixed[ra] = self.fixed[ra] or self.fixed[rb]
        return ra

    def fix(self, g: int) -> None:
        self.fixed[self.find(g)] = True


class _Axes:
    """The group of every parameter axis; registering an axis again joins the two groups."""

    def __init__(self, groups: _Groups, aliases: dict[str, str]):
        self.groups = groups
        self.aliases = aliases  # tensor name -> the first name of the same parameter (tied weights)
        self.of: dict[tuple[str, int], tuple[int, int]] = {}  # (tensor, axis) -> (group, expand)

    def add(self, tensor: str, axis: int, expand: int, group: int) -> int:
        key = (self.aliases.get(tensor, tensor), axis)
        if key not in self.of:
            self.of[key] = (group, expand)
            return group
        old, old_expand = self.of[key]
        if old_expand != expand:  # the same axis read with two layouts: leave it alone
            self.groups.fix(old)
            self.groups.fix(group)
        return self.groups.union(old, group)

    def fix_tensor(self, tensor: str, ndim: int) -> None:
        for axis in range(ndim):
            self.add(tensor, axis, 1, self.groups.new(fixed=True))

    def fix_module(self, prefix: str, mod: nn.Module) -> None:
        """Every axis of every parameter and buffer of ``mod`` (one a rule does not understand)."""
        for name, t in list(mod.named_parameters()) + list(mod.named_buffers()):
            self.fix_tensor(f"{prefix}.{name}" if prefix else name, t.ndim)


def _aliases(module: nn.Module) -> dict[str, str]:
    """Each parameter/buffer name -> the first name under which the same tensor appears."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    named = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    for name, t in named:
        out[name] = first.setdefault(id(t), name)
    return out


def fx_spec(family: Family) -> PermutationSpec:
    module = family.build_module()
    inputs = family.example_inputs(batch=2)
    return module_spec(module, inputs, name=str(family.ckpt.path))


def module_spec(module: nn.Module, inputs: dict[str, torch.Tensor], name: str = "model") -> PermutationSpec:
    """The spec of ``module``, whose parameter names are the checkpoint's tensor names."""
    try:
        gm = torch.fx.symbolic_trace(module)
    except Exception as e:  # tracing failures come in many types
        raise SurgeryError(f"{name}: module cannot be traced with torch.fx ({type(e).__name__}: {e}); "
                           "it is not permutable automatically") from e
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    args = [inputs[n.target] if n.target in inputs else list(inputs.values())[i] for i, n in enumerate(placeholders)]
    with torch.no_grad():
        ShapeProp(gm).propagate(*args)
    walk = _Walk(module, dict(gm.named_modules()))
    for node in gm.graph.nodes:
        walk.visit(node)
    return walk.spec()


Value = tuple[int, int, int]  # (group, expand, axis carrying the group)


class _Walk:
    """One pass over the traced graph: the value of every node and the group of every parameter axis."""

    def __init__(self, module: nn.Module, mods: dict[str, nn.Module]):
        self.groups = _Groups()
        self.aliases = _aliases(module)
        self.axes = _Axes(self.groups, self.aliases)
        self.tensors = dict(module.state_dict(keep_vars=True))
        self.mods = mods
        self.value: dict[torch.fx.Node, Value | None] = {}
        self.statistics: set[str] = set()

    # ----- helpers ------------------------------------------------------------------------------
    @staticmethod
    def shape(node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def fixed(self) -> Value:
        return (self.groups.new(fixed=True), 1, 1)

    def fix_args(self, node) -> Value:
        for a in node.all_input_nodes:
            if self.value.get(a):
                self.groups.fix(self.value[a][0])
        return self.fixed()

    def arg(self, node, i: int = 0) -> Value | None:
        a = node.args[i] if len(node.args) > i else None
        return self.value.get(a) if isinstance(a, torch.fx.Node) else None

    def on_axis(self, node, x: Value | None, axis: int) -> Value | None:
        """``x`` when it is carried by ``axis`` (negative: from the end) of the first input, else None
        (and its group fixed: the layer mixes along another axis, which the spec cannot follow)."""
        in_shape = self.shape(node.args[0]) if node.args else None
        if x is None or not in_shape:
            return None
        if x[2] == axis % len(in_shape):
            return x
        self.groups.fix(x[0])
        return None

    # ----- the walk -----------------------------------------------------------------------------
    def visit(self, node) -> None:
        if node.op == "placeholder":
            self.value[node] = self.fixed()
        elif node.op == "output":
            self.fix_args(node)
        elif node.op == "get_attr":
            if node.target in self.tensors:  # a parameter used outside a module rule: keep its axes as they are
                self.axes.fix_tensor(node.target, self.tensors[node.target].ndim)
            self.value[node] = self.fixed()
        elif node.op == "call_module":
            self.value[node] = self.module_rule(node, self.mods[node.target])
        elif node.op in ("call_function", "call_method"):
            self.value[node] = self.function_rule(node)
        else:
            self.value[node] = self.fix_args(node)

    def module_rule(self, node, mod: nn.Module) -> Value:
        prefix, axes, x = node.target, self.axes, self.arg(node)
        out_shape = self.shape(node)

        def unknown() -> Value:
            axes.fix_module(prefix, mod)
            return self.fix_args(node)

        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            linear = isinstance(mod, nn.Linear)
            if out_shape is None:
                return unknown()
            if not linear and mod.groups != 1:
                x = self.on_axis(node, x, 1)
                if mod.groups == mod.in_channels == mod.out_channels and x is not None and x[1] == 1:
                    g = axes.add(f"{prefix}.weight", 0, 1, x[0])
                    if mod.bias is not None:
                        g = axes.add(f"{prefix}.bias", 0, 1, g)
                    return (g, 1, 1)
                return unknown()
            x = self.on_axis(node, x, -1 if linear else 1) or self.fix_args(node)
            axes.add(f"{prefix}.weight", 1, x[1], x[0])
            out = axes.add(f"{prefix}.weight", 0, 1, self.groups.new())  # a second call joins the first's output
            if mod.bias is not None:
                out = axes.add(f"{prefix}.bias", 0, 1, out)
            return (out, 1, len(out_shape) - 1 if linear else 1)
        if isinstance(mod, nn.Embedding) and out_shape is not None:
            self.fix_args(node)  # token ids
            axes.add(f"{prefix}.weight", 0, 1, self.groups.new(fixed=True))  # rows are indexed by the ids
            return (axes.add(f"{prefix}.weight", 1, 1, self.groups.new()), 1, len(out_shape) - 1)
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm)):
            layer_norm = isinstance(mod, nn.LayerNorm)
            if layer_norm and len(mod.normalized_shape) != 1:
                return unknown()
            x = self.on_axis(node, x, -1 if layer_norm else 1)
            if x is None:
                return unknown()
            g = x[0]
            for pname, _ in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                if pname != "num_batches_tracked":
                    g = axes.add(f"{prefix}.{pname}", 0, x[1], g)
            self.statistics.update(f"{prefix}.{b}" for b in ("running_mean", "running_var")
                                   if getattr(mod, b, None) is not None)
            return (g, x[1], x[2])
        if isinstance(mod, ELEMENTWISE_MODULES):
            return self.passthrough(node, x) or unknown()
        if isinstance(mod, nn.Flatten) and x is not None:
            return self.flatten(node, x, mod.start_dim)
        return unknown()

    def passthrough(self, node, x: Value | None) -> Value | None:
        """Elementwise ops and pooling: the value's axis keeps its length and position."""
        in_shape, out_shape = self.shape(node.args[0]) if node.args else None, self.shape(node)
        if x is None or in_shape is None or out_shape is None or len(in_shape) != len(out_shape) \
                or x[2] >= len(in_shape):
            return None
        if in_shape[x[2]] != out_shape[x[2]] or (in_shape != out_shape and x[2] != 1):
            return None  # pooling shrinks the spatial axes, never the channels at dim 1
        return x

    def flatten(self, node, x: Value, start_dim: int) -> Value:
        in_shape, out_shape = self.shape(node.args[0]), self.shape(node)
        if (in_shape is None or out_shape is None or start_dim != 1 or len(out_shape) != 2 or x[2] != 1):
            return self.fix_args(node)
        return (x[0], x[1] * math.prod(in_shape[2:]), 1)

    def function_rule(self, node) -> Value | None:
        target, x = node.target, self.arg(node)
        method = node.op == "call_method"
        if method and target in NO_TENSOR_METHODS:
            return None
        is_binary = (not method and target in BINARY) or (method and target in BINARY_METHODS)
        if is_binary and len(node.args) >= 2:
            a, b = node.args[0], node.args[1]
            va, vb = self.arg(node, 0), self.arg(node, 1)
            if va and vb and self.shape(a) == self.shape(b) and va[1:] == vb[1:]:
                return (self.groups.union(va[0], vb[0]), va[1], va[2])
            if va and not isinstance(b, torch.fx.Node):
                return va
            if vb and not isinstance(a, torch.fx.Node):
                return vb
        elif (not method and target in ELEMENTWISE_FUNCTIONS) or (method and target in ELEMENTWISE_METHODS):
            kept = self.passthrough(node, x)
            if kept is not None:
                return kept
        elif x is not None and ((not method and target in FLATTENS) or
                                (method and target in ("flatten", "view", "reshape"))):
            in_shape, out_shape = self.shape(node.args[0]), self.shape(node)
            if in_shape == out_shape:
                return x
            start = node.args[1] if len(node.args) > 1 and target in (torch.flatten, "flatten") else 1
            start = node.kwargs.get("start_dim", start)
            if out_shape and in_shape and len(out_shape) == 2 and out_shape[0] == in_shape[0]:
                return self.flatten(node, x, start)
        elif x is not None and method and target == "mean":
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
            in_shape = self.shape(node.args[0])
            if in_shape and dims and x[2] == 1 and all(d % len(in_shape) >= 2 for d in dims):
                return x
        return self.fix_args(node)

    def spec(self) -> PermutationSpec:
        spec = PermutationSpec()
        sizes: dict[int, set[int]] = {}
        by_root: dict[int, list[tuple[str, int, int]]] = {}
        names_of: dict[str, list[str]] = {}
        for name, canonical in self.aliases.items():
            names_of.setdefault(canonical, []).append(name)
        for (tensor, axis), (g, expand) in self.axes.of.items():
            root = self.groups.find(g)
            by_root.setdefault(root, []).append((tensor, axis, expand))
            sizes.setdefault(root, set()).add(self.tensors[tensor].shape[axis] // expand)
        for root, mem in by_root.items():
            if self.groups.fixed[root] or len(sizes[root]) != 1:
                continue
            base = f"{mem[0][0].rsplit('.', 1)[0]}:out"
            gname = next(n for n in (base, *(f"{base}{i}" for i in range(2, len(by_root) + 2))) if n not in spec.groups)
            spec.add_group(PermGroup(gname, sizes[root].pop()))
            for tensor, axis, expand in mem:
                for name in names_of.get(tensor, [tensor]):
                    spec.add_axis(name, axis, Segment(gname, expand=expand))
        spec.statistics = self.statistics & set(spec.axes)
        return spec
