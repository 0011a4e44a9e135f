"""Permutation specs from a family's structure (Git Re-Basin, Ainsworth et al. 2023, Sec. 3.1;
transformer heads and residual stream as in Verma & Elbayad 2024, "Merging Text Transformer Models
from Different Initializations").

No tensor name is written here: MLPs and sequential CNNs use ``layers()``; ResNets use
``residual_groups()``/``inner_groups()``; transformers use ``block_linears()``,
``block_norms()``, ``attention``, ``embedding_names()`` and ``head_names()``; every other runnable family (a
user's ``--model`` module) is traced with torch.fx (``fx_spec``).
"""

from __future__ import annotations

from modelsurgery.errors import SurgeryError
from modelsurgery.families.base import Family, Linear, Norm
from modelsurgery.ops.match.spec import PermGroup, PermutationSpec, Segment


def permutation_spec(family: Family, residual: bool = True) -> PermutationSpec:
    """The permutation groups of ``family``'s checkpoint, validated against its shapes.

    ``residual=False`` keeps the transformer residual stream fixed (identity)."""
    if family.attention is not None and family.num_layers > 0:
        spec = transformer_spec(family, residual=residual)
    elif hasattr(family, "residual_groups") and hasattr(family, "inner_groups"):
        spec = channel_group_spec(family, [*family.residual_groups(), *family.inner_groups()])
    elif hasattr(family, "layers") and family.name in ("mlp", "cnn"):
        spec = mlp_spec(family)
    elif family.runnable:
        from modelsurgery.ops.match.fx_spec import fx_spec

        spec = fx_spec(family)
    else:
        raise SurgeryError(
            f"{family.ckpt.path}: family '{family.name}' has no permutation structure (not permutable); "
            "pass --model package.module:function so the module can be traced, or use --method linear"
        )
    if not spec.groups:
        raise SurgeryError(f"{family.ckpt.path}: no permutable hidden units found (model is not permutable)")
    spec.statistics |= norm_statistics(family)
    spec.validate(family.ckpt.shapes())
    return spec


def norm_statistics(family: Family) -> set[str]:
    """BatchNorm running statistics: permuted with their channels, but data statistics, not
    weights, so they stay out of the matching objective."""
    norms = [x for x in (family.layers() if hasattr(family, "layers") else []) if isinstance(x, Norm)]
    for i in range(family.num_layers):
        norms += list(family.block_norms(i).values())
    return {n for norm in norms for n in (norm.running_mean, norm.running_var) if n}


def _in_out(lin: Linear) -> tuple[int, int]:
    """(input axis, output axis) of a linear weight."""
    return (0, 1) if lin.transposed else (1, 0)


def linear_axes(spec: PermutationSpec, lin: Linear, inp: list[Segment] | None, out: list[Segment] | None) -> None:
    in_ax, out_ax = _in_out(lin)
    if inp:
        spec.add_axis(lin.weight, in_ax, *inp)
    if out:
        spec.add_axis(lin.weight, out_ax, *out)
        if lin.bias:
            spec.add_axis(lin.bias, 0, *out)


