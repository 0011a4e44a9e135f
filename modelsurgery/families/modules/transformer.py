"""The transformer families' shared torch parts (Vaswani et al. 2017, "Attention Is All You Need", eq. 1):
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
from modelsurgery.families.base import Stages


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
