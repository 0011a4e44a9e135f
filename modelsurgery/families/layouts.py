"""Tensor-name layouts of the decoder-only LLM families, as data (the way mergekit describes
architectures): where the embedding, blocks, final norm and head live, which suffix inside a block plays
which role, how fused projections split, and the switches that a family fixes regardless of its
config.json (norm kind and offset, embedding scale, window rule). Everything a config.json can vary
(biases, heads, head_dim, rope, windows, soft-caps, parallel residual) is read by ``decoder.settings``.

Adding the next LLaMA-like architecture is one ``Layout`` entry here plus a parity test.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LLAMA_LINEARS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                 "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
LLAMA_NORMS = {"attn": "input_layernorm", "mlp": "post_attention_layernorm"}
QK_NORMS = {"q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}
# Gemma 2/3: "post_attention_layernorm" is a norm AFTER attention (LLaMA's name for the pre-MLP norm)
GEMMA_NORMS = {"attn": "input_layernorm", "attn_post": "post_attention_layernorm",
               "mlp": "pre_feedforward_layernorm", "mlp_post": "post_feedforward_layernorm"}


@dataclass(frozen=True)
class Layout:
    """One decoder family's tensor names and fixed switches.

    ``linears``/``norms``: role -> module path inside a block (tensors are ``<path>.weight`` and
    optionally ``<path>.bias``). Fused roles: ``qkv`` (parts q, k, v; ``qkv_per_head``: rows grouped per
    head as [q_h, k_h, v_h] for every head h, GPT-NeoX) and ``gate_up`` (parts gate, up).
    ``window_rule``: which layers use ``sliding_window``: ``none``; ``all`` (Mistral, Phi-3);
    ``typed`` (``layer_types``, else the family's default pattern: ``window_period`` p makes layer i
    sliding unless (i+1) % p == 0, Gemma; ``max_window_layers`` with ``use_sliding_window``, Qwen).
    """

    family: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    linears: dict[str, str] = field(default_factory=lambda: dict(LLAMA_LINEARS))
    norms: dict[str, str] = field(default_factory=lambda: dict(LLAMA_NORMS))
    embed: str = "model.embed_tokens"
    blocks: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    qkv_per_head: bool = False
    norm_kind: str = "rmsnorm"  # rmsnorm | layernorm
    norm_offset: float = 0.0  # Gemma scales by (1 + weight)
    embed_scale: bool = False  # Gemma multiplies embeddings by sqrt(hidden_size)
    window_rule: str = "none"  # none | all | typed
    window_period: int | None = None
    #: the config.json keys the family's MLP reads, first present wins (Gemma 2/3 read hidden_activation only:
    #: transformers ignores their hidden_act, which Gemma 1's files spell 'gelu')
    activation_keys: tuple[str, ...] = ("hidden_act",)
    default_activation: str = "silu"
    #: activation names the family's transformers code reads as another (Gemma 1: 'gelu' is the tanh GELU)
    activation_aliases: dict = field(default_factory=dict)
    #: theta when config.json names none; Gemma 3: full_attention / sliding_attention layers
    default_theta: float = 10000.0
    default_local_theta: float = 10000.0
    local_rope: bool = False  # sliding layers have their own rope (Gemma 3)
    attention_scalar: bool = False  # scores scaled by query_pre_attn_scalar**-0.5 (Gemma)
    softcaps: bool = False  # attn_logit_softcapping / final_logit_softcapping read (Gemma)
    #: attention and MLP read the same input (GPT-NeoX), unless config.json says use_parallel_residual=false
    parallel_residual: bool = False
    #: what the family's transformers config class assumes when config.json leaves a key out
    config_defaults: dict = field(default_factory=dict)
    #: detected from tensor names alone when config.json is absent (the layout names this family)
    claims_without_config: bool = False
    #: module paths transformers' model spells otherwise than the checkpoint -> the checkpoint's (transformers 5
    #: loads GPT-NeoX's 'embed_out' as 'lm_head'; PEFT adapters name the module as the loaded model does)
    module_aliases: dict = field(default_factory=dict)

    def tensor(self, index: int, role_path: str, kind: str = "weight") -> str:
        return f"{self.blocks}.{index}.{role_path}.{kind}"

    def activation(self, config: dict) -> str:
        """The MLP activation the family's transformers code runs for this config.json."""
        name = next((config[k] for k in self.activation_keys if config.get(k) is not None), self.default_activation)
        return self.activation_aliases.get(name, name)


