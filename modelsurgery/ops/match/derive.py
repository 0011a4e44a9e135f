"""Permutation specs from a family's structure (Git Re-Basin, Ainsworth et al. 2023, Sec. 3.1;
transformer heads and residual stream as in Verma & Elbayad 2024, "Merging Text Transformer Models
from Different Initializations").

No tensor name and no family name is written here: chains (MLPs, sequential CNNs) use
``chain_layers()``; ResNets give ``channel_groups()``; transformers use ``block_linears()`` (fused
projections permuted per part), ``block_norms()``, ``attention``, ``rotary``, ``embedding_names()`` and
``head_names()``; every other runnable family (a user's ``--model`` module) is traced with torch.fx
(``fx_spec``).
"""

from __future__ import annotations

from modelsurgery.errors import SurgeryError
from modelsurgery.families.base import Family, Linear, Norm
from modelsurgery.ops.match.spec import PermGroup, PermutationSpec, Segment


def permutation_spec(family: Family, residual: bool = True, complete: bool = True) -> PermutationSpec:
    """The permutation groups of ``family``'s checkpoint, validated against its shapes.

    ``residual=False`` keeps the transformer residual stream fixed (identity). ``complete`` (for anything that
    writes a permuted model) refuses a permuted stream read by a tensor the spec does not know
    (``check_stream_readers``); an analysis of the spec's own tensors may pass False."""
    if family.attention is not None and family.num_layers > 0:
        spec = transformer_spec(family, residual=residual, complete=complete)
    elif family.channel_groups():
        spec = channel_group_spec(family, family.channel_groups())
    elif family.chain_layers():
        spec = mlp_spec(family)
    elif family.runnable:
        from modelsurgery.ops.match.fx_spec import fx_spec

        spec = fx_spec(family)
    else:
        raise SurgeryError(
            f"{family.ckpt.path}: family '{family.name}' has no permutation structure (not permutable); "
            "pass --model package.module:function so the module can be traced (surgery merge --method linear "
            "merges without matching)"
        )
    if not spec.groups:
        raise SurgeryError(f"{family.ckpt.path}: no permutable hidden units found (model is not permutable)")
    spec.statistics |= norm_statistics(family)
    spec.validate(family.ckpt.shapes())
    return spec


def norm_statistics(family: Family) -> set[str]:
    """BatchNorm running statistics: permuted with their channels, but data statistics, not
    weights, so they stay out of the matching objective."""
    norms = [x for x in family.layers() if isinstance(x, Norm)]
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
    for layer in family.chain_layers():
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


def attention_axes(spec: PermutationSpec, family: Family, i: int, lin: dict[str, Linear],
                   res: list[Segment] | None, rotary: bool) -> None:
    """Block ``i``'s heads group on q, k, v (separate, or fused parts) and o. ``rotary`` keeps the q/k units
    within a head in place (RoPE pairs, or q/k norms shared by all heads)."""
    att, ckpt = family.attention, family.ckpt
    fused = lin.get("qkv")
    if "o" not in lin:
        raise SurgeryError(f"{ckpt.path}: block {i} has no attention output projection (not permutable)")
    if fused is not None and fused.per_head:
        # [head, part, head_dim] rows: whole heads move as units of (parts x head_dim) rows, the output
        # projection's inputs as units of head_dim columns (one key/value head per query head)
        if att.num_kv_heads != att.num_heads:
            raise SurgeryError(f"tensor '{fused.weight}': per-head fused qkv with grouped-query attention "
                               "is not supported")
        heads = spec.add_group(PermGroup(f"block{i}.heads", att.num_heads))
        parts = len(fused.fused or ("q", "k", "v"))
        linear_axes(spec, fused, res, [Segment(heads, expand=parts * att.head_dim)])
        linear_axes(spec, lin["o"], [Segment(heads, expand=att.head_dim)], res)
        return
    heads = spec.add_group(PermGroup(
        f"block{i}.heads", att.num_kv_heads, kind="heads", head_dim=att.head_dim,
        q_per_kv=att.num_heads // att.num_kv_heads, rotary=rotary,
    ))
    if fused is not None:
        linear_axes(spec, fused, res, [Segment(heads, v) for v in (fused.fused or ("q", "k", "v"))])
    else:
        for role in ("q", "k", "v"):
            if role not in lin:
                raise SurgeryError(f"{ckpt.path}: block {i} has no '{role}' projection (not permutable)")
            linear_axes(spec, lin[role], res, [Segment(heads, role)])
    linear_axes(spec, lin["o"], [Segment(heads, "o")], res)


def transformer_spec(family: Family, residual: bool = True, complete: bool = True) -> PermutationSpec:
    """Residual stream (one group for all blocks), attention heads per block, MLP units per block.

    Fused projections are permuted per part: q|k|v concatenated (GPT-2, Phi-3, with grouped-query
    attention too) as three segments of one axis, gate|up as two segments of the MLP units. Parts laid
    out head by head (GPT-NeoX's ``query_key_value``) move whole heads, each a unit of parts x head_dim
    rows (the units within a head stay, as RoPE requires anyway). Norms of the residual width move with
    the stream, whatever their formula (a (1 + w) weight is permuted like any other); per-head q/k norms
    (Qwen3, Gemma 3) are shared by all heads, so whole heads move and the units within a head stay."""
    spec = PermutationSpec()
    ckpt = family.ckpt
    hidden = family.hidden_size
    # a model whose output is the hidden state itself (an encoder) cannot permute its residual stream
    res = None
    if residual and family.output_kind == "logits" and hidden:
        res = [Segment(spec.add_group(PermGroup("residual", hidden)))]
    for i in range(family.num_layers):
        lin = family.block_linears(i)
        norms = family.block_norms(i)
        attention_axes(spec, family, i, lin, res, rotary=family.rotary or any(n.per_head for n in norms.values()))
        producers = [lin[r] for r in ("up", "gate", "gate_up") if r in lin]
        if producers and "down" in lin:
            first = producers[0]
            size = ckpt.shape(first.weight)[_in_out(first)[1]] // max(1, len(first.fused))
            units = spec.add_group(PermGroup(f"block{i}.mlp", size))
            for p in producers:
                linear_axes(spec, p, res, [Segment(units)] * max(1, len(p.fused)))
            linear_axes(spec, lin["down"], [Segment(units)], res)
        if res:
            for norm in norms.values():
                if norm.per_head:
                    continue
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
        if complete:
            check_stream_readers(family, spec, hidden)
    return spec


def check_stream_readers(family: Family, spec: PermutationSpec, hidden: int) -> None:
    """Refuse a permuted residual stream when a float tensor with an axis of its width is not in the spec:
    it would be copied in the old order while the stream around it moves (the 'score.weight' [labels, hidden]
    of a ...ForSequenceClassification, which the family describes neither as a block tensor nor as a head)."""
    ckpt = family.ckpt
    per_head = {n for i in range(family.num_layers) for norm in family.block_norms(i).values() if norm.per_head
                for n in (norm.weight, norm.bias) if n}  # head_dim wide, whole heads move: known, not permuted
    unknown = next((n for n in ckpt if n not in spec.axes and n not in per_head and hidden in ckpt.shape(n)
                    and ckpt.info(n).dtype.is_floating_point), None)
    if unknown is not None:
        raise SurgeryError(
            f"{ckpt.path}: tensor '{unknown}' {tuple(ckpt.shape(unknown))} reads the residual stream that weight "
            f"matching permutes, but family '{family.name}' does not describe it (a classification head?), so it "
            "would keep the old order; merge without matching (--method linear, or --no-align)")
