"""Tiny random Hugging Face models written by transformers' own save_pretrained (no hub, no downloads).

Interop tests build these and compare our families, and our outputs, against transformers.
"""

from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_gpt2(folder: Path, seed: int = 0, **overrides) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = {"vocab_size": 97, "n_positions": 64, "n_embd": 32, "n_layer": 3, "n_head": 4, "resid_pdrop": 0.0,
           "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": 0, "eos_token_id": 0}
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**cfg)).eval()
    model.save_pretrained(folder)
    return Path(folder)


def save_tiny_llama(folder: Path, seed: int = 0, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 56, "num_hidden_layers": 3,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
           "tie_word_embeddings": False}
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    model.save_pretrained(folder)
    return Path(folder)


def save_tiny_bert(folder: Path, seed: int = 0, **overrides) -> Path:
    from transformers import BertConfig, BertModel

    cfg = {"vocab_size": 97, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
           "intermediate_size": 48, "max_position_embeddings": 64, "hidden_dropout_prob": 0.0,
           "attention_probs_dropout_prob": 0.0}
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = BertModel(BertConfig(**cfg)).eval()
    model.save_pretrained(folder)
    return Path(folder)


def load_hf(folder: Path):
    """transformers' own model for a folder written above (the independent reference)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(folder)
    cls = AutoModel if cfg.model_type == "bert" else AutoModelForCausalLM
    model = cls.from_pretrained(folder, attn_implementation="eager").eval()
    # transformers 5 keeps float32 weights in the memory-mapped file, so a weight's address modulo the cache line
    # follows its file's header length; on CPUs with wider vector units the matmul kernels then sum in another
    # order for two files holding the same bits (seen in CI: logits of our copy and of the original one ulp
    # apart). Fresh, allocator-aligned memory makes two folders with the same weights compute the same logits.
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data = tensor.data.clone()
    return model


# ----- the decoder LLM families (issue #12) -----------------------------------------------------
# Random tiny configs: 3 layers, grouped-query attention where the family has it, right padding
# exercised by the tests. Each entry: transformers config class, causal-LM class, defaults.
_DECODERS: dict[str, tuple[str, str, dict]] = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", {
        "vocab_size": 97, "hidden_size": 32, "intermediate_size": 56, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8}}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {
        "vocab_size": 97, "hidden_size": 32, "intermediate_size": 56, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "sliding_window": 5, "tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {
        "vocab_size": 97, "hidden_size": 32, "intermediate_size": 56, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {
        "vocab_size": 97, "hidden_size": 32, "intermediate_size": 56, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 64,
        "tie_word_embeddings": True}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {
        "vocab_size": 97, "hidden_size": 32, "intermediate_size": 56, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 64,
        "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {
        "vocab_size": 97, "hidden_size": 32, "intermediate_size": 56, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 64,
        "query_pre_attn_scalar": 16, "sliding_window": 5, "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "vocab_size": 97, "hidden_size": 32, "intermediate_size": 56, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 64,
        "query_pre_attn_scalar": 16, "sliding_window": 5, "sliding_window_pattern": 2,
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
        "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {
        "vocab_size": 97, "hidden_size": 32, "intermediate_size": 56, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "original_max_position_embeddings": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
        "tie_word_embeddings": False}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {
        "vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 4, "max_position_embeddings": 64, "rotary_pct": 0.25,
        "use_parallel_residual": True, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0}),
}

#: the family name each builder's checkpoint must be detected as
DECODER_FAMILY = {"llama3": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
                  "gemma2": "gemma2", "gemma3": "gemma3", "phi3": "phi3", "gpt_neox": "gpt_neox"}


def save_tiny_decoder(kind: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random ``kind`` checkpoint (a key of ``DECODER_FAMILY``) written by save_pretrained;
    ``overrides`` replace config values (``rope_parameters`` replaces the whole dict)."""
    import transformers

    config_cls, model_cls, cfg = _DECODERS[kind]
    cfg = {**cfg, **overrides}
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**cfg)).eval()
    with torch.no_grad():  # norms start at 1 (Gemma: 0) and biases at 0; move them so tests see them
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return Path(folder)


def save_tiny_llama3(folder: Path, seed: int = 0, **overrides) -> Path:
    """LLaMA 3.2-style: rope_type llama3 (factor 32), tied head."""
    return save_tiny_decoder("llama3", folder, seed, **overrides)


def save_tiny_mistral(folder: Path, seed: int = 0, **overrides) -> Path:
    """Mistral: sliding_window 5 (tests run longer sequences), untied head."""
    return save_tiny_decoder("mistral", folder, seed, **overrides)


def save_tiny_qwen2(folder: Path, seed: int = 0, **overrides) -> Path:
    """Qwen2/2.5: q/k/v biases, tied head (as the small published models)."""
    return save_tiny_decoder("qwen2", folder, seed, **overrides)


def save_tiny_qwen3(folder: Path, seed: int = 0, **overrides) -> Path:
    """Qwen3: per-head q_norm/k_norm, head_dim 16 != hidden/heads 8."""
    return save_tiny_decoder("qwen3", folder, seed, **overrides)


def save_tiny_gemma(folder: Path, seed: int = 0, **overrides) -> Path:
    """Gemma 1: LLaMA's tensor names with (1+w) norms, embeddings x sqrt(hidden), tanh GELU, one kv head."""
    return save_tiny_decoder("gemma", folder, seed, **overrides)


def save_tiny_gemma2(folder: Path, seed: int = 0, **overrides) -> Path:
    """Gemma 2: (1+w) norms, pre/post norms, soft-capping, alternating sliding window 5."""
    return save_tiny_decoder("gemma2", folder, seed, **overrides)


def save_tiny_gemma3(folder: Path, seed: int = 0, **overrides) -> Path:
    """Gemma 3 text: Gemma 2's switches plus q/k norms, local/global rope bases (global linear x8),
    sliding layers alternating with full ones (pattern 2)."""
    return save_tiny_decoder("gemma3", folder, seed, **overrides)


def save_tiny_phi3(folder: Path, seed: int = 0, **overrides) -> Path:
    """Phi-3: fused qkv_proj and gate_up_proj."""
    return save_tiny_decoder("phi3", folder, seed, **overrides)


def save_tiny_gpt_neox(folder: Path, seed: int = 0, **overrides) -> Path:
    """GPT-NeoX / Pythia: parallel residual, per-head fused query_key_value, rotary_pct 0.25."""
    return save_tiny_decoder("gpt_neox", folder, seed, **overrides)
