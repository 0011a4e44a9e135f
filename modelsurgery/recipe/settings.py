"""mergekit's parameter settings, evaluated per tensor (mergekit ``config.py``, ``evaluate_setting``).

A setting is a scalar, a gradient (a list of numbers interpolated over a slice's layers), or a
list of ``{filter, value}`` conditions where the first condition whose ``filter`` is a substring
of the tensor name (or is absent or ``*``) gives the value. A gradient at position t in [0, 1]
(layer i of n: t = i / (n - 1), t = 1 for a one-layer slice; embeddings and head: t = 0) is the
piecewise-linear interpolation of the list placed at equal spacing.
"""

from __future__ import annotations

import math
from typing import Any

from modelsurgery.errors import SurgeryError


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def read_numbers(setting: Any) -> Any:
    """``setting`` with numbers written as strings read as numbers: YAML 1.1 (PyYAML) reads ``1e-3`` (no dot)
    as a string, where mergekit's pydantic config takes it as the float 0.001."""
    if isinstance(setting, str):
        try:
            return float(setting)
        except ValueError:
            return setting
    if isinstance(setting, list):
        return [read_numbers(e) for e in setting]
    if isinstance(setting, dict) and "value" in setting:
        return {**setting, "value": read_numbers(setting["value"])}
    return setting


def check_setting(setting: Any, where: str) -> None:
    """Refuse a setting mergekit would not accept (or would silently misread)."""
    if isinstance(setting, bool):
        return
    if isinstance(setting, (int, float)) or (isinstance(setting, list) and setting and all(map(_is_number, setting))):
        bad = next((x for x in (setting if isinstance(setting, list) else [setting])
                    if isinstance(x, float) and not math.isfinite(x)), None)
        if bad is not None:  # a NaN weight makes every merged value NaN
            raise SurgeryError(f"{where}: {bad!r} is not a finite number")
        return
    if isinstance(setting, list) and setting and all(isinstance(e, dict) for e in setting):
        for cond in setting:
            extra = set(cond) - {"filter", "value"}
            if extra or "value" not in cond:
                raise SurgeryError(f"{where}: a condition has keys {sorted(cond)}; expected 'value' and an "
                                   "optional 'filter'")
            if cond.get("filter") is not None and not isinstance(cond["filter"], str):
                raise SurgeryError(f"{where}: filter {cond['filter']!r} is not a string")
            if isinstance(cond["value"], (list, dict)) and not (
                    isinstance(cond["value"], list) and all(_is_number(e) for e in cond["value"])):
                raise SurgeryError(f"{where}: a condition's value must be a number, true/false or a gradient list")
            check_setting(cond["value"], where)
        return
    raise SurgeryError(f"{where}: {setting!r} is not a number, a gradient list or a list of {{filter, value}}")


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """The value of ``setting`` for ``tensor_name`` at position ``t``; None when no condition matches."""
    if isinstance(setting, (bool, int, float)):
        return setting
    if all(_is_number(e) for e in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or (tensor_name and f in tensor_name):
            return evaluate_setting(cond["value"], tensor_name, t)
    return None


def is_gradient(setting: Any) -> bool:
    """Whether ``setting`` (or one of its conditions) varies over the layers: a list of two or more numbers."""
    if not isinstance(setting, list):
        return False
    if all(_is_number(e) for e in setting):
        return len(setting) > 1
    return any(isinstance(c, dict) and is_gradient(c.get("value")) for c in setting)


def layer_position(index: int, num_layers: int) -> float:
    """t of layer ``index`` in a slice of ``num_layers`` layers (mergekit's ``plan_slice``)."""
    return index / (num_layers - 1) if num_layers > 1 else 1.0
