"""Family registry: ``detect_family(ckpt)`` names what a checkpoint holds.

Each family lives in its own module and registers itself with ``@register``; importing this
package imports them all. Detection uses tensor names, shapes and config.json only; ``detect_family``
also refuses another tool's quantized tensors (``checkpoint.foreign``: names and dtypes from the headers).

One rule keeps ``surgery inspect`` and detection free of torch: ``families/<name>.py`` describes a
family (detection, blocks, roles, config.json -> settings) and imports no torch at module level; the
torch modules it runs live in ``families/modules/<name>.py`` and are imported by the methods that
build or feed them (``build_module``, ``example_inputs``).
"""

from __future__ import annotations

import importlib

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.checkpoint.foreign import foreign_quantization
from modelsurgery.errors import SurgeryError
from modelsurgery.families.base import Attention, Block, Family, Linear, Norm, Stages

_REGISTRY: dict[str, type[Family]] = {}
_MODULES = ("mlp", "cnn", "resnet", "gpt2", "decoder_family", "bert", "custom")


def register(cls: type[Family]) -> type[Family]:
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    for mod in _MODULES:
        try:
            importlib.import_module(f"modelsurgery.families.{mod}")
        except ModuleNotFoundError as e:  # a family module not written yet must not break the others
            if e.name != f"modelsurgery.families.{mod}":
                raise


def registered() -> dict[str, type[Family]]:
    _load_all()
    return dict(_REGISTRY)


class UnknownFamily(Family):
    """Any checkpoint: pure tensor operations work, forward passes do not. A checkpoint whose tensors
    follow a known decoder layout under another ``model_type`` (OLMo 2 with LLaMA's names) is not run
    as that family: the refusal names the closest one."""

    name = "unknown"
    runnable = False

    @classmethod
    def detect(cls, ckpt: Checkpoint) -> bool:
        return True

    @property
    def closest_family(self) -> str | None:
        from modelsurgery.families.decoder_family import closest_family

        return closest_family(self.ckpt)

    def not_runnable_reason(self) -> str:
        closest = self.closest_family
        if closest is None:
            return ("no known model family matches this checkpoint's tensors; pass --model "
                    "package.module:function to build it")
        model_type = self.config.get("model_type") or self.config.get("architectures")
        return (f"config.json model_type {model_type!r} is not a supported family; its tensor names follow "
                f"the '{closest}' layout (closest family: {closest}), but an unknown architecture is not run "
                "as a look-alike")

    def describe(self) -> dict:
        d = super().describe()
        if self.closest_family:
            d["closest_family"] = self.closest_family
        return d


def detect_family(ckpt: Checkpoint, model: str | None = None) -> Family:
    """The family of ``ckpt``; ``model`` ('package.module:function') forces a user factory.

    Every command that reads weights asks here first, so another tool's quantized checkpoint (bitsandbytes
    int8 codes under the float names, GPTQ/AWQ, HQQ, ... tensors) is refused here in one line naming the file
    and the format: none of them reads integer codes as float weights."""
    foreign = foreign_quantization(ckpt)
    if foreign is not None:
        qc = (ckpt.config or {}).get("quantization_config")
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        said = f" (config.json quantization_config: {method})" if isinstance(method, str) else ""
        raise SurgeryError(f"{ckpt.path}: {foreign}{said}; modelsurgery reads float weights: save the float model "
                           "with that tool, or `surgery dequantize` a GPTQ or compressed-tensors folder")
    return identify_family(ckpt, model)


def identify_family(ckpt: Checkpoint, model: str | None = None) -> Family:
    """The family from names, shapes and config.json alone, whatever the tensors hold (``surgery inspect``
    describes any checkpoint; commands that read weights call ``detect_family``)."""
    if model:
        from modelsurgery.families.custom import CustomFamily

        return CustomFamily(ckpt, model)
    config = ckpt.config or {}
    kind, archs = config.get("model_type"), config.get("architectures")
    if kind is not None and not isinstance(kind, str):
        raise SurgeryError(f"{ckpt.path}: config.json model_type is not a string")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise SurgeryError(f"{ckpt.path}: config.json architectures is not a list of strings")
    candidates = [
        cls for cls in sorted(registered().values(), key=lambda c: -c.priority)
        if cls.name != "custom" and cls.detect(ckpt)
    ]
    return candidates[0](ckpt) if candidates else UnknownFamily(ckpt)


def family_by_name(name: str) -> type[Family]:
    fams = registered()
    if name not in fams:
        raise SurgeryError(f"unknown family '{name}' (known: {', '.join(sorted(fams))})")
    return fams[name]


__all__ = [
    "Attention",
    "Block",
    "Family",
    "Linear",
    "Norm",
    "Stages",
    "UnknownFamily",
    "detect_family",
    "family_by_name",
    "identify_family",
    "register",
    "registered",
]
