"""Float vs quantized model side by side (``--eval``): the family's metrics (accuracy for
classifiers, perplexity for language models) through ``ops.evaluate``, output agreement through
``compare_outputs``, and for encoders the cosine of sentence embeddings (mean pooling over the
attention mask, then L2 normalisation, as sentence-transformers computes them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modelsurgery.data import Dataset
from modelsurgery.ops.evaluate import compare_outputs, evaluate


def sentence_embeddings(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the unmasked positions, L2-normalised ([N, T, H] -> [N, H])."""
    m = torch.ones(hidden.shape[:2]) if mask is None else mask.float()
    pooled = (hidden * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
    return F.normalize(pooled, dim=-1)


@torch.no_grad()
def sentence_cosine(float_model: nn.Module, quant_model: nn.Module, family, data: Dataset,
                    batch_size: int = 64) -> float:
    cos = []
    for batch in data.batches(batch_size, family):
        a = sentence_embeddings(float_model(**batch).float(), batch.get("attention_mask"))
        b = sentence_embeddings(quant_model(**batch).float(), batch.get("attention_mask"))
        cos.append((a * b).sum(-1))
    return torch.cat(cos).mean().item()


def compare_models(float_model: nn.Module, quant_model: nn.Module, family, data: Dataset) -> dict:
    """{"float": metrics, "quantized": metrics, "agreement": compare_outputs(...), and for encoders
    "sentence_cosine"}."""
    result = {"float": evaluate(float_model, family, data), "quantized": evaluate(quant_model, family, data),
              "agreement": compare_outputs(float_model, quant_model, family, data)}
    for r in (result["float"], result["quantized"]):
        r.pop("samples", None)
    result["samples"] = len(data)
    if family.output_kind == "hidden" and data.is_tokens:
        result["sentence_cosine"] = sentence_cosine(float_model, quant_model, family, data)
    return result
