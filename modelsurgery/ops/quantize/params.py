"""The parameters a quantization method declares (as AIMET's ``AdaroundParameters`` and mergekit's
merge methods do): name, type, default, help and where the default comes from.

A method lists its ``MethodParam`` s in ``WeightQuantizer.params``; that list is the one definition
of each default. The CLI builds its method flags from it (``--steps``, ``--reg-weight`` ...; a flag
left out takes the chosen method's default), ``resolve_params`` checks what the user gave against
it, and the provenance of every output records the resolved values. A later option that belongs to
the method (a GPTQ initialisation, a device, a preset) is one more ``MethodParam`` in the method's
list, never a second copy of a default elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from modelsurgery.errors import SurgeryError


@dataclass(frozen=True)
class MethodParam:
    name: str
    type: type
    default: Any
    help: str
    #: the paper or reference code the default comes from
    source: str = ""
    #: smallest accepted value (inclusive), or None
    minimum: float | None = None
    #: largest accepted value (inclusive), or None
    maximum: float | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def with_default(self, default: Any, source: str) -> MethodParam:
        """The same parameter with another method's default (one help text, several defaults)."""
        return replace(self, default=default, source=source)

    def check(self, value: Any) -> Any:
        """``value`` converted to the declared type; SurgeryError naming the flag when it is not valid."""
        try:
            if self.type is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            converted = self.type(value)
        except (TypeError, ValueError):
            raise SurgeryError(f"{self.flag} {value!r}: expected {self.type.__name__}") from None
        if self.minimum is not None and converted < self.minimum:
            raise SurgeryError(f"{self.flag} {converted}: must be at least {self.minimum}")
        if self.maximum is not None and converted > self.maximum:
            raise SurgeryError(f"{self.flag} {converted}: must be at most {self.maximum}")
        return converted


# ----- the parameters several methods share (each method gives its own default) -----------------
STEPS = MethodParam("steps", int, 0, "Reconstruction steps per block (Adam updates; signed steps for "
                  "flexround-signsgd).", minimum=0)
LR = MethodParam("lr", float, 0.0, "Learning rate of the learned rounding parameters (Adam's; for "
               "flexround-signsgd the signed step, 0 meaning 2^(2 - bits) / sqrt(50 x steps)).", minimum=0.0)
BATCH_SIZE = MethodParam("batch_size", int, 32, "Calibration samples per reconstruction step (and per forward "
                         "pass when measuring block errors).", minimum=1)


@dataclass(frozen=True)
class Preset:
    """``--preset NAME`` of the learned methods: the reconstruction steps, calibration samples and batch
    size used where the user sets none of their own."""

    name: str
    samples: int
    #: None keeps each method's declared batch size
    batch_size: int | None
    #: where the values come from
    source: str
    #: method name -> its own "steps" (left out: the method's declared steps) and, where its reference
    #: recipe differs from the above, its own "samples" and "batch_size"
    methods: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    def for_method(self, name: str) -> tuple[int | None, int, int | None]:
        """(steps, samples, batch size) this preset gives ``name``; None keeps the method's declared value."""
        own = self.methods.get(name, {})
        return own.get("steps"), own.get("samples", self.samples), own.get("batch_size", self.batch_size)


#: AutoRound's recipes for its SignRound (``auto_round/cli/main.py`` RECIPES: light = 50 iters, default =
#: 200, best = 1000 iters on 512 samples; always batch 8 and 128 samples otherwise), used by flexround-signsgd
_SIGNROUND_SOURCE = ("flexround-signsgd: AutoRound's recipes (auto_round/cli/main.py RECIPES: light 50 iters, default "
                     "200, best 1000 iters and 512 samples; 128 samples and batch 8 otherwise)")

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("fast", 64, 8,
           "this project's: 1/20 of each method's declared steps, 64 samples in batches of 8, so a block trains "
           "in about 1/80 of the default's sample-steps; the trade-off is measured by benchmarks/bench_presets.py; "
           + _SIGNROUND_SOURCE,
           {"flexround": {"steps": 250}, "adaround": {"steps": 500},
            "flexround-signsgd": {"steps": 50, "samples": 128}}),
    Preset("default", 128, None,
           "each method's declared steps and batch size (its paper's or reference code's, above); 128 samples"),
    Preset("best", 1024, 32,
           "BRECQ's main_imagenet.py (iters_w 20000, num_samples 1024) and block_reconstruction (batch 32); "
           + _SIGNROUND_SOURCE,
           {"flexround": {"steps": 20_000}, "adaround": {"steps": 20_000},
            "flexround-signsgd": {"steps": 1000, "samples": 512, "batch_size": 8}}),
)}


def resolve_params(method_name: str, declared: Iterable[MethodParam], given: Mapping[str, Any]) -> dict[str, Any]:
    """Every declared parameter's value: ``given`` (checked) where set and not None, else its default.

    A parameter the method does not declare is refused in one line naming the flag and the method."""
    declared = {p.name: p for p in declared}
    for name, value in given.items():
        if value is not None and name not in declared:
            flag = "--" + name.replace("_", "-")
            own = ", ".join(p.flag for p in declared.values()) or "none"
            raise SurgeryError(f"{flag}: not a parameter of --method {method_name} (its parameters: {own})")
    return {name: p.check(given[name]) if given.get(name) is not None else p.default
            for name, p in declared.items()}


def all_params(methods: Iterable[type]) -> dict[str, list[tuple[str, MethodParam]]]:
    """Parameter name -> [(method name, its declaration)] over ``methods``, for building CLI flags."""
    out: dict[str, list[tuple[str, MethodParam]]] = {}
    for m in methods:
        for p in m.params:
            out.setdefault(p.name, []).append((m.name, p))
    return out
