"""LLaMA (Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models"): pre-RMSNorm
decoder blocks, rotary positions (RoFormer eq. 34), SwiGLU MLP (Shazeer 2020), grouped-query attention
(Ainslie et al. 2023) with ``num_key_value_heads`` shared key/value heads.

Checkpoints: ``LlamaForCausalLM`` (``model.layers.{i}.``, ``lm_head.weight``, or logits through
``model.embed_tokens.weight`` when ``tie_word_embeddings`` is set). Head counts come from config.json
only; rope scaling other than the default is refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.families import register
from modelsurgery.families.base import Attention, Linear, Norm
from modelsurgery.families.transformer import (
    Activation,
    RMSNorm,
    TransformerFamily,
    TransformerModule,
    apply_rotary,
    attend,
    attention_bias,
    rotary_tables,
    split_heads,
)

PREFIX = "model."
ATTN = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
MLP = {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


class LlamaAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, bias: bool):
        super().__init__()
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=bias)
        self.head_dim = head_dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
                ) -> torch.Tensor:
        d = self.head_dim
        q = apply_rotary(split_heads(self.q_proj(x), d), cos, sin)
        k = apply_rotary(split_heads(self.k_proj(x), d), cos, sin)
        v = split_heads(self.v_proj(x), d)
        return self.o_proj(attend(q, k, v, mask, d ** -0.5, softmax_fp32=True))


class LlamaMLP(nn.Module):
    def __init__(self, hidden: int, inner: int, bias: bool, activation: Activation):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)
        self.act = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, hidden: int, inner: int, heads: int, kv_heads: int, head_dim: int, eps: float,
                 attn_bias: bool, mlp_bias: bool, activation: Activation):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = LlamaAttention(hidden, heads, kv_heads, head_dim, attn_bias)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = LlamaMLP(hidden, inner, mlp_bias, activation)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None, cos: torch.Tensor | None = None,
                sin: torch.Tensor | None = None) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), mask, cos, sin)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaBody(nn.Module):
    def __init__(self, vocab: int, hidden: int, num_layers: int, eps: float, make_block):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(make_block() for _ in range(num_layers))
        self.norm = RMSNorm(hidden, eps)


class Llama(TransformerModule):
    """LLaMA language model; parameter names follow the checkpoint (``model.*``, ``lm_head.weight``)."""

    def __init__(self, vocab: int, hidden: int, inner: int, num_layers: int, heads: int, kv_heads: int,
                 head_dim: int, eps: float, theta: float, attn_bias: bool, mlp_bias: bool, activation: str,
                 untied_head: bool, where: str):
        super().__init__()
        act = Activation(activation, where)
        self.model = LlamaBody(vocab, hidden, num_layers, eps, lambda: LlamaBlock(
            hidden, inner, heads, kv_heads, head_dim, eps, attn_bias, mlp_bias, act))
        if untied_head:
            self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.head_dim, self.theta = head_dim, theta

    def layers(self) -> list[nn.Module]:
        return list(self.model.layers)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, dict]:
        hidden = self.model.embed_tokens(input_ids)
        cos, sin = rotary_tables(input_ids, self.head_dim, self.theta, hidden.dtype)
        mask = attention_bias(input_ids, attention_mask, causal=True, dtype=hidden.dtype)
        return hidden, {"mask": mask, "cos": cos, "sin": sin}

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.lm_head.weight if hasattr(self, "lm_head") else self.model.embed_tokens.weight
        return F.linear(self.model.norm(hidden), weight)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab]."""
        return self.run(input_ids=input_ids, attention_mask=attention_mask)


