"""One decoder-only transformer with switches, for the LLaMA-like families (LLaMA 1-3, Mistral, Qwen2/3,
Gemma 2/3, Phi-3, GPT-NeoX): pre-norm blocks (Xiong et al. 2020), grouped-query attention (Ainslie et al.
2023), rotary positions (``families/rope.py``), gated MLPs (Shazeer 2020). Tensor names come from the family's
``Layout`` (``families/layouts.py``); the switches come from config.json through ``DecoderSettings``
(``families/decoder_family.py``):

- attention: q/k/v/o biases (from the tensors), per-head q/k RMSNorm (Qwen3, Gemma 3), score scale
  ``query_pre_attn_scalar**-0.5`` (Gemma) else head_dim**-0.5, tanh soft-capping of scores and of the
  final logits (Gemma 2), a sliding window on all layers (Mistral, Phi-3) or on typed layers
  (``layer_types``, Gemma's alternation, Qwen's ``max_window_layers``), partial rotary, Gemma 3's own
  rope for sliding layers;
- norms: RMSNorm or LayerNorm, scale (1 + w) (Gemma), extra post-norms after attention and MLP (Gemma);
- residual: sequential, or parallel attention + MLP from the same input (GPT-NeoX);
- fused projections: ``qkv`` concatenated (Phi-3) or per head (GPT-NeoX), ``gate_up`` (Phi-3).

The module is traceable for ONNX export: masks (causal, padding, window band) and rope tables come
from tensor shapes through torch ops; soft-capping is a tanh in the graph.

Family API used by the operations (see ``families/base.py``): ``block_linears(i)`` returns roles q, k,
v, o, gate, up, down, or the fused ``qkv``/``gate_up`` with ``Linear.fused`` naming their parts in order
and ``Linear.per_head`` for GPT-NeoX's per-head layout. ``block_norms(i)`` returns ``attn``, ``mlp``
(pre-norms), ``attn_post``, ``mlp_post`` (Gemma's post-norms), ``q_norm``, ``k_norm`` (``Norm.per_head``);
``Norm.offset`` is 1.0 for Gemma's (1 + w). ``layer_windows()`` gives each block's sliding window (None:
full attention), ``features()`` what inspect shows; ``config_for_layers``/``per_layer_config`` keep
``layer_types`` explicit. Built modules take ``input_ids`` and ``attention_mask``; ``stages()`` passes
``mask``/``cos``/``sin`` (full-attention layers) and ``mask_local``/``cos_local``/``sin_local`` (sliding
layers, where the config has them) to each block.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from modelsurgery.families.modules.transformer import (
    Activation,
    RMSNorm,
    TransformerModule,
    apply_rotary,
    attend,
    attention_bias,
)

if TYPE_CHECKING:
    from modelsurgery.families.decoder_family import DecoderSettings


def attach(root: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Register ``module`` at dotted ``path`` under ``root`` (creating plain containers), so that
    parameter names are the checkpoint's tensor names whatever the family's layout."""
    *parents, leaf = path.split(".")
    for name in parents:
        if name not in root._modules:
            root.add_module(name, nn.Module())
        root = root._modules[name]
    root.add_module(leaf, module)
    return module


def make_norm(layout, size: int, eps: float) -> nn.Module:
    if layout.norm_kind == "layernorm":
        return nn.LayerNorm(size, eps=eps)
    return RMSNorm(size, eps, offset=layout.norm_offset)


