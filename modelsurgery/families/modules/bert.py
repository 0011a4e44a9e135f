"""The BERT encoder ``BertFamily`` runs (Devlin et al. 2019): post-norm blocks, learned absolute
positions and token types, bidirectional attention with a padding mask; returns last_hidden_state."""

from __future__ import annotations

import torch
from torch import nn

from modelsurgery.families.modules.transformer import (
    Activation,
    TransformerModule,
    attend,
    attention_bias,
    positions,
    split_heads,
)


class BertEmbeddings(nn.Module):
    def __init__(self, vocab: int, positions_: int, types: int, hidden: int, eps: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(positions_, hidden)
        self.token_type_embeddings = nn.Embedding(types, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x + self.position_embeddings(positions(input_ids)))


class BertSelfAttention(nn.Module):
    def __init__(self, hidden: int, head_dim: int):
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.head_dim = head_dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        d = self.head_dim
        q, k, v = (split_heads(lin(x), d) for lin in (self.query, self.key, self.value))
        return attend(q, k, v, mask, d ** -0.5)


class BertResidualOut(nn.Module):
    """dense, then LayerNorm(dense(x) + residual): BERT's SelfOutput and Output."""

    def __init__(self, in_features: int, hidden: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(in_features, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, hidden: int, head_dim: int, eps: float):
        super().__init__()
        self.self = BertSelfAttention(hidden, head_dim)
        self.output = BertResidualOut(hidden, hidden, eps)


class BertIntermediate(nn.Module):
    def __init__(self, hidden: int, inner: int, activation: Activation):
        super().__init__()
        self.dense = nn.Linear(hidden, inner)
        self.act = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, hidden: int, inner: int, head_dim: int, eps: float, activation: Activation):
        super().__init__()
        self.attention = BertAttention(hidden, head_dim, eps)
        self.intermediate = BertIntermediate(hidden, inner, activation)
        self.output = BertResidualOut(inner, hidden, eps)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.attention.output(self.attention.self(hidden, mask), hidden)
        return self.output(self.intermediate(hidden), hidden)


class BertEncoder(nn.Module):
    def __init__(self, layers: list[BertLayer]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class Bert(TransformerModule):
    """BERT encoder; parameter names follow the checkpoint (with or without ``bert.``)."""

    def __init__(self, prefix: str, vocab: int, positions_: int, types: int, hidden: int, inner: int,
                 num_layers: int, heads: int, eps: float, activation: str, where: str):
        super().__init__()
        body = nn.Module() if prefix else self
        body.embeddings = BertEmbeddings(vocab, positions_, types, hidden, eps)
        act = Activation(activation, where)
        body.encoder = BertEncoder([BertLayer(hidden, inner, hidden // heads, eps, act) for _ in range(num_layers)])
        if prefix:
            self.bert = body
        self._prefixed = bool(prefix)

    @property
    def body(self) -> nn.Module:
        return self.bert if self._prefixed else self

    def layers(self) -> list[nn.Module]:
        return list(self.body.encoder.layer)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        hidden = self.body.embeddings(input_ids, token_type_ids)
        return hidden, {"mask": attention_bias(input_ids, attention_mask, causal=False, dtype=hidden.dtype)}

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """last_hidden_state [B, T, hidden]."""
        return self.run(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
