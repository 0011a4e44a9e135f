"""Merge methods, one file each, registered by name (mergekit's layout).

The per-tensor interface (what ``surgery merge`` and a recipe runner both call)::

    method = get_method("ties")
    params = method.resolve({"density": 0.5})       # declared names -> values, defaults filled in
    out = method.fn(tensors, weights, base, params)

- ``tensors``: one tensor per model (same shape), any float dtype; the result is float32.
- ``weights``: one float per model, for *this* tensor (mergekit's per-model ``weight``).
- ``base``: the base model's tensor for methods with ``needs_base`` (task arithmetic, TIES), else None.
- ``params``: a plain mapping of the method's declared parameter names to values for *this*
  tensor, so a caller may pass a different ``t`` or ``density`` per tensor (mergekit's gradients).
  ``Method.resolve`` validates a mapping against the declaration (unknown names, types, ranges)
  and fills in the declared defaults; ``fn`` reads only declared names.

A method declares its parameters as ``Param`` (name, type, default, help, and the value its paper
or reference code uses), as mergekit's ``ConfigParameterDef`` does. The CLI builds its method flags
from these declarations and the output's provenance records the resolved values.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from modelsurgery.errors import SurgeryError


@dataclass(frozen=True)
class Param:
    """One declared parameter of a merge method."""

    name: str
    type: type  # float, int or bool
    default: Any
    help: str
    paper: str = ""  # the value the paper / reference implementation uses, and where
    low: float | None = None  # inclusive bounds, checked by Method.resolve
    high: float | None = None

    def check(self, value: Any, method: str) -> Any:
        where = f"merge method '{method}': parameter '{self.name}'"
        if self.type is bool:
            if not isinstance(value, bool):
                raise SurgeryError(f"{where} is true or false, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SurgeryError(f"{where} is a number, got {value!r}")
        value = self.type(value)
        if value != value:  # NaN
            raise SurgeryError(f"{where} is NaN")
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise SurgeryError(f"{where} = {value}: expected a value in [{self.low}, {self.high}]")
        return value


MethodFn = Callable[[list[torch.Tensor], list[float], "torch.Tensor | None", Mapping[str, Any]], torch.Tensor]


@dataclass(frozen=True)
class Method:
    name: str
    fn: MethodFn
    params: tuple[Param, ...] = ()
    needs_base: bool = False
    max_models: int | None = None
    paper: str = ""

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def resolve(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Declared defaults overridden by ``given``; an undeclared name or a bad value is a SurgeryError."""
        given = dict(given or {})
        unknown = [k for k in given if self.param(k) is None]
        if unknown:
            known = ", ".join(p.name for p in self.params) or "none"
            raise SurgeryError(f"merge method '{self.name}' has no parameter '{unknown[0]}' (its parameters: {known})")
        return {p.name: p.check(given[p.name], self.name) if p.name in given else p.default for p in self.params}


METHODS: dict[str, Method] = {}
_MODULES = ("linear", "slerp", "task_arithmetic", "ties")


def register_method(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def all_methods() -> dict[str, Method]:
    for mod in _MODULES:
        importlib.import_module(f"modelsurgery.ops.merge.{mod}")
    return METHODS


def get_method(name: str) -> Method:
    methods = all_methods()
    if name not in methods:
        raise SurgeryError(f"merge method '{name}': expected one of match, {', '.join(sorted(methods))}")
    return methods[name]
