"""Merge methods, one file each, registered by name (mergekit's layout).

A method combines one tensor from every model: ``fn(tensors, weights, base, options) -> tensor``
in float32; ``weights`` has one entry per model; ``base`` is the base model's tensor for methods
that need one (task arithmetic, TIES), else None.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from modelsurgery.errors import SurgeryError


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., torch.Tensor]
    needs_base: bool = False
    max_models: int | None = None
    paper: str = ""


METHODS: dict[str, Method] = {}
_MODULES = ("linear", "slerp", "task_arithmetic", "ties")


def register_method(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    for mod in _MODULES:
        importlib.import_module(f"modelsurgery.ops.merge.{mod}")
    if name not in METHODS:
        raise SurgeryError(f"merge method '{name}': expected one of match, {', '.join(sorted(METHODS))}")
    return METHODS[name]
