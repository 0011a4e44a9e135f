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


def slerp(tensors: list[torch.Tensor], weights: list[float], base: torch.Tensor | None,
          params: Mapping[str, Any]) -> torch.Tensor:
    a, b = (x.to(torch.float32) for x in tensors)
    t = float(params["t"])
    na, nb = float(a.norm()), float(b.norm())
    ua = a / na if na > EPS else a
    ub = b / nb if nb > EPS else b
    dot = float(ua.flatten().double() @ ub.flatten().double())
    if abs(dot) > DOT_THRESHOLD:
        return (1 - t) * a + t * b
    omega = math.acos(max(-1.0, min(1.0, dot)))
    s = math.sin(omega)
    return a * (math.sin((1 - t) * omega) / s) + b * (math.sin(t * omega) / s)


PARAMS = (
    Param("t", float, 0.5, "position between the first model (0) and the second (1); --alpha sets it",
          paper="mergekit slerp: t, required", low=0.0, high=1.0),
)

register_method(Method("slerp", slerp, PARAMS, max_models=2, paper="Shoemake 1985"))
