"""Adapters made and merged by PEFT itself (the independent reference for fold and extract)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.hf_tiny import load_hf, save_tiny_bert, save_tiny_gpt2, save_tiny_llama

BUILDERS = {"gpt2": save_tiny_gpt2, "llama": save_tiny_llama, "bert": save_tiny_bert}


def build(kind: str, folder: Path, seed: int = 0, **overrides) -> Path:
    return BUILDERS[kind](folder, seed=seed, **overrides)


def make_adapter(base: Path, config, out: Path, seed: int = 0, scale_b: float = 1.0) -> Path:
    """A PEFT adapter on ``base`` with every trainable tensor random (PEFT initialises B, or a LoKr
    factor, to zero: folding that would test nothing). DoRA magnitudes are perturbed around their
    initial norms so they stay positive. ``scale_b`` multiplies lora_B afterwards."""
    from peft import get_peft_model

    model = get_peft_model(load_hf(base), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=gen)
            if "magnitude" in name:
                p.mul_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
            if "lora_B" in name:
                p.mul_(scale_b)
    model.save_pretrained(out)
    return out


def peft_merged(base: Path | torch.nn.Module, *adapters: Path) -> torch.nn.Module:
    """PEFT's merge_and_unload(), adapter after adapter."""
    from peft import PeftModel

    model = load_hf(base) if isinstance(base, Path) else base
    for a in adapters:
        model = PeftModel.from_pretrained(model, a).merge_and_unload()
    return model.eval()


def outputs(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
