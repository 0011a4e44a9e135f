"""What llama.cpp's ``convert_hf_to_gguf.py`` does per decoder family, as data: the GGUF architecture,
the row reorderings and value shifts it applies to tensors, the hyperparameters it writes, and what a
config must satisfy for llama.cpp's graph of that architecture to compute the same model (refused in
one line otherwise). ``gguf.py`` writes the file; this module says what goes in it.

- llama, mistral (``LlamaModel``): q/k rows (and their biases) interleaved pairwise (``permute``),
  rope.dimension_count;
  LLaMA 3.1 rope scaling as ``rope_freqs.weight``.
- qwen2, qwen3 (``Qwen2Model``, ``Qwen3Model``): NeoX-style rope, rows in transformers' order.
- gemma2 (``Gemma2Model``): every ``*norm.weight`` stored plus one (llama.cpp multiplies by w, transformers
  by 1 + w), no output head (tied), key/value length, both soft-caps and the sliding window; llama.cpp
  fixes the window pattern (every other layer, from the first) and scales attention by 1/sqrt(head_dim).
- gemma3 (``Gemma3Model``): Gemma 2's norm shift (q/k norms too), final soft-cap when set, window pattern
  fixed at five sliding layers then a full one, sliding layers' rope base fixed at 10000; the full layers'
  linear rope scaling (Gemma 3 4B-27B: x8) as ``TextModel``'s rope.scaling.type/factor, which llama.cpp
  applies to the full layers only (``get_rope_freq_scale``: sliding layers take rope_freq_scale_train_swa,
  fixed at 1 for gemma3), as transformers does.
- phi3 (``Phi3MiniModel``): fused qkv_proj and gate_up_proj kept fused (llama.cpp splits them), the
  original context length and a partial rope dimension count; longrope (Phi-3 128k, Phi-3.5) as
  ``rope_factors_long/short.weight`` and rope.scaling.attn_factor sqrt(1 + ln s / ln original) with
  s = max_position_embeddings / original (1 when s <= 1).
- gpt_neox (``GPTNeoXModel``): the per-head [q_h, k_h, v_h] rows of query_key_value regrouped as
  [q; k; v] (weight and bias), partial rope dimension count, parallel residual, LayerNorm epsilon.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import gguf
import numpy as np

from modelsurgery.errors import SurgeryError
from modelsurgery.families.layouts import layout_of


@dataclass(frozen=True)
class GGUFFamily:
    arch: gguf.MODEL_ARCH
    #: q_proj/k_proj rows reordered to llama.cpp's interleaved pairs, rope.dimension_count written
    interleave_qk: bool = False
    #: ``*norm.weight`` tensors stored plus this (Gemma's RMSNorm scales by 1 + w)
    norm_shift: float = 0.0
    #: fused query_key_value rows regrouped from per-head [q_h, k_h, v_h] to [q; k; v] (GPT-NeoX)
    regroup_qkv: bool = False
    #: the output head is not written (llama.cpp's graph reads token_embd): only a tied head is accepted
    tied_head_only: bool = False
    #: rope types llama.cpp's graph of the family computes as transformers does
    rope_types: tuple[str, ...] = ("default", "linear")
    #: sliding layers as llama.cpp fixes them: every ``window_period``-th layer is full, the others slide
    window_period: int | None = None
    #: True: a sliding window shorter than the context is refused (llama.cpp's graph attends to all)
    no_window: bool = True
    #: activations llama.cpp's graph computes (config.json's hidden_activation / hidden_act)
    activations: tuple[str, ...] = ("silu",)
    #: whether llama.cpp's graph reads the q/k/v/o biases config.json's attention_bias adds (else the file,
    #: holding tensors the graph does not take, would not load)
    attention_bias: bool = True
    hparams: Callable[[gguf.GGUFWriter, dict], None] = field(default=lambda w, c: None)


def head_dim(config: dict) -> int:
    default = 256 if config.get("model_type", "").startswith("gemma") else None  # Gemma's config classes
    return config.get("head_dim") or default or config["hidden_size"] // config["num_attention_heads"]


def _gemma2_hparams(w: gguf.GGUFWriter, config: dict) -> None:
    w.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))
    w.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    w.add_sliding_window(int(config["sliding_window"]))


def _gemma3_hparams(w: gguf.GGUFWriter, config: dict) -> None:
    if config.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    w.add_sliding_window(int(config["sliding_window"]))


def _phi3_hparams(w: gguf.GGUFWriter, config: dict) -> None:
    w.add_rope_scaling_orig_ctx_len(original_context(config))
    w.add_rope_dimension_count(rope_dimensions(config))
    w.add_sliding_window(int(config.get("sliding_window") or 0))  # 0: none (the converter's convention)
    if rope_of(config).get("rope_type") == "longrope":
        w.add_rope_scaling_attn_factors(longrope_attn_factor(config))


def original_context(config: dict) -> int:
    """Phi-3's pretraining context (the converter's original_max_position_embeddings, else the context)."""
    return int(config.get("original_max_position_embeddings") or config["max_position_embeddings"])


def longrope_attn_factor(config: dict) -> float:
    """The converter's rope.scaling.attn_factor for longrope (``Phi3MiniModel.generate_extra_tensors``):
    sqrt(1 + ln s / ln original), s = max_position_embeddings / original, 1 when s <= 1; llama.cpp
    multiplies cos and sin by it (cparams.yarn_attn_factor *= hparams.rope_attn_factor), as transformers
    multiplies them by its attention_factor."""
    original = original_context(config)
    scale = config["max_position_embeddings"] / original
    return math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0


def longrope_factors(config: dict) -> dict[str, np.ndarray]:
    """The converter's ``rope_factors_long.weight`` / ``rope_factors_short.weight`` (float32): ggml's rope
    divides each rotary frequency by its factor, as transformers' inv_freq = 1 / (factor * base^(2i/d))."""
    rope = rope_of(config)
    return {gguf.TENSOR_NAMES[tensor] + ".weight": np.asarray(rope[key], dtype=np.float32)
            for tensor, key in ((gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, "long_factor"),
                                (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, "short_factor"))}