class DecoderBlock(nn.Module):
    """attn-norm -> attention (-> post-norm) -> residual, mlp-norm -> MLP (-> post-norm) -> residual;
    or, with a parallel residual, x + attention(norm1(x)) + mlp(norm2(x))."""

    def __init__(self, s: DecoderSettings, layout, index: int):
        super().__init__()
        self.s, self.window = s, s.windows[index]
        self.local_rope = self.window is not None and s.rope_local is not None
        q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
        shapes = {"q": (q, s.hidden), "k": (kv, s.hidden), "v": (kv, s.hidden), "qkv": (q + 2 * kv, s.hidden),
                  "o": (s.hidden, q), "gate": (s.inner, s.hidden), "up": (s.inner, s.hidden),
                  "gate_up": (2 * s.inner, s.hidden), "down": (s.hidden, s.inner)}
        # modules live under their layout paths; roles find them by path (so a replaced module is seen)
        self.paths = dict(layout.linears) | dict(layout.norms)
        for role, path in layout.linears.items():
            attach(self, path, nn.Linear(shapes[role][1], shapes[role][0], bias=role in s.biases))
        for role, path in layout.norms.items():
            size = s.head_dim if role in ("q_norm", "k_norm") else s.hidden
            attach(self, path, make_norm(layout, size, s.eps))
        self.qkv_per_head = layout.qkv_per_head
        self.act = Activation(s.activation, "config.json")

    def has(self, role: str) -> bool:
        return role in self.paths

    def part(self, role: str) -> nn.Module:
        return self.get_submodule(self.paths[role])

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, T, H, d], k and v [B, T, KV, d]."""
        s, (b, t) = self.s, x.shape[:2]
        if not self.has("qkv"):
            return tuple(self.part(r)(x).reshape(b, t, -1, s.head_dim) for r in ("q", "k", "v"))
        fused = self.part("qkv")(x)
        if self.qkv_per_head:  # GPT-NeoX: [q_h, k_h, v_h] for each head h
            return fused.reshape(b, t, s.heads, 3 * s.head_dim).chunk(3, dim=-1)
        q, k, v = fused.split([s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], dim=-1)
        return tuple(y.reshape(b, t, -1, s.head_dim) for y in (q, k, v))

    def attention_branch(self, x: torch.Tensor, mask, cos, sin) -> torch.Tensor:
        q, k, v = self.project_qkv(x)
        if self.has("q_norm"):  # per-head RMSNorm before rotary
            q, k = self.part("q_norm")(q), self.part("k_norm")(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        out = attend(q, k, v, mask, self.s.scaling, softmax_fp32=True, softcap=self.s.attn_softcap)
        return self.part("o")(out)

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        if self.has("gate_up"):
            gate, up = self.part("gate_up")(x).chunk(2, dim=-1)
            return self.part("down")(self.act(gate) * up)
        if self.has("gate"):
            return self.part("down")(self.act(self.part("gate")(x)) * self.part("up")(x))
        return self.part("down")(self.act(self.part("up")(x)))

    def post(self, role: str, x: torch.Tensor) -> torch.Tensor:
        return self.part(role)(x) if self.has(role) else x

    def forward(self, hidden: torch.Tensor, mask=None, cos=None, sin=None, mask_local=None, cos_local=None,
                sin_local=None) -> torch.Tensor:
        if self.window is not None:
            mask = mask_local
        if self.local_rope:
            cos, sin = cos_local, sin_local
        attn = self.post("attn_post", self.attention_branch(self.part("attn")(hidden), mask, cos, sin))
        if self.s.parallel_residual:
            return self.mlp_branch(self.part("mlp")(hidden)) + attn + hidden
        hidden = hidden + attn
        return hidden + self.post("mlp_post", self.mlp_branch(self.part("mlp")(hidden)))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary on the first cos.shape[-1] dimensions of each head (all of them unless partial)."""
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return apply_rotary(x, cos, sin)
    return torch.cat((apply_rotary(x[..., :d], cos, sin), x[..., d:]), dim=-1)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma 2's tanh soft-capping: cap * tanh(x / cap)."""
    return x if cap is None else torch.tanh(x / cap) * cap


class Decoder(TransformerModule):
    """The decoder language model; parameter names are the checkpoint's (``layout`` decides them)."""

    def __init__(self, s: DecoderSettings, layout):
        super().__init__()
        self.s, self.embed_scale = s, layout.embed_scale
        self.paths = {"embed": layout.embed, "blocks": layout.blocks, "final_norm": layout.final_norm,
                      "lm_head": layout.embed if s.tied_head else layout.lm_head}
        attach(self, layout.embed, nn.Embedding(s.vocab, s.hidden))
        attach(self, layout.blocks, nn.ModuleList(DecoderBlock(s, layout, i) for i in range(s.num_layers)))
        attach(self, layout.final_norm, make_norm(layout, s.hidden, s.eps))
        if not s.tied_head:
            attach(self, layout.lm_head, nn.Linear(s.hidden, s.vocab, bias=False))

    def part(self, name: str) -> nn.Module:
        return self.get_submodule(self.paths[name])

    def layers(self) -> list[nn.Module]:
        return list(self.part("blocks"))

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, dict]:
        s = self.s
        hidden = self.part("embed")(input_ids)
        if self.embed_scale:  # Gemma: sqrt(hidden) rounded to the activation dtype, as transformers does
            hidden = hidden * torch.tensor(math.sqrt(s.hidden), dtype=hidden.dtype)
        context = {}
        if any(w is None for w in s.windows):
            context["mask"] = attention_bias(input_ids, attention_mask, causal=True, dtype=hidden.dtype)
        windows = {w for w in s.windows if w is not None}
        if windows:
            context["mask_local"] = attention_bias(input_ids, attention_mask, causal=True, dtype=hidden.dtype,
                                                   window=windows.pop())
        context["cos"], context["sin"] = s.rope.tables(input_ids, hidden.dtype)
        if s.rope_local is not None and "mask_local" in context:
            context["cos_local"], context["sin_local"] = s.rope_local.tables(input_ids, hidden.dtype)
        return hidden, context

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(self.part("final_norm")(hidden), self.part("lm_head").weight)
        return softcap(logits, self.s.final_softcap)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab]."""
        return self.run(input_ids=input_ids, attention_mask=attention_mask)
