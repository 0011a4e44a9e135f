"""Evaluation of a runnable model on a dataset: mean cross-entropy and accuracy for classifiers,
next-token cross-entropy and perplexity exp(mean NLL) for causal LMs (Jelinek et al. 1977), and
output agreement between two models (cosine similarity, max |difference|, top-1 agreement).

Everything runs under ``torch.no_grad()`` in batches; sums are accumulated in float64 so the
result does not depend on the batch size beyond float32 rounding of the forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from modelsurgery.data import Dataset, check_fits
from modelsurgery.errors import SurgeryError

Progress = Callable[[str, int, int, dict], None]


def _param_dtype(module: nn.Module) -> torch.dtype:
    p = next((p for p in module.parameters() if p.dtype.is_floating_point), None)
    return p.dtype if p is not None else torch.float32


def _forward(module: nn.Module, family, part: Dataset) -> torch.Tensor:
    """Run one batch; floating inputs follow the module's dtype; output as float32."""
    dtype = _param_dtype(module)
    batch = {k: v.to(dtype) if v.dtype.is_floating_point else v for k, v in part.model_inputs(family).items()}
    out = module(**batch)
    if not isinstance(out, torch.Tensor):
        raise SurgeryError(f"the {family.name} model returned {type(out).__name__}, not one tensor")
    return out.float()


class _EvalMode:
    """Put modules in eval mode for the duration, then restore their training flags."""

    def __init__(self, *modules: nn.Module):
        self.modules = modules
        self.flags = [m.training for m in modules]

    def __enter__(self):
        for m in self.modules:
            m.eval()

    def __exit__(self, *exc):
        for m, flag in zip(self.modules, self.flags):
            m.train(flag)


@torch.no_grad()
def evaluate(module: nn.Module, family, dataset: Dataset, batch_size: int = 64,
             progress: Progress | None = None) -> dict:
    """Metrics of ``module`` (built by ``family``) on ``dataset``.

    Classifiers (logits [N, C] and labels): ``loss`` (mean cross-entropy) and ``accuracy``.
    Language models (logits [N, T, V] on token ids): ``loss`` (mean next-token cross-entropy over
    positions whose target is not padding; targets from ``labels`` [N, T] when present, ``-100``
    ignored, else the input ids) and ``perplexity``. Encoders (output_kind "hidden"): only
    ``samples``: without a reference there is nothing to score (see ``compare_outputs``).
    """
    check_fits(family, dataset)
    result: dict = {"samples": len(dataset)}
    if family.output_kind != "logits":
        return result
    if dataset.labels is None and not dataset.is_tokens:
        raise SurgeryError(f"{dataset.source}: has no 'labels'; evaluating a classifier needs them")
    nll, correct, count = 0.0, 0, 0
    kind = None
    with _EvalMode(module):
        for done, part in enumerate(dataset.split(batch_size)):
            logits = _forward(module, family, part)
            if logits.dim() == 3 and dataset.is_tokens and (part.labels is None or part.labels.dim() == 2):
                kind = "lm"
                targets = part.labels if part.labels is not None else part.input_ids
                valid = targets[:, 1:] != -100
                if part.attention_mask is not None:
                    valid &= part.attention_mask[:, 1:].bool()
                logits, targets = logits[:, :-1][valid], targets[:, 1:][valid]
            elif logits.dim() == 2 and part.labels is not None and part.labels.dim() == 1:
                kind = "classifier"
                targets = part.labels
            else:
                labels = "labels " + str(list(part.labels.shape)) if part.labels is not None else "no labels"
                raise SurgeryError(f"{dataset.source}: cannot score outputs of shape {list(logits.shape)} against "
                                   f"{labels}")
            if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= logits.shape[-1]):
                bad = int(targets.min()) if int(targets.min()) < 0 else int(targets.max())
                raise SurgeryError(f"{dataset.source}: label {bad} is outside the model's {logits.shape[-1]} outputs")
            nll += F.cross_entropy(logits, targets, reduction="sum").double().item()
            correct += int((logits.argmax(-1) == targets).sum())
            count += targets.numel()
            if progress:
                progress("evaluate", min((done + 1) * batch_size, len(dataset)), len(dataset), {})
    if count == 0:
        raise SurgeryError(f"{dataset.source}: no position to score (every target is padding)")
    loss = nll / count
    if kind == "lm":
        result.update(tokens=count, loss=loss, perplexity=math.exp(loss))
    else:
        result.update(loss=loss, accuracy=correct / count)
    return result


@torch.no_grad()
def compare_outputs(module_a: nn.Module, module_b: nn.Module, family, dataset: Dataset, batch_size: int = 64,
                    progress: Progress | None = None) -> dict:
    """How closely ``module_b`` reproduces ``module_a`` on ``dataset``: the mean and minimum cosine
    similarity of output vectors (one per sample, or per non-padding token for sequence outputs),
    max and mean |a - b|, and for logits the top-1 agreement."""
    check_fits(family, dataset)
    cos_sum, cos_min, max_abs, abs_sum, values, agree, vectors = 0.0, math.inf, 0.0, 0.0, 0, 0, 0
    with _EvalMode(module_a, module_b):
        for done, part in enumerate(dataset.split(batch_size)):
            a, b = _forward(module_a, family, part), _forward(module_b, family, part)
            if a.shape != b.shape:
                raise SurgeryError(f"the two models give outputs of different shapes: {list(a.shape)} and "
                                   f"{list(b.shape)}")
            if a.dim() == 3 and part.attention_mask is not None:
                keep = part.attention_mask.bool()
                a, b = a[keep], b[keep]
            a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
            cos = F.cosine_similarity(a.double(), b.double(), dim=-1)
            diff = (a - b).abs()
            cos_sum += cos.sum().item()
            cos_min = min(cos_min, cos.min().item()) if cos.numel() else cos_min
            max_abs = max(max_abs, diff.max().item()) if diff.numel() else max_abs
            abs_sum += diff.double().sum().item()
            values += diff.numel()
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            vectors += len(a)
            if progress:
                progress("compare", min((done + 1) * batch_size, len(dataset)), len(dataset), {})
    result = {"samples": len(dataset), "vectors": vectors, "cosine_mean": cos_sum / max(vectors, 1),
              "cosine_min": cos_min if vectors else None, "max_abs_diff": max_abs,
              "mean_abs_diff": abs_sum / max(values, 1)}
    if family.output_kind == "logits":
        result["top1_agreement"] = agree / max(vectors, 1)
    return result
