"""What an adapter method contributes to folding: its PEFT type, the tensor names it stores per
module, and how it turns a base weight into the adapted one. One file per method, registered here.

``fold_weight(site)`` returns the adapted weight in the stored layout, computed in float32, from the
base weight ``site.weight`` (float32, stored layout: (out, in), or (in, out) when ``site.transposed``,
as GPT-2's Conv1D). ``fold_bias(site, bias)`` returns the adapted bias (most methods leave it).
``weight_shape(shapes)`` says, from the shapes of a module's adapter tensors alone, the (out, in) shape
of the weight they update (None where the adapter does not fix a side), so a mismatched BASE is
refused before any tensor is read.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from modelsurgery.errors import SurgeryError


@dataclass
class Site:
    """One base tensor an adapter module updates."""

    tensor: str  # base tensor name
    module: str  # module name (tensor name without '.weight')
    weight: torch.Tensor  # float32, stored layout
    transposed: bool
    parts: dict[str, torch.Tensor]  # the adapter's tensors for this module, float32
    config: dict
    where: str  # the adapter folder, for messages

    def out_in(self) -> torch.Tensor:
        """The weight as (out, in)."""
        return self.weight.t() if self.transposed else self.weight

    def stored(self, out_in: torch.Tensor) -> torch.Tensor:
        return out_in.t() if self.transposed else out_in

    def fail(self, problem: str) -> SurgeryError:
        return SurgeryError(f"{self.where}: module '{self.module}' (base tensor '{self.tensor}'): {problem}")

    def require(self, *names: str) -> None:
        missing = [n for n in names if n not in self.parts]
        if missing:
            raise self.fail(f"adapter tensor '{self.module}.{missing[0]}' is missing")


@dataclass(frozen=True)
class Variant:
    peft_type: str
    parameter_names: tuple[str, ...]
    fold_weight: Callable[[Site], torch.Tensor]
    weight_shape: Callable[[dict[str, tuple[int, ...]]], tuple[int | None, int | None]]
    fold_bias: Callable[[Site, torch.Tensor], torch.Tensor] | None = None
    source: str = ""


VARIANTS: dict[str, Variant] = {}
_MODULES = ("lora", "miss", "lokr")


def register_variant(variant: Variant) -> Variant:
    VARIANTS[variant.peft_type] = variant
    return variant


def all_variants() -> dict[str, Variant]:
    for mod in _MODULES:
        importlib.import_module(f"modelsurgery.ops.adapters.{mod}")
    return VARIANTS


def variant_for(peft_type: str, where: str) -> Variant:
    variants = all_variants()
    key = str(peft_type).upper()
    if key not in variants:
        raise SurgeryError(
            f"{where}: adapter type '{peft_type}' is not supported (supported: {', '.join(sorted(variants))})"
        )
    return variants[key]


def config_value(config: dict, key: str, default):
    """A config field, with the method's PEFT default when the file leaves it out (or writes null)."""
    value = config.get(key)
    return default if value is None else value
