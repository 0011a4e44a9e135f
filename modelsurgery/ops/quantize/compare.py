"""Float vs quantized model side by side on evaluation data: accuracy (classifiers with labels),
perplexity (language models), and output cosine similarity (for encoders: of the mean-pooled,
L2-normalised sentence embeddings, as sentence-transformers computes them)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from modelsurgery.ops.quantize.calibration import batches


def sentence_embeddings(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if hidden.dim() == 2:
        return F.normalize(hidden, dim=-1)
    m = torch.ones(hidden.shape[:2]) if mask is None else mask.float()
    pooled = (hidden * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
    return F.normalize(pooled, dim=-1)


@torch.no_grad()
def run_metrics(module: nn.Module, data: dict[str, torch.Tensor], labels: torch.Tensor | None,
                output_kind: str, batch_size: int = 64) -> tuple[dict, torch.Tensor]:
    outs, nll, count, correct = [], 0.0, 0, 0
    for i, b in enumerate(batches(data, batch_size)):
        out = module(**b).float()
        if output_kind == "hidden":
            outs.append(sentence_embeddings(out, b.get("attention_mask")))
            continue
        outs.append(out.reshape(out.shape[0], -1))
        if out.dim() == 3 and "input_ids" in b:
            logits, target = out[:, :-1], b["input_ids"][:, 1:]
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
            count += target.numel()
        elif labels is not None and out.dim() == 2:
            y = labels[i * batch_size : i * batch_size + out.shape[0]]
            correct += (out.argmax(-1) == y).sum().item()
            count += y.numel()
    metrics: dict = {}
    if output_kind != "hidden" and count:
        if "input_ids" in data:
            metrics["perplexity"] = math.exp(nll / count)
        else:
            metrics["accuracy"] = correct / count
    return metrics, torch.cat(outs)


def compare_models(float_model: nn.Module, quant_model: nn.Module, data: dict[str, torch.Tensor],
                   labels: torch.Tensor | None, output_kind: str) -> dict:
    """{"float": {...}, "quantized": {...}, "output_cosine": mean cosine of outputs per sample}."""
    f_metrics, f_out = run_metrics(float_model, data, labels, output_kind)
    q_metrics, q_out = run_metrics(quant_model, data, labels, output_kind)
    cosine = F.cosine_similarity(f_out, q_out, dim=-1).mean().item()
    return {"float": f_metrics, "quantized": q_metrics, "output_cosine": cosine,
            "samples": int(f_out.shape[0])}
