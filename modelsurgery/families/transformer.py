"""What the Hugging Face transformer families share as description: the config.json keys they read
(checked for type and range before anything uses them), prefixes, tied heads, example inputs.

The torch parts they run on (attention, masks, rotary, RMSNorm, GPT-2's Conv1D, activations) live in
``families/modules/transformer.py``; the names that used to live here are still importable from this
module (resolved on first use, so importing it does not import torch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from modelsurgery.errors import SurgeryError
from modelsurgery.families.base import Family

if TYPE_CHECKING:
    import torch

#: the building blocks ``modules/transformer.py`` defines, importable from here as before the split
_MODULE_NAMES = ("ACTIVATIONS", "Activation", "Conv1D", "RMSNorm", "TransformerModule", "apply_rotary", "attend",
                 "attention_bias", "gelu_tanh", "positions", "quick_gelu", "rotate_half", "split_heads")


def __getattr__(name: str):
    if name in _MODULE_NAMES:
        from modelsurgery.families.modules import transformer

        return getattr(transformer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----- family helpers ---------------------------------------------------------------------------
# config.json keys the transformer families read, with the values a model can have; a value outside
# them (a string head count, zero heads, a NaN epsilon) is refused naming the key, never met later as a
# TypeError or ZeroDivisionError in the middle of a build.
_POSITIVE_INT = ("num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size", "intermediate_size",
                 "vocab_size", "max_position_embeddings", "sliding_window", "sliding_window_pattern",
                 "n_head", "n_embd", "n_inner", "n_positions", "n_ctx", "type_vocab_size")
_COUNT = ("num_hidden_layers", "n_layer", "max_window_layers")
#: the spellings of the block count in config.json (transformers' attribute_map aliases them)
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer")
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

    #: what the family's transformers config class assumes for a key config.json leaves out, for the keys
    #: ``config_value`` reads as written
    config_defaults: ClassVar[dict[str, Any]] = {}

    def config_readers(self) -> dict[str, Callable[[], Any]]:
        """The config.json keys whose value the family derives (from other keys or tensor shapes) instead of
        reading it as written: head counts and head_dim as attention uses them, and the tied head, which
        is, as transformers 5 loads it, whether the file lacks the head's tensor (it keeps a head the file holds,
        whatever the flag says)."""
        readers: dict[str, Callable[[], Any]] = {"tie_word_embeddings": lambda: self.tied_head}
        att = self.attention
        if att is not None:
            readers.update(num_attention_heads=lambda: att.num_heads, n_head=lambda: att.num_heads,
                           num_key_value_heads=lambda: att.num_kv_heads, head_dim=lambda: att.head_dim)
        return readers

    def config_value(self, key: str):
        if not self.config:
            return None
        written = {**self.config_defaults, **self.config}.get(key)
        try:
            reader = self.config_readers().get(key)
            return written if reader is None else reader()
        except SurgeryError:  # a value the family does not run (an unknown rope type): compared as written
            return written

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
        import torch

        ids = torch.randint(0, self.vocab_size, (batch, seq_len), generator=generator)
        mask = torch.ones(batch, seq_len, dtype=torch.long)
        if batch > 1 and seq_len > 1:
            mask[-1, seq_len - max(1, seq_len // 4):] = 0
        return {"input_ids": ids, "attention_mask": mask}

    def check_language_model(self) -> None:
        """Refuse to run a checkpoint with a tensor outside the blocks that is neither an embedding nor the LM
        head: transformers' ...ForSequenceClassification keeps the decoder's names plus 'score.weight' and no
        lm_head, and run as a language model with the head tied to the embedding it would silently compute
        vocabulary logits of another model."""
        known = set(self.embedding_names()) | set(self.head_names())
        extra = next((n for n in self.ckpt if n not in known and self.block_of(n) is None), None)
        if extra is not None:
            raise SurgeryError(
                f"{self.ckpt.path}: tensor '{extra}' is not part of the {self.name} language model (a classification "
                "head?); only causal-LM checkpoints (embeddings, blocks, final norm, LM head) can be run"
            )

    def layer_count_config(self, num_layers: int, key: str) -> dict | None:
        """config.json with ``num_layers`` blocks under ``key`` and under any other spelling of the count it
        holds (GPT-2's n_layer is also read as num_hidden_layers: a stale one would win in transformers)."""
        if not self.config:
            return None
        cfg = dict(self.config)
        for k in {key, *(k for k in LAYER_COUNT_KEYS if k in cfg)}:
            cfg[k] = int(num_layers)
        return self.remap_layer_lists(cfg, [i % self.num_layers for i in range(num_layers)])

    def describe(self) -> dict:
        d = super().describe()
        att = self.attention
        d.update(vocab_size=self.vocab_size,
                 num_heads=att.num_heads if att else None,
                 num_kv_heads=att.num_kv_heads if att else None,
                 head_dim=att.head_dim if att else None)
        return d