def _gpt_neox_hparams(w: gguf.GGUFWriter, config: dict) -> None:
    w.add_rope_dimension_count(rope_dimensions(config))
    w.add_parallel_residual(bool(config.get("use_parallel_residual", True)))
    w.add_layer_norm_eps(float(config.get("layer_norm_eps", 1e-5)))


def rope_dimensions(config: dict) -> int:
    """Rotated dimensions per head: Phi-3's partial_rotary_factor or GPT-NeoX's rotary_pct of head_dim."""
    fraction = config.get("partial_rotary_factor", config.get("rotary_pct", 1.0))
    rope = config.get("rope_parameters") or {}
    fraction = rope.get("partial_rotary_factor", fraction)
    return int(float(fraction) * head_dim(config))


GELU_TANH = ("gelu_pytorch_tanh",)
FAMILIES: dict[str, GGUFFamily] = {
    "llama": GGUFFamily(gguf.MODEL_ARCH.LLAMA, interleave_qk=True, rope_types=("default", "linear", "llama3")),
    "mistral": GGUFFamily(gguf.MODEL_ARCH.LLAMA, interleave_qk=True, rope_types=("default", "linear", "llama3")),
    "qwen2": GGUFFamily(gguf.MODEL_ARCH.QWEN2),
    "qwen3": GGUFFamily(gguf.MODEL_ARCH.QWEN3, attention_bias=False),
    "gemma2": GGUFFamily(gguf.MODEL_ARCH.GEMMA2, norm_shift=1.0, tied_head_only=True, rope_types=("default",),
                         window_period=2, no_window=False, activations=GELU_TANH, hparams=_gemma2_hparams,
                         attention_bias=False),
    "gemma3_text": GGUFFamily(gguf.MODEL_ARCH.GEMMA3, norm_shift=1.0, rope_types=("default", "linear"), window_period=6,
                              no_window=False, activations=GELU_TANH, hparams=_gemma3_hparams, attention_bias=False),
    "phi3": GGUFFamily(gguf.MODEL_ARCH.PHI3, rope_types=("default", "longrope"), hparams=_phi3_hparams),
    "gpt_neox": GGUFFamily(gguf.MODEL_ARCH.GPTNEOX, regroup_qkv=True, rope_types=("default",),
                           activations=("gelu",), hparams=_gpt_neox_hparams),
}


