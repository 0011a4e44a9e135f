"""MiSS (Kang & Yin, "MiSS: Balancing LoRA Performance and Efficiency with Simple Shard Sharing",
first published as Bone, "Block-Affine Adaptation"), folded as PEFT's ``peft/tuners/miss/layer.py``
defines each variant (``init_weights`` in the config):

- default (balance): ``miss_block`` D (r, out); weight column i gains D[i mod r] per output unit,
  W[o, i] += D[i mod r, o] (a trailing partial shard included);
- ``mini``: D (r, mini_r) tiled out/mini_r times along the outputs, then as balance;
- ``bat`` (Bone's block-affine form): D (out/r, r, r); each r x r block W_pq of the (out, in) weight
  becomes W_pq + W_pq D_p + D_p.

PEFT defines MiSS for ``nn.Linear`` only, so a fan-in-fan-out (Conv1D) target is refused. PEFT's
older ``BONE`` type stores ``bone_block`` with the balance / ``bat`` forms and folds the same way.
"""

from __future__ import annotations

import torch

from modelsurgery.ops.adapters.variants import Site, Variant, register_variant


def fold_weight(site: Site) -> torch.Tensor:
    name = "miss_block" if "miss_block" in site.parts else "bone_block"
    site.require(name)
    d = site.parts[name]
    if site.transposed:
        raise site.fail("MiSS is defined by PEFT for nn.Linear layers only, not fan-in-fan-out (Conv1D) weights")
    w = site.weight
    out_f, in_f = w.shape
    mode = site.config.get("init_weights", True)
    if mode == "bat":
        r = d.shape[-1]
        if d.dim() != 3 or out_f % r or in_f % r or d.shape[0] != out_f // r:
            raise site.fail(f"bat block {tuple(d.shape)} does not tile the weight {tuple(w.shape)} into {r}x{r} blocks")
        blocks = w.reshape(out_f // r, r, in_f // r, r).permute(0, 2, 1, 3)  # [p, q] = W_pq
        delta = blocks @ d[:, None] + d[:, None]
        return w + delta.permute(0, 2, 1, 3).reshape(out_f, in_f)
    if d.dim() != 2:
        raise site.fail(f"adapter tensor '{site.module}.{name}' has shape {tuple(d.shape)}, expected (r, out)")
    if mode == "mini":
        mini_r = d.shape[1]
        if out_f % mini_r:
            raise site.fail(f"mini_r={mini_r} does not divide the {out_f} outputs")
        d = d.repeat(1, out_f // mini_r)
    if d.shape[1] != out_f:
        raise site.fail(f"adapter tensor '{site.module}.{name}' has shape {tuple(d.shape)}, the layer {out_f} outputs")
    r = d.shape[0]
    shard = torch.arange(in_f, device=w.device) % r
    return w + d.t()[:, shard]


def weight_shape(shapes: dict[str, tuple[int, ...]]) -> tuple[int | None, int | None]:
    """Outputs only: balance (r, out); bat (out/r, r, r); mini (r, mini_r) fixes neither side."""
    d = shapes.get("miss_block", shapes.get("bone_block"))
    if d is None:
        return None, None
    return (d[0] * d[-1], None) if len(d) == 3 else (None, None)


register_variant(Variant("MISS", ("miss_block",), fold_weight, weight_shape, source="peft/tuners/miss/layer.py"))
register_variant(Variant("BONE", ("bone_block",), fold_weight, weight_shape,
                         source="peft/tuners/bone/layer.py (PEFT < 0.18)"))
