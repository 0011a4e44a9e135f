"""Permutation specs derived from the module graph with torch.fx (the automatic spec of Git
Re-Basin's PyTorch ports, Ainsworth et al. 2023): tensors sharing a hidden dimension form a group.

The traced graph is walked once. Every value carries the group of its channel axis (dim 1);
Linear/Conv layers start a new group on their output and join their weight's input axis to the
input's group; BatchNorm/LayerNorm and elementwise ops pass the group through; residual adds
(and elementwise products) merge the groups of their operands; a flatten after a conv spreads
each channel over H*W consecutive features. Model inputs, outputs and anything an unknown op
touches are fixed, so a spec never changes the function.
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
    groups = _Groups()
    value: dict[torch.fx.Node, tuple[int, int] | None] = {}  # node -> (group, expand)
    members: list[tuple[str, int, int, int]] = []  # (tensor, axis, expand, group)
    statistics: set[str] = set()
    mods = dict(gm.named_modules())

    def shape(node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def fixed_value() -> tuple[int, int]:
        return (groups.new(fixed=True), 1)

    def fix_args(node) -> None:
        for a in node.all_input_nodes:
            if value.get(a):
                groups.fix(value[a][0])

    def inp(node) -> tuple[int, int] | None:
        a = node.args[0] if node.args else None
        return value.get(a) if isinstance(a, torch.fx.Node) else None

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            value[node] = fixed_value()
        elif node.op == "output":
            fix_args(node)
        elif node.op == "get_attr":
            value[node] = fixed_value()
        elif node.op == "call_module":
            value[node] = _module_rule(node, mods[node.target], inp(node), shape, groups, members, fix_args,
                                       statistics)
        elif node.op in ("call_function", "call_method"):
            value[node] = _function_rule(node, inp(node), value, shape, groups, fix_args)
        else:
            fix_args(node)
            value[node] = fixed_value()

    spec = PermutationSpec()
    sizes: dict[int, set[int]] = {}
    by_root: dict[int, list[tuple[str, int, int]]] = {}
    params = dict(module.state_dict())
    for tensor, axis, expand, g in members:
        root = groups.find(g)
        by_root.setdefault(root, []).append((tensor, axis, expand))
        sizes.setdefault(root, set()).add(params[tensor].shape[axis] // expand)
    for root, mem in by_root.items():
        if groups.fixed[root] or len(sizes[root]) != 1:
            continue
        gname = spec.add_group(PermGroup(f"{mem[0][0].rsplit('.', 1)[0]}:out", sizes[root].pop()))
        for tensor, axis, expand in mem:
            spec.add_axis(tensor, axis, Segment(gname, expand=expand))
    spec.statistics = statistics & set(spec.axes)
    return spec


def _module_rule(node, mod, x, shape, groups, members, fix_args, statistics):
    prefix = node.target
    if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        conv = not isinstance(mod, nn.Linear)
        if conv and mod.groups != 1:
            if mod.groups == mod.in_channels == mod.out_channels and x is not None and x[1] == 1:
                members.append((f"{prefix}.weight", 0, 1, x[0]))
                if mod.bias is not None:
                    members.append((f"{prefix}.bias", 0, 1, x[0]))
                return x
            fix_args(node)
            return (groups.new(fixed=True), 1)
        if x is None:
            fix_args(node)
            x = (groups.new(fixed=True), 1)
        members.append((f"{prefix}.weight", 1, x[1], x[0]))
        out = groups.new()
        members.append((f"{prefix}.weight", 0, 1, out))
        if mod.bias is not None:
            members.append((f"{prefix}.bias", 0, 1, out))
        return (out, 1)
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm)) and x is not None:
        in_shape = shape(node.args[0])
        if isinstance(mod, nn.LayerNorm) and (len(mod.normalized_shape) != 1 or not in_shape or len(in_shape) != 2):
            fix_args(node)
            return (groups.new(fixed=True), 1)
        for pname, _ in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if pname != "num_batches_tracked":
                members.append((f"{prefix}.{pname}", 0, x[1], x[0]))
        statistics.update(f"{prefix}.{b}" for b in ("running_mean", "running_var") if getattr(mod, b, None) is not None)
        return x
    if isinstance(mod, ELEMENTWISE_MODULES) and x is not None:
        return x
    if isinstance(mod, nn.Flatten) and x is not None:
        return _flatten(node, x, shape, mod.start_dim, groups, fix_args)
    fix_args(node)
    return (groups.new(fixed=True), 1)


def _flatten(node, x, shape, start_dim, groups, fix_args):
    in_shape, out_shape = shape(node.args[0]), shape(node)
    if in_shape is None or out_shape is None or start_dim != 1 or len(out_shape) != 2:
        fix_args(node)
        return (groups.new(fixed=True), 1)
    return (x[0], x[1] * math.prod(in_shape[2:]))


def _function_rule(node, x, value, shape, groups, fix_args):
    target = node.target
    if node.op == "call_method" and target in NO_TENSOR_METHODS:
        return None
    is_binary = ((node.op == "call_function" and target in BINARY)
                 or (node.op == "call_method" and target in BINARY_METHODS))
    if is_binary and len(node.args) >= 2:
        a, b = node.args[0], node.args[1]
        va = value.get(a) if isinstance(a, torch.fx.Node) else None
        vb = value.get(b) if isinstance(b, torch.fx.Node) else None
        sa, sb = shape(a), shape(b)
        if va and vb and sa == sb and va[1] == vb[1]:
            return (groups.union(va[0], vb[0]), va[1])
        if va and not isinstance(b, torch.fx.Node):
            return va
        if vb and not isinstance(a, torch.fx.Node):
            return vb
    elif x is not None and ((node.op == "call_function" and target in ELEMENTWISE_FUNCTIONS)
                            or (node.op == "call_method" and target in ELEMENTWISE_METHODS)):
        return x
    elif x is not None and ((node.op == "call_function" and target in FLATTENS) or
                            (node.op == "call_method" and target in ("flatten", "view", "reshape"))):
        in_shape, out_shape = shape(node.args[0]), shape(node)
        if in_shape == out_shape:
            return x
        start = node.args[1] if len(node.args) > 1 and target in (torch.flatten, "flatten") else 1
        start = node.kwargs.get("start_dim", start)
        if out_shape and in_shape and len(out_shape) == 2 and out_shape[0] == in_shape[0]:
            return _flatten(node, x, shape, start, groups, fix_args)
    elif x is not None and node.op == "call_method" and target == "mean":
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        in_shape = shape(node.args[0])
        if in_shape and dims and all(d % len(in_shape) >= 2 for d in dims):
            return x
    fix_args(node)
    return (groups.new(fixed=True), 1)