# ----- checks ---------------------------------------------------------------------------------------
def rope_of(config: dict) -> dict:
    """The rope settings of the full-attention layers (rope_parameters, rope_scaling or rope_theta)."""
    params = dict(config.get("rope_parameters") or {})
    if "full_attention" in params:
        params = dict(params["full_attention"])
    scaling = config.get("rope_scaling") or {}
    params.setdefault("rope_theta", config.get("rope_theta", config.get("rotary_emb_base", 10000.0)))
    if scaling:  # 4.x spelling: every setting of the scaling (llama3's low/high_freq_factor, original context)
        params.setdefault("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        for key, value in scaling.items():
            if key not in ("type", "rope_type"):
                params.setdefault(key, value)
    return params


def _sliding_layers(config: dict) -> list[bool] | None:
    """Which layers slide, as config.json says (layer_types, or Gemma 3's sliding_window_pattern)."""
    n = config["num_hidden_layers"]
    if config.get("layer_types"):
        return [t == "sliding_attention" for t in config["layer_types"]]
    if config.get("sliding_window_pattern"):
        p = int(config["sliding_window_pattern"])
        return [(i + 1) % p != 0 for i in range(n)]
    return None


def check_family(config: dict, where: str) -> GGUFFamily:
    """The family's GGUF description, or a one-line refusal of a config llama.cpp would compute differently."""
    model_type = config.get("model_type")
    fam = FAMILIES.get(model_type)
    if fam is None:
        raise SurgeryError(f"{where}: --format gguf supports model_type {', '.join(FAMILIES)} "
                           f"(as llama.cpp's converter writes them); this model is '{model_type}'")
    rope = rope_of(config)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in fam.rope_types:
        raise SurgeryError(f"{where}: rope_type '{rope_type}' is not written to GGUF for {model_type} (it writes "
                           f"{', '.join(fam.rope_types)})")
    layout = layout_of(model_type)  # the key the family's transformers code reads (Gemma 2/3: hidden_activation)
    act = layout.activation(config) if layout else config.get("hidden_act") or fam.activations[0]
    if act not in fam.activations:
        raise SurgeryError(f"{where}: activation '{act}': llama.cpp's {fam.arch.name.lower()} graph computes "
                           f"{', '.join(fam.activations)}")
    window = config.get("sliding_window")
    context = config.get("max_position_embeddings", 0)
    if fam.no_window and window and window < context and config.get("use_sliding_window", True):
        raise SurgeryError(f"{where}: sliding_window {window} < context {context}: llama.cpp's "
                           f"{fam.arch.name.lower()} graph attends to the whole context; GGUF would change the model")
    if fam.window_period:
        _check_window_pattern(config, fam, where)
    if fam.arch in (gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3):
        _check_gemma(config, fam, where)
    if rope_type == "longrope":
        _check_longrope(config, rope, where)
    if not fam.attention_bias and config.get("attention_bias"):
        raise SurgeryError(f"{where}: attention_bias true: llama.cpp's {fam.arch.name.lower()} graph has no place "
                           "for all of the attention biases (the file would not load)")
    if model_type == "gpt_neox" and config.get("attention_bias") is False:
        raise SurgeryError(f"{where}: attention_bias false: llama.cpp's gptneox graph reads the qkv biases")
    return fam


def _check_window_pattern(config: dict, fam: GGUFFamily, where: str) -> None:
    n, p = config["num_hidden_layers"], fam.window_period
    stated = _sliding_layers(config)
    fixed = [(i + 1) % p != 0 for i in range(n)]
    if stated is not None and stated != fixed:
        raise SurgeryError(f"{where}: sliding layers {[i for i, s in enumerate(stated) if s]}: llama.cpp's "
                           f"{fam.arch.name.lower()} graph fixes them as every layer but each {p}th")
    if not config.get("sliding_window"):
        raise SurgeryError(f"{where}: no sliding_window: llama.cpp's {fam.arch.name.lower()} graph needs one")


def _check_gemma(config: dict, fam: GGUFFamily, where: str) -> None:
    scalar = config.get("query_pre_attn_scalar", 256)
    if scalar != head_dim(config):
        raise SurgeryError(f"{where}: query_pre_attn_scalar {scalar} != head_dim {head_dim(config)}: llama.cpp "
                           "scales attention by 1/sqrt(head_dim) (except for its own 27B sizes)")
    if fam.arch == gguf.MODEL_ARCH.GEMMA2:
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if config.get(key) is None:
                raise SurgeryError(f"{where}: {key} is unset: llama.cpp's gemma2 graph would cap at its default")
        if config.get("tie_word_embeddings") is False:
            raise SurgeryError(f"{where}: an untied lm_head: llama.cpp's gemma2 graph reads token_embd as the head")
    else:
        if config.get("attn_logit_softcapping"):
            raise SurgeryError(f"{where}: attn_logit_softcapping on gemma3: llama.cpp's graph has none")
        local = (config.get("rope_parameters") or {}).get("sliding_attention") or {}
        theta = local.get("rope_theta", config.get("rope_local_base_freq", 10000.0))
        if float(theta) != 10000.0 or local.get("rope_type", "default") != "default":
            raise SurgeryError(f"{where}: sliding layers' rope theta {theta} ({local.get('rope_type', 'default')}): "
                               "llama.cpp fixes them at 10000, unscaled")


def _check_longrope(config: dict, rope: dict, where: str) -> None:
    """What transformers' _compute_longrope_parameters reads and the converter does not: an explicit
    attention_factor, or a factor other than max_position_embeddings / original (its attention factor's
    source), or another original context than config.json's top-level one (llama.cpp's n_ctx_orig_yarn)."""
    ours = longrope_attn_factor(config)
    original = original_context(config)
    if rope.get("original_max_position_embeddings", original) != original:
        raise SurgeryError(f"{where}: rope original_max_position_embeddings {rope['original_max_position_embeddings']}"
                           f" != {original}: llama.cpp's converter takes config.json's")
    factor = rope.get("factor")
    if rope.get("attention_factor") is not None:
        key, value, theirs = "attention_factor", rope["attention_factor"], float(rope["attention_factor"])
    elif factor is not None:
        theirs = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1.0 else 1.0
        key, value = "factor", factor
    else:
        theirs = key = value = None
    if theirs is not None and not math.isclose(theirs, ours, rel_tol=1e-6):
        raise SurgeryError(f"{where}: rope {key} {value}: transformers scales attention by {theirs:.6g}, llama.cpp's "
                           f"converter writes {ours:.6g} (from max_position_embeddings / original)")
    dims = rope_dimensions(config) // 2
    for key in ("long_factor", "short_factor"):
        if len(rope.get(key) or []) != dims:
            raise SurgeryError(f"{where}: rope {key} has {len(rope.get(key) or [])} values: llama.cpp reads "
                               f"{dims} (rotary dimensions / 2)")


# ----- tensors --------------------------------------------------------------------------------------
def row_order(fam: GGUFFamily, gguf_name: str, rows: int, config: dict) -> np.ndarray | None:
    """The converter's row reordering of a tensor (None: rows as stored)."""
    n_head = config["num_attention_heads"]
    if fam.interleave_qk:  # weights and biases alike (attention_bias): a bias entry belongs to its row
        heads = n_head if gguf_name.endswith(("attn_q.weight", "attn_q.bias")) else \
            (config.get("num_key_value_heads") or n_head) if gguf_name.endswith(("attn_k.weight", "attn_k.bias")) \
            else 0
        if heads:
            return qk_permutation(rows, heads)
    if fam.regroup_qkv and gguf_name.endswith(("attn_qkv.weight", "attn_qkv.bias")):
        return np.arange(rows).reshape(n_head, 3, rows // n_head // 3).swapaxes(0, 1).reshape(rows)
    return None


def qk_permutation(rows: int, n_head: int) -> np.ndarray:
    """Row order llama.cpp's converter gives q_proj/k_proj (``LlamaModel.permute``): within each head,
    the two rotate-half halves are interleaved pairwise."""
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


def value_shift(fam: GGUFFamily, source_name: str) -> float:
    """What the converter adds to a float tensor (Gemma: 1 to every ``*norm.weight``)."""
    return fam.norm_shift if source_name.endswith("norm.weight") else 0.0


def leaves_out(fam: GGUFFamily, source_name: str, config: dict) -> bool:
    """Tensors the converter does not write: rotary caches, GPT-NeoX's causal masks, Gemma 2's head."""
    if source_name.endswith(("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias")):
        return True
    return fam.tied_head_only and source_name == "lm_head.weight"