@register
class LlamaFamily(TransformerFamily):
    name = "llama"
    model_types = ("llama",)
    rotary = True
    block_pattern = r"model\.layers\.(\d+)\."

    @classmethod
    def detect(cls, ckpt: Checkpoint) -> bool:
        return cls.config_allows(ckpt) and all(
            name in ckpt for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                                      "model.layers.0.mlp.gate_proj.weight")
        )

    def __init__(self, ckpt: Checkpoint):
        super().__init__(ckpt)
        if "model.embed_tokens.weight" not in ckpt:
            raise SurgeryError(f"{ckpt.path}: not a LLaMA checkpoint (no 'model.embed_tokens.weight')")

    # ----- structure ----------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.ckpt.shape("model.embed_tokens.weight")[1]

    def config_for_layers(self, num_layers: int) -> dict | None:
        return self.layer_count_config(num_layers, "num_hidden_layers")

    def _p(self, index: int, suffix: str) -> str:
        return f"{PREFIX}layers.{index}.{suffix}"

    def block_linears(self, index: int) -> dict[str, Linear]:
        """q [H*d, hidden], k and v [KV*d, hidden], o [hidden, H*d], gate and up [inner, hidden],
        down [hidden, inner] (torch layout, out x in)."""
        return {
            role: Linear(self._p(index, f"{m}.weight"), self.maybe(self._p(index, f"{m}.bias")))
            for role, m in {**ATTN, **MLP}.items()
        }

    def block_norms(self, index: int) -> dict[str, Norm]:
        """``attn``: RMSNorm before attention; ``mlp``: RMSNorm before the MLP (weights only)."""
        return {
            "attn": Norm(self._p(index, "input_layernorm.weight"), kind="rmsnorm"),
            "mlp": Norm(self._p(index, "post_attention_layernorm.weight"), kind="rmsnorm"),
        }

    @property
    def attention(self) -> Attention | None:
        heads = self.cfg("num_attention_heads")
        if heads is None:
            return None
        heads = int(heads)
        head_dim = int(self.cfg("head_dim", default=self.hidden_size // heads))
        # without num_key_value_heads (older configs) the key projection's rows tell it
        kv = self.cfg("num_key_value_heads",
                      default=self.ckpt.shape(self._p(0, "self_attn.k_proj.weight"))[0] // head_dim)
        return Attention(heads, int(kv), head_dim)

    def embedding_names(self) -> list[str]:
        return ["model.embed_tokens.weight"]

    def head_names(self) -> list[str]:
        return ["model.norm.weight"] + ([] if self.tied_head else ["lm_head.weight"])

    # ----- running ------------------------------------------------------------------------------
    def rope_theta(self) -> float:
        """Base of the rotary frequencies; only unscaled ("default") rope is supported."""
        params = self.config.get("rope_parameters") or {}
        scaling = self.config.get("rope_scaling") or {}
        kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        if kind != "default":
            raise SurgeryError(
                f"{self.ckpt.path}: rope type '{kind}' is not supported (only unscaled rotary embeddings)"
            )
        return float(params.get("rope_theta") or self.config.get("rope_theta") or 10000.0)

    def build_module(self, state=None, dtype=torch.float32) -> nn.Module:
        att = self.attention
        if att is None:
            self.need("num_attention_heads", why="the number of attention heads cannot be read from tensor shapes")
        if att.num_heads % att.num_kv_heads:
            raise SurgeryError(f"{self.ckpt.path}: num_attention_heads={att.num_heads} is not a multiple of "
                               f"num_key_value_heads={att.num_kv_heads}")
        if self.tied_head and self.cfg("tie_word_embeddings") is False:
            raise SurgeryError(f"{self.ckpt.path}: tensor 'lm_head.weight' is missing and config.json says "
                               "tie_word_embeddings=false")
        module = Llama(
            vocab=self.vocab_size,
            hidden=self.hidden_size,
            inner=self.ckpt.shape(self._p(0, "mlp.gate_proj.weight"))[0],
            num_layers=self.num_layers,
            heads=att.num_heads,
            kv_heads=att.num_kv_heads,
            head_dim=att.head_dim,
            eps=float(self.cfg("rms_norm_eps", default=1e-6)),
            theta=self.rope_theta(),
            attn_bias=self.has(self._p(0, "self_attn.q_proj.bias")),
            mlp_bias=self.has(self._p(0, "mlp.gate_proj.bias")),
            activation=self.cfg("hidden_act", default="silu"),
            untied_head=not self.tied_head,
            where=str(self.ckpt.path),
        )
        return self.load_state(module, state, dtype)

    def describe(self) -> dict:
        d = super().describe()
        d["tied_head"] = self.tied_head
        return d
