"""BERT (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers"): post-norm encoder
blocks (LayerNorm after each residual sum), learned absolute positions and token-type embeddings,
bidirectional attention with a padding mask.

Checkpoints: ``BertModel`` (``embeddings.*``, ``encoder.layer.{i}.``, optional ``pooler.*``) and task
models with a ``bert.`` prefix (``BertForMaskedLM``, ``BertForSequenceClassification``; their heads
``cls.*`` / ``classifier.*`` are head tensors). The built module returns last_hidden_state.
"""

from __future__ import annotations

import torch
from torch import nn

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.families import register
from modelsurgery.families.base import Attention, Linear, Norm
from modelsurgery.families.transformer import (
    Activation,
    TransformerFamily,
    TransformerModule,
    attend,
    attention_bias,
    positions,
    split_heads,
)

PREFIXES = ("", "bert.")
LINEARS = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
           "o": "attention.output.dense", "up": "intermediate.dense", "down": "output.dense"}


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


@register
class BertFamily(TransformerFamily):
    name = "bert"
    model_types = ("bert",)
    output_kind = "hidden"
    norm_placement = "post"
    block_pattern = r"(?:bert\.)?encoder\.layer\.(\d+)\."

    @classmethod
    def detect(cls, ckpt: Checkpoint) -> bool:
        return cls.config_allows(ckpt) and any(
            f"{p}embeddings.word_embeddings.weight" in ckpt and f"{p}encoder.layer.0.attention.self.query.weight"
            in ckpt for p in PREFIXES
        )

    def __init__(self, ckpt: Checkpoint):
        super().__init__(ckpt)
        self.prefix = next((p for p in PREFIXES if f"{p}embeddings.word_embeddings.weight" in ckpt), None)
        if self.prefix is None:
            raise SurgeryError(f"{ckpt.path}: not a BERT checkpoint (no '[bert.]embeddings.word_embeddings.weight')")

    # ----- structure ----------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.ckpt.shape(f"{self.prefix}embeddings.word_embeddings.weight")[1]

    def config_for_layers(self, num_layers: int) -> dict | None:
        return self.layer_count_config(num_layers, "num_hidden_layers")

    def _p(self, index: int, suffix: str) -> str:
        return f"{self.prefix}encoder.layer.{index}.{suffix}"

    def block_linears(self, index: int) -> dict[str, Linear]:
        """q, k, v, o [hidden, hidden]; up (intermediate.dense) [inner, hidden]; down (output.dense)
        [hidden, inner] (torch layout, out x in)."""
        return {
            role: Linear(self._p(index, f"{m}.weight"), self.maybe(self._p(index, f"{m}.bias")))
            for role, m in LINEARS.items()
        }

    def block_norms(self, index: int) -> dict[str, Norm]:
        """Post-norm: ``attn`` is the LayerNorm after the attention residual sum, ``mlp`` the one after
        the MLP residual sum."""
        return {
            role: Norm(self._p(index, f"{m}.LayerNorm.weight"), self.maybe(self._p(index, f"{m}.LayerNorm.bias")))
            for role, m in (("attn", "attention.output"), ("mlp", "output"))
        }

    def output_projections(self, index: int) -> list[Linear]:
        """None: in a post-norm block a LayerNorm follows each residual sum, so zeroing o and down
        leaves LayerNorm(LayerNorm(x)), not x; no set of zeroed linears makes a BERT block an identity."""
        return []

    @property
    def attention(self) -> Attention | None:
        heads = self.cfg("num_attention_heads")
        if heads is None:
            return None
        return Attention(int(heads), int(heads), self.hidden_size // int(heads))

    def embedding_names(self) -> list[str]:
        e = f"{self.prefix}embeddings."
        names = [f"{e}word_embeddings.weight", f"{e}position_embeddings.weight", f"{e}token_type_embeddings.weight",
                 f"{e}LayerNorm.weight", f"{e}LayerNorm.bias"]
        return [n for n in names if n in self.ckpt]

    def head_names(self) -> list[str]:
        """The pooler and any task head (``cls.*``, ``classifier.*``): tensors outside embeddings and encoder."""
        body = (f"{self.prefix}embeddings.", f"{self.prefix}encoder.")
        names = self.ckpt.keys()
        return [n for n in names if not n.startswith(body)]

    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "token_type_ids"]

    def example_inputs(self, batch: int = 2, seq_len: int = 8, generator: torch.Generator | None = None
                       ) -> dict[str, torch.Tensor]:
        inputs = super().example_inputs(batch, seq_len, generator)
        inputs["token_type_ids"] = torch.zeros(batch, seq_len, dtype=torch.long)
        return inputs

    # ----- running ------------------------------------------------------------------------------
    def build_module(self, state=None, dtype=torch.float32) -> nn.Module:
        heads = int(self.need("num_attention_heads",
                              why="the number of attention heads cannot be read from tensor shapes"))
        where = self.ckpt.path
        if self.cfg("is_decoder", default=False) or self.cfg("add_cross_attention", default=False):
            raise SurgeryError(f"{where}: BERT as a decoder (is_decoder / add_cross_attention) is not supported")
        if self.cfg("position_embedding_type", default="absolute") != "absolute":
            raise SurgeryError(f"{where}: position_embedding_type "
                               f"'{self.cfg('position_embedding_type')}' is not supported (only 'absolute')")
        if self.hidden_size % heads:
            raise SurgeryError(f"{where}: hidden size {self.hidden_size} is not divisible by "
                               f"num_attention_heads={heads}")
        e = f"{self.prefix}embeddings."
        module = Bert(
            prefix=self.prefix,
            vocab=self.vocab_size,
            positions_=self.ckpt.shape(f"{e}position_embeddings.weight")[0],
            types=self.ckpt.shape(f"{e}token_type_embeddings.weight")[0],
            hidden=self.hidden_size,
            inner=self.ckpt.shape(self._p(0, "intermediate.dense.weight"))[0],
            num_layers=self.num_layers,
            heads=heads,
            eps=float(self.cfg("layer_norm_eps", default=1e-12)),
            activation=self.cfg("hidden_act", default="gelu"),
            where=str(where),
        )
        return self.load_state(module, state, dtype)
