"""Adapters: fold PEFT adapters (LoRA, DoRA, MiSS/Bone, LoKr) into base weights, extract a LoRA from a
fine-tune by truncated SVD. The PEFT folder format lives in ``peft_format``; each method in its own file."""

from modelsurgery.ops.adapters.extract import ExtractOptions, ExtractReport, extract_lora
from modelsurgery.ops.adapters.fold import FoldOptions, FoldReport, fold_adapters
from modelsurgery.ops.adapters.variants import all_variants

__all__ = [
    "ExtractOptions", "ExtractReport", "FoldOptions", "FoldReport", "all_variants", "extract_lora", "fold_adapters",
]
