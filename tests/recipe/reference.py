"""mergekit's documented merge semantics, written out independently in float64 numpy for the tests.

Sources (behaviour, not code): mergekit README / docs/merge_methods.md and ``config.py``:
- a gradient ``[v0, ..., vm]`` is spread evenly over a slice's layers: layer i of n sits at
  t = i / (n - 1) and takes the piecewise-linear value at t (``np.interp`` over equally spaced
  anchors); embeddings and the output head are evaluated at t = 0;
- a ``filter`` condition applies when its string occurs in the tensor name; the first match wins;
- ``slerp``: ``t = 0`` is the base model, ``t = 1`` the other; lerp when the normalised tensors'
  dot product exceeds 0.9995 in magnitude;
- ``linear``: sum_i w_i x_i / sum_i w_i (normalize: true by default);
- ``task_arithmetic``: base + lambda * sum_i w_i (x_i - base) (normalize: false by default);
- ``ties``: each task vector keeps its int(density * n) largest magnitudes; the elected sign is
  that of sum_i w_i delta_i (a zero sum counts as positive); the result is base + lambda * the
  sum of agreeing weighted deltas divided by the sum of the agreeing weights (normalize: true);
  ``rescale: true`` scales each trimmed task vector back to its L1 norm before the election.
"""

from __future__ import annotations

import numpy as np
from safetensors.numpy import load_file


def load(folder) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in load_file(str(folder / "model.safetensors")).items()}


def gradient(values, t: float) -> float:
    if np.isscalar(values):
        return float(values)
    return float(np.interp(t, np.linspace(0.0, 1.0, len(values)), values))


def filtered(conditions, name: str, t: float):
    for c in conditions:
        if c.get("filter") in (None, "*") or c["filter"] in name:
            return gradient(c["value"], t)
    return None


def slerp(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ua = a / np.linalg.norm(a) if np.linalg.norm(a) > 1e-8 else a
    ub = b / np.linalg.norm(b) if np.linalg.norm(b) > 1e-8 else b
    dot = float(np.sum(ua * ub))
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    theta = np.arccos(dot)
    return (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)


def ties(base: np.ndarray, xs: list[np.ndarray], weights: list[float], densities: list[float],
         lam: float = 1.0, rescale: bool = False, normalize: bool = True) -> np.ndarray:
    deltas = []
    for x, w, d in zip(xs, weights, densities):
        delta = (x - base).ravel()
        keep = np.zeros_like(delta)
        if d >= 1:
            keep = delta.copy()
        else:
            k = int(d * delta.size)
            idx = np.argsort(-np.abs(delta), kind="stable")[:k]
            keep[idx] = delta[idx]
        if rescale and np.abs(keep).sum() > 1e-7:  # mergekit's rescale: restore the task vector's L1 norm
            keep = keep * (np.abs(delta).sum() / np.abs(keep).sum())
        deltas.append(w * keep)
    deltas = np.stack(deltas)
    sign = np.where(deltas.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(deltas) == sign
    w = np.array(weights)[:, None]
    merged = (deltas * agree).sum(0)
    if normalize:  # mergekit's normalize: true divides by the agreeing weights; false keeps the sum
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1
        merged = merged / divisor
    return base + lam * merged.reshape(base.shape)
