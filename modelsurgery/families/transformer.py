"""Shared parts of the transformer families (Vaswani et al. 2017, "Attention Is All You Need", eq. 1):
scaled dot-product attention with grouped key/value heads, rotary position embeddings (Su et al. 2021,
RoFormer, eq. 34), masks built from shapes, RMSNorm, GPT-2's Conv1D and the activations the configs name.

Everything here is plain torch and traceable for ONNX export: masks and positions come from tensor
shapes through torch ops, never from Python control flow on tensor values.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from modelsurgery.errors import SurgeryError
from modelsurgery.families.base import Family, Stages


# ----- activations ------------------------------------------------------------------------------
def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's "gelu_new": the tanh approximation of GELU, written as transformers writes it."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "quick_gelu": quick_gelu,
}


class Activation(nn.Module):
    def __init__(self, name: str, where: str):
        super().__init__()
        if name not in ACTIVATIONS:
            raise SurgeryError(
                f"{where}: activation '{name}' is not supported (known: {', '.join(sorted(ACTIVATIONS))})"
            )
        self.name = name
        self.fn = ACTIVATIONS[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


# ----- layers -----------------------------------------------------------------------------------
class Conv1D(nn.Module):
    """GPT-2's linear layer: weight stored (in, out), y = x W + b."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight) + self.bias


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in float32 as LLaMA does. ``offset``
    1.0 is Gemma's variant: scale by (1 + weight), also in float32, then round to the input dtype."""

    def __init__(self, size: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size) - offset)
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (self.offset + self.weight.to(torch.float32))).to(dtype)
        return self.weight * h.to(dtype)


# ----- masks and positions ----------------------------------------------------------------------
def positions(input_ids: torch.Tensor) -> torch.Tensor:
    """Position ids 0..T-1 as [1, T]. transformers 5 uses the same for right-padded batches."""
    return torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)


def attention_bias(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, causal: bool,
                   dtype: torch.dtype, window: int | None = None) -> torch.Tensor | None:
    """Additive attention bias [B or 1, 1, T, T]: 0 where a query may attend, dtype's minimum elsewhere
    (what transformers' eager attention adds). ``attention_mask`` [B, T]: 1 for tokens, 0 for padding.
    ``window`` (causal only): query i sees keys j with i - window < j <= i (Mistral's sliding window,
    transformers' ``sliding_window_overlay``)."""
    allowed = None
    if causal:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        allowed = pos.unsqueeze(0) <= pos.unsqueeze(1)
        if window is not None:
            allowed = allowed & (pos.unsqueeze(1) - pos.unsqueeze(0) < window)
        allowed = allowed.unsqueeze(0).unsqueeze(0)
    if attention_mask is not None:
        keep = attention_mask.to(torch.bool).unsqueeze(1).unsqueeze(2)
        allowed = keep if allowed is None else allowed & keep
    if allowed is None:
        return None
    zero = torch.zeros((), dtype=dtype, device=input_ids.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


# ----- attention --------------------------------------------------------------------------------
def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, T, n*d] -> [B, n, T, d]."""
    return x.reshape(x.shape[0], x.shape[1], -1, head_dim).transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scaling: float,
           softmax_fp32: bool = False, softcap: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scaling + bias) v with q [B, H, T, d] and k, v [B, KV, T, d] (KV divides H:
    grouped-query attention shares each key/value head among H/KV query heads). Returns [B, T, H*d].
    ``softcap``: scores become softcap * tanh(scores / softcap) before the bias (Gemma 2)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        b, kv, t, d = k.shape
        k = k.unsqueeze(2).expand(b, kv, groups, t, d).reshape(b, kv * groups, t, d)
        v = v.unsqueeze(2).expand(b, kv, groups, t, d).reshape(b, kv * groups, t, d)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias
    if softmax_fp32:
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    else:
        weights = torch.softmax(scores, dim=-1)
    out = torch.matmul(weights, v).transpose(1, 2)
    return out.reshape(out.shape[0], out.shape[1], -1)


# ----- the runnable model -----------------------------------------------------------------------
class TransformerModule(nn.Module):
    """embed -> blocks -> head. Subclasses define ``embed(**inputs) -> (hidden, context)``,
    ``head(hidden)`` and the ``layers()`` list of blocks, each called ``block(hidden, **context)``."""

    def layers(self) -> list[nn.Module]:
        raise NotImplementedError

    def embed(self, **inputs) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run(self, **inputs) -> torch.Tensor:
        hidden, context = self.embed(**inputs)
        for block in self.layers():
            hidden = block(hidden, **context)
        return self.head(hidden)

    def stages(self) -> Stages:
        return Stages(embed=self.embed, blocks=list(self.layers()), head=self.head)


# ----- family helpers ---------------------------------------------------------------------------
# config.json keys the transformer families read, with the values a model can have; a value outside
# them (a string head count, zero heads, a NaN epsilon) is refused naming the key, never met later as a
# TypeError or ZeroDivisionError in the middle of a build.
_POSITIVE_INT = ("num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size", "intermediate_size",
                 "vocab_size", "max_position_embeddings", "sliding_window", "sliding_window_pattern",
                 "n_head", "n_embd", "n_inner", "n_positions", "n_ctx", "type_vocab_size")
_COUNT = ("num_hidden_layers", "n_layer", "max_window_layers")
_POSITIVE_FLOAT = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "rope_theta", "rotary_emb_base",
                   "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping")
_FRACTION = ("partial_rotary_factor", "rotary_pct")
_BOOL = ("tie_word_embeddings", "use_parallel_residual", "use_sliding_window", "attention_bias", "mlp_bias")
_TEXT = ("hidden_act", "activation_function", "model_type")
_MAPPING = ("rope_scaling", "rope_parameters")


def config_problem(key: str, value) -> str | None:
    """What is wrong with config.json's ``key: value`` for a transformer family, or None."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if value is None:
        return None
    if key in _POSITIVE_INT and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return "a whole number >= 1"
    if key in _COUNT and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return "a whole number >= 0"
    if key in _POSITIVE_FLOAT and not (number(value) and value > 0):
        return "a finite number > 0"
    if key in _FRACTION and not (number(value) and 0 < value <= 1):
        return "a number in (0, 1]"
    if key in _BOOL and not isinstance(value, bool):
        return "true or false"
    if key in _TEXT and not isinstance(value, str):
        return "a string"
    if key in _MAPPING and not isinstance(value, dict):
        return "an object"
    if key == "layer_types" and not (isinstance(value, list) and all(isinstance(t, str) for t in value)):
        return "a list of strings"
    return None


