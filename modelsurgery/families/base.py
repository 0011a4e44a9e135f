"""What a model family is: detection, repeated blocks, tensor roles, and a runnable module.

A family is described mostly as data (mergekit's lesson): which tensors form block i, and which
role each tensor plays (query, key, value, attention output, MLP up/gate/down, norms, embeddings,
head). Operations ask these questions instead of hard-coding tensor names:

- depth operations (grow) use ``blocks()``, ``block_of()`` and ``config_for_layers()``;
- permutation specs (merge), width growth and function-preserving identity blocks use
  ``block_linears()``, ``block_norms()`` and the attention geometry;
- calibration, evaluation and export use ``build_module()`` and ``example_inputs()``.

A new family is one new file with a subclass registered through ``@register``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError


@dataclass(frozen=True)
class Linear:
    """A linear map stored in the checkpoint. ``transposed``: weight stored (in, out), as GPT-2's Conv1D."""

    weight: str
    bias: str | None = None
    transposed: bool = False


@dataclass(frozen=True)
class Norm:
    weight: str
    bias: str | None = None
    kind: str = "layernorm"  # layernorm | rmsnorm | batchnorm
    running_mean: str | None = None
    running_var: str | None = None
    #: the norm scales by (offset + weight): Gemma's RMSNorm has offset 1.0 (a zero weight is scale one)
    offset: float = 0.0
    #: weight of head_dim entries shared by every head of q (role q_norm) or k (k_norm), applied per
    #: head before rotary (Qwen3, Gemma 3): it moves with the within-head units, not the residual stream
    per_head: bool = False


@dataclass
class Block:
    """One repeated block: block i of the model is every tensor whose name starts with ``prefix``."""

    index: int
    prefix: str
    names: list[str] = field(default_factory=list)


@dataclass
class Stages:
    """A built module seen as embed -> blocks -> head, for block-by-block work (calibration,
    per-block reconstruction, activation statistics).

    ``embed(**inputs)`` returns the first hidden state and a context dict (masks, rotary tables);
    each block is called ``block(hidden, **context)``; ``head(hidden)`` gives the model output.
    ``blocks`` are the real submodules (or thin wrappers around them), so their parameters are
    the model's own; map them to checkpoint names by identity through ``model.named_parameters()``.
    """

    embed: Callable[..., tuple[torch.Tensor, dict]]
    blocks: list[nn.Module]
    head: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Attention:
    """Attention geometry of the transformer families."""

    num_heads: int
    num_kv_heads: int
    head_dim: int


