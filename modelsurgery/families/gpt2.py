"""GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"): pre-norm
decoder blocks, learned positions, fused q/k/v in Conv1D layers (weights stored (in, out)).

Checkpoints: ``GPT2LMHeadModel`` (``transformer.h.{i}.``, ``lm_head.weight`` usually absent because it
is tied to ``transformer.wte.weight``) and bare ``GPT2Model`` (``h.{i}.``; logits through the tied
embedding). Without config.json the sizes come from tensor shapes; the number of heads cannot, so a
forward pass then asks for config.json. The module built is ``modules/gpt2.GPT2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.families import register
from modelsurgery.families.base import Attention, Linear, Norm
from modelsurgery.families.transformer import TransformerFamily

if TYPE_CHECKING:
    from torch import nn

PREFIXES = ("transformer.", "")


@register
class GPT2Family(TransformerFamily):
    name = "gpt2"
    model_types = ("gpt2",)
    block_pattern = r"(?:transformer\.)?h\.(\d+)\."
    structural_config_keys = ("n_head", "activation_function", "scale_attn_weights",
                              "scale_attn_by_inverse_layer_idx", "tie_word_embeddings")
    tuning_config_keys = ("layer_norm_epsilon",)
    #: GPT2Config's defaults (transformers ``configuration_gpt2.py``)
    config_defaults: ClassVar[dict[str, Any]] = {"activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
                                                 "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False}

    @classmethod
    def detect(cls, ckpt: Checkpoint) -> bool:
        return cls.config_allows(ckpt) and any(
            f"{p}wte.weight" in ckpt and f"{p}h.0.attn.c_attn.weight" in ckpt for p in PREFIXES
        )

    def __init__(self, ckpt: Checkpoint):
        super().__init__(ckpt)
        self.prefix = next((p for p in PREFIXES if f"{p}wte.weight" in ckpt), None)
        if self.prefix is None:
            raise SurgeryError(f"{ckpt.path}: not a GPT-2 checkpoint (no 'transformer.wte.weight' or 'wte.weight')")

    # ----- structure ----------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.ckpt.shape(f"{self.prefix}wte.weight")[1]

    def config_for_layers(self, num_layers: int) -> dict | None:
        return self.layer_count_config(num_layers, "n_layer")

    def check_layout(self, source_indices: Sequence[int]) -> None:
        """Refused when a block would change position under ``scale_attn_by_inverse_layer_idx``: block i
        divides its attention scores by i + 1, so a moved copy would compute another function."""
        if self.cfg("scale_attn_by_inverse_layer_idx", default=False):
            moved = next((j for j, s in enumerate(source_indices) if s != j), None)
            if moved is not None:
                raise SurgeryError(
                    f"{self.ckpt.path}: config.json scale_attn_by_inverse_layer_idx=true divides block i's "
                    f"attention scores by i + 1, so block {source_indices[moved]} at position {moved} would "
                    "compute another function; a layout that moves blocks (depth growth, mergekit slices) is not "
                    "supported for this model"
                )

    def mlp_size_key(self) -> str | None:
        """``n_inner``, also when config.json leaves it out (the published GPT-2 configs do; transformers then
        uses 4 x n_embd)."""
        return "n_inner" if self.config else None

    def _p(self, index: int, suffix: str) -> str:
        return f"{self.prefix}h.{index}.{suffix}"

    def block_linears(self, index: int) -> dict[str, Linear]:
        """qkv is one fused Conv1D, weight (hidden, 3*hidden) = [q | k | v] along the output axis."""
        lin = {"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"}
        return {
            role: Linear(self._p(index, f"{m}.weight"), self.maybe(self._p(index, f"{m}.bias")), transposed=True)
            for role, m in lin.items()
        }

    def block_norms(self, index: int) -> dict[str, Norm]:
        """``attn``: the norm before attention (ln_1); ``mlp``: the norm before the MLP (ln_2)."""
        return {
            role: Norm(self._p(index, f"{m}.weight"), self.maybe(self._p(index, f"{m}.bias")))
            for role, m in (("attn", "ln_1"), ("mlp", "ln_2"))
        }

    @property
    def attention(self) -> Attention | None:
        heads = self.cfg("n_head", "num_attention_heads")
        if heads is None:
            return None
        return Attention(int(heads), int(heads), self.hidden_size // int(heads))

    def embedding_names(self) -> list[str]:
        return [f"{self.prefix}wte.weight", f"{self.prefix}wpe.weight"]

    def tied_weights(self) -> dict[str, str]:
        return {"lm_head.weight": f"{self.prefix}wte.weight"} if self.tied_head else {}

    def head_names(self) -> list[str]:
        names = [f"{self.prefix}ln_f.weight", f"{self.prefix}ln_f.bias"]
        return [n for n in names if n in self.ckpt] + ([] if self.tied_head else ["lm_head.weight"])

    # ----- running ------------------------------------------------------------------------------
    def build_module(self, state=None, dtype=None) -> nn.Module:
        from modelsurgery.families.modules.gpt2 import GPT2

        self.check_language_model()
        heads = int(self.need("n_head", "num_attention_heads",
                              why="the number of attention heads cannot be read from tensor shapes"))
        if self.cfg("add_cross_attention", default=False):
            raise SurgeryError(f"{self.ckpt.path}: GPT-2 with cross-attention (add_cross_attention) is not supported")
        hidden = self.hidden_size
        if hidden % heads:
            raise SurgeryError(f"{self.ckpt.path}: hidden size {hidden} is not divisible by n_head={heads}")
        module = GPT2(
            prefix=self.prefix,
            vocab=self.vocab_size,
            positions_=self.ckpt.shape(f"{self.prefix}wpe.weight")[0],
            hidden=hidden,
            inner=self.ckpt.shape(self._p(0, "mlp.c_fc.weight"))[1],
            num_layers=self.num_layers,
            num_heads=heads,
            eps=float(self.cfg("layer_norm_epsilon", "layer_norm_eps",
                               default=self.config_defaults["layer_norm_epsilon"])),
            activation=self.cfg("activation_function", default=self.config_defaults["activation_function"]),
            scale_weights=bool(self.cfg("scale_attn_weights", default=self.config_defaults["scale_attn_weights"])),
            scale_by_layer=bool(self.cfg("scale_attn_by_inverse_layer_idx",
                                         default=self.config_defaults["scale_attn_by_inverse_layer_idx"])),
            untied_head=not self.tied_head,
            where=str(self.ckpt.path),
        )
        return self.load_state(module, state, dtype)

    def describe(self) -> dict:
        d = super().describe()
        d["tied_head"] = self.tied_head
        return d
