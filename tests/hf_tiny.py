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
    return cls.from_pretrained(folder, attn_implementation="eager").eval()