class Family:
    """Base class. Subclasses set ``name`` and implement ``detect`` and the structure methods."""

    name: ClassVar[str] = "unknown"
    #: higher wins when several families detect a checkpoint
    priority: ClassVar[int] = 0
    #: True when build_module can run the checkpoint
    runnable: ClassVar[bool] = True
    #: "logits" (classifier/LM), or "hidden" (encoders returning last_hidden_state)
    output_kind: ClassVar[str] = "logits"
    #: regex with one group: the block index, matched against tensor names (e.g. r"transformer\.h\.(\d+)\.")
    block_pattern: ClassVar[str | None] = None

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.config: dict = dict(ckpt.config or {})

    # ----- detection ----------------------------------------------------------------------------
    @classmethod
    def detect(cls, ckpt: Checkpoint) -> bool:
        raise NotImplementedError

    # ----- blocks -------------------------------------------------------------------------------
    def blocks(self) -> list[Block]:
        """The repeated blocks in order (empty for families without a block stack)."""
        if not self.block_pattern:
            return []
        pat = re.compile(self.block_pattern)
        found: dict[int, Block] = {}
        for name in self.ckpt:
            m = pat.match(name)
            if m:
                i = int(m.group(1))
                prefix = name[: m.end()]
                found.setdefault(i, Block(i, prefix)).names.append(name)
        return [found[i] for i in sorted(found)]

    def block_of(self, name: str) -> tuple[int, str] | None:
        """(block index, name inside the block) or None for tensors outside the block stack."""
        if not self.block_pattern:
            return None
        m = re.match(self.block_pattern, name)
        return (int(m.group(1)), name[m.end():]) if m else None

    def block_name(self, index: int, suffix: str) -> str:
        """The tensor name for ``suffix`` inside block ``index`` (inverse of ``block_of``)."""
        template = self.blocks()[0].prefix
        return re.sub(r"\d+(\.)$", f"{index}\\1", template) + suffix

    @property
    def num_layers(self) -> int:
        return len(self.blocks())

    @property
    def hidden_size(self) -> int | None:
        return None

    def config_for_layers(self, num_layers: int) -> dict | None:
        """config.json for the same model with ``num_layers`` blocks (None without a config)."""
        return None

    # ----- roles --------------------------------------------------------------------------------
    def block_linears(self, index: int) -> dict[str, Linear]:
        """Roles -> linear maps of block ``index``. Transformer roles: q, k, v (or qkv fused),
        o (attention output), up, gate (optional), down (MLP output)."""
        return {}

    def block_norms(self, index: int) -> dict[str, Norm]:
        return {}

    def output_projections(self, index: int) -> list[Linear]:
        """Linears whose zeroing makes block ``index`` an identity on the residual stream."""
        lin = self.block_linears(index)
        return [lin[r] for r in ("o", "down") if r in lin]

    @property
    def attention(self) -> Attention | None:
        return None

    def embedding_names(self) -> list[str]:
        return []

    def head_names(self) -> list[str]:
        """Tensors of the output head (LM head, classifier)."""
        return []

    # ----- running ------------------------------------------------------------------------------
    # Built modules take the inputs named by ``input_names()`` as keyword arguments, return one
    # tensor (logits or last_hidden_state), are traceable for ONNX export, and have a
    # ``stages() -> Stages`` method.
    def build_module(self, state: dict[str, torch.Tensor] | None = None, dtype: torch.dtype = torch.float32
                     ) -> nn.Module:
        """A torch module in eval mode holding ``state`` (default: the checkpoint's tensors)."""
        raise SurgeryError(
            f"{self.ckpt.path}: family '{self.name}' cannot be run; pass --model package.module:function "
            "to build the module"
        )

    def load_state(self, module: nn.Module, state: dict[str, torch.Tensor] | None, dtype: torch.dtype) -> nn.Module:
        """Load ``state`` (default: the checkpoint, read one tensor at a time so that loading holds
        the module and one tensor, never a second model) into ``module`` strictly, naming the
        first mismatch."""
        own = module.state_dict()
        for k, v in own.items():
            if k not in (self.ckpt if state is None else state):
                raise SurgeryError(f"{self.ckpt.path}: tensor '{k}' needed by the {self.name} model is missing")
            shape = self.ckpt.shape(k) if state is None else state[k].shape
            if tuple(shape) != tuple(v.shape):
                raise SurgeryError(
                    f"{self.ckpt.path}: tensor '{k}' has shape {tuple(shape)}, the {self.name} model "
                    f"expects {tuple(v.shape)}"
                )
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(self.ckpt.get(k) if state is None else state[k])
        if state is None:
            self.ckpt.close()  # the module holds the weights now; the mapped file need not stay resident
        return module.to(dtype).eval()

    def input_names(self) -> list[str]:
        return ["input"]

    def output_names(self) -> list[str]:
        return ["logits" if self.output_kind == "logits" else "last_hidden_state"]

    def example_inputs(self, batch: int = 2, seq_len: int = 8, generator: torch.Generator | None = None
                       ) -> dict[str, torch.Tensor]:
        """Random inputs of the right shape, keyed by ``input_names()``."""
        raise SurgeryError(f"{self.ckpt.path}: family '{self.name}' has no known input shape")

    def describe(self) -> dict:
        return {
            "family": self.name,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "runnable": self.runnable,
        }