def mlp_spec(family: Family) -> PermutationSpec:
    """Hidden units (channels) between consecutive weight layers of an MLP or a sequential CNN
    (``layers()``): BatchNorms carried along; a conv->linear flatten spreads a channel over H*W."""
    spec = PermutationSpec()
    ckpt = family.ckpt
    current: str | None = None
    for layer in family.layers():
        if isinstance(layer, Norm):
            if current is None:
                raise SurgeryError(f"tensor '{layer.weight}': a norm before any weight layer (not permutable)")
            for name in (layer.weight, layer.bias, layer.running_mean, layer.running_var):
                if name:
                    spec.add_axis(name, 0, Segment(current))
            continue
        in_ax, out_ax = _in_out(layer)
        if current is not None:
            size = spec.groups[current].size
            fan_in = ckpt.shape(layer.weight)[in_ax]
            if fan_in % size:
                raise SurgeryError(f"tensor '{layer.weight}': {fan_in} inputs do not follow from {size} units")
            spec.add_axis(layer.weight, in_ax, Segment(current, expand=fan_in // size))
        current = spec.add_group(PermGroup(f"{layer.weight.rsplit('.', 1)[0]}:out", ckpt.shape(layer.weight)[out_ax]))
        spec.add_axis(layer.weight, out_ax, Segment(current))
        if layer.bias:
            spec.add_axis(layer.bias, 0, Segment(current))
    if current is not None:  # the model's output units stay in place
        for name, axes in list(spec.axes.items()):
            axes = {ax: segs for ax, segs in axes.items() if segs[0].group != current}
            if axes:
                spec.axes[name] = axes
            else:
                del spec.axes[name]
        del spec.groups[current]
    return spec


def channel_group_spec(family: Family, groups: list) -> PermutationSpec:
    """Groups given by the family (ResNet: residual streams tied across blocks, and each block's
    inner channels): axis 0 of ``out_axis`` tensors, axis 1 of ``in_axis`` tensors. A stream that
    reappears zero-padded in the next (option-A shortcut) keeps both in place."""
    ckpt = family.ckpt
    fixed = {g.padded_from for g in groups if g.padded_from} | {g.name for g in groups if g.padded_from}
    spec = PermutationSpec()
    for g in groups:
        if g.name in fixed:
            continue
        name = spec.add_group(PermGroup(g.name, g.size))
        for t in g.out_axis:
            spec.add_axis(t, 0, Segment(name))
        for t in g.in_axis:
            fan_in = ckpt.shape(t)[1]
            if fan_in % g.size:
                raise SurgeryError(f"tensor '{t}': {fan_in} inputs do not follow from {g.size} channels")
            spec.add_axis(t, 1, Segment(name, expand=fan_in // g.size))
    return spec


def uses_rotary(family: Family) -> bool:
    if getattr(family, "rotary", None) is not None:
        return bool(family.rotary)
    return any("rope" in k for k in family.config) or family.name == "llama"


def transformer_spec(family: Family, residual: bool = True) -> PermutationSpec:
    """Residual stream (one group for all blocks), attention heads per block, MLP units per block."""
    spec = PermutationSpec()
    att = family.attention
    ckpt = family.ckpt
    hidden = family.hidden_size
    # a model whose output is the hidden state itself (an encoder) cannot permute its residual stream
    res = None
    if residual and family.output_kind == "logits" and hidden:
        res = [Segment(spec.add_group(PermGroup("residual", hidden)))]
    rotary = uses_rotary(family)
    for i in range(family.num_layers):
        lin = family.block_linears(i)
        heads = spec.add_group(PermGroup(
            f"block{i}.heads", att.num_kv_heads, kind="heads", head_dim=att.head_dim,
            q_per_kv=att.num_heads // att.num_kv_heads, rotary=rotary,
        ))
        if "qkv" in lin:
            if att.num_kv_heads != att.num_heads:
                raise SurgeryError(f"tensor '{lin['qkv'].weight}': fused qkv with grouped-query attention "
                                   "is not supported")
            linear_axes(spec, lin["qkv"], res, [Segment(heads, v) for v in ("q", "k", "v")])
        else:
            for role in ("q", "k", "v"):
                if role not in lin:
                    raise SurgeryError(f"{ckpt.path}: block {i} has no '{role}' projection (not permutable)")
                linear_axes(spec, lin[role], res, [Segment(heads, role)])
        if "o" not in lin:
            raise SurgeryError(f"{ckpt.path}: block {i} has no attention output projection (not permutable)")
        linear_axes(spec, lin["o"], [Segment(heads, "o")], res)
        if "up" in lin and "down" in lin:
            up = lin["up"]
            units = spec.add_group(PermGroup(f"block{i}.mlp", ckpt.shape(up.weight)[_in_out(up)[1]]))
            for role in ("up", "gate"):
                if role in lin:
                    linear_axes(spec, lin[role], res, [Segment(units)])
            linear_axes(spec, lin["down"], [Segment(units)], res)
        if res:
            for norm in family.block_norms(i).values():
                for name in (norm.weight, norm.bias):
                    if name:
                        spec.add_axis(name, 0, *res)
    if res:
        for name in [*family.embedding_names(), *family.head_names()]:
            if name not in ckpt or not ckpt.info(name).dtype.is_floating_point:
                continue
            shape = ckpt.shape(name)
            if shape and shape[-1] == hidden:
                spec.add_axis(name, len(shape) - 1, *res)
    return spec
