"""The GPT-2 model ``GPT2Family`` runs (Radford et al. 2019): pre-norm blocks, learned positions,
fused q/k/v in Conv1D layers; parameter names follow the checkpoint."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modelsurgery.families.modules.transformer import (
    Activation,
    Conv1D,
    TransformerModule,
    attend,
    attention_bias,
    positions,
    split_heads,
)


class GPT2Attention(nn.Module):
    def __init__(self, hidden: int, num_heads: int, scaling: float):
        super().__init__()
        self.c_attn = Conv1D(hidden, 3 * hidden)
        self.c_proj = Conv1D(hidden, hidden)
        self.hidden, self.head_dim, self.scaling = hidden, hidden // num_heads, scaling

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.c_attn(x).split(self.hidden, dim=2)
        d = self.head_dim
        out = attend(split_heads(q, d), split_heads(k, d), split_heads(v, d), mask, self.scaling)
        return self.c_proj(out)


class GPT2MLP(nn.Module):
    def __init__(self, hidden: int, inner: int, activation: Activation):
        super().__init__()
        self.c_fc = Conv1D(hidden, inner)
        self.c_proj = Conv1D(inner, hidden)
        self.act = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, hidden: int, inner: int, num_heads: int, eps: float, scaling: float, activation: Activation):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden, eps=eps)
        self.attn = GPT2Attention(hidden, num_heads, scaling)
        self.ln_2 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = GPT2MLP(hidden, inner, activation)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = hidden + self.attn(self.ln_1(hidden), mask)
        return hidden + self.mlp(self.ln_2(hidden))


class GPT2(TransformerModule):
    """GPT-2 language model; parameter names follow the checkpoint (with or without ``transformer.``)."""

    def __init__(self, prefix: str, vocab: int, positions_: int, hidden: int, inner: int, num_layers: int,
                 num_heads: int, eps: float, activation: str, scale_weights: bool, scale_by_layer: bool,
                 untied_head: bool, where: str):
        super().__init__()
        body = nn.Module() if prefix else self
        body.wte = nn.Embedding(vocab, hidden)
        body.wpe = nn.Embedding(positions_, hidden)
        act = Activation(activation, where)
        scaling = [
            ((hidden // num_heads) ** -0.5 if scale_weights else 1.0) / (float(i + 1) if scale_by_layer else 1.0)
            for i in range(num_layers)
        ]
        body.h = nn.ModuleList(GPT2Block(hidden, inner, num_heads, eps, scaling[i], act) for i in range(num_layers))
        body.ln_f = nn.LayerNorm(hidden, eps=eps)
        if prefix:
            self.transformer = body
        if untied_head:
            self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self._prefixed = bool(prefix)

    @property
    def body(self) -> nn.Module:
        return self.transformer if self._prefixed else self

    def layers(self) -> list[nn.Module]:
        return list(self.body.h)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, dict]:
        body = self.body
        hidden = body.wte(input_ids) + body.wpe(positions(input_ids))
        return hidden, {"mask": attention_bias(input_ids, attention_mask, causal=True, dtype=hidden.dtype)}

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.body.ln_f(hidden)
        weight = self.lm_head.weight if hasattr(self, "lm_head") else self.body.wte.weight
        return F.linear(hidden, weight)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab]."""
        return self.run(input_ids=input_ids, attention_mask=attention_mask)
