"""Spherical linear interpolation of two models, per tensor (Shoemake 1985), with mergekit's
definition: the angle W between the flattened tensors (each normalised when its norm exceeds
eps), theta = sin((1-t)W)/sin(W) * a + sin(tW)/sin(W) * b, and plain lerp (1-t)a + tb when
|cos W| > 0.9995 (nearly colinear, where the formula is ill-conditioned)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from modelsurgery.ops.merge import Method, Param, register_method

DOT_THRESHOLD = 0.9995  # mergekit's
EPS = 1e-8  # mergekit's: a tensor with a smaller norm is not normalised


#: elements of the normalised tensors turned to float64 at a time for their dot product (8 MB each), so that
#: a merge of two embeddings holds no float64 or normalised copy of them
DOT_CHUNK = 1 << 20


def unit_dot(a: torch.Tensor, b: torch.Tensor, na: float, nb: float) -> float:
    """<a/na, b/nb> in float64 (a tensor of norm <= EPS is not divided), a piece at a time."""
    a, b = a.flatten(), b.flatten()
    total = 0.0
    for i in range(0, a.numel(), DOT_CHUNK):
        pa, pb = a[i:i + DOT_CHUNK], b[i:i + DOT_CHUNK]
        pa, pb = (pa / na if na > EPS else pa), (pb / nb if nb > EPS else pb)
        total += float(pa.double() @ pb.double())
    return total


def slerp(tensors: list[torch.Tensor], weights: list[float], base: torch.Tensor | None,
          params: Mapping[str, Any]) -> torch.Tensor:
    a, b = (x.to(torch.float32) for x in tensors)
    t = float(params["t"])
    dot = unit_dot(a, b, float(a.norm()), float(b.norm()))
    if abs(dot) > DOT_THRESHOLD:
        ca, cb = 1 - t, t
    else:
        omega = math.acos(max(-1.0, min(1.0, dot)))
        s = math.sin(omega)
        ca, cb = math.sin((1 - t) * omega) / s, math.sin(t * omega) / s
    out = a * ca
    return out.add_(b * cb)


PARAMS = (
    Param("t", float, 0.5, "position between the first model (0) and the second (1); --alpha sets it",
          paper="mergekit slerp: t, required", low=0.0, high=1.0),
)

register_method(Method("slerp", slerp, PARAMS, max_models=2, paper="Shoemake 1985"))
