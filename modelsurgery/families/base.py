"""What a model family is: detection, repeated blocks, tensor roles, and a runnable module.

A family is described mostly as data (mergekit's lesson): which tensors form block i, and which
role each tensor plays (query, key, value, attention output, MLP up/gate/down, norms, embeddings,
head). Operations ask these questions instead of hard-coding tensor names:

- depth operations (grow) use ``blocks()``, ``block_of()``, ``check_layout()``, ``config_for_layout()``
  and ``output_projections()`` (identity blocks);
- permutation specs (merge) use ``chain_layers()`` (MLPs, sequential CNNs), ``channel_groups()``
  (ResNets) or, for transformers, ``block_linears()``, ``block_norms()``, ``attention`` and ``rotary``;
- width growth uses ``width_groups()``; Weight Aligning uses ``classifier()``;
- calibration, evaluation and export use ``build_module()`` and ``example_inputs()``.

Operations ask these capability methods and never test a family's name or probe it with
``hasattr``: the defaults here say "this family has no such structure", so a new family is one new
file with a subclass registered through ``@register``.

Describing and running are kept apart: a family file (``families/<name>.py``) describes a checkpoint
from tensor names, shapes, metadata and config.json, and imports no torch, so that detection and
``surgery inspect`` answer from headers alone. The torch modules a family runs live in
``families/modules/<name>.py``; ``build_module`` and ``example_inputs`` import them (and torch) when
called. ``tests/test_startup.py`` checks the rule: inspecting a safetensors checkpoint imports no torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING, ClassVar

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class Linear:
    """A linear map stored in the checkpoint. ``transposed``: weight stored (in, out), as GPT-2's Conv1D.

    ``fused``: the roles stacked along the output axis of a fused projection, in order (GPT-2's and
    Phi-3's ``("q", "k", "v")``, Phi-3's ``("gate", "up")``); ``per_head``: the parts are interleaved
    head by head ([head, part, head_dim], GPT-NeoX's ``query_key_value``) instead of concatenated."""

    weight: str
    bias: str | None = None
    transposed: bool = False
    fused: tuple[str, ...] = ()
    per_head: bool = False


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


@dataclass
class ChannelGroup:
    """Tensors sharing one channel axis: permuting the channels means permuting axis 0 of every name in
    ``out_axis`` and axis 1 of every name in ``in_axis`` with the same permutation.

    ``padded_from``/``pad_offset``: for an option-A shortcut, the previous residual group's channels
    reappear zero-padded at ``pad_offset`` in this one (their permutations are then not independent).
    """

    name: str
    size: int
    out_axis: list[str] = field(default_factory=list)
    in_axis: list[str] = field(default_factory=list)
    stages: list[int] = field(default_factory=list)
    padded_from: str | None = None
    pad_offset: int = 0


@dataclass(frozen=True)
class WidthGroup:
    """Hidden units that can grow together without touching the rest of the model: the outputs of
    ``producers`` (a fused producer grows each of its ``fused`` parts), the channels of ``norms`` and
    the inputs of ``consumers`` (``positions`` consecutive inputs per unit: a conv channel flattened
    over H*W). ``config_key``: the config.json entry that records the size, if any."""

    name: str
    size: int
    producers: tuple[Linear, ...]
    consumers: tuple[Linear, ...]
    norms: tuple[Norm, ...] = ()
    positions: int = 1
    config_key: str | None = None


def chain_width_groups(family: Family, chain: list[Linear | Norm]) -> list[WidthGroup]:
    """One group per hidden layer of a chain: its outputs, the norms up to the next weight layer, and
    that layer's inputs (spread over H*W positions after a conv -> flatten -> linear)."""
    weights = [i for i, x in enumerate(chain) if isinstance(x, Linear)]
    groups = []
    for a, b in pairwise(weights):
        lin, nxt = chain[a], chain[b]
        positions = (family.spatial_positions(nxt.weight.rsplit(".", 1)[0])
                     if len(family.ckpt.shape(nxt.weight)) == 2 else 1)
        norms = tuple(x for x in chain[a + 1: b] if isinstance(x, Norm))
        groups.append(WidthGroup(lin.weight, family.ckpt.shape(lin.weight)[0], (lin,), (nxt,), norms, positions))
    return groups


#: config.json keys of the MLP's inner width (LLaMA-like, GPT-2, OPT-like)
INTERMEDIATE_KEYS = ("intermediate_size", "n_inner", "ffn_dim")


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
    #: True when positions enter as rotary embeddings of q and k (RoPE rotates fixed pairs of head units)
    rotary: ClassVar[bool] = False

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.config: dict = dict(ckpt.config or {})
        self.check_config()

    def check_config(self) -> None:
        """Refuse config.json values of the wrong type or range in one line before anything reads them
        (families that read config.json declare their keys; the default reads none)."""

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
        """config.json for the same model with ``num_layers`` blocks (None without a config). Per-layer
        lists are tiled (block j is block j mod L, as G_stack lays it out); see ``config_for_layout``."""
        return None

    def check_layout(self, source_indices: Sequence[int]) -> None:
        """Refuse (``SurgeryError``, one line) a depth layout whose block j is block ``source_indices[j]`` when
        this family cannot run it: blocks whose computation depends on their position, or blocks that only
        fit where they are. Default: any layout of the repeated blocks runs."""

    def config_for_layout(self, source_indices: Sequence[int]) -> dict | None:
        """config.json for a model whose block j is this model's block ``source_indices[j]``: the layer
        count from ``config_for_layers`` and every per-layer list (``per_layer_config``) carried entry by
        entry to its output position (a sliced or interleaved Gemma keeps each block's attention type)."""
        cfg = self.config_for_layers(len(source_indices))
        return None if cfg is None else self.remap_layer_lists(cfg, source_indices)

    def remap_layer_lists(self, cfg: dict, source_indices: Sequence[int]) -> dict:
        """``cfg`` with each per-layer list rebuilt as [list[s] for s in source_indices]."""
        cfg = dict(cfg)
        for key, values in self.per_layer_config().items():
            cfg[key] = [values[s] for s in source_indices]
        return cfg

    #: config.json keys that hold one entry per block in transformers' configs: attention type (sliding or
    #: full), rope on/off (SmolLM3), MLP type (dense or sparse), block type of hybrid models
    per_layer_keys: ClassVar[tuple[str, ...]] = ("layer_types", "no_rope_layers", "mlp_layer_types",
                                                 "layers_block_type")

    #: config.json keys under which weights of the same shapes compute another function, so that merging models
    #: that differ in one is meaningless (head counts, head_dim, activation, tied head, which layers slide): a
    #: merge refuses the difference (``ops/merge/configs.py``)
    structural_config_keys: ClassVar[tuple[str, ...]] = ()
    #: config.json keys of numeric settings that fine-tunes of one model may differ in on purpose (rope base and
    #: scaling, context length, norm epsilon, window size): a merge warns and records the difference
    tuning_config_keys: ClassVar[tuple[str, ...]] = ()

    def config_value(self, key: str):
        """The value this checkpoint computes with for config.json ``key``: as written, or what the family
        assumes when the file leaves it out (None without config.json)."""
        return self.config.get(key)

    def per_layer_config(self) -> dict[str, list]:
        """The config.json lists with one entry per block: ``per_layer_keys`` whose value is a list of
        ``num_layers`` entries. A family whose per-layer settings are implied (a window pattern) writes
        them out here, so that regrown configs stay explicit."""
        n = self.num_layers
        return {k: list(self.config[k]) for k in self.per_layer_keys
                if isinstance(self.config.get(k), list) and len(self.config[k]) == n and n}

    # ----- roles --------------------------------------------------------------------------------
    def block_linears(self, index: int) -> dict[str, Linear]:
        """Roles -> linear maps of block ``index``. Transformer roles: q, k, v (or qkv fused),
        o (attention output), up, gate (optional), down (MLP output)."""
        return {}

    def block_norms(self, index: int) -> dict[str, Norm]:
        return {}

    def output_projections(self, index: int) -> list[Linear]:
        """Linears whose zeroing makes block ``index`` an identity on the residual stream; [] when no set
        of zeroed linears does (post-norm blocks, projection shortcuts). On a pre-norm block each branch
        ends in its output projection, or in a bias-free norm of it (Gemma's post-norms map 0 to 0)."""
        lin = self.block_linears(index)
        return [lin[r] for r in ("o", "down") if r in lin]

    # ----- capabilities (defaults: the family has no such structure) ----------------------------
    def layers(self) -> list[Linear | Norm]:
        """Every weight layer (``Linear``; conv weights [out, in, kh, kw]) and norm in forward order,
        for families that list them (MLPs, CNNs, ResNets); [] otherwise."""
        return []

    def chain_layers(self) -> list[Linear | Norm]:
        """The model as one chain, each weight layer feeding the next (MLPs, sequential CNNs), in
        forward order; [] when it is not one (residual or attention models)."""
        return []

    def channel_groups(self) -> list[ChannelGroup]:
        """Permutation groups given as channel axes (ResNets: residual streams tied across blocks, and
        each block's inner channels); [] for families described otherwise."""
        return []

    def spatial_positions(self, layer: str) -> int:
        """Inputs per channel of layer ``layer`` (module name): H*W for a linear after a conv and a
        flatten, else 1."""
        return 1

    def classifier(self) -> Linear | None:
        """The final fully connected layer (class scores), [classes, features]: the last Linear of
        ``layers()``, else a 2-D weight of the head; None when there is none."""
        ckpt = self.ckpt
        candidates = [x for x in self.layers() if isinstance(x, Linear)]
        if not candidates:
            for name in self.head_names():
                if name.endswith("weight") and len(ckpt.shape(name)) == 2:
                    bias = name[: -len("weight")] + "bias"
                    candidates.append(Linear(name, bias if bias in ckpt else None))
        if candidates and len(ckpt.shape(candidates[-1].weight)) == 2:
            return candidates[-1]
        return None

    def width_groups(self) -> list[WidthGroup]:
        """Hidden units that width growth may add to. Defaults: a chain (``chain_layers()``) grows every
        hidden layer's outputs (BatchNorms between follow, the next layer's inputs too); transformer
        blocks grow each MLP's inner units: outputs of up and gate (or a fused gate_up), inputs of down."""
        chain = self.chain_layers()
        if chain:
            return chain_width_groups(self, chain)
        groups = []
        key = self.mlp_size_key()
        if self.config and key is None and self.num_layers:
            raise SurgeryError(f"{self.ckpt.path}: config.json names no MLP size ({', '.join(INTERMEDIATE_KEYS)})")
        for i in range(self.num_layers):
            lin = self.block_linears(i)
            producers = [lin[r] for r in ("up", "gate", "gate_up") if r in lin]
            if not producers or "down" not in lin:
                return []
            first = producers[0]
            rows = self.ckpt.shape(first.weight)[1 if first.transposed else 0] // max(1, len(first.fused))
            groups.append(WidthGroup(f"block {i} mlp", rows, tuple(producers), (lin["down"],), config_key=key))
        return groups

    def mlp_size_key(self) -> str | None:
        """The config.json key that holds the MLP's inner width (written by width growth): the first of
        ``INTERMEDIATE_KEYS`` in config.json; None when it names none."""
        return next((k for k in INTERMEDIATE_KEYS if k in self.config), None)

    @property
    def attention(self) -> Attention | None:
        return None

    def embedding_names(self) -> list[str]:
        return []

    def head_names(self) -> list[str]:
        """Tensors of the output head (LM head, classifier)."""
        return []

    def tied_weights(self) -> dict[str, str]:
        """Weights the model reads from another tensor of the checkpoint (a tied head's, absent from the
        file) -> that tensor."""
        return {}

    def renamed_weights(self) -> dict[str, str]:
        """Tensor names the model transformers loads gives tensors this checkpoint spells otherwise -> the
        checkpoint's names (what an adapter trained on that model calls them)."""
        return {}

    def loaded_names(self) -> dict[str, str]:
        """``renamed_weights`` the other way: a checkpoint tensor name -> the loaded model's name for it."""
        return {stored: loaded for loaded, stored in self.renamed_weights().items()}

    # ----- running ------------------------------------------------------------------------------
    # Built modules take the inputs named by ``input_names()`` as keyword arguments, return one
    # tensor (logits or last_hidden_state), are traceable for ONNX export, and have a
    # ``stages() -> Stages`` method. They are defined in ``families/modules/`` and imported here, in
    # the methods that build or feed them, so that describing a checkpoint never imports torch.
    def build_module(self, state: dict[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None
                     ) -> nn.Module:
        """A torch module in eval mode holding ``state`` (default: the checkpoint's tensors), in
        ``dtype`` (default float32)."""
        raise SurgeryError(f"{self.ckpt.path}: {self.not_runnable_reason()}")

    def max_positions(self) -> int | None:
        """The longest sequence the model takes (learned position tables, config limits); None: no limit."""
        return None

    def not_runnable_reason(self) -> str:
        """Why ``build_module`` cannot run this checkpoint, for the one-line refusal of any operation
        that needs a forward pass (families that run never get asked)."""
        return f"family '{self.name}' cannot be run; pass --model package.module:function to build the module"

    def build_empty(self, dtype: torch.dtype | None = None) -> nn.Module:
        """``build_module`` with every parameter on the meta device (no memory, no data) and the buffers
        real (rotary tables, persistent ones read from the checkpoint): for work that reads the weights
        a block at a time (``torch.utils.swap_tensors`` puts real tensors in place, keeping identity)."""
        from modelsurgery.families.modules import parameters_on_meta

        with parameters_on_meta():
            return self.build_module(None, dtype)

    def load_state(self, module: nn.Module, state: dict[str, torch.Tensor] | None,
                   dtype: torch.dtype | None = None) -> nn.Module:
        """Load ``state`` (default: the checkpoint, read one tensor at a time so that loading holds
        the module and one tensor, never a second model) into ``module`` strictly, naming the
        first mismatch; the module is returned in ``dtype`` (default float32), in eval mode."""
        import torch

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
                if not v.is_meta:  # a parameter of ``build_empty``: read later, block by block
                    v.copy_(self.ckpt.get(k) if state is None else state[k])
        return module.to(dtype or torch.float32).eval()  # the checkpoint is its opener's to close (Checkpoint.close)

    def input_names(self) -> list[str]:
        return ["input"]

    def output_names(self) -> list[str]:
        return ["logits" if self.output_kind == "logits" else "last_hidden_state"]

    def example_inputs(self, batch: int = 2, seq_len: int = 8, generator: torch.Generator | None = None
                       ) -> dict[str, torch.Tensor]:
        """Random inputs of the right shape, keyed by ``input_names()``."""
        raise SurgeryError(f"{self.ckpt.path}: family '{self.name}' has no known input shape")

    def features(self) -> list[str]:
        """The config switches this checkpoint turns on, as short phrases for ``surgery inspect``
        (e.g. ``sliding_window=4096 on alternate layers``, ``qk_norm``, ``tied head``)."""
        return []

    def describe(self) -> dict:
        return {
            "family": self.name,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "runnable": self.runnable,
            "features": self.features(),
        }