LAYOUTS: tuple[Layout, ...] = (
    Layout("llama", ("llama",), ("LlamaForCausalLM",), claims_without_config=True),
    Layout("mistral", ("mistral",), ("MistralForCausalLM",), window_rule="all",
           config_defaults={"sliding_window": 4096}),
    Layout("qwen2", ("qwen2",), ("Qwen2ForCausalLM",), window_rule="typed",
           config_defaults={"use_sliding_window": False}),
    Layout("qwen3", ("qwen3",), ("Qwen3ForCausalLM",), norms={**LLAMA_NORMS, **QK_NORMS}, window_rule="typed",
           config_defaults={"use_sliding_window": False}, claims_without_config=True),
    # Gemma 1: LLaMA's tensor names, Gemma's (1 + w) norms and sqrt(hidden) embedding scale; its published
    # config.json says hidden_act 'gelu', which transformers runs as the tanh GELU (as Gemma 2/3 do)
    Layout("gemma", ("gemma",), ("GemmaForCausalLM",), norm_offset=1.0, embed_scale=True,
           activation_keys=("hidden_activation", "hidden_act"), default_activation="gelu_pytorch_tanh",
           activation_aliases={"gelu": "gelu_pytorch_tanh"}, config_defaults={"head_dim": 256}),
    Layout("gemma2", ("gemma2",), ("Gemma2ForCausalLM",), norms=dict(GEMMA_NORMS), norm_offset=1.0,
           embed_scale=True, window_rule="typed", window_period=2,
           activation_keys=("hidden_activation",), default_activation="gelu_pytorch_tanh",
           attention_scalar=True, softcaps=True, claims_without_config=True,
           config_defaults={"sliding_window": 4096, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
                            "final_logit_softcapping": 30.0, "head_dim": 256}),
    Layout("gemma3", ("gemma3_text",), ("Gemma3ForCausalLM",), norms={**GEMMA_NORMS, **QK_NORMS},
           norm_offset=1.0, embed_scale=True, window_rule="typed", window_period=6,
           activation_keys=("hidden_activation",), default_activation="gelu_pytorch_tanh",
           default_theta=1_000_000.0, local_rope=True, attention_scalar=True, softcaps=True,
           config_defaults={"sliding_window": 4096, "query_pre_attn_scalar": 256, "head_dim": 256},
           claims_without_config=True),
    Layout("phi3", ("phi3",), ("Phi3ForCausalLM",),
           linears={"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj",
                    "down": "mlp.down_proj"},
           window_rule="all", config_defaults={"rms_norm_eps": 1e-5}, claims_without_config=True),
    Layout("gpt_neox", ("gpt_neox",), ("GPTNeoXForCausalLM",),
           linears={"qkv": "attention.query_key_value", "o": "attention.dense", "up": "mlp.dense_h_to_4h",
                    "down": "mlp.dense_4h_to_h"},
           embed="gpt_neox.embed_in", blocks="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm",
           lm_head="embed_out", qkv_per_head=True, norm_kind="layernorm", default_activation="gelu",
           parallel_residual=True, config_defaults={"rotary_pct": 0.25, "layer_norm_eps": 1e-5},
           claims_without_config=True, module_aliases={"lm_head": "embed_out"}),
)


def layout_of(model_type: str | None) -> Layout | None:
    """The layout of config.json's ``model_type``, or None."""
    return next((lay for lay in LAYOUTS if model_type in lay.model_types), None)


def layouts_matching(names) -> list[Layout]:
    """The layouts whose embedding and block-0 linears and norms all appear in ``names``, most specific
    first (a layout naming more tensors before a plainer one it contains; ties keep table order)."""
    found = []
    for lay in LAYOUTS:
        needed = [f"{lay.embed}.weight"] + [lay.tensor(0, p) for p in (*lay.linears.values(), *lay.norms.values())]
        if all(n in names for n in needed):
            found.append((len(needed), lay))
    return [lay for _, lay in sorted(found, key=lambda t: -t[0])]
