"""BERT (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers"): post-norm encoder
blocks (LayerNorm after each residual sum), learned absolute positions and token-type embeddings,
bidirectional attention with a padding mask.

Checkpoints: ``BertModel`` (``embeddings.*``, ``encoder.layer.{i}.``, optional ``pooler.*``) and task
models with a ``bert.`` prefix (``BertForMaskedLM``, ``BertForSequenceClassification``; their heads
``cls.*`` / ``classifier.*`` are head tensors). The built module (``modules/bert.Bert``) returns
last_hidden_state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.families import register
from modelsurgery.families.base import Attention, Linear, Norm
from modelsurgery.families.transformer import TransformerFamily

if TYPE_CHECKING:
    import torch
    from torch import nn

PREFIXES = ("", "bert.")
LINEARS = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
           "o": "attention.output.dense", "up": "intermediate.dense", "down": "output.dense"}


@register
class BertFamily(TransformerFamily):
    name = "bert"
    model_types = ("bert",)
    output_kind = "hidden"
    norm_placement = "post"
    block_pattern = r"(?:bert\.)?encoder\.layer\.(\d+)\."
    structural_config_keys = ("num_attention_heads", "hidden_act", "position_embedding_type")
    tuning_config_keys = ("layer_norm_eps",)
    #: BertConfig's defaults (transformers ``configuration_bert.py``)
    config_defaults: ClassVar[dict[str, Any]] = {"hidden_act": "gelu", "layer_norm_eps": 1e-12,
                                                 "position_embedding_type": "absolute"}

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

    def classifier(self) -> Linear | None:
        """The task head's last Linear (``classifier``; ``cls.seq_relationship``; an untied masked-LM decoder).
        The pooler and the masked-LM transform are hidden -> hidden layers feeding further layers, never
        class scores; a masked-LM head whose decoder is the word embedding (tied) has no tensor of its own."""
        inner = (f"{self.prefix}pooler.dense.weight", "cls.predictions.transform.dense.weight")
        heads = [n for n in self.head_names() if n.endswith(".weight") and n not in inner
                 and len(self.ckpt.shape(n)) == 2]
        if not heads:
            return None
        weight = heads[-1]
        bias = weight[: -len("weight")] + "bias"
        if weight == "cls.predictions.decoder.weight" and bias not in self.ckpt:
            bias = "cls.predictions.bias"  # the decoder's bias is stored once, under the head's name
        return Linear(weight, bias if bias in self.ckpt else None)

    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "token_type_ids"]

    def example_inputs(self, batch: int = 2, seq_len: int = 8, generator: torch.Generator | None = None
                       ) -> dict[str, torch.Tensor]:
        import torch

        inputs = super().example_inputs(batch, seq_len, generator)
        inputs["token_type_ids"] = torch.zeros(batch, seq_len, dtype=torch.long)
        return inputs

    # ----- running ------------------------------------------------------------------------------
    def build_module(self, state=None, dtype=None) -> nn.Module:
        from modelsurgery.families.modules.bert import Bert

        heads = int(self.need("num_attention_heads",
                              why="the number of attention heads cannot be read from tensor shapes"))
        where = self.ckpt.path
        if self.cfg("is_decoder", default=False) or self.cfg("add_cross_attention", default=False):
            raise SurgeryError(f"{where}: BERT as a decoder (is_decoder / add_cross_attention) is not supported")
        if self.cfg("position_embedding_type", default=self.config_defaults["position_embedding_type"]) != "absolute":
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
            eps=float(self.cfg("layer_norm_eps", default=self.config_defaults["layer_norm_eps"])),
            activation=self.cfg("hidden_act", default=self.config_defaults["hidden_act"]),
            where=str(where),
        )
        return self.load_state(module, state, dtype)