class TransformerFamily(Family):
    """Common questions of the Hugging Face transformer families: config values, prefixes, inputs."""

    priority = 50
    #: config.json ``model_type`` values this family runs
    model_types: tuple[str, ...] = ()
    #: "pre": norms before attention/MLP inside the residual branch; "post": after the residual sum
    norm_placement: str = "pre"
    #: True when positions enter as rotary embeddings of q and k (head dims are then paired)
    rotary: bool = False

    def max_positions(self) -> int | None:
        return self.cfg("max_position_embeddings", "n_positions", "n_ctx")

    def check_config(self) -> None:
        for key, value in self.config.items():
            problem = config_problem(key, value)
            if problem:
                shown = repr(value)
                shown = shown if len(shown) <= 40 else shown[:37] + "..."
                raise SurgeryError(f"{self.ckpt.path}: config.json {key}={shown} is not valid (expected {problem})")

    @classmethod
    def config_allows(cls, ckpt) -> bool:
        model_type = (ckpt.config or {}).get("model_type")
        return model_type is None or model_type in cls.model_types

    def cfg(self, *keys: str, default=None):
        """The first of ``keys`` present in config.json, else ``default``."""
        for key in keys:
            if self.config.get(key) is not None:
                return self.config[key]
        return default

    def need(self, *keys: str, why: str):
        """A config value a forward pass needs; a clear error when config.json lacks it."""
        value = self.cfg(*keys)
        if value is None:
            raise SurgeryError(
                f"{self.ckpt.path}: config.json with '{keys[0]}' is needed to run the {self.name} model ({why})"
            )
        return value

    def has(self, name: str) -> bool:
        return name in self.ckpt

    def maybe(self, name: str) -> str | None:
        return name if name in self.ckpt else None

    @property
    def tied_head(self) -> bool:
        """True when logits use the token embedding (no ``lm_head.weight`` in the checkpoint)."""
        return "lm_head.weight" not in self.ckpt

    @property
    def vocab_size(self) -> int:
        return self.ckpt.shape(self.embedding_names()[0])[0]

    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask"]

    def example_inputs(self, batch: int = 2, seq_len: int = 8, generator: torch.Generator | None = None
                       ) -> dict[str, torch.Tensor]:
        """Random token ids and a right-padded attention mask (the last row loses its last quarter)."""
        ids = torch.randint(0, self.vocab_size, (batch, seq_len), generator=generator)
        mask = torch.ones(batch, seq_len, dtype=torch.long)
        if batch > 1 and seq_len > 1:
            mask[-1, seq_len - max(1, seq_len // 4):] = 0
        return {"input_ids": ids, "attention_mask": mask}

    def layer_count_config(self, num_layers: int, key: str) -> dict | None:
        if not self.config:
            return None
        cfg = dict(self.config)
        cfg[key] = int(num_layers)
        return self.remap_layer_lists(cfg, [i % self.num_layers for i in range(num_layers)])

    def describe(self) -> dict:
        d = super().describe()
        att = self.attention
        d.update(vocab_size=self.vocab_size,
                 num_heads=att.num_heads if att else None,
                 num_kv_heads=att.num_kv_heads if att else None,
                 head_dim=att.head_dim if att else None)
        return d
