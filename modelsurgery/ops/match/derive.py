"""Permutation specs from a family's structure (Git Re-Basin, Ainsworth et al. 2023, Sec. 3.1;
transformer heads and residual stream as in Verma & Elbayad 2024, "Merging Text Transformer Models
from Different Initializations").

No tensor name is written here: MLPs use ``layers()``; transformers use ``block_linears()``,
``block_norms()``, ``attention``, ``embedding_names()`` and ``head_names()``; every other runnable
family (CNN, ResNet, a user's ``--model`` module) is traced with torch.fx (``fx_spec``).
"""

from __future__ import annotations

from modelsurgery.errors import SurgeryError
from modelsurgery.families.base import Family, Linear
from modelsurgery.ops.match.spec import PermGroup, PermutationSpec, Segment


def permutation_spec(family: Family, residual: bool = True) -> PermutationSpec:
    """The permutation groups of ``family``'s checkpoint, validated against its shapes.

    ``residual=False`` keeps the transformer residual stream fixed (identity)."""
    if family.attention is not None and family.num_layers > 0:
        spec = transformer_spec(family, residual=residual)
    elif hasattr(family, "layers") and family.name == "mlp":
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
    spec.validate(family.ckpt.shapes())
    return spec


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
    """Hidden units between consecutive layers of an MLP (``layers()``)."""
    spec = PermutationSpec()
    layers = family.layers()
    for i, (a, b) in enumerate(zip(layers, layers[1:])):
        size = family.ckpt.shape(a.weight)[_in_out(a)[1]]
        g = spec.add_group(PermGroup(f"hidden{i}", size))
        linear_axes(spec, a, None, [Segment(g)])
        linear_axes(spec, b, [Segment(g)], None)
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
